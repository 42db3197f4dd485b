"""Segmentation probes against brute-force loops and scikit-learn."""

import os
import signal
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from capi_backbones.evals import Standardizer, knn_segment, logistic_segment, patch_pixel_labels
from capi_backbones.evals.datasets import segmentation_held_out_split
from capi_backbones.evals.segmentation import fit_patches, resolve_knn_dtype
from capi_backbones.evals.segmentation_protocol import read_mask, select_knn_setting


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


def most_common(values) -> int:
    """torch.mode's rule, written out: the most frequent value, ties to the smallest."""
    counts = Counter(int(v) for v in values)
    top = max(counts.values())
    return min(label for label, n in counts.items() if n == top)


def official_knn(train, train_labels, queries, k, distance, ignore=(0, 255)):
    """The official KNNClassifier, written out in numpy (float64 distances): drop the train patches whose most
    common label is ignored, take the k nearest (ties to the earlier train patch), and give each pixel the most
    common label of its neighbours at that pixel, ignore labels included."""
    train, queries = np.asarray(train, np.float64), np.asarray(queries, np.float64)
    train_labels = np.asarray(train_labels)
    kept = [i for i in range(len(train)) if most_common(train_labels[i]) not in ignore]
    train, train_labels = train[kept], train_labels[kept]
    if distance == "cosine":
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        distances = 1 - unit(queries) @ unit(train).T
    else:
        distances = np.sqrt(((queries[:, None] - train[None]) ** 2).sum(-1))
    out = np.empty((len(queries), train_labels.shape[1]), dtype=np.int64)
    for q in range(len(queries)):
        nearest = np.argsort(distances[q], kind="stable")[:k]
        out[q] = [most_common(train_labels[nearest, pixel]) for pixel in range(train_labels.shape[1])]
    return torch.from_numpy(out)


def labels_with_ignored_pixels(generator, n=37, pixels=6):
    labels = torch.randint(0, 5, (n, pixels), generator=generator, dtype=torch.int64)
    labels[labels == 4] = 255  # ignored pixels, 0 is ignored too by default
    labels[0] = 255  # a patch whose pixels are all ignored
    labels[1, :4] = 0  # a patch mostly made of the other ignore label
    return labels.to(torch.int16)


@pytest.mark.parametrize("distance", ["cosine", "L2"])
def test_knn_segment_equals_the_official_classifier_written_in_numpy(distance):
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(37, 5, generator=g) * 2 + 1, torch.randn(11, 5, generator=g)
    labels = labels_with_ignored_pixels(g)
    scaler = Standardizer.fit(train)
    got = knn_segment(train, labels, queries, ks=(1, 3, 10), distance=distance, standardizer=scaler,
                      train_chunk=8, query_chunk=4)  # fmt: skip
    predicted_ignored = 0
    for k in (1, 3, 10):
        expected = official_knn(scaler(train).numpy(), labels.numpy(), scaler(queries).numpy(), k, distance)
        assert torch.equal(got[k].long(), expected), k
        predicted_ignored += int(torch.isin(expected, torch.tensor([0, 255])).sum())
    assert predicted_ignored > 0  # the case exercises ignore labels in the vote
    with pytest.raises(ValueError, match="Unknown distance"):
        knn_segment(train, labels, queries, distance="L1")


def test_knn_segment_fit_leaves_out_mostly_ignored_patches():
    # the query sits on a train patch that is mostly ignore label: it must not be a neighbour
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    labels = torch.tensor([[255, 255, 3], [2, 2, 2], [1, 1, 255]], dtype=torch.int16)
    assert fit_patches(labels, (0, 255)).tolist() == [1, 2]
    got = knn_segment(train, labels, torch.tensor([[1.0, 0.01]]), ks=(1,))[1]
    assert got.tolist() == [[1, 1, 255]]  # the nearest kept patch, its ignored pixel voting too


