"""The size policy, bicubic resizing and ImageNet normalisation applied before the model.

Size policy (one rule, used everywhere):

- ``keep_aspect=True`` (default): scale the image so that its **shorter side is** ``image_size`` pixels, then round
  the longer side to the nearest multiple of the patch size (14). ``image_size`` itself must be a multiple of the
  patch size, so the shorter side is exact and the aspect ratio is kept up to at most half a patch (7 px) on the
  longer side. Small images are scaled up, large ones down.
- Size cap (``keep_aspect=True``): an image whose longer side is more than ``MAX_ASPECT_RATIO`` (10) times its
  shorter side is refused with a ValueError naming its size (``extract_to_disk`` records it as failed and goes on):
  its processed longer side would exceed 10 x ``image_size`` (a 20 x 10000 image would become a 224 x 112000
  input). Crop such images, or use ``keep_aspect=False``. Decoding itself is capped by Pillow's decompression-bomb
  limit (about 179 megapixels).
- ``keep_aspect=False``: resize to a fixed ``image_size x image_size`` square (the aspect ratio is not kept; every
  image gets the same patch grid, so any set of images can be batched together).

Resizing is bicubic with antialiasing (``torch.nn.functional.interpolate``): on uint8 pixels for decoded images,
arrays and uint8 tensors (rounded to uint8, as PIL does), on float pixels for float tensors (clamped to [0, 1]);
then pixels are scaled to [0, 1] and normalised with the ImageNet mean and std.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from capi_backbones.constants import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_SIZE,
    PATCH_SIZE,
)
from capi_backbones.models import nearest_valid_sizes

__all__ = ["MAX_ASPECT_RATIO", "Preprocessor", "resize_and_normalize"]


@dataclass(frozen=True)
class Preprocessor:
    """Maps a raw RGB image tensor (3, h, w) (uint8, or float in [0, 1]) to the model input (3, H, W)."""

    image_size: int = DEFAULT_IMAGE_SIZE  # shorter side (keep_aspect) or square side, a multiple of patch_size
    patch_size: int = PATCH_SIZE  # both output sides are multiples of it
    keep_aspect: bool = True  # False: fixed image_size x image_size square
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        size, patch = self.image_size, self.patch_size
        if not isinstance(size, int) or size < patch or size % patch:
            nearest = " or ".join(str(s) for s in nearest_valid_sizes(int(self.image_size), self.patch_size))
            raise ValueError(
                f"image_size must be a positive multiple of the patch size {self.patch_size}, got {self.image_size}. "
                f"Nearest valid: {nearest}."
            )
        if size > MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size {size} is larger than {MAX_IMAGE_SIZE} ({MAX_IMAGE_SIZE // patch} patches a side), the "
                "largest accepted: the model's memory grows with the square of the number of patches."
            )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The processed (H, W) for an input of (height, width) pixels."""
        if not self.keep_aspect:
            return self.image_size, self.image_size
        scale = self.image_size / min(height, width)
        return self._round_to_patch(height * scale), self._round_to_patch(width * scale)

    def _round_to_patch(self, size: float) -> int:
        return max(self.patch_size, math.floor(size / self.patch_size + 0.5) * self.patch_size)  # ties round up

    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError for an image the size cap refuses (see the module docstring)."""
        if not self.keep_aspect:
            return
        short, long = min(height, width), max(height, width)
        if long > MAX_ASPECT_RATIO * short:
            raise ValueError(
                f"Image of {height}x{width} pixels is more than {MAX_ASPECT_RATIO} times longer than wide, the limit "
                f"with keep_aspect (it would become a {self.image_size}x{self.image_size * long // short} px input). "
                "Crop it, or resize to a square (keep_aspect=False, --square)."
            )

    def __call__(self, image: Tensor) -> Tensor:
        self.check_size(*image.shape[-2:])
        return resize_and_normalize(image, self.output_size(*image.shape[-2:]), mean=self.mean, std=self.std)


def resize_and_normalize(
    image: Tensor,
    size: tuple[int, int],
    *,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> Tensor:
    """Bicubic antialiased resize of an RGB image (3, h, w) to ``size`` = (H, W), then ``(x / 255 - mean) / std``
    for uint8 images (resized as uint8, rounded like PIL: the fast path) or ``(x - mean) / std`` for float images
    in [0, 1] (resized as float, clamped to [0, 1]). Returns float32 (3, H, W)."""
    resize = tuple(image.shape[-2:]) != tuple(size)
    if image.dtype == torch.uint8:
        if resize:  # uint8 in, uint8 out: the vectorised channels-last kernel, ~10x faster than float
            image = F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
        pixels = image.float() / 255.0
    else:
        pixels = image.float()
        if resize:
            pixels = F.interpolate(pixels[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
            pixels = pixels.clamp_(0.0, 1.0)  # bicubic overshoots at edges
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()
