"""Pre-norm residual branch with CAPI's batch-subset stochastic depth."""

import torch
from torch import Tensor, nn

__all__ = ["Residual"]


class Residual(nn.Module):
    """``x + fn(norm(x))``. In training with ``drop_prob > 0`` only a random subset of
    ``max(int(b * (1 - drop_prob)), 1)`` samples goes through the branch, and its output is
    scaled by ``b / n_keep``, which keeps the expectation of per-sample drop path."""

    def __init__(self, norm: nn.Module, fn: nn.Module, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.norm = norm
        self.fn = fn
        self.drop_prob = drop_prob

    def forward(self, x: Tensor, **kwargs: Tensor | None) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x + self.fn(self.norm(x), **kwargs)
        b = x.shape[0]
        n_keep = max(int(b * (1 - self.drop_prob)), 1)
        keep = torch.randperm(b, device=x.device)[:n_keep]
        # per-sample kwargs (batch dim == b) follow the subset; broadcast ones (batch dim 1) stay
        kwargs = {k: v[keep] if v is not None and v.shape[0] == b else v for k, v in kwargs.items()}
        branch = self.fn(self.norm(x[keep]), **kwargs)
        return torch.index_add(x, 0, keep, branch.to(x.dtype), alpha=b / n_keep)  # bf16 branch under autocast
