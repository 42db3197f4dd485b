"""ShardWriter: collects per-image features into shards on disk and keeps the resumable index.

Layout of an output folder::

    out_dir/
      index.json               # the manifest, rewritten atomically after every shard
      shard_00000.safetensors  # or shard_00000/ (npy format), see capi_backbones.features.shards
      shard_00001.safetensors
      ...

``index.json``::

    {"version": 1, "format": "safetensors", "dtype": "float32",
     "root": "/abs/folder",                      # image names are POSIX paths relative to it
     "settings": {"model": ..., "config": {...}, "weights_fingerprint": ..., "image_size": 224, ...},
     "shards": [{"name": "shard_00000.safetensors", "count": 256, "grid_size": [16, 16],
                 "image_size": [224, 224], "files": ["a/1.jpg", ...]}, ...],
     "failed": [{"file": "b/broken.jpg", "error": "Cannot read image ..."}]}

An image is done once it is listed in a shard of the index; shards are only listed after they are renamed into
place, so a crash loses at most the images not yet in a shard.
"""

import json
import logging
import os
import re
from pathlib import Path

import torch

from capi_backbones.atomic_files import atomic_write_text
from capi_backbones.features.output import FeatureOutput
from capi_backbones.features.shards import FORMATS, SavedShard, read_shard, write_shard

__all__ = ["DEFAULT_SHARD_SIZE", "INDEX_NAME", "STORAGE_DTYPES", "ShardWriter", "load_index", "load_saved_features"]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1
DEFAULT_SHARD_SIZE = 256
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
INFORMATIONAL_SETTINGS = ("model",)  # recorded, not compared on resume (the same file may be named differently)
MAX_PENDING_SHARDS = 2  # images held in memory, in shards; then the fullest bucket is written as a smaller shard
_SHARD_NAME = re.compile(r"^shard_(\d+)(\.safetensors)?$")


