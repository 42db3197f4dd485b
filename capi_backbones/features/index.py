"""The on-disk format of an extraction folder: file names, ``index.json`` and rank manifests, and the checks of
the shards they list. The writer (``features.writer``), the verifier (``features.verification``) and the readers
(``load_saved_features``, evaluation's feature cache) all go through this module; it imports none of them.

Layout of an output folder::

    out_dir/
      index.json                  # the manifest, rewritten atomically after every shard
      shard_00000.safetensors     # or shard_00000/ (npy format), see capi_backbones.features.shards
      shard_00001.safetensors
      shard_00002-r0001.safetensors  # written by rank 1 of a multi-rank (torchrun) run
      index.rank00001.json        # rank 1's own manifest while a multi-rank run is going (merged, then deleted)

``index.json``::

    {"version": 1, "format": "safetensors", "dtype": "float32",
     "root": "/abs/folder",                      # image names are POSIX paths relative to it
     "settings": {"model": ..., "config": {...}, "weights_fingerprint": ..., "image_size": 224, ...},
     "shards": [{"name": "shard_00000.safetensors", "count": 256, "grid_size": [16, 16],
                 "image_size": [224, 224], "bytes": 25171224, "sha256": "sha256:...",
                 "files": ["a/1.jpg", ...],
                 "stamps": [{"size": 53211, "mtime_ns": ..., "hash": "blake2b:..."}, ...]}, ...],
     "failed": [{"file": "b/broken.jpg", "error": "Cannot read image ...", "size": 1234, "mtime_ns": ...}]}

- ``sha256``: the checksum of the shard as written (``features.shards.shard_checksum``), checked by ``verify``;
- ``stamps``: per listed image, the identity of the file its features were made from
  (:func:`capi_backbones.images.file_stamp`); a resume extracts an image again when its file was replaced;
- image names are the paths the user gave, links not resolved (two links to one file are two entries).

Indexes written before ``sha256`` and ``stamps`` existed are read as before (those checks are skipped).

A rank manifest holds ``{"shards": [...], "failed": [...]}`` with entries of the same form. Both are checked when
read (:func:`load_index`, :func:`load_manifest`): a damaged file is one ValueError naming it and what is wrong, never a
KeyError later.
"""

import json
import logging
import os
import re
from pathlib import Path

from capi_backbones.atomic_files import atomic_write_text, temporary_target

__all__ = [
    "INDEX_NAME",
    "INDEX_VERSION",
    "PART_NAME",
    "SHARD_NAME",
    "check_listed_shards",
    "check_output_folder",
    "check_output_path",
    "find_leftovers",
    "is_ours",
    "load_index",
    "load_manifest",
    "load_saved_features",
    "save_index",
    "shard_bytes",
]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1
SHARD_NAME = re.compile(r"^shard_(\d{5,})(?:-r(\d{4,}))?(\.safetensors)?$")  # shard_00012, shard_00003-r0001, ...
PART_NAME = re.compile(r"^index\.rank(\d{5})\.json$")  # one rank's manifest during a multi-rank run


def _is_final_name(name: str) -> bool:
    return bool(SHARD_NAME.match(name) or PART_NAME.match(name)) or name == INDEX_NAME


def is_temporary(name: str) -> bool:
    """A temporary (``atomic_files``' one naming scheme) of a shard, a manifest or the index."""
    target = temporary_target(name)
    return target is not None and _is_final_name(target)


def is_ours(name: str) -> bool:
    """Whether a file name in an output folder is one this package writes (shards, manifests, temporaries)."""
    return _is_final_name(name) or is_temporary(name)


def check_output_path(out_dir: str | os.PathLike) -> Path:
    """A ValueError for an empty output path (``--out ''`` would mean the current folder)."""
    if not os.fspath(out_dir).strip():
        raise ValueError("The output folder is an empty path; name a folder for the features (e.g. --out features).")
    return Path(out_dir)


