"""Image inputs: finding image files, decoding them, and turning any accepted input into RGB uint8 tensors.

Accepted inputs (see :func:`expand_inputs` and :func:`to_rgb_tensor`):

- ``PIL.Image.Image`` in any common mode (see :func:`pil_to_rgb`);
- a path (``str`` or ``pathlib.Path``) to an image file, or to a directory searched recursively for files with
  an image extension (see :func:`capi_backbones.images.find_image_files`);
- a numpy ``uint8`` array of shape (H, W) (grayscale), (H, W, 1), (H, W, 3) (RGB) or (H, W, 4) (RGBA, alpha dropped);
- a torch tensor of shape (C, H, W) or (B, C, H, W) with C = 1 or 3, either ``uint8`` in [0, 255] or floating point
  in [0, 1]. Tensors hold *raw* RGB pixels: the extractor resizes and normalises them (do not pass normalised ones).

Files are found and decoded by :mod:`capi_backbones.images`, the pipeline training and evaluation use too (hidden
files skipped, links named as given, EXIF orientation applied, colour modes converted, a pixel cap). PIL images get
the same mode conversions and their EXIF orientation, if they still carry the tag.
"""

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from capi_backbones.images import (
    UnreadableFolder,
    check_regular_file,
    expand_path,
    find_image_files,
    is_image_path,
    load_image,
    pil_to_rgb,
)

__all__ = [
    "ImageSource",
    "check_regular_file",
    "expand_inputs",
    "find_image_files",
    "is_image_path",
    "iter_file_paths",
    "load_image",
    "pil_to_rgb",
    "to_rgb_tensor",
]

ImageSource = Image.Image | str | os.PathLike | np.ndarray | Tensor

EXIF_ORIENTATION = 0x0112
_ACCEPTED = "PIL images, image paths, directories, numpy uint8 arrays (H, W[, C]) and torch tensors ([B,] C, H, W)"


def expand_inputs(
    inputs: ImageSource | Sequence[ImageSource], *, unreadable: list[UnreadableFolder] | None = None
) -> list[ImageSource]:
    """Flatten the user's inputs into a list with one entry per image, in input order.

    A single input or a list of them; directories expand to their image files (see
    :func:`capi_backbones.images.expand_path`), (B, C, H, W) tensors to B images. Raises FileNotFoundError for a
    missing path, ValueError for an empty directory, a file without an image extension, or no inputs at all; a
    sub-folder that cannot be listed raises, or is appended to ``unreadable`` (a list) when given.
    """
    items = [inputs] if _is_single_input(inputs) else list(inputs)
    if not items:
        raise ValueError(f"No images given. Pass one or a list of: {_ACCEPTED}.")
    expanded: list[ImageSource] = []
    for item in items:
        if isinstance(item, str | os.PathLike):
            expanded.extend(expand_path(item, unreadable=unreadable))
        elif isinstance(item, Tensor) and item.ndim == 4:
            expanded.extend(item.unbind(0))
        elif isinstance(item, Image.Image | np.ndarray | Tensor):
            expanded.append(item)
        else:
            raise TypeError(f"Unsupported image input of type {type(item).__name__}. Accepted: {_ACCEPTED}.")
    return expanded


def _is_single_input(inputs) -> bool:
    return isinstance(inputs, Image.Image | str | os.PathLike | np.ndarray | Tensor)


def _apply_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip a PIL image as its EXIF orientation tag says (a no-op without the tag)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_rgb_tensor(source: ImageSource) -> Tensor:
    """One image as an RGB uint8 tensor (3, H, W) (or float32 in [0, 1] for float tensor inputs).

    Decodes paths, converts PIL modes, validates array and tensor shapes, dtypes and value ranges.
    """
    if isinstance(source, str | os.PathLike):
        source = load_image(source)
    if isinstance(source, Image.Image):
        source = np.asarray(pil_to_rgb(_apply_orientation(source)))
    if isinstance(source, np.ndarray):
        return _array_to_tensor(source)
    if isinstance(source, Tensor):
        return _check_tensor(source)
    raise TypeError(f"Unsupported image input of type {type(source).__name__}. Accepted: {_ACCEPTED}.")


def _array_to_tensor(array: np.ndarray) -> Tensor:
    if array.dtype != np.uint8:
        raise TypeError(
            f"Expected a uint8 numpy image, got dtype {array.dtype}. Convert it, e.g. "
            "(array * 255).round().astype(np.uint8) for floats in [0, 1], or pass a float torch tensor (C, H, W)."
        )
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W, 1)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) == 0:
        raise ValueError(
            f"Expected a numpy image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}. "
            "Channels go last (HWC); use array.transpose(1, 2, 0) for a CHW array."
        )
    rgb = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]  # (H, W, 3), alpha dropped
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W), a copy: the input may be read-only


def _check_tensor(tensor: Tensor) -> Tensor:
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3) or min(tensor.shape[1:]) == 0:
        raise ValueError(
            f"Expected an image tensor of shape (C, H, W) or (B, C, H, W) with C = 1 or 3, got {tuple(tensor.shape)}. "
            "Channels go first; use tensor.permute(2, 0, 1) for an HWC tensor."
        )
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.uint8:
        pass
    elif tensor.is_floating_point():
        if not torch.isfinite(tensor).all():
            raise ValueError(
                "Float image tensor holds NaN or infinite values. Pass raw pixels in [0, 1] (or a uint8 tensor)."
            )
        low, high = tensor.min().item(), tensor.max().item()
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Float image tensors must hold raw pixels in [0, 1], got values in [{low:.3g}, {high:.3g}]. "
                "Pass un-normalised images (the extractor normalises them) or a uint8 tensor."
            )
        tensor = tensor.float()
    else:
        raise TypeError(f"Expected a uint8 or floating point image tensor, got {tensor.dtype}.")
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def iter_file_paths(sources: Iterable[ImageSource]) -> list[Path]:
    """The file paths among ``sources``; raises TypeError if any source is not a path."""
    paths = []
    for source in sources:
        if not isinstance(source, str | os.PathLike):
            raise TypeError(
                f"Writing features to disk needs image files or directories (names are recorded for resuming), "
                f"got a {type(source).__name__}. Save the images to files first, or use FeatureExtractor.extract()."
            )
        paths.append(Path(source))
    return paths
