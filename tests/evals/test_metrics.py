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
    assert miou(torch.from_numpy(target), torch.from_numpy(prediction)) == pytest.approx(expected, abs=1e-12)
    assert pixel_accuracy(torch.from_numpy(target), torch.from_numpy(prediction)) == pytest.approx(
        (target[keep] == prediction[keep]).mean()
    )


def test_miou_treats_a_predicted_ignore_label_as_a_miss_not_a_class():
    target = torch.tensor([0, 0, 1, 1, 2])
    prediction = torch.tensor([0, 255, 1, 1, 2])
    labels = [0, 1, 2]  # 255 is not a class
    expected = jaccard_score(target.numpy(), prediction.numpy(), labels=labels, average="macro")
    assert miou(target, prediction) == pytest.approx(expected)


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