def check_output_folder(out_dir: str | os.PathLike) -> Path:
    """Refuse, before anything is created or deleted, an output path that is empty or a folder extract did not
    write: one without ``index.json`` that holds files named like ours (``shard_00001/`` with a user's notes
    inside; resuming would delete or overwrite them). Returns the path. Imports no torch: the CLI checks early."""
    path = check_output_path(out_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Output path '{path}' exists and is not a directory.")
    if path.is_dir() and not (path / INDEX_NAME).exists():
        # our temporaries (random suffixes) are left by a crash during the first index write: not suspicious
        ours = sorted(p.name for p in path.iterdir() if SHARD_NAME.match(p.name) or PART_NAME.match(p.name))
        if ours:
            raise ValueError(
                f"'{path}' holds {ours[0]} but no {INDEX_NAME}: it was not written by extract (or its index was "
                "deleted), and extract would overwrite or delete such files. Choose a new or empty output folder, "
                "or move those files out."
            )
    return path


def shard_bytes(path: Path) -> int:
    """Size on disk of a shard: the file, or the sum of the files of an npy shard folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


def save_index(out_dir: Path, index: dict) -> None:
    atomic_write_text(out_dir / INDEX_NAME, json.dumps(index, indent=1))


def check_shard_name(path: Path, name) -> None:
    """A ValueError unless ``name`` (listed in the index or manifest ``path``) is a shard name of this folder."""
    if not isinstance(name, str) or not SHARD_NAME.match(name):
        raise ValueError(
            f"'{path}' lists a shard named {name!r}, which is not a shard of this folder "
            "(names look like shard_00000.safetensors); refusing to read outside the folder. The index was edited "
            "or damaged: delete the folder to start over."
        )


def load_index(out_dir: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of an extraction folder (structure and shard names checked: never a path outside
    it)."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No {INDEX_NAME} in '{out_dir}': not a folder written by extract_to_disk.")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"'{path}' is not valid JSON ({error}). Delete the folder to start over.") from error
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        version = index.get("version") if isinstance(index, dict) else None
        raise ValueError(f"'{path}' has index version {version!r}; this library reads {INDEX_VERSION}.")
    problem = _index_problem(index)
    if problem is not None:
        raise ValueError(f"'{path}' is damaged: {problem}. Delete the folder to start over.")
    for entry in index["shards"]:
        check_shard_name(path, entry["name"])
    return index


def _kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def _field_problem(entry: dict, key: str, kind: type | tuple[type, ...], where: str = "", optional: bool = False):
    """What is wrong with ``entry[key]`` (missing, or not of ``kind``), or None. ``where`` names the entry."""
    prefix = f"{where}: " if where else ""
    if key not in entry:
        return None if optional else f"{prefix}'{key}' is missing"
    value = entry[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                 else (kind,))):  # fmt: skip
        kinds = kind if isinstance(kind, tuple) else (kind,)
        return f"{prefix}'{key}' is {_kind(value)}, not {' or '.join(_KIND_NAMES[k] for k in kinds)}"
    return None


_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a number", type(None): "null"}


def _entries_problem(document: dict) -> str | None:
    """What is wrong with the ``shards`` and ``failed`` lists of an index or manifest, or None."""
    for key in ("shards", "failed"):
        problem = _field_problem(document, key, list)
        if problem is not None:
            return problem
    for i, entry in enumerate(document["shards"]):
        where = f"shard entry {i}"
        if not isinstance(entry, dict):
            return f"{where} is {_kind(entry)}, not an object"
        for key, kind in (("name", str), ("count", int), ("files", list), ("grid_size", list), ("image_size", list)):
            problem = _field_problem(entry, key, kind, where)
            if problem is not None:
                return problem
        if not all(isinstance(name, str) for name in entry["files"]):
            return f"{where}: 'files' holds something other than names"
        for key in ("grid_size", "image_size"):
            if len(entry[key]) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry[key]):
                return f"{where}: '{key}' is not two numbers"
        for key, kind in (("bytes", int), ("sha256", str), ("stamps", list)):
            problem = _field_problem(entry, key, kind, where, optional=True)
            if problem is not None:
                return problem
        stamps = entry.get("stamps")
        if stamps is not None and (len(stamps) != len(entry["files"]) or not all(
                stamp is None or (isinstance(stamp, dict) and {"size", "mtime_ns", "hash"} <= stamp.keys())
                for stamp in stamps)):  # fmt: skip
            return f"{where}: 'stamps' does not hold one file stamp per listed image"
    for i, entry in enumerate(document["failed"]):
        where = f"failed entry {i}"
        if not isinstance(entry, dict):
            return f"{where} is {_kind(entry)}, not an object"
        for key in ("file", "error"):
            problem = _field_problem(entry, key, str, where)
            if problem is not None:
                return problem
        for key in ("size", "mtime_ns"):
            problem = _field_problem(entry, key, (int, type(None)), where, optional=True)
            if problem is not None:
                return problem
    return None


def _index_problem(index: dict) -> str | None:
    """What is wrong with the structure of a parsed ``index.json`` (written by this library: damage from outside),
    or None."""
    for key, kind in (("format", str), ("dtype", str), ("root", str), ("settings", dict)):
        problem = _field_problem(index, key, kind)
        if problem is not None:
            return problem
    return _entries_problem(index)


def load_manifest(path: Path) -> dict:
    """A rank's manifest ``index.rankNNNNN.json`` (checked like the index)."""
    redo = "Delete it to extract that rank's images again."
    try:
        part = json.loads(path.read_text())
    except json.JSONDecodeError as error:  # written atomically, so this is damage from outside
        raise ValueError(f"'{path}' (a rank's manifest) is not valid JSON ({error}). {redo}") from None
    problem = f"it is {_kind(part)}, not an object" if not isinstance(part, dict) else _entries_problem(part)
    if problem is not None:
        raise ValueError(f"'{path}' (a rank's manifest) is damaged: {problem}. {redo}")
    for entry in part["shards"]:
        check_shard_name(path, entry["name"])
    return part


def check_listed_shards(out_dir: Path, index: dict, *, read: bool = False) -> dict[str, str]:
    """Shard name -> what is wrong with it, for the shards listed in ``index`` (empty when all are fine).

    Always: every listed shard exists, has the size in bytes recorded when it was written, and the same checksum
    (indexes written before sizes or checksums were recorded: those checks are skipped). The checksum reads each
    shard's bytes once without decoding them (SHA-256, about 1-2 GB/s: a small share of what extracting them
    took). ``read=True`` (what ``verify`` runs) also decodes each shard and checks its rows against the index, before
    the checksum, so that a renamed or swapped shard is called that rather than damaged."""
    from capi_backbones.features.shards import read_shard, shard_checksum  # torch: only when shards are read

    problems = {}
    for entry in index["shards"]:
        path = out_dir / entry["name"]
        if not path.exists():
            problems[entry["name"]] = "missing"
            continue
        size = shard_bytes(path)
        if "bytes" in entry and size != entry["bytes"]:
            problems[entry["name"]] = f"{size} bytes on disk, {entry['bytes']} when written (truncated or changed)"
            continue
        if read:
            try:
                shard = read_shard(path)
            except Exception as error:  # a damaged file fails in many ways (safetensors, numpy, json)
                problems[entry["name"]] = f"unreadable ({type(error).__name__}: {error})"
                continue
            rows = {len(shard.files), shard.patch_features.shape[0], shard.registers.shape[0]}
            if shard.pooled is not None:
                rows.add(shard.pooled.shape[0])
            if rows != {entry["count"]}:
                problems[entry["name"]] = f"holds {sorted(rows)} rows for {entry['count']} listed images"
            elif shard.files != entry["files"]:
                row = next(i for i, (a, b) in enumerate(zip(shard.files, entry["files"], strict=True)) if a != b)
                problems[entry["name"]] = (
                    f"holds other images than the index lists (row {row}: '{shard.files[row]}' in the shard, "
                    f"'{entry['files'][row]}' in the index): the shard was renamed, swapped or edited"
                )
            elif list(shard.grid_size) != entry["grid_size"] or list(shard.image_size) != entry["image_size"]:
                problems[entry["name"]] = "grid or image size differs from the index"
            elif "sha256" in entry and shard_checksum(path) != entry["sha256"]:
                problems[entry["name"]] = DAMAGED
        elif "sha256" in entry and shard_checksum(path) != entry["sha256"]:
            problems[entry["name"]] = DAMAGED
    return problems


DAMAGED = "its data differs from what was written (checksum mismatch): damaged on disk"


def find_leftovers(out_dir: Path, index: dict) -> list[Path]:
    """Files of ours that the index does not list: shards a crash left unlisted, and temporary files of
    interrupted writes. Only safe to delete while holding the folder's run lock."""
    listed = {entry["name"] for entry in index["shards"]}
    return sorted(
        path
        for path in out_dir.iterdir()
        if (SHARD_NAME.match(path.name) and path.name not in listed) or is_temporary(path.name)
    )


def load_saved_features(out_dir: str | os.PathLike) -> list:
    """Every shard listed in ``out_dir/index.json``, in writing order (``SavedShard`` rows named by ``files``).

    Raises a ValueError naming the shards that are missing, truncated or damaged (run ``extract`` again to redo
    them)."""
    from capi_backbones.features.shards import read_shard

    out_dir = Path(out_dir)
    index = load_index(out_dir)
    bad = check_listed_shards(out_dir, index)
    if bad:
        listing = "; ".join(f"{name}: {problem}" for name, problem in bad.items())
        raise ValueError(
            f"'{out_dir}' has damaged shards ({listing}). Run the same extract command again to redo their images."
        )
    return [read_shard(out_dir / shard["name"]) for shard in index["shards"]]