def test_knn_segment_in_bfloat16_follows_the_official_cosine_in_bfloat16():
    g = torch.Generator().manual_seed(1)
    train, queries = torch.randn(64, 16, generator=g), torch.randn(9, 16, generator=g)
    labels = labels_with_ignored_pixels(g, n=64)
    got = knn_segment(train, labels, queries, ks=(1, 5), distance="cosine", dtype=torch.bfloat16, train_chunk=16)
    kept = [i for i in range(64) if most_common(labels[i]) not in (0, 255)]
    a, b = queries.bfloat16(), train[kept].bfloat16()  # the official: cast, normalise and multiply in bfloat16
    distances = (1 - (a / torch.norm(a, dim=-1)[:, None]) @ (b / torch.norm(b, dim=-1)[:, None]).T).float().numpy()
    for k in (1, 5):
        for q in range(len(queries)):
            nearest = np.asarray(kept)[np.argsort(distances[q], kind="stable")[:k]]
            expected = [most_common(labels[nearest, pixel]) for pixel in range(labels.shape[1])]
            assert got[k][q].tolist() == expected, (k, q)
    fp32 = knn_segment(train, labels, queries, ks=(5,), distance="cosine")[5]
    print(f"bfloat16 vs float32: {(fp32 != got[5]).sum()} of {fp32.numel()} pixels differ")


def test_knn_dtype_auto_is_bfloat16_only_where_native(monkeypatch):
    from capi_backbones.runtime import precision

    # the package's one detection of native bf16 decides (runtime.precision), as it does for the models
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: None)
    assert resolve_knn_dtype("auto", "cpu") == torch.float32
    assert resolve_knn_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: "AMX-BF16")
    assert resolve_knn_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cuda_bf16_support", lambda device: False)
    assert resolve_knn_dtype("auto", "cuda") == torch.float32  # a pre-Ampere GPU emulates bf16
    monkeypatch.setattr(precision, "cuda_bf16_support", lambda device: True)
    assert resolve_knn_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown k-NN dtype"):
        resolve_knn_dtype("float16", "cpu")


def test_logistic_segment_stops_at_the_official_tolerance():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=g)
    x = torch.randn(400, 12, generator=g) + torch.nn.functional.one_hot(labels, 12).float() * 0.8
    queries = torch.randn(300, 12, generator=g)
    pixel_labels = (labels + 1)[:, None].repeat(1, 4)  # labels 1..4: none ignored
    official = LogisticRegression(C=1e5, tol=1e-12, max_iter=1000).fit(x.numpy(), (labels + 1).numpy())
    predicted = logistic_segment(x, pixel_labels, queries, c=1e5)
    assert torch.equal(predicted[:, 0], torch.from_numpy(official.predict(queries.numpy())).to(predicted.dtype))


def test_logistic_segment_spreads_the_patch_prediction_over_its_pixels():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    x = torch.nn.functional.one_hot(labels, 3).float() * 4 + torch.randn(60, 3, generator=g) * 0.1
    pixel_labels = (labels + 1)[:, None].repeat(1, 4)  # 1..3: 0 is an ignore label by default
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


def test_held_out_split_is_the_official_numpy_permutation_floored():
    for n in range(0, 400):
        np.random.seed(0)  # the official: base_setup seeds numpy's global generator with 0, then permutation(n)
        order = np.random.permutation(n)
        fitted, held_out = segmentation_held_out_split(n)
        assert held_out.tolist() == order[: n // 10].tolist() and fitted.tolist() == order[n // 10 :].tolist(), n


def test_ties_between_knn_settings_go_to_the_first_in_the_official_grid_order():
    scores = {"knn/cosine/k=1": 0.5, "knn/L2/k=1": 0.7, "knn/cosine/k=3": 0.7, "knn/L2/k=3": 0.6}
    assert select_knn_setting(scores, (1, 3), ("cosine", "L2")) == (1, "L2")  # (1, L2) comes before (3, cosine)
    scores["knn/cosine/k=3"] = 0.8
    assert select_knn_setting(scores, (1, 3), ("cosine", "L2")) == (3, "cosine")


def test_a_fifo_named_as_a_mask_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "mask.png"
    os.mkfifo(fifo)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("read_mask opened the FIFO and blocked"))
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match="not a regular file"):
            read_mask(fifo, None, 28)  # opening a FIFO for reading would block forever
    finally:
        signal.alarm(0)
