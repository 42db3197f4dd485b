"""ShardWriter: collects per-image features into shards on disk and keeps the resumable index.

The layout of the folder and of ``index.json`` is described in ``capi_backbones.features.index``.

An image is done once it is listed in a shard of the index; shards are only listed after they are renamed into
place, so a crash loses at most the images not yet in a shard.

**Many runs, many ranks.** One run writes a folder at a time (the run lock, an ``flock`` on the folder, see
``capi_backbones.features.folder_lock``: a second concurrent run refuses at once, nothing is lost). Within a
multi-rank run every rank writes shards with its own name suffix (``-r0001``) and its own manifest
``index.rankNNNNN.json``; rank 0 merges the manifests into ``index.json`` at the end. Whoever opens the folder next
(one process or any number of ranks) first merges manifests left by an interrupted run, so a resumed run needs no
knowledge of how many ranks came before.

**Resume does not trust the index.** Before a run, every listed shard must exist with the size and checksum
recorded at writing (the half of ``capi-backbones verify`` that does not decode shards). A missing, truncated or
damaged shard is dropped from the index with a
warning naming it, and its images are extracted again. Unlisted shard files and temporary files of interrupted
writes (names matching ours only) are deleted; the run lock guarantees that no other run is writing them.

**Failed images** are recorded with the file's size and modification time, and skipped by later runs (reported
again) unless the file changed or ``retry_failed=True`` (``--retry-failed``): an image that crashed the model is
not fed to it on every run.
"""

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from capi_backbones.atomic_files import atomic_write_text
from capi_backbones.constants import DEFAULT_SHARD_SIZE, STORAGE_DTYPE_NAMES
from capi_backbones.features.index import (
    INDEX_NAME,
    INDEX_VERSION,
    PART_NAME,
    SHARD_NAME,
    check_listed_shards,
    check_output_folder,
    check_shard_name,
    find_leftovers,
    load_index,
    load_manifest,
    load_saved_features,
    save_index,
    shard_bytes,
)
from capi_backbones.features.output import FeatureOutput
from capi_backbones.features.shards import FORMATS, NPY_SHARD_FILES, SavedShard, read_shard, write_shard
from capi_backbones.images import same_file_content

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "INDEX_NAME",
    "STORAGE_DTYPES",
    "ShardWriter",
    "check_writer_options",
    "load_index",
    "load_saved_features",
    "make_folder",
    "merge_rank_manifests",
    "prepare_folder",
]

logger = logging.getLogger(__name__)

STORAGE_DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPE_NAMES}
INFORMATIONAL_SETTINGS = ("model",)  # recorded, not compared on resume (the same file may be named differently)
MAX_PENDING_SHARDS = 2  # images held in memory, in shards; then the fullest bucket is written as a smaller shard


def check_writer_options(*, format: str, shard_size: int, dtype: str) -> None:
    """Raise a ValueError for an unknown shard format or storage dtype, or a bad shard size."""
    if format not in FORMATS:
        raise ValueError(f"Unknown format '{format}'. Choose one of {list(FORMATS)}.")
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}.")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"Unknown storage dtype '{dtype}'. Choose one of {list(STORAGE_DTYPES)}.")


def make_folder(out_dir: Path) -> None:
    """Create the output folder (and its parents) after :func:`~capi_backbones.features.index.check_output_folder`:
    a ValueError for an empty path, a file, or a folder holding files named like ours but no index."""
    check_output_folder(out_dir).mkdir(parents=True, exist_ok=True)


def _new_index(*, format: str, dtype: str, settings: dict, root: Path) -> dict:
    return {
        "version": INDEX_VERSION,
        "format": format,
        "dtype": dtype,
        "settings": settings,
        "root": str(root),
        "shards": [],
        "failed": [],
    }


def _check_compatible(out_dir: Path, index: dict, new_index: dict) -> None:
    diffs = [
        f"{key}: {index.get(key)!r} vs {new_index[key]!r}"
        for key in ("version", "format", "dtype")
        if index.get(key) != new_index[key]
    ]
    old_settings = {k: v for k, v in (index.get("settings") or {}).items() if k not in INFORMATIONAL_SETTINGS}
    new_settings = {k: v for k, v in new_index["settings"].items() if k not in INFORMATIONAL_SETTINGS}
    diffs += [
        f"{key}: {old_settings.get(key)!r} vs {new_settings.get(key)!r}"
        for key in sorted(set(old_settings) | set(new_settings))
        if old_settings.get(key) != new_settings.get(key)
    ]
    if diffs:
        raise ValueError(
            f"'{out_dir}' already holds features made differently ({'; '.join(diffs)}; saved vs now). "
            "Use another output folder, or delete this one to start over."
        )


