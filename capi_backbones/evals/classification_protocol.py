"""The classification protocol end to end: features of a dataset split by split (cached), k-NN, then the linear
and attentive probe grids (resumable), hyper-parameters chosen on held-out data, top-1/top-5 on test."""

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from capi_backbones.evals.datasets import ClassificationData, held_out_split
from capi_backbones.evals.defaults import (
    ATTENTION_HEAD_DIM,
    DEFAULT_KNN_KS,
    LR_REFERENCE_BATCH,
    OFFICIAL_BATCH_SIZE,
    OFFICIAL_ITERATIONS,
    OFFICIAL_LEARNING_RATES,
    OFFICIAL_WARMUP_ITERATIONS,
    OFFICIAL_WEIGHT_DECAYS,
    PROBES,
    SELECTION_FRACTION,
)
from capi_backbones.evals.feature_cache import SplitFeatures, cache_digest, extract_split
from capi_backbones.evals.figure import classification_figure, save_png
from capi_backbones.evals.knn import knn_classify
from capi_backbones.evals.metrics import topk_accuracy
from capi_backbones.evals.probe_grid import (
    CachedBatches,
    ProbeGrid,
    ProbeTrainingConfig,
    predict_grid,
    train_probe_grid,
)
from capi_backbones.evals.report import locked_output
from capi_backbones.evals.representations import (
    DEFAULT_REPRESENTATIONS,
    REPRESENTATIONS,
    TOKEN_REPRESENTATIONS,
    check_representations,
    make_representations,
)
from capi_backbones.runtime.seeding import probe_augmentation_seed
from capi_backbones.transforms import TrainTransform

__all__ = ["PROBES", "AugmentedBatches", "ClassificationSettings", "run_classification"]

logger = logging.getLogger(__name__)

AUGMENT_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as the official probes use
FIGURE_NAME = "results.png"


@dataclass(frozen=True)
class ClassificationSettings:
    probes: tuple[str, ...] = PROBES
    representations: tuple[str, ...] = DEFAULT_REPRESENTATIONS
    knn_ks: tuple[int, ...] = DEFAULT_KNN_KS
    training: ProbeTrainingConfig = ProbeTrainingConfig()
    augment: bool = False  # train probes on RandomResizedCrop + flip through the backbone, not on cached crops
    head_dim: int = ATTENTION_HEAD_DIM
    device: str = "cpu"  # where the probes train (the extractor has its own device)


