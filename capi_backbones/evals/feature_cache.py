"""Features of a dataset split, extracted once with ``FeatureExtractor.extract_to_disk`` and reused by later runs.

Classification evaluates center crops (the official eval transform: bicubic resize of the shorter side to
``256 / 224`` of the image size, then a center square of the image size): the crops are written as PNG files in
blocks of ``CROP_BLOCK`` images, extracted, and deleted, so the cache holds features only. Segmentation extracts the
image files themselves with a square extractor (the official bicubic resize to resolution x resolution).

Each split folder holds the extraction's ``index.json`` and shards, and ``sources.json``, the list of source files
in order: a later run with a different file list, model or settings is refused instead of mixing features.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from capi_backbones.atomic_files import ENVIRONMENT_ERRNOS, WriteError, atomic_write_text
from capi_backbones.features import load_image, load_index, load_saved_features
from capi_backbones.transforms import CROP_RESIZE_RATIO, center_crop  # noqa: F401 (CROP_RESIZE_RATIO: re-exported)

__all__ = ["CROP_RESIZE_RATIO", "SplitFeatures", "cache_digest", "center_crop", "extract_split"]

CROP_BLOCK = 512  # crops written to disk at a time
SOURCES_NAME = "sources.json"
CROPS_FOLDER = "crops.tmp"


@dataclass
class SplitFeatures:
    """Features of the images of a split that could be read, in the split's order (``kept`` indexes the split)."""

    patch_features: Tensor  # (N, h, w, D)
    pooled: Tensor | None  # (N, D_pred)
    registers: Tensor  # (N, R, D)
    kept: list[int]  # positions in the split of the N rows
    failed: dict[str, str] = field(default_factory=dict)  # source path -> why it was skipped