def _delete(path: Path) -> None:
    """Delete a shard or temporary file of ours. An npy shard folder is deleted only if it holds nothing but the
    files we write: a user's file inside is kept (with the folder) and named in a warning."""
    if path.is_dir() and not path.is_symlink():
        foreign = sorted(p.name for p in path.iterdir() if p.name not in NPY_SHARD_FILES)
        if foreign:
            logger.warning("Keeping %s: it holds files extract did not write (%s).", path, ", ".join(foreign))
            return
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def merge_rank_manifests(out_dir: Path, index: dict) -> dict:
    """Add the shards and failures of every ``index.rankNNNNN.json`` to ``index``, save it, then delete the
    manifests (in that order: a crash in between only repeats the merge, which skips shards already listed)."""
    parts = sorted(p for p in out_dir.iterdir() if PART_NAME.match(p.name))
    if not parts:
        return index
    listed = {entry["name"] for entry in index["shards"]}
    failed = {entry["file"]: entry for entry in index["failed"]}
    for part_path in parts:
        part = load_manifest(part_path)
        for entry in part["shards"]:
            check_shard_name(part_path, entry["name"])
            if entry["name"] not in listed:
                index["shards"].append(entry)
                listed.add(entry["name"])
        failed.update((entry["file"], entry) for entry in part["failed"])
    done = {name for entry in index["shards"] for name in entry["files"]}
    index["failed"] = [entry for name, entry in sorted(failed.items()) if name not in done]
    save_index(out_dir, index)
    for part_path in parts:
        part_path.unlink()
    logger.info("Merged %d rank manifest(s) into %s.", len(parts), out_dir / INDEX_NAME)
    return index


def _shard_entry(out_dir: Path, name: str, shard: SavedShard, checksum: str, stamps: list) -> dict:
    return {
        "name": name,
        "count": len(shard.files),
        "grid_size": list(shard.grid_size),
        "image_size": list(shard.image_size),
        "bytes": shard_bytes(out_dir / name),
        "sha256": checksum,
        "files": shard.files,
        "stamps": stamps,
    }


def _drop_changed_images(out_dir: Path, index: dict, format: str) -> None:
    """Images replaced on disk since their features were written (same name, other content: see
    ``capi_backbones.images.same_file_content``) are taken out of the index, so that they are extracted again:
    their shard is rewritten without them under a new name (the other images keep their features), then the old
    one is deleted. Images whose file is gone keep their features. Entries without stamps (older indexes) are
    trusted."""
    root = Path(index["root"])
    numbers = (SHARD_NAME.match(p.name) for p in out_dir.iterdir())
    next_number = 1 + max((int(m.group(1)) for m in numbers if m and m.group(2) is None), default=-1)
    shards = index["shards"]
    position = 0
    while position < len(shards):
        entry = shards[position]
        changed = {
            row
            for row, (name, stamp) in enumerate(zip(entry["files"], entry.get("stamps") or [], strict=False))
            if stamp is not None and same_file_content(os.path.normpath(root / name), stamp) is False
        }
        if not changed:
            position += 1
            continue
        names = ", ".join(entry["files"][row] for row in sorted(changed)[:3]) + (", ..." if len(changed) > 3 else "")
        logger.warning("%d image(s) changed since their features were written (%s): extracting them again.",
                       len(changed), names)  # fmt: skip
        keep = [row for row in range(entry["count"]) if row not in changed]
        try:
            old = read_shard(out_dir / entry["name"]) if keep else None
        except Exception as error:  # damaged as well: all its images are extracted again
            logger.warning("Shard %s is unreadable (%s): its images will be extracted again.", entry["name"], error)
            keep, old = [], None
        if keep:
            rows = torch.tensor(keep)
            shard = SavedShard(
                files=[old.files[row] for row in keep],
                patch_features=old.patch_features[rows].clone(),
                registers=old.registers[rows].clone(),
                pooled=None if old.pooled is None else old.pooled[rows].clone(),
                grid_size=old.grid_size,
                image_size=old.image_size,
            )
            name = f"shard_{next_number:05d}{FORMATS[format]}"
            next_number += 1
            checksum = write_shard(out_dir / name, shard, format=format)
            shards[position] = _shard_entry(out_dir, name, shard, checksum, [entry["stamps"][row] for row in keep])
            position += 1
        else:
            del shards[position]
        save_index(out_dir, index)  # the rewritten shard listed and the old one not; then the old one goes
        _delete(out_dir / entry["name"])


