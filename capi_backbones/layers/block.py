"""Transformer block: attention residual then MLP residual, both pre-norm with RMSNorm."""

import math

import torch
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
        if x.dtype not in REDUCED_PRECISION or (self.weight is not None and self.weight.dtype != x.dtype):
            return super().forward(x)
        dims = tuple(range(-len(self.normalized_shape), 0))
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
        scale = torch.rsqrt(norm.square() / math.prod(self.normalized_shape) + eps).to(x.dtype)
        return x * scale if self.weight is None else x * scale * self.weight


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