def cache_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of a split cache's ``index.json``: which shards (and so which features) the cache holds. Any image
    extracted later (e.g. one that was unreadable and was fixed) adds a shard and changes it."""
    return hashlib.sha256((Path(folder) / "index.json").read_bytes()).hexdigest()


def _check_sources(folder: Path, paths: list[Path]) -> None:
    sources = [os.fspath(Path(p).resolve()) for p in paths]
    record = folder / SOURCES_NAME
    if record.exists():
        if json.loads(record.read_text()) != sources:
            raise ValueError(
                f"'{folder}' caches features of another file list (the dataset changed). Use another --out folder, "
                "or delete this one to extract again."
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(sources))


def extract_split(
    extractor,
    paths: list[Path],
    folder: str | os.PathLike,
    *,
    crop: bool,
    pooled: bool = True,
    progress: bool = True,
    desc: str = "features",
) -> SplitFeatures:
    """Extract (or reuse) the features of ``paths`` into ``folder`` and load them.

    ``extractor``: a ``FeatureExtractor``; with ``crop=True`` it must resize to a fixed square
    (``keep_aspect=False``), and images are center-cropped to its ``image_size`` first. Unreadable images are
    skipped and listed in ``failed``; they are tried again by the next run.
    """
    folder = Path(folder)
    if not paths:
        raise ValueError(f"No images to extract for {desc}.")
    _check_sources(folder, paths)
    failed: dict[str, str] = {}
    if crop:
        _extract_crops(extractor, paths, folder, pooled=pooled, progress=progress, desc=desc, failed=failed)
    else:
        summary = extractor.extract_to_disk(paths, folder, pooled=pooled, progress=progress)
        root = Path(load_index(folder)["root"])
        failures = {**summary.failed_before, **summary.failed}  # failed_before: skipped as failed in an earlier run
        failed.update({os.fspath(root / name): message for name, message in failures.items()})
    return _load(folder, paths, crop=crop, failed=failed, desc=desc)


def _done_positions(folder: Path) -> set[int]:
    if not (folder / "index.json").exists():
        return set()
    return {int(Path(name).stem) for shard in load_index(folder)["shards"] for name in shard["files"]}


def _extract_crops(extractor, paths, folder: Path, *, pooled, progress, desc, failed) -> None:
    if extractor.keep_aspect:
        raise ValueError("Center crops need a square extractor: FeatureExtractor(..., keep_aspect=False).")
    done = _done_positions(folder)
    todo = [i for i in range(len(paths)) if i not in done]
    crops = folder / CROPS_FOLDER
    bar = tqdm(total=len(paths), initial=len(done), unit="img", desc=desc, disable=not progress)
    try:
        for start in range(0, len(todo), CROP_BLOCK):
            shutil.rmtree(crops, ignore_errors=True)
            crops.mkdir(parents=True)
            written = []
            for i in todo[start : start + CROP_BLOCK]:
                try:
                    crop = center_crop(load_image(paths[i]), extractor.image_size)
                except (OSError, ValueError) as error:  # the image's own failure: named, the others go on
                    failed[os.fspath(paths[i])] = str(error)
                    continue
                try:
                    crop.save(crops / f"{i:08d}.png")
                except OSError as error:  # a full disk is the machine's failure, not the image's (exit 3)
                    if error.errno in ENVIRONMENT_ERRNOS:
                        raise WriteError(crops / f"{i:08d}.png", error) from error
                    raise
                written.append(crops / f"{i:08d}.png")
            if written:
                summary = extractor.extract_to_disk(written, folder, pooled=pooled, progress=False)
                failures = {**summary.failed_before, **summary.failed}
                failed.update({os.fspath(paths[int(Path(n).stem)]): m for n, m in failures.items()})
            bar.update(len(todo[start : start + CROP_BLOCK]))
    finally:
        bar.close()
        shutil.rmtree(crops, ignore_errors=True)


def _load(folder: Path, paths: list[Path], *, crop: bool, failed: dict[str, str], desc: str) -> SplitFeatures:
    if not (folder / "index.json").exists() and failed:  # nothing was ever written: every image failed
        first, message = next(iter(failed.items()))
        split = desc.removeprefix("features ")
        raise ValueError(
            f"None of the {len(paths)} images of the {split} split could be read (first: {first}: {message})."
        )
    index = load_index(folder)
    if crop:
        position_of = {name: int(Path(name).stem) for shard in index["shards"] for name in shard["files"]}
    else:
        root = Path(index["root"])
        lookup = {Path(os.path.normpath(p.resolve())): i for i, p in enumerate(paths)}
        position_of = {
            name: lookup.get(Path(os.path.normpath(root / name)), -1)
            for shard in index["shards"]
            for name in shard["files"]
        }
    shards = load_saved_features(folder)
    if not shards:
        raise ValueError(f"None of the {len(paths)} images could be read (first error: {next(iter(failed.values()))}).")
    grids = {tuple(s.patch_features.shape[1:]) for s in shards}
    if len(grids) > 1:
        raise ValueError(f"'{folder}' holds features of several patch grids {sorted(grids)}; expected one size.")
    placement = []  # per shard: (rows in the shard, rows of the output), filled below
    positions = []
    for shard in shards:
        found = [(r, position_of.get(name, -1)) for r, name in enumerate(shard.files)]
        found = [(r, p) for r, p in found if p >= 0]
        placement.append(found)
        positions += [p for _, p in found]
    kept = sorted(set(positions))
    output_row = {p: j for j, p in enumerate(kept)}

    def gather(attribute: str) -> Tensor | None:
        first = getattr(shards[0], attribute)
        if first is None:
            return None
        out = torch.empty((len(kept), *first.shape[1:]), dtype=torch.float32)
        for shard, found in zip(shards, placement, strict=True):
            if found:
                rows = torch.tensor([r for r, _ in found])
                out[torch.tensor([output_row[p] for _, p in found])] = getattr(shard, attribute)[rows].float()
        return out

    kept_sources = {os.fspath(paths[i]) for i in kept}
    still_failed = {p: m for p, m in failed.items() if p not in kept_sources}
    return SplitFeatures(gather("patch_features"), gather("pooled"), gather("registers"), kept, still_failed)