def prepare_folder(out_dir: Path, *, format: str, dtype: str, settings: dict, root: Path) -> dict:
    """Open (or start) the index of ``out_dir`` for a run that holds the folder's run lock, and return it.

    Refuses other settings; merges rank manifests of an interrupted multi-rank run; drops listed shards that are
    missing, truncated or damaged (checksum mismatch; their images will be extracted again); deletes unlisted
    shards and temporary files.
    """
    make_folder(out_dir)  # refuses a folder that is not ours before anything is deleted
    new_index = _new_index(format=format, dtype=dtype, settings=settings, root=root)
    if not (out_dir / INDEX_NAME).exists():
        index = new_index
    else:
        index = load_index(out_dir)
        _check_compatible(out_dir, index, new_index)
        recorded = Path(index["root"])
        if recorded != Path(root) and not recorded.exists() and Path(root).exists():  # the project was moved
            logger.warning("The images of '%s' were under %s, which is gone; looking for them under %s now.",
                           out_dir, recorded, root)  # fmt: skip
            index["root"] = str(root)  # names are relative to it: the images already done stay done
    index = merge_rank_manifests(out_dir, index)
    bad = check_listed_shards(out_dir, index)
    index["shards"] = [entry for entry in index["shards"] if entry["name"] not in bad]
    save_index(out_dir, index)  # first unlisted, then deleted: a crash in between leaves a leftover, never a hole
    for name, problem in bad.items():
        if (out_dir / name).exists():
            logger.warning("Deleting the listed shard %s: %s. Its images will be extracted again.", out_dir / name,
                           problem)  # fmt: skip
            _delete(out_dir / name)
        else:
            logger.warning("The listed shard %s is missing: its images will be extracted again.", out_dir / name)
    for path in find_leftovers(out_dir, index):
        logger.info("Deleting %s, left over by an interrupted run (written but never listed).", path)
        _delete(path)
    _drop_changed_images(out_dir, index, index["format"])
    return index