class AugmentedBatches:
    """Training batches made on the fly: RandomResizedCrop (scale 0.08-1, bicubic) + horizontal flip of the train
    images, through the frozen backbone. Batch ``i`` depends only on ``seed`` and ``i`` (resumable)."""

    def __init__(self, paths: Sequence[Path], labels: Tensor, extractor, representations, batch_size: int, seed: int):
        self.paths, self.extractor, self.representations = list(paths), extractor, tuple(representations)
        self.order = CachedBatches({"index": torch.arange(len(self.paths))}, labels, batch_size, seed)
        self.transform = TrainTransform(extractor.image_size, crop_scale=AUGMENT_CROP_SCALE, hflip=True)
        self.seed = seed
        self.needs_pooled = any(r in ("pooled", "pooled+avg_patch") for r in self.representations)

    @property
    def effective_batch_size(self) -> int:
        return self.order.effective_batch_size

    def __call__(self, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        from capi_backbones.features import load_image

        selected, labels = self.order(iteration)
        pixels = []
        for j, i in enumerate(selected["index"].tolist()):
            generator = torch.Generator().manual_seed(probe_augmentation_seed(self.seed, iteration, j))
            pixels.append(self.transform(load_image(self.paths[i]), generator))
        out = self.extractor.forward(torch.stack(pixels), pooled=self.needs_pooled)
        features = make_representations(out.patch_features, out.pooled, out.registers, self.representations)
        return {name: tensor.clone() for name, tensor in features.items()}, labels  # normal tensors, not inference


def _features(split: SplitFeatures, names: Sequence[str]) -> dict[str, Tensor]:
    return make_representations(split.patch_features, split.pooled, split.registers, names)


def _select(features: dict[str, Tensor], labels: Tensor, rows: Sequence[int]) -> tuple[dict[str, Tensor], Tensor]:
    index = torch.as_tensor(rows, dtype=torch.long)
    return {name: tensor[index] for name, tensor in features.items()}, labels[index]


def _describe_training(config: ProbeTrainingConfig, batch: int, n_fit: int) -> dict:
    """What the probes were trained with, and whether it is the official protocol (and if not, how it differs)."""
    differences = []
    if config.iterations != OFFICIAL_ITERATIONS or config.warmup_iterations != OFFICIAL_WARMUP_ITERATIONS:
        differences.append(f"{config.iterations} iterations, {config.warmup_iterations} warmup (official "
                           f"{OFFICIAL_ITERATIONS}, {OFFICIAL_WARMUP_ITERATIONS})")  # fmt: skip
    if config.batch_size != OFFICIAL_BATCH_SIZE:
        differences.append(f"batch {config.batch_size} (official {OFFICIAL_BATCH_SIZE})")
    elif batch < config.batch_size:
        differences.append(f"batch {batch}: the whole fitted set of {n_fit} images is smaller than {config.batch_size}")
    if tuple(config.learning_rates) != OFFICIAL_LEARNING_RATES or tuple(config.weight_decays) != OFFICIAL_WEIGHT_DECAYS:
        differences.append("another lr x wd grid")
    if config.dtype != "float32":
        differences.append(f"{config.dtype} autocast (official float32)")
    return {
        "protocol": "official" if not differences else "NOT the official protocol: " + "; ".join(differences),
        "global_batch_size": batch,
        "lr_scale": batch / LR_REFERENCE_BATCH,
        "iterations": config.iterations,
        "warmup_iterations": config.warmup_iterations,
        "micro_batch_size": config.micro_batch_size,
        "dtype": config.dtype,
        "seed": config.seed,
    }


def _rounded(row: dict, keys: Sequence[str] = ("val_top1", "top1", "top5")) -> dict:
    """Scores rounded to 4 decimals for reading; the full-precision values stay under ``raw``."""
    raw = {key: row[key] for key in keys if row.get(key) is not None}
    return {**row, **{key: round(value, 4) for key, value in raw.items()}, "raw": raw}


def _trained_on(folders: Sequence[Path], kept: Sequence[int], fit_rows, labels: Tensor, extra=None) -> str:
    """A hash of what the probes learn from: the feature caches (their index.json), which rows are fitted and their
    labels (and, for augmented training, the image files). A probe checkpoint of other data is not reused."""
    digest = hashlib.sha256()
    for folder in folders:
        digest.update(cache_digest(folder).encode())
    digest.update(json.dumps([list(kept), [int(r) for r in fit_rows], labels.tolist(), extra]).encode())
    return digest.hexdigest()


def _file_identity(path: Path) -> list:
    info = path.stat()
    return [os.fspath(path), info.st_size, info.st_mtime_ns]


def run_classification(
    data: ClassificationData,
    extractor,
    out_dir: str | os.PathLike,
    settings: ClassificationSettings = ClassificationSettings(),
    *,
    progress: bool = True,
) -> dict:
    """Run the protocol; returns ``{"results": rows, "dataset": ..., "settings": ...}`` (see ``results.json``).

    ``extractor``: a square ``FeatureExtractor`` (``keep_aspect=False``); features of each split are cached under
    ``out_dir/features/<split>`` and the probe grids are checkpointed under ``out_dir/probes``, keyed to the
    features they were trained on. ``out_dir`` is locked for the run: a second run into it is refused at once.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    unknown = [p for p in settings.probes if p not in PROBES]
    if unknown or not settings.probes:
        raise ValueError(f"Unknown probe(s) {unknown or []}. Choose from {', '.join(PROBES)}.")
    check_representations(settings.representations)
    vector_probes = any(p in settings.probes for p in ("knn", "linear"))
    vectors = [r for r in settings.representations if r not in TOKEN_REPRESENTATIONS and vector_probes]
    tokens = [r for r in settings.representations if r in TOKEN_REPRESENTATIONS and "attentive" in settings.probes]
    used = [r for r in settings.representations if r in vectors or r in tokens]  # only those a probe uses
    if not used:
        raise ValueError(
            f"No representation fits the probes {list(settings.probes)}: k-NN and linear probes take "
            f"{', '.join(r for r in REPRESENTATIONS if r not in TOKEN_REPRESENTATIONS)}; attentive probes take "
            f"{', '.join(TOKEN_REPRESENTATIONS)}."
        )
    with locked_output(out_dir):
        payload = _run(data, extractor, out_dir, settings, vectors, tokens, used, progress)
    payload["wall_time_s"] = round(time.perf_counter() - started, 1)
    return payload


def _run(data, extractor, out_dir: Path, settings: ClassificationSettings, vectors, tokens, used, progress) -> dict:
    needs_pooled = any(r in ("pooled", "pooled+avg_patch") for r in used)
    splits = {"train": data.train, "test": data.test} | ({"val": data.val} if data.val is not None else {})
    extracted: dict[str, SplitFeatures] = {}
    for name, items in splits.items():
        if not items:
            raise ValueError(f"The {name} split is empty.")
        extracted[name] = extract_split(
            extractor, [p for p, _ in items], out_dir / "features" / name, crop=True, pooled=needs_pooled,
            progress=progress, desc=f"features {name}",
        )  # fmt: skip
    skipped = {p: m for split in extracted.values() for p, m in split.failed.items()}
    for path, message in skipped.items():
        logger.warning("Skipped %s: %s", path, message)
    labels = {
        name: torch.tensor([splits[name][i][1] for i in split.kept], dtype=torch.long)
        for name, split in extracted.items()
    }
    features = {name: _features(split, used) for name, split in extracted.items()}
    num_classes = len(data.classes)
    if len(torch.unique(labels["train"])) < 2:
        raise ValueError("The readable train images cover fewer than 2 classes.")

    # hyper-parameter selection data: DATA/val, or a seeded 10% of train (the probes train on the other 90%)
    if "val" in features:
        fit_features, fit_labels, fit_rows = features["train"], labels["train"], list(range(len(labels["train"])))
        val_features, val_labels = features["val"], labels["val"]
    else:
        fit_rows, val_rows = held_out_split(len(labels["train"]), SELECTION_FRACTION)
        if len(val_rows) == 0:
            raise ValueError(
                f"The train split is too small to hold out {SELECTION_FRACTION:.0%} for choosing hyper-parameters."
            )
        fit_features, fit_labels = _select(features["train"], labels["train"], fit_rows)
        val_features, val_labels = _select(features["train"], labels["train"], val_rows)
    counts = {name: len(split.kept) for name, split in extracted.items()}
    counts |= {"fitted": len(fit_labels), "selection": len(val_labels)}

    rows: list[dict] = []
    if "knn" in settings.probes:
        knn_train = features["train"] if "val" not in features else {
            r: torch.cat([features["train"][r], features["val"][r]]) for r in vectors
        }  # fmt: skip
        knn_labels = labels["train"] if "val" not in features else torch.cat([labels["train"], labels["val"]])
        for rep in vectors:
            val_votes = knn_classify(fit_features[rep], fit_labels, val_features[rep], num_classes=num_classes,
                                     ks=settings.knn_ks, device=settings.device)  # fmt: skip
            val_scores = {k: topk_accuracy(votes, val_labels, 1) for k, votes in val_votes.items()}
            best_k = max(settings.knn_ks, key=lambda k: val_scores[k])  # first best on ties
            votes = knn_classify(knn_train[rep], knn_labels, features["test"][rep], num_classes=num_classes,
                                 ks=settings.knn_ks, device=settings.device)  # fmt: skip
            for k, scores in votes.items():
                rows.append(_rounded({"probe": "knn", "representation": rep, "setting": f"k={k}",
                                      "selected": k == best_k, "val_top1": val_scores[k],
                                      "top1": topk_accuracy(scores, labels["test"], 1),
                                      "top5": topk_accuracy(scores, labels["test"], 5)}))  # fmt: skip

    config = settings.training
    trained = None
    grids: dict[str, dict] = {}
    for kind, reps in (("linear", vectors), ("attentive", tokens)):
        if kind not in settings.probes or not reps:
            continue
        dims = {r: (kind, features["train"][r].shape[-1]) for r in reps}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            grid = ProbeGrid(dims, num_classes, learning_rates=config.learning_rates,
                             weight_decays=config.weight_decays, head_dim=settings.head_dim)  # fmt: skip
        caches = [out_dir / "features" / name for name in ("train", "val") if name in extracted]
        if settings.augment:
            fit_paths = [splits["train"][extracted["train"].kept[i]][0] for i in fit_rows]
            batches = AugmentedBatches(fit_paths, fit_labels, extractor, reps, config.batch_size, config.seed)
            identity = [_file_identity(path) for path in fit_paths]
        else:
            batches = CachedBatches({r: fit_features[r] for r in reps}, fit_labels, config.batch_size, config.seed)
            identity = None
        trained_on = _trained_on(caches, extracted["train"].kept, fit_rows, fit_labels, identity)
        train_probe_grid(grid, batches, config, batch_size=batches.effective_batch_size, device=settings.device,
                         checkpoint=out_dir / "probes" / f"{kind}.pt", trained_on=trained_on,
                         progress=progress)  # fmt: skip
        trained = _describe_training(config, batches.effective_batch_size, len(fit_labels))
        val_logits = predict_grid(grid, {r: val_features[r] for r in reps})  # (N, C, P)
        test_logits = predict_grid(grid, {r: features["test"][r] for r in reps})
        for rep in reps:
            candidates = [p for p, key in enumerate(grid.keys) if key[0] == rep]
            val_scores = [topk_accuracy(val_logits[..., p], val_labels, 1) for p in candidates]
            chosen = max(range(len(candidates)), key=lambda j: val_scores[j])  # first best on ties
            best = candidates[chosen]
            _, lr, wd = grid.keys[best]
            n_wd = len(config.weight_decays)
            grids.setdefault(kind, {})[rep] = {
                "learning_rates": list(config.learning_rates), "weight_decays": list(config.weight_decays),
                "val_top1": [[round(v, 4) for v in val_scores[i : i + n_wd]] for i in range(0, len(val_scores), n_wd)],
                "selected": list(divmod(chosen, n_wd)),
            }  # fmt: skip
            rows.append(_rounded({"probe": kind, "representation": rep, "setting": f"lr={lr:g} wd={wd:g}",
                                  "selected": True, "effective_lr": lr * trained["lr_scale"],
                                  "val_top1": val_scores[chosen],
                                  "top1": topk_accuracy(test_logits[..., best], labels["test"], 1),
                                  "top5": topk_accuracy(test_logits[..., best], labels["test"], 5)}))  # fmt: skip

    picture = None
    if rows:
        picture = save_png(classification_figure(grids, rows), out_dir / FIGURE_NAME)
    training_data = "augmented (RandomResizedCrop 0.08-1 + flip through the backbone)" if settings.augment else (
        "cached center-crop features")  # fmt: skip
    return {
        "protocol": "classification",
        "settings": {**asdict(settings), "representations": used, "probe_training_data": training_data,
                     "feature_precision": extractor.precision_used},
        "probe_training": trained,
        "dataset": {"root": str(data.root), "classes": data.classes, "splits": data.note, "counts": counts,
                    "skipped": skipped},
        "results": rows,
        "selection_grids": grids,
        "picture": None if picture is None else str(picture),
    }  # fmt: skip
