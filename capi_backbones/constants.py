"""Constants shared across the package (one place, UPPER_CASE)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PATCH_SIZE = 14
N_REGISTERS = 16
DEFAULT_IMAGE_SIZE = 224
MAX_IMAGE_SIZE = 7168  # 512 patches a side (262,144 tokens): the largest image size a run may ask for

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
