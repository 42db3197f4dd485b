"""The segmentation protocol end to end: patch features of each split (cached), masks resized with nearest and cut
into per-patch pixel labels, k-NN and logistic regression with hyper-parameters chosen on held-out data, mIoU and
pixel accuracy on test, and a picture of image | ground truth | prediction for a few test images."""

import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from capi_backbones.atomic_files import atomic_write_text
from capi_backbones.evals.datasets import SegmentationData, segmentation_held_out_split
from capi_backbones.evals.defaults import (
    CLASSIFIERS,
    DEFAULT_IGNORE_LABELS,
    DEFAULT_KNN_DTYPE,
    DEFAULT_SEGMENTATION_KS,
    DISTANCES,
    N_PICTURES,
)
from capi_backbones.evals.feature_cache import extract_split
from capi_backbones.evals.figure import save_png
from capi_backbones.evals.metrics import miou, pixel_accuracy
from capi_backbones.evals.report import locked_output
from capi_backbones.evals.segmentation import (
    LOGISTIC_C_GRID,
    LOGISTIC_MAX_ITER,
    LOGISTIC_TOLERANCE,
    Standardizer,
    knn_segment,
    logistic_segment,
    patch_pixel_labels,
    resolve_knn_dtype,
)

__all__ = [
    "CLASSIFIERS",
    "SegmentationSettings",
    "label_palette",
    "read_mask",
    "run_segmentation",
    "select_knn_setting",
]

logger = logging.getLogger(__name__)

SCORES_NAME = "selection_scores.json"  # validation scores of the hyper-parameters already tried (for resuming)


@dataclass(frozen=True)
class SegmentationSettings:
    classifiers: tuple[str, ...] = CLASSIFIERS
    ks: tuple[int, ...] = DEFAULT_SEGMENTATION_KS
    distances: tuple[str, ...] = DISTANCES
    c_grid: tuple[float, ...] = LOGISTIC_C_GRID
    logreg_max_iter: int = LOGISTIC_MAX_ITER
    logreg_tol: float = LOGISTIC_TOLERANCE
    knn_dtype: str = DEFAULT_KNN_DTYPE  # "auto": bfloat16 (official) where the device has it natively, else float32
    ignore_labels: tuple[int, ...] = DEFAULT_IGNORE_LABELS
    num_classes: int | None = None  # None: the largest label of the train masks + 1
    n_pictures: int = N_PICTURES  # test images drawn in segmentation_examples.png
    device: str = "cpu"  # where the k-NN search runs


def _rounded(row: dict, keys=("val_miou", "miou", "pixel_accuracy")) -> dict:
    """Scores rounded to 4 decimals for reading; the full-precision values stay under ``raw``."""
    raw = {key: row[key] for key in keys}
    return {**row, **{key: round(value, 4) for key, value in raw.items()}, "raw": raw}


def select_knn_setting(scores, ks: Sequence[int], distances: Sequence[str]) -> tuple[int, str]:
    """The (k, distance) of the best validation score ``scores["knn/<distance>/k=<k>"]``; among equal scores the
    first in the official grid order (``itertools.product(ks, distances)``: k outer, distance inner)."""
    return max(itertools.product(ks, distances), key=lambda s: scores[f"knn/{s[1]}/k={s[0]}"])


