"""k-NN classification against a brute-force loop."""

import math

import pytest
import torch

from capi_backbones.evals import knn_classify, knn_top1


def brute_force_votes(train, labels, queries, k, num_classes, temperature=0.07):
    votes = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for q, query in enumerate(queries.double()):
        sims = []
        for t, key in enumerate(train.double()):
            sims.append((float(query @ key / (query.norm() * key.norm())), t))
        for sim, t in sorted(sims, reverse=True)[:k]:
            votes[q, int(labels[t])] += math.exp(sim / temperature)
    return votes


@pytest.mark.parametrize("query_chunk", [None, 3])
def test_votes_equal_a_brute_force_loop(query_chunk):
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(40, 8, generator=g), torch.randn(9, 8, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    votes = knn_classify(train, labels, queries, num_classes=5, ks=(1, 5, 10), query_chunk=query_chunk)
    for k in (1, 5, 10):
        expected = brute_force_votes(train, labels, queries, k, 5)
        torch.testing.assert_close(votes[k].double(), expected, rtol=1e-4, atol=0)


def test_knn_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="empty"):
        knn_classify(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        knn_classify(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.randn(2, 4), num_classes=2)
    with pytest.raises(ValueError, match="Expected train"):
        knn_classify(torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.randn(2, 5))


def test_knn_top1_is_the_share_of_test_samples_whose_weighted_vote_is_right():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    train_labels, test_labels = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    expected = brute_force_votes(train, train_labels, test, 20, 4).argmax(1)  # class 3 appears in test only
    assert knn_top1(train, train_labels, test, test_labels) == pytest.approx((expected == test_labels).double().mean())
    assert knn_top1(train, train_labels, train, train_labels, k=1) == 1.0  # each train sample is its own neighbour
    with pytest.raises(ValueError, match="test_labels"):
        knn_top1(train, train_labels, test, test_labels[:3])
