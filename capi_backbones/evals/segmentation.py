"""Semantic segmentation from frozen patch features, as in the official evaluation.

Every patch carries the ps x ps pixel labels under it (``patch_pixel_labels``). Two classifiers of patches:

- k-NN (``knn_segment``): features standardised with statistics of the train set (``Standardizer``), cosine or L2
  distance, and each pixel of a query patch takes the most common label of the same pixel in its k nearest train
  patches. The search runs by blocks of queries and of train patches, so millions of train patches fit in memory.
- logistic regression (``logistic_segment``): scikit-learn on the most common label of each patch, the predicted
  label spread over the patch's pixels.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from capi_backbones.evals.metrics import DEFAULT_IGNORE_LABELS

__all__ = [
    "DEFAULT_SEGMENTATION_KS",
    "DISTANCES",
    "LOGISTIC_C_GRID",
    "Standardizer",
    "knn_segment",
    "logistic_segment",
    "patch_pixel_labels",
    "patch_mode_labels",
]

logger = logging.getLogger(__name__)

DEFAULT_SEGMENTATION_KS = (1, 3, 10, 30)
DISTANCES = ("cosine", "L2")
LOGISTIC_C_GRID = tuple(float(c) for c in 10 ** np.linspace(-6, 5, 8))
DISTANCE_BUDGET = 2**24  # entries of one (query x train) distance block: 64 MiB in float32
VOTE_BUDGET = 2**24  # entries of one (query x pixel x class) vote block


def patch_pixel_labels(masks: Tensor, patch_size: int) -> Tensor:
    """(N, H, W) label maps -> (N * h * w, ps * ps): the pixel labels of each patch, patches in row-major order
    (the order of ``patch_features.flatten(0, 2)`` for features (N, h, w, D))."""
    n, height, width = masks.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"Mask size {height}x{width} is not a multiple of the patch size {patch_size}.")
    h, w = height // patch_size, width // patch_size
    patches = masks.reshape(n, h, patch_size, w, patch_size).permute(0, 1, 3, 2, 4)  # (N, h, w, ps, ps)
    return patches.reshape(n * h * w, patch_size * patch_size)


def patch_mode_labels(pixel_labels: Tensor) -> Tensor:
    """The most common pixel label of each patch (ties: the smallest label), (M, L) -> (M,)."""
    return pixel_labels.mode(dim=1).values


@dataclass
class Standardizer:
    """Per-channel standardisation (x - mean) / std, fitted on train features only (scikit-learn's StandardScaler:
    population std, channels of zero variance left unscaled)."""

    mean: Tensor  # (D,) float64
    std: Tensor  # (D,) float64

    @classmethod
    def fit(cls, features: Tensor, chunk: int = 16_384) -> "Standardizer":
        """Statistics of (M, D) ``features``, accumulated in float64 by blocks of rows (any dtype, no copy)."""
        total = torch.zeros(features.shape[1], dtype=torch.float64)
        for start in range(0, len(features), chunk):
            total += features[start : start + chunk].to(torch.float64).sum(dim=0)
        mean = total / len(features)
        squares = torch.zeros_like(mean)
        for start in range(0, len(features), chunk):
            squares += features[start : start + chunk].to(torch.float64, copy=True).sub_(mean).square_().sum(dim=0)
        std = (squares / len(features)).sqrt()
        return cls(mean, torch.where(std > 0, std, torch.ones_like(std)))

    def __call__(self, features: Tensor) -> Tensor:
        """Standardised float32 copy of ``features``, on their device."""
        out = features.to(torch.float32, copy=True)  # one float32 copy, then in place
        return out.sub_(self.mean.to(out.device, torch.float32)).div_(self.std.to(out.device, torch.float32))


def _distances(queries: Tensor, keys: Tensor, distance: str) -> Tensor:
    if distance == "cosine":
        return 1 - torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    if distance == "L2":
        return torch.cdist(queries, keys)
    raise ValueError(f"Unknown distance '{distance}'. Choose one of {list(DISTANCES)}.")


@torch.no_grad()
def knn_segment(
    train_features: Tensor,
    train_pixel_labels: Tensor,
    query_features: Tensor,
    *,
    ks: Sequence[int] = DEFAULT_SEGMENTATION_KS,
    distance: str = "cosine",
    standardizer: Standardizer | None = None,
    ignore_labels: Sequence[int] = DEFAULT_IGNORE_LABELS,
    device: str | torch.device | None = None,
    query_chunk: int | None = None,
    train_chunk: int = 65_536,
    progress: bool = False,
) -> dict[int, Tensor]:
    """Pixel labels of query patches from their k nearest train patches, for each k in ``ks``.

    Args:
        train_features: (M, D) train patch features, any float dtype (e.g. float16 or a memory-mapped array to save
            memory); blocks of ``train_chunk`` rows are standardised and moved to ``device`` one at a time.
        train_pixel_labels: (M, L) integer labels of the L = ps*ps pixels of each train patch.
        query_features: (Q, D) patch features to label.
        ks: numbers of neighbours; one search for the largest serves them all.
        distance: ``"cosine"`` or ``"L2"``, on the standardised features.
        standardizer: applied to train and query features (fit it on the train features); None: raw features.
        ignore_labels: labels that do not vote (a pixel whose neighbours all carry one gets ``ignore_labels[0]``).
        device: where the search runs (default: the device of ``query_features``).

    Returns:
        ``{k: labels}``, labels (Q, L) with the dtype of ``train_pixel_labels``, on the CPU. A pixel takes the most
        common label of its neighbours' pixels at the same place; ties go to the smallest label.
    """
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"Expected train (M, D) and query (Q, D) features, got {tuple(train_features.shape)} and "
            f"{tuple(query_features.shape)}."
        )
    if train_pixel_labels.ndim != 2 or len(train_pixel_labels) != len(train_features):
        raise ValueError(
            f"train_pixel_labels must be ({len(train_features)}, L), got {tuple(train_pixel_labels.shape)}."
        )
    if len(train_features) == 0:
        raise ValueError("The train set has no patches.")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}.")
    _distances(query_features[:1].float(), query_features[:1].float(), distance)  # check the name early
    device = query_features.device if device is None else torch.device(device)
    k_max = min(max(ks), len(train_features))
    n_queries, n_pixels = len(query_features), train_pixel_labels.shape[1]
    ignored = [int(i) for i in ignore_labels]
    num_classes = _largest_label(train_pixel_labels, ignored) + 1
    train_chunk = min(train_chunk, len(train_features))
    query_chunk = query_chunk or max(1, DISTANCE_BUDGET // train_chunk)
    prepare = standardizer if standardizer is not None else (lambda x: x.float())

    # 1. the k_max nearest train patches of every query: train blocks outside (each standardised once), queries
    #    inside; a running top-k of (Q, k_max) is all that is kept between blocks
    best_distance = torch.full((n_queries, k_max), float("inf"), device=device)
    best_index = torch.zeros((n_queries, k_max), dtype=torch.long, device=device)
    blocks = range(0, len(train_features), train_chunk)
    for t0 in _progress(blocks, progress, "k-NN segmentation"):
        keys = prepare(train_features[t0 : t0 + train_chunk].to(device))  # (t, D)
        for q0 in range(0, n_queries, query_chunk):
            queries = prepare(query_features[q0 : q0 + query_chunk].to(device))  # (q, D)
            dist, index = _distances(queries, keys, distance).topk(min(k_max, len(keys)), dim=1, largest=False)
            dist = torch.cat([best_distance[q0 : q0 + query_chunk], dist], dim=1)
            index = torch.cat([best_index[q0 : q0 + query_chunk], index + t0], dim=1)
            dist, order = dist.topk(k_max, dim=1, largest=False)  # (q, k_max), nearest first
            best_distance[q0 : q0 + query_chunk], best_index[q0 : q0 + query_chunk] = dist, index.gather(1, order)
        del keys

    # 2. per pixel, the most common label of the neighbours' pixels at the same place
    results = {k: torch.empty(n_queries, n_pixels, dtype=train_pixel_labels.dtype) for k in ks}
    vote_chunk = max(1, VOTE_BUDGET // (n_pixels * (num_classes + 1)))
    for q0 in range(0, n_queries, vote_chunk):
        index = best_index[q0 : q0 + vote_chunk].cpu()
        neighbour_labels = train_pixel_labels[index].to(device).long()  # (q, k_max, L)
        for k in ks:
            results[k][q0 : q0 + len(index)] = _pixel_mode(neighbour_labels[:, :k], num_classes, ignored).cpu()
    return results


def _largest_label(labels: Tensor, ignored: list[int], chunk: int = 65_536) -> int:
    """The largest label that is not ignored (0 if there is none), by blocks of rows: no copy of all labels."""
    largest = 0
    for start in range(0, len(labels), chunk):
        block = labels[start : start + chunk]
        keep = torch.ones_like(block, dtype=torch.bool)
        for label in ignored:
            keep &= block != label
        if keep.any():
            largest = max(largest, int(block[keep].max()))
    return largest


def _pixel_mode(labels: Tensor, num_classes: int, ignored: list[int]) -> Tensor:
    """(q, k, L) labels -> (q, L): per pixel the most common non-ignored label over k (ties: smallest)."""
    q, _, n_pixels = labels.shape
    votable = (labels >= 0) & (labels < num_classes) & ~torch.isin(labels, torch.tensor(ignored, device=labels.device))
    slot = torch.where(votable, labels, num_classes)  # ignored labels vote in a dropped extra column
    counts = torch.zeros(q, n_pixels, num_classes + 1, device=labels.device)
    counts.scatter_add_(2, slot.permute(0, 2, 1), torch.ones_like(slot, dtype=counts.dtype).permute(0, 2, 1))
    counts = counts[..., :num_classes]
    best = counts.argmax(dim=2)  # the first (smallest) label among the most voted
    return torch.where(counts.sum(dim=2) > 0, best, ignored[0] if ignored else 0)


def logistic_segment(
    train_features: Tensor,
    train_pixel_labels: Tensor,
    query_features: Tensor,
    *,
    c: float,
    standardizer: Standardizer | None = None,
    ignore_labels: Sequence[int] = DEFAULT_IGNORE_LABELS,
    max_iter: int = 1000,
) -> Tensor:
    """Multinomial logistic regression (scikit-learn, L2, lbfgs, inverse strength ``c``) fitted on the most common
    label of each train patch (patches whose most common label is an ignore label are left out); each query patch's
    predicted label is given to all its pixels. Returns (Q, L) labels with the dtype of ``train_pixel_labels``."""
    from sklearn.linear_model import LogisticRegression

    prepare = standardizer if standardizer is not None else (lambda x: x.float())
    targets = patch_mode_labels(train_pixel_labels)
    keep = ~torch.isin(targets, torch.tensor(list(ignore_labels), dtype=targets.dtype))
    if len(torch.unique(targets[keep])) < 2:
        raise ValueError("Logistic regression needs at least 2 classes among the train patches.")
    x_train = prepare(train_features[keep]).numpy()
    estimator = LogisticRegression(C=c, max_iter=max_iter)
    estimator.fit(x_train, targets[keep].numpy())
    predicted = torch.from_numpy(estimator.predict(prepare(query_features).numpy())).to(train_pixel_labels.dtype)
    return predicted[:, None].expand(-1, train_pixel_labels.shape[1]).contiguous()


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="chunk")
