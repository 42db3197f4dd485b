"""Constants shared across the package (one place, UPPER_CASE)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PATCH_SIZE = 14
N_REGISTERS = 16
DEFAULT_IMAGE_SIZE = 224

NORM_EPS = 1e-5
ROPE_MAX_FREQ = 7.0
ROPE_MIN_FREQ = 7e-4

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
