"""Pre-norm residual branch with CAPI's batch-subset stochastic depth."""

import inspect
from typing import Final

import torch
from torch import Tensor, nn

__all__ = ["Residual"]


class Residual(nn.Module):
    """``x + fn(norm(x))``. In training with ``drop_prob > 0`` only a random subset of
    ``max(int(b * (1 - drop_prob)), 1)`` samples goes through the branch, and its output is
    scaled by ``b / n_keep``, which keeps the expectation of per-sample drop path.

    A branch whose ``forward`` takes ``coords`` (attention) gets ``(normed, coords, context, context_coords)``;
    any other branch (the MLP) gets the normed tokens only. The arguments are explicit (no ``**kwargs``) so that
    the block compiles with TorchScript."""

    positional: Final[bool]  # fn takes (x, coords, context, context_coords); a TorchScript constant

    def __init__(self, norm: nn.Module, fn: nn.Module, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.norm = norm
        self.fn = fn
        self.drop_prob = drop_prob
        self.positional = "coords" in inspect.signature(fn.forward).parameters

    def _branch(
        self, x: Tensor, coords: Tensor | None, context: Tensor | None, context_coords: Tensor | None
    ) -> Tensor:
        if self.positional:
            if not torch.jit.is_scripting():  # eager: any branch taking coords, which may be optional
                return self.fn(self.norm(x), coords, context, context_coords)
            assert coords is not None  # TorchScript: attention's coords is a Tensor
            return self.fn(self.norm(x), coords, context, context_coords)
        return self.fn(self.norm(x))

    def forward(
        self,
        x: Tensor,
        coords: Tensor | None = None,
        context: Tensor | None = None,
        context_coords: Tensor | None = None,
    ) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x + self._branch(x, coords, context, context_coords)
        b = x.shape[0]
        n_keep = max(int(b * (1 - self.drop_prob)), 1)
        keep = torch.randperm(b, device=x.device)[:n_keep]
        # per-sample positions and context (batch dim == b) follow the subset; broadcast ones (batch dim 1) stay
        coords, context = _subset(coords, keep, b), _subset(context, keep, b)
        branch = self._branch(x[keep], coords, context, _subset(context_coords, keep, b))
        return torch.index_add(x, 0, keep, branch.to(x.dtype), alpha=b / n_keep)  # bf16 branch under autocast


def _subset(value: Tensor | None, keep: Tensor, b: int) -> Tensor | None:
    if value is not None and value.shape[0] == b:
        return value[keep]
    return value
