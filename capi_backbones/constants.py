"""Constants shared across the package (one place, UPPER_CASE).

The library's defaults that the command line also shows live here (those of the evaluation protocols in
``capi_backbones.evals.defaults``): the library's signatures and the CLI's options both read them, and the CLI can
without importing torch. ``tests/test_cli_defaults.py`` checks that each option's default is its library argument's.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PATCH_SIZE = 14
N_REGISTERS = 16
DEFAULT_IMAGE_SIZE = 224
MAX_IMAGE_SIZE = 7168  # 512 patches a side (262,144 tokens): the largest image size a run may ask for
MAX_ASPECT_RATIO = 10  # longer side / shorter side of an image accepted when its shape is kept (features.preprocessing)

NORM_EPS = 1e-5
ROPE_MAX_FREQ = 7.0
ROPE_MIN_FREQ = 7e-4

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Exit codes of every command (``capi-backbones ...`` and ``python -m capi_backbones.train``)
EXIT_INPUTS_FAILED = 1  # finished, but some inputs could not be used (they are named); train: non-finite losses
EXIT_USAGE = 2  # usage or input error
EXIT_ENVIRONMENT = 3  # the machine stopped the command: disk full, no permission, a missing optional dependency

# Downloads of weights (capi_backbones.pretrained.download; the CLI's --download-timeout)
DOWNLOAD_DEADLINE_S = 3600.0  # the whole download (1.2 GB needs about 3 Mbit/s to make it); $CAPI_DOWNLOAD_TIMEOUT
DOWNLOAD_TIMEOUT_ENV = "CAPI_DOWNLOAD_TIMEOUT"  # seconds a whole download may take (default DOWNLOAD_DEADLINE_S)

# Feature extraction (capi_backbones.features; the CLI's extract, pca, explore and eval options)
DEFAULT_BATCH_SIZE = 16  # FeatureExtractor's images per forward pass; --batch-size
DEFAULT_SHARD_SIZE = 256  # images per shard written by extract_to_disk; --shard-size
SHARD_FORMATS = ("safetensors", "npy")  # extract_to_disk's shard formats (--format)
DEFAULT_SHARD_FORMAT = "safetensors"
STORAGE_DTYPE_NAMES = ("float32", "float16")  # the dtypes extract_to_disk stores features in (--dtype)
DEFAULT_STORAGE_DTYPE = "float32"
CLI_DECODE_WORKERS = 2  # the CLI's --workers: image decoding processes (FeatureExtractor's num_workers defaults to 0)

# PCA pictures (capi_backbones.viz; ``capi-backbones pca``)
N_RGB = 3  # components shown as the RGB picture, and the heatmap columns drawn by default (--components)
PCA_VALUE_RANGE = 2.3  # whitened values in [-r, r] map to [0, 1]
PCA_TILE_HEIGHT = 224  # height of each picture of the grid in pixels (--tile-height)
PCA_MIN_TILE_HEIGHT = 16
RESAMPLE_NAMES = ("nearest", "bilinear", "bicubic")  # upsampling of the maps (--resample); nearest keeps patches crisp
DEFAULT_RESAMPLE = "nearest"

# Feature explorer page (capi_backbones.viz.explore; ``capi-backbones explore``)
EXPLORER_MAX_PHOTOS = 64  # cards in one page
EXPLORER_MAX_PATCHES = 96 * 16 * 16  # patches per model over all photos: 64 photos of 3:2 aspect at 224 px (24576)
EXPLORER_MAX_STORED_VALUES = 2**25  # feature values over all models: 64 MiB of float16, about 90 MB of page
EXPLORER_TITLE = "CAPI feature explorer"

# Exported graphs (capi_backbones.export; ``capi-backbones export-onnx``, ``export-torch``)
EXPORT_OUTPUTS = ("pooled", "registers", "patch_features")  # the graph's outputs, in this order
# ``capi-backbones export`` (a run's teacher): suffix -> format
TEACHER_EXPORT_FORMATS = {".safetensors": "safetensors", ".pth": "official", ".pt": "official"}
MIN_ONNX_OPSET = 18  # torch's ONNX exporter writes opset 18 when asked for less, without an error