def read_mask(path: Path, size: tuple[int, int] | None, resolution: int) -> np.ndarray:
    """A PNG label map resized to resolution x resolution with nearest, as int64 (H, W). ``size`` (W, H) is the
    image's size, which the mask must have."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ValueError(f"Cannot read mask '{path}': {error.strerror or error}.") from error
    if not stat.S_ISREG(mode):
        raise ValueError(f"Mask '{path}' is not a regular file (a FIFO, device or folder). Masks must be PNG files.")
    try:
        with Image.open(path) as mask:
            mask.load()
    except Exception as error:
        raise ValueError(f"Cannot read mask '{path}': {type(error).__name__}: {error}") from error
    if mask.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise ValueError(
            f"Mask '{path}' has mode {mask.mode}: masks must be single-channel label maps (one class index per "
            "pixel, PNG mode L, P or I), not colour pictures."
        )
    if size is not None and mask.size != size:
        raise ValueError(f"Mask '{path}' is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}.")
    if mask.mode.startswith("I;16"):
        mask = Image.fromarray(np.asarray(mask).astype(np.int32))
    return np.asarray(mask.resize((resolution, resolution), Image.Resampling.NEAREST)).astype(np.int64)


def label_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, the PASCAL VOC palette (bits of the label spread over R, G, B; label 0 is black)."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for label in range(n):
        value, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours[label] = (r, g, b)
    return colours


def _colour(labels: np.ndarray, ignore_labels: Sequence[int]) -> np.ndarray:
    palette = label_palette(max(int(labels.max()) + 1, 1))
    out = palette[np.clip(labels, 0, None)]
    out[np.isin(labels, list(ignore_labels))] = 255  # ignored pixels: white
    return out


def _unpatch(pixel_labels: Tensor, n: int, grid: tuple[int, int], patch_size: int) -> Tensor:
    """(n * h * w, ps * ps) -> (n, h * ps, w * ps): the inverse of ``patch_pixel_labels``."""
    h, w = grid
    x = pixel_labels.reshape(n, h, w, patch_size, patch_size).permute(0, 1, 3, 2, 4)
    return x.reshape(n, h * patch_size, w * patch_size)


class _Scores:
    """Validation scores by hyper-parameter setting, saved after each so a rerun skips what is done."""

    def __init__(self, path: Path, context: dict) -> None:
        self.path, self.context = path, json.loads(json.dumps(context))  # as it reads back (tuples -> lists)
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.scores = saved.get("scores", {}) if saved.get("context") == self.context else {}

    def __contains__(self, key: str) -> bool:
        return key in self.scores

    def __getitem__(self, key: str) -> float:
        return self.scores[key]

    def __setitem__(self, key: str, value: float) -> None:
        self.scores[key] = value
        atomic_write_text(self.path, json.dumps({"context": self.context, "scores": self.scores}, indent=1))


def run_segmentation(
    data: SegmentationData,
    extractor,
    out_dir: str | os.PathLike,
    settings: SegmentationSettings = SegmentationSettings(),
    *,
    progress: bool = True,
) -> dict:
    """Run the protocol; returns ``{"results": rows, ...}`` (see ``results.json``) and writes
    ``out_dir/segmentation_examples.png``. ``extractor``: a square ``FeatureExtractor`` at the evaluation
    resolution (``keep_aspect=False``)."""
    out_dir = Path(out_dir)
    unknown = [c for c in settings.classifiers if c not in CLASSIFIERS]
    if unknown or not settings.classifiers:
        raise ValueError(f"Unknown classifier(s) {unknown or []}. Choose from {', '.join(CLASSIFIERS)}.")
    unknown = [d for d in settings.distances if d not in DISTANCES]
    if unknown or not settings.distances:
        raise ValueError(f"Unknown distance(s) {unknown or []}. Choose from {', '.join(DISTANCES)}.")
    if not settings.ks or min(settings.ks) < 1:
        raise ValueError(f"k-NN neighbours must be positive integers, got {list(settings.ks)}.")
    knn_dtype = resolve_knn_dtype(settings.knn_dtype, settings.device)
    started = time.perf_counter()
    with locked_output(out_dir):
        payload = _segment(data, extractor, out_dir, settings, knn_dtype, progress)
    payload["wall_time_s"] = round(time.perf_counter() - started, 1)
    return payload


def _segment(data, extractor, out_dir: Path, settings: SegmentationSettings, knn_dtype, progress: bool) -> dict:
    resolution, patch_size = extractor.image_size, extractor.model.patch_size
    splits = {"train": data.train, "test": data.test} | ({"val": data.val} if data.val is not None else {})
    features: dict[str, Tensor] = {}
    labels: dict[str, Tensor] = {}
    kept_pairs: dict[str, list[tuple[Path, Path]]] = {}
    skipped: dict[str, str] = {}
    grid = None
    for name, pairs in splits.items():
        split = extract_split(extractor, [image for image, _ in pairs], out_dir / "features" / name, crop=False,
                              pooled=False, progress=progress, desc=f"features {name}")  # fmt: skip
        skipped.update(split.failed)
        kept_pairs[name] = [pairs[i] for i in split.kept]
        grid = tuple(split.patch_features.shape[1:3])
        masks = []
        for image_path, mask_path in kept_pairs[name]:
            with Image.open(image_path) as image:
                size = image.size
            masks.append(torch.from_numpy(read_mask(mask_path, size, resolution)))
        features[name] = split.patch_features.flatten(0, 2)  # (N * h * w, D), patches row-major
        labels[name] = patch_pixel_labels(torch.stack(masks), patch_size).to(torch.int16)  # (N * h * w, ps * ps)
    for path, message in skipped.items():
        logger.warning("Skipped %s: %s", path, message)

    ignored = torch.tensor(settings.ignore_labels, dtype=torch.int16)
    train_valid = labels["train"][~torch.isin(labels["train"], ignored)]
    if len(train_valid) == 0:
        raise ValueError("Every train mask pixel carries an ignore label: nothing to learn from.")
    num_classes = settings.num_classes or int(train_valid.max()) + 1
    for name, split_labels in labels.items():
        valid = split_labels[~torch.isin(split_labels, ignored)]
        if len(valid) and (int(valid.max()) >= num_classes or int(valid.min()) < 0):
            raise ValueError(
                f"The {name} masks hold label {int(valid.max())}, outside the {num_classes} classes (0 to "
                f"{num_classes - 1}) and not an ignore label {list(settings.ignore_labels)}. Set --num-classes or "
                "--ignore-labels."
            )
    if len(torch.unique(train_valid)) < 2:
        raise ValueError("The train masks hold a single class: segmentation needs at least 2.")

    # hyper-parameters are chosen on DATA/val or on the official held-out 10% of the train images; then the chosen
    # classifier is fitted on train + val and scored on test, as in the official evaluation
    patches = grid[0] * grid[1]
    n_train = len(kept_pairs["train"])
    if "val" in features:
        fit_x, fit_y, val_x, val_y = features["train"], labels["train"], features["val"], labels["val"]
        n_fit, n_selection = n_train, len(kept_pairs["val"])
    else:
        fit_images, val_images = segmentation_held_out_split(n_train)
        if len(val_images) == 0:
            raise ValueError(
                f"The train split has {n_train} readable image(s): too few to hold out 10% (at least 10 images) to "
                "choose hyper-parameters. Add images or a val/ split."
            )
        n_fit, n_selection = len(fit_images), len(val_images)
        fit_rows = torch.from_numpy((fit_images[:, None] * patches + np.arange(patches)).reshape(-1))
        val_rows = torch.from_numpy((val_images[:, None] * patches + np.arange(patches)).reshape(-1))
        fit_x, fit_y = features["train"][fit_rows], labels["train"][fit_rows]
        val_x, val_y = features["train"][val_rows], labels["train"][val_rows]
    all_x, all_y = torch.cat([fit_x, val_x]), torch.cat([fit_y, val_y])
    standardizer = Standardizer.fit(fit_x)  # fitted on train only, never on val or test
    ignore = settings.ignore_labels
    scores = _Scores(
        out_dir / SCORES_NAME, {"settings": asdict(settings), "counts": {k: len(v) for k, v in kept_pairs.items()}}
    )

    rows, test_predictions = [], {}
    if "knn" in settings.classifiers:
        search = dict(standardizer=standardizer, ignore_labels=ignore, dtype=knn_dtype, device=settings.device)
        for distance in settings.distances:
            if all(f"knn/{distance}/k={k}" in scores for k in settings.ks):
                continue
            predictions = knn_segment(fit_x, fit_y, val_x, ks=settings.ks, distance=distance, progress=progress,
                                      **search)  # fmt: skip
            for k, predicted in predictions.items():
                scores[f"knn/{distance}/k={k}"] = miou(val_y, predicted, ignore)
        k, distance = select_knn_setting(scores, settings.ks, settings.distances)
        predicted = knn_segment(all_x, all_y, features["test"], ks=(k,), distance=distance, **search)[k]
        test_predictions["knn"] = predicted
        rows.append(_rounded({"classifier": "knn", "setting": f"{distance} k={k}", "selected": True,
                              "val_miou": scores[f"knn/{distance}/k={k}"],
                              "miou": miou(labels["test"], predicted, ignore),
                              "pixel_accuracy": pixel_accuracy(labels["test"], predicted, ignore)}))  # fmt: skip
    if "logreg" in settings.classifiers:
        for c in settings.c_grid:
            if f"logreg/C={c:g}" not in scores:
                predicted = logistic_segment(fit_x, fit_y, val_x, c=c, standardizer=standardizer, ignore_labels=ignore,
                                             max_iter=settings.logreg_max_iter, tol=settings.logreg_tol)  # fmt: skip
                scores[f"logreg/C={c:g}"] = miou(val_y, predicted, ignore)
        c = max(settings.c_grid, key=lambda value: scores[f"logreg/C={value:g}"])
        predicted = logistic_segment(all_x, all_y, features["test"], c=c, standardizer=standardizer,
                                     ignore_labels=ignore, max_iter=settings.logreg_max_iter,
                                     tol=settings.logreg_tol)  # fmt: skip
        test_predictions["logreg"] = predicted
        rows.append(_rounded({"classifier": "logreg", "setting": f"C={c:g}", "selected": True,
                              "val_miou": scores[f"logreg/C={c:g}"], "miou": miou(labels["test"], predicted, ignore),
                              "pixel_accuracy": pixel_accuracy(labels["test"], predicted, ignore)}))  # fmt: skip

    picture = None
    if settings.n_pictures > 0:
        n = min(settings.n_pictures, len(kept_pairs["test"]))
        first = next(iter(test_predictions))
        truth = _unpatch(labels["test"][: n * patches], n, grid, patch_size).numpy()
        guess = _unpatch(test_predictions[first][: n * patches], n, grid, patch_size).numpy()
        picture = _write_picture(out_dir / "segmentation_examples.png", kept_pairs["test"][:n], truth, guess,
                                 resolution, ignore)  # fmt: skip
    return {
        "protocol": "segmentation",
        "settings": {**asdict(settings), "resolution": resolution, "num_classes_used": num_classes,
                     "knn_dtype_used": str(knn_dtype).removeprefix("torch."),
                     "feature_precision": extractor.precision_used},
        "dataset": {"root": str(data.root), "splits": data.note, "skipped": skipped,
                    "counts": {**{name: len(pairs) for name, pairs in kept_pairs.items()}, "fitted_images": n_fit,
                               "selection_images": n_selection}},
        "selection_scores": dict(scores.scores),
        "results": rows,
        "picture": None if picture is None else str(picture),
    }  # fmt: skip


def _write_picture(path: Path, pairs, truth: np.ndarray, guess: np.ndarray, resolution: int, ignore) -> Path:
    from capi_backbones.features import load_image

    rows = []
    for (image_path, _), t, g in zip(pairs, truth, guess, strict=True):
        image = np.asarray(load_image(image_path).resize((resolution, resolution), Image.Resampling.BICUBIC))
        rows.append(np.concatenate([image, _colour(t, ignore), _colour(g, ignore)], axis=1))
    return save_png(Image.fromarray(np.concatenate(rows, axis=0)), path)