class ShardWriter:
    """Buckets single-image features by processed size and writes a shard whenever a bucket is full.

    Memory is bounded: when ``MAX_PENDING_SHARDS * shard_size`` images wait in buckets (many different sizes),
    the fullest bucket is written early, as a shard of fewer than ``shard_size`` images.

    ``settings`` describes how features are made (model, image size, ...); resuming into a folder whose index has
    other settings, format or dtype raises a ValueError. ``root`` is used only when the index is new.
    """

    def __init__(self, out_dir: Path, *, format: str, shard_size: int, dtype: str, settings: dict, root: Path) -> None:
        if format not in FORMATS:
            raise ValueError(f"Unknown format '{format}'. Choose one of {list(FORMATS)}.")
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}.")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"Unknown storage dtype '{dtype}'. Choose one of {list(STORAGE_DTYPES)}.")
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"Output path '{out_dir}' exists and is not a directory.")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.format, self.shard_size, self.dtype = out_dir, format, shard_size, dtype
        self.index_path = out_dir / INDEX_NAME
        new_index = {"version": INDEX_VERSION, "format": format, "dtype": dtype, "settings": settings}
        if self.index_path.exists():
            self.index = load_index(out_dir)
            self._check_compatible(new_index)
        else:
            self.index = {**new_index, "root": str(root), "shards": [], "failed": []}
        self.root = Path(self.index["root"])
        self.done = {self._path_of(name) for shard in self.index["shards"] for name in shard["files"]}
        self.failed = {entry["file"]: entry["error"] for entry in self.index["failed"]}
        self.shards_written: list[str] = []
        self._pending: dict[tuple[int, int], list[tuple[str, FeatureOutput]]] = {}
        self._next_number = 1 + max(
            (int(m.group(1)) for m in (_SHARD_NAME.match(p.name) for p in out_dir.iterdir()) if m), default=-1
        )

    def _check_compatible(self, new_index: dict) -> None:
        old = {key: self.index.get(key) for key in new_index}
        diffs = [
            f"{key}: {old[key]!r} vs {new_index[key]!r}"
            for key in ("version", "format", "dtype")
            if old[key] != new_index[key]
        ]
        old_settings = {k: v for k, v in (old["settings"] or {}).items() if k not in INFORMATIONAL_SETTINGS}
        new_settings = {k: v for k, v in new_index["settings"].items() if k not in INFORMATIONAL_SETTINGS}
        diffs += [
            f"{key}: {old_settings.get(key)!r} vs {new_settings.get(key)!r}"
            for key in sorted(set(old_settings) | set(new_settings))
            if old_settings.get(key) != new_settings.get(key)
        ]
        if not diffs:
            return
        raise ValueError(
            f"'{self.out_dir}' already holds features made differently ({'; '.join(diffs)}; saved vs now). "
            "Use another output folder, or delete this one to start over."
        )

    def _path_of(self, name: str) -> Path:
        return Path(os.path.normpath(self.root / name))

    def name_of(self, path: Path) -> str:
        """The recorded name of an absolute image path: POSIX, relative to the index root."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def add(self, path: Path, output: FeatureOutput) -> None:
        """Queue the features of one image (``output`` has batch size 1); writes a shard when a bucket fills."""
        name = self.name_of(path)
        self.failed.pop(name, None)
        bucket = self._pending.setdefault(output.image_size, [])
        bucket.append((name, output))
        if len(bucket) >= self.shard_size:
            self._write(self._pending.pop(output.image_size))
        elif sum(map(len, self._pending.values())) >= MAX_PENDING_SHARDS * self.shard_size:
            self._write(self._pending.pop(max(self._pending, key=lambda s: len(self._pending[s]))))

    def add_failure(self, path: Path, error: str) -> None:
        self.failed[self.name_of(path)] = error

    def finish(self) -> None:
        """Write all partly filled buckets and the final index."""
        for size in list(self._pending):
            self._write(self._pending.pop(size))
        self._save_index()

    def _write(self, bucket: list[tuple[str, FeatureOutput]]) -> None:
        joined = FeatureOutput.concatenate([output for _, output in bucket])
        dtype = STORAGE_DTYPES[self.dtype]
        shard = SavedShard(
            files=[name for name, _ in bucket],
            patch_features=joined.patch_features.to(dtype),
            registers=joined.registers.to(dtype),
            pooled=None if joined.pooled is None else joined.pooled.to(dtype),
            grid_size=joined.grid_size,
            image_size=joined.image_size,
        )
        shard_name = f"shard_{self._next_number:05d}{FORMATS[self.format]}"
        self._next_number += 1
        write_shard(self.out_dir / shard_name, shard, format=self.format)
        self.index["shards"].append(
            {
                "name": shard_name,
                "count": len(shard.files),
                "grid_size": list(shard.grid_size),
                "image_size": list(shard.image_size),
                "files": shard.files,
            }
        )
        self.done.update(self._path_of(name) for name in shard.files)
        self.shards_written.append(shard_name)
        self._save_index()
        logger.debug("Wrote %s (%d images of %s px).", shard_name, len(shard.files), shard.image_size)

    def _save_index(self) -> None:
        self.index["failed"] = [{"file": name, "error": error} for name, error in sorted(self.failed.items())]
        atomic_write_text(self.index_path, json.dumps(self.index, indent=1))


def load_index(out_dir: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of an extraction folder."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {INDEX_NAME} in '{out_dir}': not a folder written by extract_to_disk.")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"'{path}' is not valid JSON ({error}). Delete the folder to start over.") from error
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"'{path}' has index version {index.get('version')!r}; this library reads {INDEX_VERSION}.")
    return index


def load_saved_features(out_dir: str | os.PathLike) -> list[SavedShard]:
    """Every shard listed in ``out_dir/index.json``, in writing order (rows named by ``SavedShard.files``)."""
    index = load_index(out_dir)
    return [read_shard(Path(out_dir) / shard["name"]) for shard in index["shards"]]
