"""``capi-backbones verify DIR``: the full check of an extraction folder against its index.

It reads every shard listed in ``index.json`` and checks its rows against the index (count, image names, grid and
image size), that no image is listed twice, and lists leftovers (see :func:`capi_backbones.features.index.
find_leftovers`). The cheap half, run by every resume, is :func:`capi_backbones.features.index.check_listed_shards`.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from capi_backbones.features.index import (
    PART_NAME,
    SHARD_NAME,
    check_listed_shards,
    find_leftovers,
    load_index,
    load_manifest,
    shard_bytes,
)

__all__ = [
    "SHARD_NAME",
    "VerificationReport",
    "check_listed_shards",
    "find_leftovers",
    "shard_bytes",
    "verify_output",
]


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
    for name in parts:
        try:
            load_manifest(out_dir / name)
        except ValueError as error:
            problems.append(str(error))
    return VerificationReport(
        out_dir=out_dir,
        n_shards=len(index["shards"]),
        n_images=len(seen),
        n_failed=len(index["failed"]),
        problems=problems,
        leftovers=[p.name for p in find_leftovers(out_dir, index)],
        unmerged_ranks=parts,
    )
