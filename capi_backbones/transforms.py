"""Image crops and resizes shared by training and evaluation (so neither imports the other).

- ``TrainTransform``: torchvision's RandomResizedCrop (bicubic, on the PIL image) + optional flip + ImageNet
  normalisation, its randomness drawn from a generator (pretraining, and the probes' ``--augment``).
- ``center_crop``: the official evaluation crop, ``Resize(256)`` then ``CenterCrop(224)`` scaled to any image size
  (``CROP_RESIZE_RATIO`` = 256 / 224, written here once).

torchvision is imported on first use, so importing this module stays light.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from capi_backbones.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["CROP_RESIZE_RATIO", "CropBox", "TrainTransform", "center_crop", "random_resized_crop_box"]

CROP_RESIZE_RATIO = 256 / 224  # the official eval transform: Resize(256), CenterCrop(224), at any image size
TRAIN_EXTRA_HINT = "pip install 'capi-backbones[train]'"


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``int(size * 256 / 224)`` (bicubic, antialiased), then crop the center
    ``size`` x ``size`` square (torchvision's rounding)."""
    short = int(size * CROP_RESIZE_RATIO)
    width, height = image.size
    new_size = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    top = int(round((new_size[1] - size) / 2.0))
    left = int(round((new_size[0] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator,
) -> CropBox:
    """The box of torchvision's RandomResizedCrop (10 tries of a random area and log-uniform aspect ratio,
    then a centre crop with the ratio clamped), drawn from ``generator``."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_low + (log_high - log_low) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return CropBox(top, left, h, w)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def _transforms_v2():
    """torchvision's ``transforms.v2`` (imported on first use, so ``import capi_backbones.train`` stays light)."""
    try:
        from torchvision.transforms import v2
    except ImportError as error:
        raise ImportError(f"Training needs torchvision ({error}). Install it with: {TRAIN_EXTRA_HINT}") from None
    return v2


class TrainTransform:
    """RandomResizedCrop (bicubic, on the PIL image like the official pipeline), optional horizontal flip,
    then a float tensor normalised with the ImageNet mean and std. Randomness comes in as a generator."""

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.6, 1.0),
        hflip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.image_size = image_size
        self.crop_scale = crop_scale
        self.hflip = hflip
        self.mean = list(mean)
        self.std = list(std)
        _transforms_v2()  # fail here, with the install hint, rather than in a DataLoader worker

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Tensor:
        box = random_resized_crop_box(image.height, image.width, self.crop_scale, generator=generator)
        flip = bool(torch.rand(1, generator=generator) < 0.5)  # always drawn: the stream does not depend on hflip
        v2 = _transforms_v2()
        TF = v2.functional
        image = TF.resized_crop(
            image, box.top, box.left, box.height, box.width, [self.image_size, self.image_size],
            interpolation=v2.InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        if self.hflip and flip:
            image = TF.horizontal_flip(image)
        tensor = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)  # (3, S, S) in [0, 1]
        return TF.normalize(tensor, self.mean, self.std)
