"""Sinkhorn-Knopp and the online clustering head: marginals, position-wise independence, purity,
distributed reductions (simulated with two threads), and where gradients go."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capi_backbones.train.clustering import ClusteringOutput, OnlineClustering, sinkhorn_knopp


def _scores(*shape, seed=0, scale=1 / 0.06, dtype=torch.float64) -> torch.Tensor:
    """Cosine-like logits in [-1, 1] divided by the target temperature, as the clustering layer gives them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)


def _reference_sk(scores: torch.Tensor, n_iterations: int, eps: float = 1e-8) -> torch.Tensor:
    """The spec's recipe (CAPI_SPEC section 7), written out with numpy-style explicit loops over the batch dims."""
    m = scores.double().numpy().copy()
    m = m - m.max(axis=-2, keepdims=True) + 50.0
    m = np.exp(m)
    for _ in range(n_iterations):
        m = m / (m.sum(axis=-2, keepdims=True) + eps)
        m = m / (m.sum(axis=-1, keepdims=True) + eps)
    return torch.from_numpy(m)


def test_matches_the_spec_recipe():
    scores = _scores(5, 32, 16)
    for n in (1, 3, 10):
        assert torch.allclose(sinkhorn_knopp(scores, n), _reference_sk(scores, n), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rows_sum_to_one_after_last_iteration(dtype):
    scores = _scores(4, 64, 32, dtype=dtype)
    q = sinkhorn_knopp(scores, 3)
    assert q.shape == scores.shape and q.dtype == dtype
    assert torch.all(q >= 0)
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    assert torch.allclose(q.float().sum(-1), torch.ones(4, 64), atol=tol)


def test_columns_become_balanced():
    n_samples, k = 64, 16
    scores = _scores(n_samples, k, seed=1)
    target = n_samples / k  # each prototype gets n_samples / K of the mass when balanced

    def imbalance(q: torch.Tensor) -> float:
        return float((q.sum(0) - target).abs().max() / target)

    softmax = torch.softmax(scores, dim=-1)
    spread = [imbalance(sinkhorn_knopp(scores, n)) for n in (1, 3, 10, 300)]
    assert imbalance(softmax) > spread[0] > spread[1] > spread[2]
    assert spread[-1] < 1e-6  # converged: doubly balanced


def test_extreme_scores_stay_finite():
    # realistic: N(0, 1) logits (unit tokens, N(0, 1) prototypes) over the target temperature 0.06
    g = torch.Generator().manual_seed(0)
    q = sinkhorn_knopp(torch.randn(3, 256, 1024, generator=g) / 0.06, 3)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(-1), torch.ones(3, 256), atol=1e-5)
    # absurd scale: rows far below every column's max underflow to 0, but nothing overflows or turns NaN
    extreme = sinkhorn_knopp(_scores(3, 50, 20, scale=1e4), 3)
    assert torch.isfinite(extreme).all() and extreme.min() >= 0 and extreme.sum(-1).max() <= 1 + 1e-9
    half = sinkhorn_knopp(_scores(50, 20, dtype=torch.float16, scale=5.0), 3)  # fp16: shift 0
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert torch.allclose(half.float().sum(-1), torch.ones(50), atol=1e-2)


def test_does_not_mutate_its_input():
    scores = _scores(2, 16, 8)
    before, version = scores.clone(), scores._version
    out = sinkhorn_knopp(scores, 3)
    assert torch.equal(scores, before) and scores._version == version
    assert out.data_ptr() != scores.data_ptr()


