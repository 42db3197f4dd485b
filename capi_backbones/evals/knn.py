"""k-NN classification of frozen features, as in DINO: cosine similarity, votes weighted by exp(sim / T)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from capi_backbones.evals.defaults import DEFAULT_KNN_KS, KNN_TEMPERATURE

__all__ = ["DEFAULT_KNN_KS", "KNN_TEMPERATURE", "knn_classify", "knn_top1"]

SIMILARITY_BUDGET = 2**26  # entries of one (queries x train) similarity block: 256 MiB in float32


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    num_classes: int | None = None,
    ks: Sequence[int] = DEFAULT_KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    device: str | torch.device | None = None,
    query_chunk: int | None = None,
) -> dict[int, Tensor]:
    """Class votes of each query from its ``k`` nearest train features, for each ``k`` in ``ks``.

    Args:
        train_features: (N, D) features of the labelled set (any backbone; L2-normalised here).
        train_labels: (N,) class indices in [0, num_classes).
        query_features: (Q, D) features to classify.
        num_classes: C (default: ``train_labels.max() + 1``).
        ks: numbers of neighbours; one search for the largest serves them all.
        temperature: T of the vote weights exp(cosine / T) (DINO: 0.07).
        device: where the search runs (default: the device of ``train_features``); results come back on the CPU.
        query_chunk: queries per similarity block (default: as many as fit in 256 MiB of similarities).

    Returns:
        ``{k: votes}``, votes (Q, C) float32: the summed weights of the neighbours of each class. ``votes.argmax(1)``
        is the prediction; ``metrics.topk_accuracy(votes, labels, 5)`` the top-5 accuracy.
    """
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"Expected train (N, D) and query (Q, D) features, got {tuple(train_features.shape)} and "
            f"{tuple(query_features.shape)}."
        )
    if train_labels.shape != train_features.shape[:1]:
        raise ValueError(f"train_labels must be ({len(train_features)},), got {tuple(train_labels.shape)}.")
    if len(train_features) == 0:
        raise ValueError("The train set is empty: k-NN needs labelled features.")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}.")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}), got [{train_labels.min()}, {train_labels.max()}]."
        )
    device = train_features.device if device is None else torch.device(device)
    k_max = min(max(ks), len(train_features))
    train = F.normalize(train_features.to(device, torch.float32), dim=1)  # (N, D)
    labels = train_labels.to(device, torch.long)
    chunk = query_chunk or max(1, SIMILARITY_BUDGET // len(train))
    votes = {k: torch.empty(len(query_features), num_classes) for k in ks}
    for start in range(0, len(query_features), chunk):
        queries = F.normalize(query_features[start : start + chunk].to(device, torch.float32), dim=1)  # (q, D)
        similarity, index = (queries @ train.T).topk(k_max, dim=1)  # (q, k_max), sorted, most similar first
        weights = (similarity / temperature).exp()
        neighbour_labels = labels[index]  # (q, k_max)
        for k in ks:
            block = torch.zeros(len(queries), num_classes, device=device)
            block.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            votes[k][start : start + len(queries)] = block.cpu()
    return votes


@torch.no_grad()
def knn_top1(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Top-1 accuracy of the DINOv2 weighted k-NN vote (cosine similarity, weights exp(sim / T)) of ``test_features``
    (Q, D) among ``train_features`` (N, D): a stable, one-call entry point (used by the training's k-NN monitor).

    Labels are class indices; the classes are those of train and test together. Runs where the train features are.
    """
    if test_labels.shape != test_features.shape[:1]:
        raise ValueError(f"test_labels must be ({len(test_features)},), got {tuple(test_labels.shape)}.")
    if len(test_features) == 0:
        raise ValueError("The test set is empty: nothing to score.")
    num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1 if len(train_labels) else 1
    votes = knn_classify(train_features, train_labels, test_features, num_classes=num_classes, ks=(k,),
                         temperature=temperature)[k]  # fmt: skip
    return (votes.argmax(dim=1) == test_labels.cpu().long()).double().mean().item()
