"""Metrics against scikit-learn and direct loops."""

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from capi_backbones.evals import miou, pixel_accuracy, topk_accuracy


def test_miou_equals_sklearn_jaccard_on_the_scored_pixels():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, size=(3, 20, 20))
    target[:, :3] = 255  # ignored rows
    prediction = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 8, size=target.shape))
    prediction[target == 255] = 7  # whatever is predicted on ignored pixels does not count
    keep = target != 255
    expected = jaccard_score(target[keep], prediction[keep], average="macro")
    t, p = torch.from_numpy(target), torch.from_numpy(prediction)
    assert miou(t, p, (255,)) == pytest.approx(expected, abs=1e-12)
    assert pixel_accuracy(t, p, (255,)) == pytest.approx((target[keep] == prediction[keep]).mean())


def official_miou(target, prediction, ignore_labels):
    """The official mIoU: scikit-learn's macro Jaccard on the pixels whose target is not ignored."""
    target, prediction = np.asarray(target).ravel(), np.asarray(prediction).ravel()
    keep = ~np.isin(target, ignore_labels)
    return jaccard_score(target[keep], prediction[keep], average="macro")


def test_miou_counts_a_predicted_ignore_label_as_a_class_with_iou_0():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 6, size=(2, 16, 16))
    target[:, :2] = 255
    prediction = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 6, size=target.shape))
    prediction[rng.random(target.shape) < 0.1] = 255  # some pixels predicted as ignored
    prediction[rng.random(target.shape) < 0.1] = 0
    for ignore in ((0, 255), (255,)):
        expected = official_miou(target, prediction, ignore)
        got = miou(torch.from_numpy(target), torch.from_numpy(prediction), ignore)
        assert got == pytest.approx(expected, abs=1e-12)
    assert miou(torch.tensor([1, 1, 2]), torch.tensor([1, 255, 2])) == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_default_ignore_labels_are_the_official_0_and_255():
    target, prediction = torch.tensor([0, 1, 2, 255]), torch.tensor([2, 1, 2, 1])
    assert pixel_accuracy(target, prediction) == 1.0 and miou(target, prediction) == 1.0


def test_topk_accuracy_equals_a_loop():
    scores = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    for k in (1, 3, 5):
        expected = np.mean([int(labels[i]) in scores[i].argsort(descending=True)[:k].tolist() for i in range(50)])
        assert topk_accuracy(scores, labels, k) == pytest.approx(expected)


def test_metrics_refuse_mismatched_or_empty_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        miou(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="ignore label"):
        pixel_accuracy(torch.full((4,), 255), torch.zeros(4))
