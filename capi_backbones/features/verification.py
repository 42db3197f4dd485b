"""Checking an extraction folder against its index: the cheap check that every resume runs, and the full one of
``capi-backbones verify DIR``.

- cheap (:func:`check_listed_shards` with ``read=False``): every shard listed in ``index.json`` exists and has the
  size in bytes recorded when it was written (indexes written before sizes were recorded: presence only);
- full (:func:`verify_output`): also reads every shard and checks its rows against the index (count, image names,
  grid and image size), that no image is listed twice, and lists leftovers (see :func:`find_leftovers`).
"""

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "SHARD_NAME",
    "VerificationReport",
    "check_listed_shards",
    "find_leftovers",
    "shard_bytes",
    "verify_output",
]

logger = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"^shard_(\d{5,})(?:-r(\d{4,}))?(\.safetensors)?$")  # shard_00012, shard_00003-r0001, ...
PART_NAME = re.compile(r"^index\.rank(\d{5})\.json$")  # one rank's manifest during a multi-rank run
_TEMPORARY_NAME = re.compile(
    r"^\.(shard_\d{5,}(?:-r\d{4,})?(?:\.safetensors)?|index\.json|index\.rank\d{5}\.json)\..+\.tmp$"
)


def shard_bytes(path: Path) -> int:
    """Size on disk of a shard: the file, or the sum of the files of an npy shard folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


def check_listed_shards(out_dir: Path, index: dict, *, read: bool = False) -> dict[str, str]:
    """Shard name -> what is wrong with it, for the shards listed in ``index`` (empty when all are fine)."""
    from capi_backbones.features.shards import read_shard

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
            if rows != {entry["count"]} or shard.files != entry["files"]:
                problems[entry["name"]] = f"holds {sorted(rows)} rows for {entry['count']} listed images"
            elif list(shard.grid_size) != entry["grid_size"] or list(shard.image_size) != entry["image_size"]:
                problems[entry["name"]] = "grid or image size differs from the index"
    return problems


def find_leftovers(out_dir: Path, index: dict) -> list[Path]:
    """Files of ours that the index does not list: shards a crash left unlisted, and temporary files of
    interrupted writes. Only safe to delete while holding the folder's run lock."""
    listed = {entry["name"] for entry in index["shards"]}
    return sorted(
        path
        for path in out_dir.iterdir()
        if (SHARD_NAME.match(path.name) and path.name not in listed) or _TEMPORARY_NAME.match(path.name)
    )


@dataclass
class VerificationReport:
    """What :func:`verify_output` found. ``ok`` when ``problems`` is empty (leftovers are only reported)."""

    out_dir: Path
    n_shards: int
    n_images: int
    n_failed: int
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    unmerged_ranks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_output(out_dir: str | os.PathLike) -> VerificationReport:
    """Full check of an extraction folder against its ``index.json`` (see the module docstring)."""
    from capi_backbones.features.writer import load_index

    out_dir = Path(out_dir)
    index = load_index(out_dir)
    problems = [f"{name}: {problem}" for name, problem in check_listed_shards(out_dir, index, read=True).items()]
    seen: dict[str, str] = {}
    for entry in index["shards"]:
        if entry["count"] != len(entry["files"]):
            problems.append(f"{entry['name']}: count {entry['count']} but {len(entry['files'])} files in the index")
        for name in entry["files"]:
            if name in seen:
                problems.append(f"{name}: listed in both {seen[name]} and {entry['name']}")
            seen[name] = entry["name"]
    parts = sorted(p.name for p in out_dir.iterdir() if PART_NAME.match(p.name))
    return VerificationReport(
        out_dir=out_dir,
        n_shards=len(index["shards"]),
        n_images=len(seen),
        n_failed=len(index["failed"]),
        problems=problems,
        leftovers=[p.name for p in find_leftovers(out_dir, index)],
        unmerged_ranks=parts,
    )
