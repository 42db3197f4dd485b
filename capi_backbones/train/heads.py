"""The student's prediction head: ``L2NormLinear``, as in the official CAPI code.

l2-normalize, then a weight-normalized ``Linear(in_dim, K, bias=False)`` whose per-prototype gain
``weight_g`` starts at 1. Parameter names (``last_layer.weight_g``, ``last_layer.weight_v``) are the
official checkpoint keys under ``head.``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["L2NormLinear", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """``Linear`` without bias whose weight is ``weight_v * weight_g / (||weight_v||_row + 1e-8)``.

    The same formula as the official bf16-friendly ``weight_norm`` (norm over all dims but 0).
    """

    def __init__(self, in_dim: int, out_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1, device=device, dtype=dtype))  # (K, 1)
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim, device=device, dtype=dtype))  # (K, D)

    @property
    def weight(self) -> Tensor:
        """The effective (K, D) weight."""
        v = self.weight_v
        return v * (self.weight_g / (v.norm(p=2, dim=1, keepdim=True) + 1e-8))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class L2NormLinear(nn.Module):
    """(*, in_dim) -> (*, out_dim): ``normalize(x)`` then a weight-normalized linear layer (gain 1 at init)."""

    def __init__(self, in_dim: int, out_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.last_layer = WeightNormLinear(in_dim, out_dim, device=device, dtype=dtype)
        if self.last_layer.weight_v.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: direction ~ truncated normal (std 0.02), gain 1."""
        nn.init.trunc_normal_(self.last_layer.weight_v, std=0.02)
        nn.init.ones_(self.last_layer.weight_g)

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, eps=eps))
