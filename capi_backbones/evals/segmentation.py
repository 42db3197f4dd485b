"""Semantic segmentation from frozen patch features, as in the official evaluation.

Every patch carries the ps x ps pixel labels under it (``patch_pixel_labels``). Two classifiers of patches:

- k-NN (``knn_segment``): features standardised with statistics of the train set (``Standardizer``), cosine or L2
  distance (in bfloat16 as the official ADE20K setting, or float32), and each pixel of a query patch takes the most
  common label of the same pixel in its k nearest train patches, ignore labels included; train patches whose most
  common label is an ignore label are not fitted. The search runs by blocks of queries and of train patches, so
  millions of train patches fit in memory.
- logistic regression (``logistic_segment``): scikit-learn's L-BFGS on the most common label of each patch (the
  official uses cuML's: same loss, tolerance and iterations; see ``logistic_segment``), the predicted label spread
  over the patch's pixels.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from capi_backbones.evals.defaults import DEFAULT_IGNORE_LABELS, DEFAULT_SEGMENTATION_KS, DISTANCES, KNN_DTYPES
from capi_backbones.runtime.precision import native_bf16

__all__ = [
    "DEFAULT_SEGMENTATION_KS",
    "DISTANCES",
    "KNN_DTYPES",
    "LOGISTIC_C_GRID",
    "LOGISTIC_TOLERANCE",
    "Standardizer",
    "fit_patches",
    "knn_segment",
    "logistic_segment",
    "patch_pixel_labels",
    "patch_mode_labels",
    "resolve_knn_dtype",
]

logger = logging.getLogger(__name__)

LOGISTIC_C_GRID = tuple(float(c) for c in 10 ** np.linspace(-6, 5, 8))
LOGISTIC_TOLERANCE = 1e-12  # the official (cuML) tolerance; scikit-learn's default 1e-4 stops too early
LOGISTIC_MAX_ITER = 1000
DISTANCE_BUDGET = 2**24  # entries of one (query x train) distance block: 64 MiB in float32
VOTE_BUDGET = 2**24  # entries of one (query x neighbour x pixel) vote block


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


def resolve_knn_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """``"auto"`` (the official bfloat16 where ``device`` has it natively, else float32), ``"bfloat16"`` or
    ``"float32"`` -> the dtype of the k-NN search. Native: ``runtime.precision.native_bf16``, as for the models."""
    if name not in KNN_DTYPES:
        raise ValueError(f"Unknown k-NN dtype '{name}'. Choose one of {list(KNN_DTYPES)}.")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return getattr(torch, name)


def _distances(queries: Tensor, keys: Tensor, distance: str) -> Tensor:
    """The official distances, computed in the dtype of the inputs: cosine ``1 - a/|a| . b/|b|``, L2 ``cdist``
    (in bfloat16, which CPU ``cdist`` lacks, the matrix-product form that ``cdist`` uses for large inputs)."""
    if distance == "cosine":
        queries = queries / torch.norm(queries, dim=-1)[:, None]
        keys = keys / torch.norm(keys, dim=-1)[:, None]
        return 1 - queries @ keys.T
    if distance == "L2":
        if queries.dtype != torch.bfloat16 or queries.device.type == "cuda":
            return torch.cdist(queries, keys)
        q_norm, k_norm = queries.pow(2).sum(-1, keepdim=True), keys.pow(2).sum(-1, keepdim=True)
        q_ext = torch.cat([-2 * queries, q_norm, torch.ones_like(q_norm)], dim=-1)
        k_ext = torch.cat([keys, torch.ones_like(k_norm), k_norm], dim=-1)
        return (q_ext @ k_ext.T).clamp_min_(1e-30).sqrt_()
    raise ValueError(f"Unknown distance '{distance}'. Choose one of {list(DISTANCES)}.")


def _order_keys(distances: Tensor, first_index: int) -> Tensor:
    """int64 keys that sort like (distance, train index): the float's bits made monotonic, then the index. Equal
    distances (frequent in bfloat16) go to the earlier train patch, so the neighbours do not depend on blocks."""
    if distances.dtype == torch.bfloat16:
        bits = distances.view(torch.int16).to(torch.int64)
        bits = torch.where(bits < 0, bits ^ 0x7FFF, bits)
    else:
        bits = distances.to(torch.float32).view(torch.int32).to(torch.int64)
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    index = torch.arange(first_index, first_index + distances.shape[1], device=distances.device)
    return (bits << 32) | index


def fit_patches(train_pixel_labels: Tensor, ignore_labels: Sequence[int], chunk: int = 65_536) -> Tensor:
    """Indices of the train patches the official fit keeps: those whose most common pixel label (``Tensor.mode``:
    ties to the smallest) is not an ignore label. Computed by blocks of rows."""
    ignored = torch.tensor([int(label) for label in ignore_labels], dtype=torch.long)
    keep = []
    for start in range(0, len(train_pixel_labels), chunk):
        modes = train_pixel_labels[start : start + chunk].long().mode(dim=1).values
        keep.append(torch.nonzero(~torch.isin(modes, ignored)).flatten() + start)
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)


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
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    query_chunk: int | None = None,
    train_chunk: int = 65_536,
    progress: bool = False,
) -> dict[int, Tensor]:
    """Pixel labels of query patches from their k nearest train patches, for each k in ``ks``, as the official
    ``KNNClassifier``.

    The fit leaves out the train patches whose most common pixel label is an ignore label (``fit_patches``). Each
    pixel of a query patch then takes the most common label of the same pixel in its k nearest kept train patches,
    ignore labels included (a pixel can be predicted as an ignore label, which the metrics count as a miss); ties
    go to the smallest label (``Tensor.mode``). Neighbours at equal distance are taken in train order.

    Args:
        train_features: (M, D) train patch features, any float dtype (e.g. float16 or a memory-mapped array to save
            memory); blocks of ``train_chunk`` rows are standardised and moved to ``device`` one at a time.
        train_pixel_labels: (M, L) integer labels of the L = ps*ps pixels of each train patch.
        query_features: (Q, D) patch features to label.
        ks: numbers of neighbours; one search for the largest serves them all.
        distance: ``"cosine"`` or ``"L2"``, on the standardised features.
        standardizer: applied to train and query features (fit it on the train features); None: raw features.
        ignore_labels: train patches whose most common label is one of these are not fitted.
        dtype: of the distance computation (the official ADE20K setting is ``torch.bfloat16``; see
            ``resolve_knn_dtype``); features are standardised in float32, then cast.
        device: where the search runs (default: the device of ``query_features``).

    Returns:
        ``{k: labels}``, labels (Q, L) with the dtype of ``train_pixel_labels``, on the CPU.
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
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}.")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"The k-NN dtype must be torch.float32 or torch.bfloat16, got {dtype}.")
    _distances(query_features[:1].float(), query_features[:1].float(), distance)  # check the name early
    kept = fit_patches(train_pixel_labels, ignore_labels)
    if len(kept) == 0:
        raise ValueError("Every train patch is mostly ignore labels: the k-NN has nothing to fit.")
    device = query_features.device if device is None else torch.device(device)
    k_max = min(max(ks), len(kept))
    n_queries, n_pixels = len(query_features), train_pixel_labels.shape[1]
    train_chunk = min(train_chunk, len(kept))
    query_chunk = query_chunk or max(1, DISTANCE_BUDGET // train_chunk)
    standardize = standardizer if standardizer is not None else (lambda x: x.float())

    def prepare(features: Tensor) -> Tensor:
        return standardize(features.to(device)).to(dtype)

    # 1. the k_max nearest kept train patches of every query: train blocks outside (each prepared once), queries
    #    inside; a running top-k of (distance, train order) keys, (Q, k_max), is all that is kept between blocks
    best = torch.full((n_queries, k_max), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    blocks = range(0, len(kept), train_chunk)
    for t0 in _progress(blocks, progress, "k-NN segmentation"):
        keys = prepare(train_features[kept[t0 : t0 + train_chunk]])  # (t, D)
        for q0 in range(0, n_queries, query_chunk):
            queries = prepare(query_features[q0 : q0 + query_chunk])  # (q, D)
            block = _order_keys(_distances(queries, keys, distance), t0)
            block = block.topk(min(k_max, block.shape[1]), dim=1, largest=False).values
            merged = torch.cat([best[q0 : q0 + query_chunk], block], dim=1)
            best[q0 : q0 + query_chunk] = merged.topk(k_max, dim=1, largest=False, sorted=True).values
        del keys
    neighbours = kept[(best & 0xFFFFFFFF).cpu()]  # (Q, k_max) train rows, nearest first

    # 2. per pixel, the most common label of the neighbours' pixels at the same place (official: Tensor.mode)
    results = {k: torch.empty(n_queries, n_pixels, dtype=train_pixel_labels.dtype) for k in ks}
    vote_chunk = max(1, VOTE_BUDGET // (n_pixels * k_max))
    for q0 in range(0, n_queries, vote_chunk):
        neighbour_labels = train_pixel_labels[neighbours[q0 : q0 + vote_chunk]]  # (q, k_max, L)
        for k in ks:
            results[k][q0 : q0 + len(neighbour_labels)] = neighbour_labels[:, :k].mode(dim=1).values
    return results


def logistic_segment(
    train_features: Tensor,
    train_pixel_labels: Tensor,
    query_features: Tensor,
    *,
    c: float,
    standardizer: Standardizer | None = None,
    ignore_labels: Sequence[int] = DEFAULT_IGNORE_LABELS,
    max_iter: int = LOGISTIC_MAX_ITER,
    tol: float = LOGISTIC_TOLERANCE,
) -> Tensor:
    """Multinomial logistic regression (L2, inverse strength ``c``) fitted on the most common label of each train
    patch (patches whose most common label is an ignore label are left out, ``fit_patches``); each query patch's
    predicted label is given to all its pixels. Returns (Q, L) labels with the dtype of ``train_pixel_labels``.

    The official fit is cuML's L-BFGS with ``tol=1e-12``, ``max_iter=1000``, 50 line-search steps and a memory of
    5 corrections. This is scikit-learn's ``lbfgs`` with the same tolerance (its gradient tolerance), iterations
    and line-search steps; scikit-learn fixes the memory at scipy's 10 corrections (not settable), the one setting
    that differs."""
    from sklearn.linear_model import LogisticRegression

    prepare = standardizer if standardizer is not None else (lambda x: x.float())
    keep = fit_patches(train_pixel_labels, ignore_labels)
    targets = patch_mode_labels(train_pixel_labels[keep])
    if len(torch.unique(targets)) < 2:
        raise ValueError("Logistic regression needs at least 2 classes among the train patches.")
    x_train = prepare(train_features[keep]).numpy()
    estimator = LogisticRegression(C=c, max_iter=max_iter, tol=tol)
    estimator.fit(x_train, targets.numpy())
    predicted = torch.from_numpy(estimator.predict(prepare(query_features).numpy())).to(train_pixel_labels.dtype)
    return predicted[:, None].expand(-1, train_pixel_labels.shape[1]).contiguous()


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="chunk")
