"""Segmentation probes against brute-force loops and scikit-learn."""

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from capi_backbones.evals import Standardizer, knn_segment, logistic_segment, patch_pixel_labels


def test_patch_pixel_labels_cut_masks_into_row_major_patches():
    masks = torch.arange(2 * 4 * 6).reshape(2, 4, 6)  # two 4x6 masks, patch 2 -> 2x3 patches each
    labels = patch_pixel_labels(masks, 2)
    assert labels.shape == (12, 4)
    assert labels[0].tolist() == [0, 1, 6, 7]  # image 0, patch (0, 0)
    assert labels[4].tolist() == [14, 15, 20, 21]  # image 0, patch (1, 1)
    assert labels[6].tolist() == [24, 25, 30, 31]  # image 1, patch (0, 0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patch_pixel_labels(torch.zeros(1, 5, 6), 2)


def test_standardizer_matches_sklearn_standard_scaler():
    x = torch.randn(300, 6, dtype=torch.float64) * torch.tensor([1, 2, 3, 0, 5, 6]) + 4
    scaler = StandardScaler().fit(x.numpy())
    before = x.clone()
    ours = Standardizer.fit(x, chunk=64)
    torch.testing.assert_close(ours(x).double(), torch.from_numpy(scaler.transform(x.numpy())), rtol=1e-5, atol=1e-5)
    x32 = x.float()
    ours(x32)
    assert torch.equal(x, before) and torch.equal(x32, before.float())  # inputs are never modified


def brute_force(train, train_labels, queries, k, distance, ignore=255):
    out = torch.empty(len(queries), train_labels.shape[1], dtype=train_labels.dtype)
    for q in range(len(queries)):
        if distance == "cosine":
            d = [1 - float(queries[q] @ t / (queries[q].norm() * t.norm())) for t in train]
        else:
            d = [float((queries[q] - t).norm()) for t in train]
        nearest = sorted(range(len(train)), key=lambda i: d[i])[:k]
        for pixel in range(train_labels.shape[1]):
            votes = Counter(int(train_labels[i, pixel]) for i in nearest if int(train_labels[i, pixel]) != ignore)
            top = max(votes.values()) if votes else 0
            out[q, pixel] = min(label for label, n in votes.items() if n == top) if votes else ignore
    return out


@pytest.mark.parametrize("distance", ["cosine", "L2"])
def test_knn_segment_equals_a_brute_force_loop(distance):
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(37, 5, generator=g) * 2 + 1, torch.randn(11, 5, generator=g)
    labels = torch.randint(0, 4, (37, 6), generator=g, dtype=torch.int64).to(torch.int16)
    labels[labels == 3] = 255  # some ignored pixels
    labels[0] = 255  # a patch whose pixels are all ignored
    scaler = Standardizer.fit(train)
    got = knn_segment(train, labels, queries, ks=(1, 3, 10), distance=distance, standardizer=scaler,
                      train_chunk=8, query_chunk=4)  # fmt: skip
    for k in (1, 3, 10):
        expected = brute_force(scaler(train), labels, scaler(queries), k, distance)
        assert torch.equal(got[k], expected), k
    with pytest.raises(ValueError, match="Unknown distance"):
        knn_segment(train, labels, queries, distance="L1")


def test_logistic_segment_spreads_the_patch_prediction_over_its_pixels():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    x = torch.nn.functional.one_hot(labels, 3).float() * 4 + torch.randn(60, 3, generator=g) * 0.1
    pixel_labels = labels[:, None].repeat(1, 4)
    predicted = logistic_segment(x, pixel_labels, x, c=1.0)
    assert predicted.shape == (60, 4) and torch.equal(predicted, pixel_labels)


def textured_scene(rng, size=56):
    """A noise-textured background (class 0) with a striped disc (class 1) and a checkered square (class 2)."""
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(110, 25, (size, size, 3))
    mask = np.zeros((size, size), dtype=np.int64)
    cy, cx, r = rng.integers(14, size - 14, 2).tolist() + [int(rng.integers(8, 12))]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    top, left = rng.integers(0, size - 16, 2)
    square = (yy >= top) & (yy < top + 16) & (xx >= left) & (xx < left + 16) & ~disc
    image[disc] = np.where(((yy[disc] // 3) % 2)[:, None] == 0, [230, 40, 40], [120, 10, 10])
    image[square] = np.where(
        (((yy[square] // 4) + (xx[square] // 4)) % 2)[:, None] == 0, [20, 20, 220], [200, 200, 250]
    )
    mask[disc], mask[square] = 1, 2
    return np.clip(image, 0, 255).astype(np.uint8), mask
