"""Metrics of the probes: top-k accuracy of class scores, and mIoU / pixel accuracy of label maps."""

from collections.abc import Sequence

import torch
from torch import Tensor

from capi_backbones.evals.defaults import DEFAULT_IGNORE_LABELS

__all__ = ["DEFAULT_IGNORE_LABELS", "miou", "pixel_accuracy", "topk_accuracy"]


def topk_accuracy(scores: Tensor, labels: Tensor, k: int = 1) -> float:
    """Share of rows of ``scores`` (N, C) whose ``k`` highest classes contain ``labels`` (N,)."""
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(
            f"Expected scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}."
        )
    if len(labels) == 0:
        raise ValueError("No samples to score.")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N, k)
    return (top == labels.to(top.device)[:, None]).any(dim=1).float().mean().item()


def _valid(target: Tensor, prediction: Tensor, ignore_labels: Sequence[int]) -> tuple[Tensor, Tensor]:
    if target.shape != prediction.shape:
        raise ValueError(f"Target and prediction shapes differ: {tuple(target.shape)} vs {tuple(prediction.shape)}.")
    target, prediction = target.reshape(-1).long(), prediction.reshape(-1).long().to(target.device)
    keep = ~torch.isin(target, torch.tensor(list(ignore_labels), dtype=torch.long, device=target.device))
    if not keep.any():
        raise ValueError("Every target pixel carries an ignore label: nothing to score.")
    return target[keep], prediction[keep]


def pixel_accuracy(target: Tensor, prediction: Tensor, ignore_labels: Sequence[int] = DEFAULT_IGNORE_LABELS) -> float:
    """Share of the pixels whose target is not an ignore label that are predicted right."""
    target, prediction = _valid(target, prediction, ignore_labels)
    return (target == prediction).float().mean().item()


def miou(target: Tensor, prediction: Tensor, ignore_labels: Sequence[int] = DEFAULT_IGNORE_LABELS) -> float:
    """Mean intersection over union (macro Jaccard), as the official evaluation computes it.

    Pixels whose target is an ignore label are dropped; the mean runs over every label present in the remaining
    targets or predictions (scikit-learn's ``jaccard_score(target, prediction, average="macro")`` on those pixels).
    A pixel predicted as an ignore label is therefore a miss of its target class, and the ignore label counts as
    one more class, with IoU 0.
    """
    target, prediction = _valid(target, prediction, ignore_labels)
    classes, both = torch.unique(torch.cat([target, prediction]), return_inverse=True)
    t, p = both[: len(target)], both[len(target) :]
    n = len(classes)
    intersection = torch.bincount(t[t == p], minlength=n).double()
    union = torch.bincount(t, minlength=n).double() + torch.bincount(p, minlength=n).double() - intersection
    return (intersection / union).mean().item()
