"""The one image pipeline of the package: finding image files and decoding them, for extraction, training, PCA and
evaluation alike (so every command sees the same files and the same pixels). No torch here.

**Finding** (:func:`find_image_files`): a folder is searched recursively for files whose extension (any case) is
in :data:`capi_backbones.constants.IMAGE_EXTENSIONS`. Hidden files and folders (names starting with a dot: macOS'
``._photo.jpg`` AppleDouble files, ``.cache/``, ``.git/``) are skipped. Links are followed, to files and to folders
(the layout of Hugging Face caches and git-annex), and files are named by the path under the searched folder, never
by their target: two links to one file are two images. A folder reached twice through links (a cycle) is searched
once. A sub-folder that cannot be listed is an error naming it (or, with ``unreadable=``, collected and skipped).
Entries that are not regular files (a FIFO or a device named ``*.jpg``) are found like files and refused, without
being opened, by the decoder.

**Decoding** (:func:`load_image`): only regular files are opened; the EXIF orientation is applied (phone photos
come out upright); every common mode becomes 8-bit RGB (:func:`pil_to_rgb`): palette (P, PA), grayscale (L, LA, 1),
CMYK and YCbCr through Pillow's conversions; the alpha channel of RGBA/LA/PA is dropped (colours are kept as stored,
not composited on a background); 16-bit (I;16*) and 32-bit integer (I) images holding values in [0, 65535] are
scaled to [0, 255] by ``round(v / 257)`` (65535 -> 255), never clipped; float (F) images must hold values in [0, 1].
Images of more than :data:`MAX_PIXELS` pixels are refused before their pixels are decoded (decompression bombs).
Every failure is an OSError or ValueError whose message names the file.
"""

import hashlib
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from capi_backbones.constants import IMAGE_EXTENSIONS

__all__ = [
    "MAX_PIXELS",
    "UnreadableFolder",
    "UnreadableFolderError",
    "check_regular_file",
    "expand_path",
    "file_stamp",
    "same_file_content",
    "find_image_files",
    "is_hidden",
    "is_image_path",
    "load_image",
    "pil_to_rgb",
]

# Pillow refuses images above twice its MAX_IMAGE_PIXELS (about 179 million pixels) as decompression bombs and
# warns above once; here the limit is one number, checked from the header, with one message and no warning.
MAX_PIXELS = 2 * 89_478_485
_SIXTEEN_BIT_MAX = 65535
_MODES_VIA_RGBA = ("P", "PA")  # palette images may carry transparency: expand it first, then drop it

UnreadableFolder = tuple[Path, str]  # (folder, why it could not be listed)


class UnreadableFolderError(OSError):
    """A folder among the inputs could not be listed (its errno kept: EACCES is an environment failure)."""

    def __init__(self, folder: Path, reason: str, errno: int | None) -> None:
        super().__init__(errno, reason, str(folder))
        self.message = f"Cannot list the folder '{folder}' ({reason}); fix its permissions or move it out."

    def __str__(self) -> str:
        return self.message