class ShardWriter:
    """Buckets single-image features by processed size and writes a shard whenever a bucket is full.

    Memory is bounded: when ``MAX_PENDING_SHARDS * shard_size`` images wait in buckets (many different sizes),
    the fullest bucket is written early, as a shard of fewer than ``shard_size`` images.

    ``settings`` describes how features are made (model, image size, ...); resuming into a folder whose index has
    other settings, format or dtype raises a ValueError. ``root`` is used only when the index is new.

    With ``world_size`` 1 the writer owns ``index.json`` and prepares the folder (:func:`prepare_folder`; the caller
    should hold the run lock). With ``world_size`` > 1, rank 0 must have run :func:`prepare_folder` before any
    rank builds its writer; each rank then writes only its own shards (suffix ``-rNNNN``) and its own manifest,
    which :func:`merge_rank_manifests` folds into the index once every rank has finished.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        format: str,
        shard_size: int,
        dtype: str,
        settings: dict,
        root: Path,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_writer_options(format=format, shard_size=shard_size, dtype=dtype)
        out_dir = Path(out_dir)
        self.out_dir, self.format, self.shard_size, self.dtype = out_dir, format, shard_size, dtype
        self.index_path = out_dir / INDEX_NAME
        self.world_size = world_size
        if world_size == 1:
            self.index = prepare_folder(out_dir, format=format, dtype=dtype, settings=settings, root=root)
            self._suffix, self.manifest_path, self._own = "", self.index_path, self.index
        else:
            self.index = load_index(out_dir)
            _check_compatible(out_dir, self.index, _new_index(format=format, dtype=dtype, settings=settings, root=root))
            self._suffix = f"-r{rank:04d}"
            self.manifest_path = out_dir / f"index.rank{rank:05d}.json"
            self._own = {"shards": [], "failed": []}  # this rank's part, merged by rank 0 at the end
        self.root = Path(self.index["root"])
        self.done = {self._path_of(name) for shard in self.index["shards"] for name in shard["files"]}
        self.failed_entries = {entry["file"]: entry for entry in self.index["failed"]}
        self._new_failures: dict[str, dict] = {}
        self.shards_written: list[str] = []
        self._pending: dict[tuple[int, int], list[tuple[str, FeatureOutput]]] = {}
        numbers = (SHARD_NAME.match(p.name) for p in out_dir.iterdir())
        self._next_number = 1 + max((int(m.group(1)) for m in numbers if m and self._is_own(m)), default=-1)

    def _is_own(self, match) -> bool:
        return (match.group(2) is None) if not self._suffix else (f"-r{match.group(2)}" == self._suffix)

    @property
    def failed(self) -> dict[str, str]:
        """Recorded name -> error, for the images that failed in this or earlier runs and are not done since."""
        return {name: entry["error"] for name, entry in {**self.failed_entries, **self._new_failures}.items()}

    def _path_of(self, name: str) -> Path:
        return Path(os.path.normpath(self.root / name))

    def name_of(self, path: Path) -> str:
        """The recorded name of an absolute image path: POSIX, relative to the index root."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    def failed_before(self, path: Path) -> str | None:
        """The recorded error if ``path`` failed in an earlier run and has not changed since, else None."""
        entry = self.failed_entries.get(self.name_of(path))
        if entry is None or entry.get("size") is None:
            return None
        try:
            info = os.stat(path)
        except OSError:
            return None
        return entry["error"] if (info.st_size, info.st_mtime_ns) == (entry["size"], entry["mtime_ns"]) else None

    def add(self, path: Path, output: FeatureOutput, stamp: dict | None = None) -> None:
        """Queue the features of one image (``output`` has batch size 1); writes a shard when a bucket fills.
        ``stamp``: the identity of the file they were made from (``capi_backbones.images.file_stamp``), recorded
        so that a later run redoes the image if the file is replaced."""
        name = self.name_of(path)
        self.failed_entries.pop(name, None)
        self._new_failures.pop(name, None)
        bucket = self._pending.setdefault(output.image_size, [])
        bucket.append((name, output, stamp))
        if len(bucket) >= self.shard_size:
            self._write(self._pending.pop(output.image_size))
        elif sum(map(len, self._pending.values())) >= MAX_PENDING_SHARDS * self.shard_size:
            self._write(self._pending.pop(max(self._pending, key=lambda s: len(self._pending[s]))))

    def add_failure(self, path: Path, error: str) -> None:
        """Record that ``path`` failed with ``error`` (with its size and mtime, so an unchanged file is skipped
        by later runs)."""
        try:
            info = os.stat(path)
            size, mtime_ns = info.st_size, info.st_mtime_ns
        except OSError:
            size = mtime_ns = None
        name = self.name_of(path)
        self.failed_entries.pop(name, None)
        self._new_failures[name] = {"file": name, "error": error, "size": size, "mtime_ns": mtime_ns}

    def finish(self) -> None:
        """Write all partly filled buckets and the final index (or this rank's manifest)."""
        for size in list(self._pending):
            self._write(self._pending.pop(size))
        self._save()

    def _write(self, bucket: list[tuple[str, FeatureOutput, dict | None]]) -> None:
        joined = FeatureOutput.concatenate([output for _, output, _ in bucket])
        dtype = STORAGE_DTYPES[self.dtype]
        shard = SavedShard(
            files=[name for name, _, _ in bucket],
            patch_features=joined.patch_features.to(dtype),
            registers=joined.registers.to(dtype),
            pooled=None if joined.pooled is None else joined.pooled.to(dtype),
            grid_size=joined.grid_size,
            image_size=joined.image_size,
        )
        shard_name = f"shard_{self._next_number:05d}{self._suffix}{FORMATS[self.format]}"
        self._next_number += 1
        checksum = write_shard(self.out_dir / shard_name, shard, format=self.format)
        self._own["shards"].append(
            _shard_entry(self.out_dir, shard_name, shard, checksum, [stamp for _, _, stamp in bucket])
        )
        self.done.update(self._path_of(name) for name in shard.files)
        self.shards_written.append(shard_name)
        self._save()
        logger.debug("Wrote %s (%d images of %s px).", shard_name, len(shard.files), shard.image_size)

    def _save(self) -> None:
        if self.world_size == 1:
            entries = {**self.failed_entries, **self._new_failures}
            self.index["failed"] = [entries[name] for name in sorted(entries)]
        else:
            self._own["failed"] = [self._new_failures[name] for name in sorted(self._new_failures)]
        atomic_write_text(self.manifest_path, json.dumps(self._own, indent=1))
