"""Reading evaluation datasets from folders: ImageFolder-style classification sets and images/ + masks/
segmentation sets, with their train / val / test splits. Problems are raised as one-line ValueErrors."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capi_backbones.evals.defaults import SELECTION_FRACTION, TEST_FRACTION
from capi_backbones.features import find_image_files

__all__ = [
    "SELECTION_FRACTION",
    "SPLIT_SEED",
    "ClassificationData",
    "SegmentationData",
    "held_out_split",
    "read_classification_folders",
    "read_segmentation_folders",
    "segmentation_held_out_split",
]

SPLIT_SEED = 42  # the official seed of the classification held-out split
TEST_SPLIT_SEED = 43  # the seed of the test split of a folder without split subfolders (ours: SPLIT_SEED + 1)
SEGMENTATION_SPLIT_SEED = 0  # the official segmentation script seeds numpy's global generator with 0 (rank 0)
MASK_FOLDERS = ("masks", "annotations")


def held_out_split(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices of ``range(n)``: a seeded permutation, the last ``fraction`` of it held out (the
    official split of train into train and val)."""
    order = np.random.default_rng(seed).permutation(n)
    n_kept = round((1.0 - fraction) * n)
    return np.sort(order[:n_kept]), np.sort(order[n_kept:])


def segmentation_held_out_split(n: int, seed: int = SEGMENTATION_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(fitted, held out) image indices of ``range(n)`` as the official segmentation evaluation draws them: a
    permutation from numpy's legacy generator seeded with 0, its first ``n // 10`` held out, the rest fitted, both
    in permutation order."""
    order = np.random.RandomState(seed).permutation(n)
    return order[n // 10 :], order[: n // 10]


@dataclass
class ClassificationData:
    """Labelled image paths by split. ``val`` is None when hyper-parameters are chosen on a held-out part of train."""

    root: Path
    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    val: list[tuple[Path, int]] | None = None
    note: str = ""  # how the splits were formed

    def counts(self) -> dict[str, int]:
        splits = {"train": self.train, "val": self.val, "test": self.test}
        return {name: len(items) for name, items in splits.items() if items is not None}


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[sub.name] = find_image_files(sub)
    return classes


def _labelled(folder: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    found = _class_folders(folder)
    if not any(found.values()):
        raise ValueError(f"'{folder}' holds no images in class subfolders (expected {folder}/<class>/<image>).")
    if classes is None:
        classes = [name for name, files in found.items() if files]
        if len(classes) < 2:
            raise ValueError(
                f"'{folder}' has {len(classes)} class folder with images ({', '.join(classes)}): classification needs "
                "at least 2 classes, one subfolder each."
            )
    unknown = sorted(name for name, files in found.items() if files and name not in classes)
    if unknown:
        raise ValueError(
            f"'{folder}' has classes that train lacks: {', '.join(unknown[:5])}. Use the same class folders."
        )
    index = {name: i for i, name in enumerate(classes)}
    return classes, [(path, index[name]) for name, files in found.items() for path in files if name in index]


def _split_folders(root: Path) -> dict[str, Path] | None:
    """The ``train`` and ``test`` folders (``test`` is ``val/`` when there is no ``test/``), plus ``val`` when both
    exist, of a dataset split into folders; None for a dataset in one folder."""
    if not root.is_dir():
        raise ValueError(f"Dataset folder '{root}' does not exist or is not a folder.")
    found = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "train" not in found:
        return None
    if len(found) == 1:
        raise ValueError(f"'{root}' has train/ but no test/ or val/ folder to report on. Add one.")
    folders = {"train": found["train"], "test": found.get("test", found.get("val"))}
    if len(found) == 3:
        folders["val"] = found["val"]
    return folders


def _split_note(folders: dict[str, Path]) -> str:
    selection = (
        f"selection: {folders['val']}" if "val" in folders else f"selection: a seeded {SELECTION_FRACTION:.0%} of train"
    )
    return f"train: {folders['train']}; test: {folders['test']}; {selection}"


ONE_FOLDER_NOTE = (
    f"one folder: a seeded {TEST_FRACTION:.0%} is test, a seeded {SELECTION_FRACTION:.0%} of the rest chooses "
    "hyper-parameters"
)


def read_classification_folders(root: str | os.PathLike) -> ClassificationData:
    """Read an ImageFolder-style dataset (labels from folder names, sorted).

    - ``root/train/<class>/...`` with ``root/test`` and/or ``root/val``: the test set is ``test`` (else ``val``);
      with both, ``val`` chooses the hyper-parameters, otherwise 10% of train (seed 42) does.
    - ``root/<class>/...``: a seeded 20% of the images is the test set, and 10% of the rest chooses.
    """
    root = Path(root)
    folders = _split_folders(root)
    if folders is not None:
        classes, train = _labelled(folders["train"], None)
        _, test = _labelled(folders["test"], classes)
        val = _labelled(folders["val"], classes)[1] if "val" in folders else None
        return ClassificationData(root, classes, train, test, val, _split_note(folders))
    classes, items = _labelled(root, None)
    kept, held = held_out_split(len(items), TEST_FRACTION, seed=TEST_SPLIT_SEED)
    return ClassificationData(root, classes, [items[i] for i in kept], [items[i] for i in held], None, ONE_FOLDER_NOTE)


@dataclass
class SegmentationData:
    """(image, mask) path pairs by split. ``val`` is None when 10% of train chooses the hyper-parameters."""

    root: Path
    train: list[tuple[Path, Path]]
    test: list[tuple[Path, Path]]
    val: list[tuple[Path, Path]] | None = None
    note: str = ""
    counts: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        splits = {"train": self.train, "val": self.val, "test": self.test}
        self.counts = {name: len(items) for name, items in splits.items() if items is not None}


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    images_dir = folder / "images"
    masks_dir = next((folder / name for name in MASK_FOLDERS if (folder / name).is_dir()), None)
    if not images_dir.is_dir() or masks_dir is None:
        raise ValueError(f"'{folder}' must hold images/ and masks/ (PNG label maps with the images' stems).")
    images = find_image_files(images_dir)
    if not images:
        raise ValueError(f"'{images_dir}' holds no images.")
    masks = {p.relative_to(masks_dir).with_suffix("").as_posix(): p for p in masks_dir.rglob("*.png")}
    keys = [p.relative_to(images_dir).with_suffix("").as_posix() for p in images]
    missing = [k for k in keys if k not in masks]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) in '{images_dir}' have no mask in '{masks_dir}' (e.g. '{missing[0]}.png'). "
            "Each image needs a PNG label map with the same name."
        )
    extra = sorted(set(masks) - set(keys))
    if extra:
        raise ValueError(
            f"{len(extra)} mask(s) in '{masks_dir}' have no image (e.g. '{extra[0]}.png'). Remove them or add images."
        )
    return [(image, masks[key]) for image, key in zip(images, keys, strict=True)]


def read_segmentation_folders(root: str | os.PathLike) -> SegmentationData:
    """Read a segmentation dataset: ``root/{train,val,test}/{images,masks}`` (test, else val, is reported on;
    with both, val chooses the hyper-parameters), or ``root/{images,masks}`` (a seeded 20% is the test set).
    Masks are PNG label maps (one label per pixel) named like their image."""
    root = Path(root)
    folders = _split_folders(root)
    if folders is not None:
        val = _pairs(folders["val"]) if "val" in folders else None
        return SegmentationData(root, _pairs(folders["train"]), _pairs(folders["test"]), val, _split_note(folders))
    items = _pairs(root)
    if len(items) < 3:
        raise ValueError(f"'{root}' has {len(items)} image(s): too few to split into train and test.")
    kept, held = held_out_split(len(items), TEST_FRACTION, seed=TEST_SPLIT_SEED)
    return SegmentationData(root, [items[i] for i in kept], [items[i] for i in held], None, ONE_FOLDER_NOTE)
