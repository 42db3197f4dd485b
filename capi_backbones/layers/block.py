"""Transformer block: attention residual then MLP residual, both pre-norm with RMSNorm."""

from torch import Tensor, nn

from capi_backbones.layers.attention import Attention
from capi_backbones.layers.mlp import Mlp
from capi_backbones.layers.residual import Residual

__all__ = ["Block"]


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
            nn.RMSNorm(dim, eps=norm_eps, **dd),
            Attention(dim, num_heads, context_dim=context_dim, **dd),
            drop_path,
        )
        self.residual2 = Residual(nn.RMSNorm(dim, eps=norm_eps, **dd), Mlp(dim, int(dim * mlp_ratio), **dd), drop_path)

    def forward(
        self,
        x: Tensor,
        coords: Tensor,
        context: Tensor | None = None,
        context_coords: Tensor | None = None,
    ) -> Tensor:
        x = self.residual1(x, coords=coords, context=context, context_coords=context_coords)
        return self.residual2(x)