def is_image_path(path: str | os.PathLike) -> bool:
    """Whether the name has an image extension (any case); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    """Hidden names (a leading dot) are skipped by the finder: ``._a.jpg``, ``.DS_Store``, ``.cache``."""
    return name.startswith(".")


def find_image_files(directory: str | os.PathLike, *, unreadable: list[UnreadableFolder] | None = None) -> list[Path]:
    """Image files under ``directory`` (recursive; see the module docstring), folder by folder, each folder's files
    then its sub-folders in name order. Paths start with ``directory`` as given (links are not resolved).

    A sub-folder that cannot be listed raises a PermissionError (an OSError) naming it; with ``unreadable`` (a
    list), ``(folder, reason)`` is appended instead and the search goes on.
    """
    directory = Path(directory)
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of the folders searched: a link cycle is searched once

    def on_error(error: OSError) -> None:
        folder = Path(error.filename) if error.filename is not None else directory
        reason = error.strerror or str(error)
        if unreadable is None:
            raise UnreadableFolderError(folder, reason, error.errno) from None
        unreadable.append((folder, reason))

    for root, dirs, files in os.walk(directory, onerror=on_error, followlinks=True):
        try:
            info = os.stat(root)
        except OSError as error:
            on_error(error)
            dirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        found.extend(Path(root) / f for f in sorted(files) if not is_hidden(f) and is_image_path(f))
    return found


def expand_path(path: str | os.PathLike, *, unreadable: list[UnreadableFolder] | None = None) -> list[Path]:
    """The image files a path names: a folder's (:func:`find_image_files`) or the file itself. Raises
    FileNotFoundError for a missing path and ValueError for a folder without images or a file without an image
    extension, each naming the path. Nothing is opened but folders."""
    path = Path(path)
    if path.is_dir():
        found_unreadable: list[UnreadableFolder] = []
        files = find_image_files(path, unreadable=found_unreadable if unreadable is not None else None)
        if unreadable is not None:
            unreadable.extend(found_unreadable)
        if not files:
            locked = f"; {len(found_unreadable)} sub-folder(s) could not be listed" if found_unreadable else ""
            raise ValueError(
                f"No image files found in directory '{path}' (searched recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)}{locked})."
            )
        return files
    if not path.exists():
        raise FileNotFoundError(f"Image path '{path}' does not exist.")
    if not is_image_path(path):
        raise ValueError(
            f"'{path}' is not an image file: its extension '{path.suffix}' is not one of "
            f"{', '.join(IMAGE_EXTENSIONS)}. Convert it or leave it out."
        )
    return [path]


_STAMP_CHUNK = 1 << 16  # the file identity hash reads the first and the last 64 KiB


def file_stamp(path: str | os.PathLike) -> dict:
    """The identity of an image file, recorded with its features so that a file replaced in place is redone:
    ``{"size", "mtime_ns", "hash"}``, where ``hash`` is a BLAKE2b digest of the size and the first and last 64 KiB
    (cheap: two reads, whatever the file size). Raises OSError for a file that is not regular, without opening it.
    """
    check_regular_file(path)
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "hash": _head_tail_hash(handle, info.st_size)}


def _head_tail_hash(handle, size: int) -> str:
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    digest.update(handle.read(_STAMP_CHUNK))
    if size > _STAMP_CHUNK:
        handle.seek(max(_STAMP_CHUNK, size - _STAMP_CHUNK))
        digest.update(handle.read(_STAMP_CHUNK))
    return "blake2b:" + digest.hexdigest()


def same_file_content(path: str | os.PathLike, stamp: dict) -> bool | None:
    """Whether ``path`` still holds what ``stamp`` (from :func:`file_stamp`) describes: the same size and, unless
    the modification time is unchanged too, the same hash (a file touched or copied is the same; a file replaced
    by another of the same size is not). None when the file is gone or unreadable."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return None
        if info.st_size != stamp["size"]:
            return False
        if info.st_mtime_ns == stamp["mtime_ns"]:
            return True
        with open(path, "rb") as handle:
            return _head_tail_hash(handle, info.st_size) == stamp["hash"]
    except OSError:
        return None


def check_regular_file(path: str | os.PathLike) -> None:
    """Raise OSError naming ``path`` unless it is a regular file (or a link to one). Never opens it, so a FIFO or a
    device with an image extension cannot block the caller."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return
    kinds: list[tuple[Callable[[int], bool], str]] = [
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    raise OSError(f"Cannot read image '{path}': it is {kind}, not a regular file.")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to RGB with its EXIF orientation applied. Raises OSError/ValueError naming the file.

    Only regular files are opened: a FIFO or device named ``*.jpg`` is refused without reading it."""
    check_regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below is the one check
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ValueError(
                        f"{width} x {height} pixels, more than the {MAX_PIXELS:,} accepted (a decompression bomb?); "
                        "shrink it first"
                    )
                image = ImageOps.exif_transpose(image)  # returns a new, loaded image (or a copy)
                return pil_to_rgb(image)
    except Exception as error:  # decoders of broken files raise many types (OSError, SyntaxError, struct.error, ...)
        raise OSError(f"Cannot read image '{path}': {type(error).__name__}: {error}") from error


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any common PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_high_bit_depth_to_uint8(image)).convert("RGB")
    if mode in _MODES_VIA_RGBA:
        image = image.convert("RGBA")
    return image.convert("RGB")  # L, LA, 1, RGBA, RGBX, CMYK, YCbCr, ...: PIL's standard conversions


def _high_bit_depth_to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image)
    if image.mode == "F" and values.size and not np.isfinite(values).all():
        raise ValueError("F (float) image holds NaN or infinite values. Replace them before extracting features.")
    if image.mode == "F":
        low, high, scale = 0.0, 1.0, 255.0
    else:  # I;16, I;16B, I;16L, I;16N, I (16-bit PNG/TIFF data in a 32-bit container)
        low, high, scale = 0, _SIXTEEN_BIT_MAX, 255.0 / _SIXTEEN_BIT_MAX
    if values.size and (values.min() < low or values.max() > high):
        raise ValueError(
            f"{image.mode} image has values in [{values.min()}, {values.max()}], outside the supported range "
            f"[{low}, {high}]. Convert it to 8-bit RGB yourself first."
        )
    return np.round(values.astype(np.float64) * scale).astype(np.uint8)
