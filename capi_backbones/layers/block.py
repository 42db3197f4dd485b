"""Transformer block: attention residual then MLP residual, both pre-norm with RMSNorm."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capi_backbones.layers.attention import Attention
from capi_backbones.layers.mlp import Mlp
from capi_backbones.layers.residual import Residual
from capi_backbones.layers.rope import REDUCED_PRECISION

__all__ = ["Block", "RMSNorm"]


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters, same fp32 numbers) with a faster bf16/fp16 path.

    On the CPU, torch's RMSNorm upcasts a bf16 input to fp32, squares and averages it there, and rounds back: about
    seven passes over the tensor. Here the mean square is one fp32-accumulated reduction read straight from the bf16
    input (``vector_norm``), and the input is scaled by the per-token factor and the weight in its own dtype: three
    passes. The factor is rounded to bf16 (a relative error under 2^-9 per token, the size of bf16's own rounding)."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles torch's own path (below) only
            return _rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


def _rms_norm(x: Tensor, normalized_shape: tuple[int, ...], weight: Tensor | None, eps: float | None) -> Tensor:
    """``RMSNorm.forward``; a function so that symbolic tracing records it as one call (``torch.fx.wrap``): its
    dtype branch runs on the real tensor."""
    if x.dtype not in REDUCED_PRECISION or (weight is not None and weight.dtype != x.dtype):
        return F.rms_norm(x, normalized_shape, weight, eps)  # what nn.RMSNorm.forward runs
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    scale = torch.rsqrt(norm.square() / math.prod(normalized_shape) + eps).to(x.dtype)
    return x * scale if weight is None else x * scale * weight


torch.fx.wrap("_rms_norm")


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        norm_eps: float = 1e-5,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.residual1 = Residual(
            RMSNorm(dim, eps=norm_eps, **dd),
            Attention(dim, num_heads, context_dim=context_dim, **dd),
            drop_path,
        )
        self.residual2 = Residual(RMSNorm(dim, eps=norm_eps, **dd), Mlp(dim, int(dim * mlp_ratio), **dd), drop_path)

    def forward(
        self,
        x: Tensor,
        coords: Tensor,
        context: Tensor | None = None,
        context_coords: Tensor | None = None,
    ) -> Tensor:
        x = self.residual1(x, coords=coords, context=context, context_coords=context_coords)
        return self.residual2(x)
