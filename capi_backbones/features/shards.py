"""One shard of saved features: writing it atomically and reading it back.

A shard holds the features of up to ``shard_size`` images that share one processed size:

- ``format="safetensors"``: one file ``shard_00000.safetensors`` with tensors ``patch_features`` (N, h, w, D),
  ``registers`` (N, 16, D) and, when pooling ran, ``pooled`` (N, D_pred); its metadata holds ``files`` (a JSON list
  of the image names, in row order), ``grid_size`` and ``image_size`` (JSON lists).
- ``format="npy"``: a folder ``shard_00000/`` with ``patch_features.npy``, ``registers.npy``, optional
  ``pooled.npy`` and ``files.json`` (``{"files": [...], "grid_size": [h, w], "image_size": [H, W]}``).

Both are written under a hidden temporary name in the same folder (``capi_backbones.atomic_files``, which also sets
the file modes) and renamed into place, so a shard either exists whole or not at all. Write errors (disk full, no
permission) are OSErrors with their errno and the file name.
"""

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import Tensor

from capi_backbones.atomic_files import atomic_folder, atomic_path
from capi_backbones.constants import SHARD_FORMATS

__all__ = [
    "FORMATS",
    "NPY_SHARD_FILES",
    "SavedShard",
    "checksum_of_bytes",
    "checksum_of_files",
    "read_shard",
    "shard_checksum",
    "write_shard",
]

FORMATS = dict(zip(SHARD_FORMATS, (".safetensors", ""), strict=True))  # format -> shard name suffix
ARRAY_NAMES = ("patch_features", "registers", "pooled")
NPY_SHARD_FILES = frozenset({*(f"{name}.npy" for name in ARRAY_NAMES), "files.json"})  # all an npy shard holds


@dataclass
class SavedShard:
    """The contents of one shard. ``files`` names the rows, relative to the index's ``root``."""

    files: list[str]
    patch_features: Tensor  # (N, h, w, D)
    registers: Tensor  # (N, R, D)
    pooled: Tensor | None  # (N, D_pred) or None
    grid_size: tuple[int, int]
    image_size: tuple[int, int]


def write_shard(path: Path, shard: SavedShard, *, format: str) -> str:
    """Write ``shard`` to ``path`` (``.../shard_00000.safetensors`` or ``.../shard_00000``) atomically. Returns the
    checksum of what was written (``capi_backbones.features.index.shard_checksum`` of the final shard)."""
    tensors = {name: getattr(shard, name).contiguous() for name in ARRAY_NAMES if getattr(shard, name) is not None}
    description = {"files": shard.files, "grid_size": list(shard.grid_size), "image_size": list(shard.image_size)}
    if format == "safetensors":
        metadata = {key: json.dumps(value) for key, value in description.items()}
        data = save(tensors, metadata=metadata)
        with ThreadPoolExecutor(1) as pool:  # hashing (which frees the GIL) runs while the file is written
            checksum = pool.submit(checksum_of_bytes, data)  # the bytes in memory: no second read of the file
            with atomic_path(path) as tmp:
                write_bytes(tmp, data)
            return checksum.result()
    if format == "npy":
        with atomic_folder(path) as tmp:  # fails if the folder exists: ShardWriter never reuses a shard name
            return _write_npy_folder(tmp, tensors, description)
    raise ValueError(f"Unknown shard format '{format}'. Choose one of {list(FORMATS)}.")


def checksum_of_bytes(data: bytes) -> str:
    """The checksum recorded for a shard file: ``sha256:<hex>`` of its bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def checksum_of_files(files: dict[str, bytes]) -> str:
    """The checksum recorded for an npy shard folder holding ``files`` (name -> bytes): SHA-256 over each file's
    name, size and SHA-256, in name order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{len(files[name])}\0".encode())
        digest.update(hashlib.sha256(files[name]).digest())
    return "sha256:" + digest.hexdigest()


def shard_checksum(path: Path) -> str:
    """The checksum of a shard on disk (:func:`checksum_of_bytes` of a file, :func:`checksum_of_files` of an npy
    shard folder), to compare with the one recorded when it was written."""
    if not path.is_dir():
        with open(path, "rb") as handle:
            return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()
    return checksum_of_files({file.name: file.read_bytes() for file in path.iterdir()})


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with Python's file I/O, so that a full disk raises OSError(ENOSPC) naming the file
    (safetensors' own writer raises its SafetensorError instead)."""
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as error:
        if error.filename is None:  # a failed write() names no file
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def _write_npy_folder(folder: Path, tensors: dict[str, Tensor], description: dict) -> str:
    """Each file is serialised in memory and written by :func:`write_bytes`: numpy's own writer reports a full disk
    as "N requested and M written", an OSError without errno or file name. Returns the folder's checksum."""
    files = {}
    for name, tensor in tensors.items():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy())
        files[f"{name}.npy"] = buffer.getvalue()
    files["files.json"] = json.dumps(description).encode()
    for name, data in files.items():
        write_bytes(folder / name, data)
    return checksum_of_files(files)


def read_shard(path: str | os.PathLike) -> SavedShard:
    """Read a shard written by :func:`write_shard` (a ``.safetensors`` file or an npy shard folder)."""
    path = Path(path)
    if path.is_dir():
        description = json.loads((path / "files.json").read_text())
        arrays = {
            name: torch.from_numpy(np.load(path / f"{name}.npy"))
            for name in ARRAY_NAMES
            if (path / f"{name}.npy").exists()
        }
    else:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            description = {key: json.loads(value) for key, value in handle.metadata().items()}
        arrays = load_file(path)
    return SavedShard(
        files=description["files"],
        patch_features=arrays["patch_features"],
        registers=arrays["registers"],
        pooled=arrays.get("pooled"),
        grid_size=tuple(description["grid_size"]),
        image_size=tuple(description["image_size"]),
    )
