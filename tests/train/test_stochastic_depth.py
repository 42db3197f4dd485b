"""CAPI's batch-subset stochastic depth (capi_backbones.layers.residual.Residual)."""

import torch
from torch import Tensor, nn

from capi_backbones.layers import Residual


class _Branch(nn.Module):
    """A branch whose output is nonzero for every sample and depends on a per-sample argument (``context``) and a
    broadcast one (``coords``)."""

    def forward(
        self, x: Tensor, coords: Tensor | None = None, context: Tensor | None = None, context_coords=None
    ) -> Tensor:
        out = torch.tanh(x) + 1.0
        if context is not None:
            out = out * context.mean(dim=(1, 2), keepdim=True)  # (b, 1, 1) per-sample scale
        if coords is not None:
            out = out + coords  # broadcast (1, n, d)
        return out


def _x(b=8, n=5, d=4, seed=0) -> Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(seed))


def test_eval_always_runs_the_branch():
    res = Residual(nn.Identity(), _Branch(), drop_prob=0.5).eval()
    x = _x()
    assert torch.equal(res(x), x + _Branch()(x))


def test_zero_drop_prob_is_plain_residual_in_training():
    res = Residual(nn.Identity(), _Branch(), drop_prob=0.0).train()
    x = _x()
    assert torch.equal(res(x), x + _Branch()(x))


def test_training_changes_exactly_n_keep_samples_scaled_by_b_over_n_keep():
    torch.manual_seed(0)
    b, drop = 8, 0.25
    n_keep = max(int(b * (1 - drop)), 1)  # 6
    res = Residual(nn.Identity(), _Branch(), drop_prob=drop).train()
    x = _x(b)
    branch = _Branch()(x)
    seen = set()
    for _ in range(50):
        out = res(x)
        changed = [i for i in range(b) if not torch.equal(out[i], x[i])]
        assert len(changed) == n_keep
        for i in changed:
            assert torch.allclose(out[i], x[i] + branch[i] * (b / n_keep), atol=1e-6)
        seen.update(changed)
    assert seen == set(range(b))  # the subset is random


def test_at_least_one_sample_is_kept():
    torch.manual_seed(1)
    res = Residual(nn.Identity(), _Branch(), drop_prob=0.99).train()
    x = _x(4)
    out = res(x)
    assert sum(not torch.equal(out[i], x[i]) for i in range(4)) == 1


def test_expectation_matches_the_plain_residual():
    torch.manual_seed(2)
    res = Residual(nn.Identity(), _Branch(), drop_prob=0.25).train()
    x = _x(8)
    mean = torch.stack([res(x) for _ in range(4000)]).mean(0)
    expected = x + _Branch()(x)
    # per sample the branch is scaled by 4/3 with probability 3/4: std ~0.58 |f|, se ~0.01 |f| over 4000 draws
    assert torch.allclose(mean, expected, atol=0.05)


def test_per_sample_kwargs_follow_the_subset():
    torch.manual_seed(3)
    b = 6
    res = Residual(nn.Identity(), _Branch(), drop_prob=0.5).train()
    x = _x(b)
    context = torch.rand(b, 3, 2) + 0.5  # per sample
    shared = torch.randn(1, 5, 4)  # broadcast over the batch
    full = _Branch()(x, coords=shared, context=context)
    out = res(x, coords=shared, context=context)
    changed = [i for i in range(b) if not torch.equal(out[i], x[i])]
    assert len(changed) == 3
    for i in changed:
        assert torch.allclose(out[i], x[i] + full[i] * 2.0, atol=1e-6)
