"""A k-NN monitor while training: the teacher's (optionally the student's) k-NN top-1 on a labelled folder.

CAPI's features first get worse than at random init, then better; the loss does not show which phase a run is in.
Every ``monitor.every`` steps (and before the first step of a run) the monitor embeds the train and test images of
``monitor.data`` (the class-folder layout ``capi-backbones eval classify`` reads) with the current teacher and
scores the test images by k-NN on the train ones, with the package's own k-NN (``evals.knn``, DINOv2's weighted
vote). The images are decoded once, at start, and center-cropped at the training resolution as ``eval classify``
does (``transforms.center_crop``: the official 256/224 resize and crop); the monitor reads no RNG and changes no
weight, so training steps are the same with or without it.

Imported only when ``monitor.data`` is set: it reads images with ``features`` and scores with ``evals``.
"""

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from capi_backbones.evals.datasets import read_classification_folders
from capi_backbones.evals.knn import knn_classify
from capi_backbones.features.preprocessing import resize_and_normalize
from capi_backbones.images import load_image
from capi_backbones.models import CapiModel
from capi_backbones.train.config import MonitorConfig
from capi_backbones.transforms import center_crop

__all__ = ["KnnMonitor", "KnnScores"]

logger = logging.getLogger(__name__)


@dataclass
class KnnScores:
    teacher: float  # k-NN top-1 of the teacher on the test images
    student: float | None  # the same for the student, when monitor.student is set
    seconds: float  # wall time of the evaluation

    def record(self) -> dict[str, float]:
        """The fields written to metrics.jsonl."""
        out = {"knn_top1": self.teacher, "knn_seconds": self.seconds}
        if self.student is not None:
            out["knn_top1_student"] = self.student
        return out


def _evenly_spaced(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    return [items[round(i * (len(items) - 1) / (limit - 1))] if limit > 1 else items[0] for i in range(limit)]


def _load(items: list[tuple[Path, int]], size: int, split: str) -> tuple[Tensor, Tensor]:
    """(N, 3, size, size) float16 normalised images and (N,) labels; unreadable images are left out, counted."""
    images, labels, failed = [], [], []
    for path, label in items:
        try:
            image = center_crop(load_image(path), size)  # the crop of `eval classify`
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, size, size) uint8
        except (OSError, ValueError) as error:
            failed.append(str(error))
            continue
        images.append(resize_and_normalize(pixels, (size, size)).to(torch.float16))
        labels.append(label)
    if failed:
        logger.warning("k-NN monitor: left out %d unreadable %s images (first: %s)", len(failed), split, failed[0])
    if not images:
        raise ValueError(f"The k-NN monitor found no readable {split} image in monitor.data; check the folder.")
    return torch.stack(images), torch.tensor(labels)


class KnnMonitor:
    """Holds the monitor's images (decoded once) and scores a model on them."""

    def __init__(self, config: MonitorConfig, image_size: int, device: torch.device) -> None:
        start = time.perf_counter()
        data = read_classification_folders(config.data)
        self.config = config
        self.device = device
        self.classes = data.classes
        self.train_images, self.train_labels = _load(_evenly_spaced(data.train, config.max_images), image_size, "train")
        self.test_images, self.test_labels = _load(_evenly_spaced(data.test, config.max_images), image_size, "test")
        logger.info(
            "k-NN monitor: %d train and %d test images of %d classes from %s, every %d steps (%.1f s to load).",
            len(self.train_labels), len(self.test_labels), len(self.classes), config.data, config.every,
            time.perf_counter() - start,
        )  # fmt: skip

    @torch.no_grad()
    def features(self, model: CapiModel, images: Tensor, autocast: Callable[[], AbstractContextManager]) -> Tensor:
        """(N, D) float32 features of ``images`` (the configured representation), in batches."""
        out = []
        for start in range(0, len(images), self.config.batch_size):
            batch = images[start : start + self.config.batch_size].to(self.device, torch.float32)
            with autocast():
                result = model.forward_features(batch, pooled=self.config.representation == "pooled")
            pooled = result.pooled if self.config.representation == "pooled" else result.patch_features.mean((1, 2))
            out.append(pooled.float())
        return torch.cat(out)

    @torch.no_grad()
    def top1(self, model: CapiModel, autocast: Callable[[], AbstractContextManager]) -> float:
        """k-NN top-1 of ``model`` (put in eval mode for the evaluation, then back) on the test images."""
        was_training = model.training
        model.eval()
        try:
            train = self.features(model, self.train_images, autocast)
            test = self.features(model, self.test_images, autocast)
        finally:
            model.train(was_training)
        k = self.config.k
        votes = knn_classify(train, self.train_labels, test, num_classes=len(self.classes), ks=(k,))[k]
        return float((votes.argmax(dim=1) == self.test_labels).float().mean())

    def evaluate(
        self, teacher: CapiModel, student: CapiModel | None, autocast: Callable[[], AbstractContextManager]
    ) -> KnnScores:
        """Scores of the teacher (and the student, when given and monitor.student is set); ``autocast`` makes the
        training's autocast context."""
        start = time.perf_counter()
        teacher_top1 = self.top1(teacher, autocast)
        student_top1 = self.top1(student, autocast) if student is not None and self.config.student else None
        return KnnScores(teacher_top1, student_top1, time.perf_counter() - start)