def test_positionwise_independence():
    """Each position is balanced over its own batch: changing position 1 leaves position 0 alone."""
    scores = _scores(3, 16, 8, seed=2)  # (positions, batch, K)
    changed = scores.clone()
    changed[1] = _scores(16, 8, seed=3)
    a, b = sinkhorn_knopp(scores, 3), sinkhorn_knopp(changed, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.allclose(a[1], b[1])
    # position-wise == running each position on its own
    assert torch.allclose(a[2], sinkhorn_knopp(scores[2], 3), rtol=0, atol=0)

    # standard SK flattens every token into one samples axis, so the positions mix
    flat_a = sinkhorn_knopp(scores.flatten(0, 1), 3).reshape(scores.shape)
    flat_b = sinkhorn_knopp(changed.flatten(0, 1), 3).reshape(scores.shape)
    assert not torch.allclose(flat_a[0], flat_b[0])


def test_reduction_hooks_are_called():
    calls = {"sum": 0, "max": 0}

    def count(kind):
        def reduce(t):
            calls[kind] += 1
            return t

        return reduce

    scores = _scores(2, 8, 4)
    out = sinkhorn_knopp(scores, 5, all_reduce_sum=count("sum"), all_reduce_max=count("max"))
    assert calls == {"sum": 5, "max": 1}
    assert torch.equal(out, sinkhorn_knopp(scores, 5))  # identity reductions change nothing
    with pytest.raises(TypeError, match="reduced tensor"):
        sinkhorn_knopp(scores, 3, all_reduce_sum=lambda t: None)


class FakeProcessGroup:
    """All-reduce across threads that stand for ranks: each rank hands in its tensor and gets the reduction."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.calls = [0] * world_size

    def reducer(self, rank: int, op):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = op(torch.stack(self.slots), dim=0)
            self.barrier.wait()  # every rank has read the slots before the next call overwrites them
            t.copy_(out)  # in place, like dist.all_reduce
            return t

        return reduce

    def run(self, fn):
        results: list = [None] * self.world_size
        errors: list[BaseException] = []

        def target(rank):
            try:
                results[rank] = fn(rank, self.reducer(rank, torch.sum), self.reducer(rank, _amax))
            except BaseException as error:  # re-raised in the main thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        if errors:
            raise errors[0]
        return results


def _amax(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.amax(dim=dim)


def test_two_ranks_equal_one_process_on_the_full_batch():
    scores = _scores(3, 20, 12, seed=4)  # (positions, batch, K); the ranks split the batch
    halves = scores.split([9, 11], dim=-2)  # uneven shards are fine
    group = FakeProcessGroup(2)
    parts = group.run(lambda r, s, m: sinkhorn_knopp(halves[r], 3, all_reduce_sum=s, all_reduce_max=m))
    assert group.calls == [4, 4]  # one max + three sums on each rank
    assert torch.allclose(torch.cat(parts, dim=-2), sinkhorn_knopp(scores, 3), rtol=1e-12, atol=1e-15)
    # without the reductions, each rank would balance only its own shard
    alone = torch.cat([sinkhorn_knopp(h, 3) for h in halves], dim=-2)
    assert not torch.allclose(alone, sinkhorn_knopp(scores, 3))


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_samples, n_prototypes"):
        sinkhorn_knopp(torch.zeros(5), 3)
    with pytest.raises(TypeError, match="floating"):
        sinkhorn_knopp(torch.zeros(4, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(torch.zeros(4, 4), 0)


# ----------------------------------------------------------------------------------- OnlineClustering


def _tokens(positions=6, batch=10, dim=16, seed=0) -> torch.Tensor:
    return torch.randn(positions, batch, dim, generator=torch.Generator().manual_seed(seed))


def test_init_and_output():
    torch.manual_seed(0)
    head = OnlineClustering(32, 512)
    assert head.layer.weight.shape == (512, 32) and head.layer.bias.shape == (512,)
    w = head.layer.weight.detach()
    assert abs(float(w.std()) - 1.0) < 0.05 and abs(float(w.mean())) < 0.05
    assert torch.equal(head.layer.bias, torch.zeros(512))
    out = head(_tokens(4, 8, 32))
    assert isinstance(out, ClusteringOutput)
    assert out.assignments.shape == (4, 8, 512) and not out.assignments.requires_grad
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert OnlineClustering(8, 16, bias=False).layer.bias is None
    meta = OnlineClustering(8, 16, device="meta")
    assert meta.layer.weight.is_meta


def test_loss_and_assignments_follow_the_recipe():
    torch.manual_seed(1)
    head = OnlineClustering(16, 32, target_temp=0.06, pred_temp=0.12, n_sk_iter=3)
    x = _tokens()
    out = head(x)
    logits = F.linear(x / x.norm(dim=-1, keepdim=True), head.layer.weight, head.layer.bias)
    expected_targets = sinkhorn_knopp(logits.detach() / 0.06, 3)
    assert torch.allclose(out.assignments, expected_targets, atol=1e-6)
    ce = -(expected_targets * torch.log_softmax(logits / 0.12, dim=-1)).sum(-1).mean()
    assert torch.allclose(out.loss, ce, rtol=1e-5)


def test_positionwise_vs_standard():
    torch.manual_seed(2)
    head = OnlineClustering(16, 8)
    x = _tokens(positions=4, batch=12)
    changed = x.clone()
    changed[3] = _tokens(positions=1, batch=12, seed=9)[0]
    a, b = head(x).assignments, head(changed).assignments
    assert torch.equal(a[:3], b[:3])  # other positions untouched
    head.positionwise = False
    a, b = head(x).assignments, head(changed).assignments
    assert a.shape == (4, 12, 8) and not torch.allclose(a[:3], b[:3])
    assert head(x[0]).assignments.shape == (12, 8)  # standard SK takes any (*, D)
    head.positionwise = True
    with pytest.raises(ValueError, match="positions, batch, D"):
        head(x[0])


def test_gradients_reach_only_the_layer():
    torch.manual_seed(3)
    head = OnlineClustering(16, 32)
    teacher = torch.nn.Linear(16, 16)
    x = teacher(_tokens())  # stands for the teacher's output, still attached to the teacher's graph
    out = head(x)
    out.loss.backward()
    assert head.layer.weight.grad is not None and head.layer.weight.grad.abs().sum() > 0
    assert head.layer.bias.grad is not None and head.layer.bias.grad.abs().sum() > 0
    assert teacher.weight.grad is None and teacher.bias.grad is None


def test_input_scale_invariance():
    torch.manual_seed(4)
    head = OnlineClustering(16, 32)
    x = _tokens()
    a, b = head(x), head(x * 7.5)
    assert torch.allclose(a.assignments, b.assignments, atol=1e-6) and torch.allclose(a.loss, b.loss, rtol=1e-5)


def test_clustering_two_ranks_equal_one_process():
    torch.manual_seed(5)
    head = OnlineClustering(16, 32).double()
    x = _tokens(positions=5, batch=12).double()
    shards = x.split(6, dim=1)  # each rank holds half of the batch, at every position
    group = FakeProcessGroup(2)
    outs = group.run(lambda r, s, m: head(shards[r], all_reduce_sum=s, all_reduce_max=m))
    full = head(x)
    assert torch.allclose(torch.cat([o.assignments for o in outs], dim=1), full.assignments, rtol=1e-10, atol=1e-14)
    # the loss is a per-rank mean over that rank's tokens; equal shards average to the full-batch loss
    assert torch.allclose((outs[0].loss + outs[1].loss) / 2, full.loss, rtol=1e-5)
