"""The probe heads of the official classification evaluation: a linear layer, and attention pooling
(``AttnPoolClassifier``: one learned query attending over a set of tokens, then a linear layer)."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATTENTION_HEAD_DIM", "AttentiveProbe", "LinearProbe"]

ATTENTION_HEAD_DIM = 64  # the official head size: heads = D // 64
INIT_STD = 0.02


class LinearProbe(nn.Module):
    """``nn.Linear(dim, num_classes)`` with trunc_normal(std 0.02) weights and zero bias. (B, D) -> (B, C)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=INIT_STD)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)


class AttentiveProbe(nn.Module):
    """Attention pooling of a token set by one learned query, then a linear classifier. (B, N, D) -> (B, C).

    The query (D,) and ``kv = nn.Linear(D, 2D)`` weights are trunc_normal(std 0.02), biases zero; the query attends
    with ``D // head_dim`` heads of ``head_dim`` channels (scaled dot product, no projection of the pooled output),
    then ``nn.Linear(D, C)``. ``dim`` must be a multiple of ``head_dim`` (64 officially; pass another head size for
    backbones whose width is not a multiple of 64).
    """

    def __init__(self, dim: int, num_classes: int, *, head_dim: int = ATTENTION_HEAD_DIM) -> None:
        super().__init__()
        if head_dim < 1 or dim % head_dim:
            raise ValueError(
                f"AttentiveProbe: feature dimension {dim} is not a multiple of the head size {head_dim}. "
                f"Pass head_dim=d with d dividing {dim} (e.g. head_dim={_largest_divisor(dim, head_dim)})."
            )
        self.num_heads = dim // head_dim
        self.query_token = nn.Parameter(torch.empty(dim))
        self.kv = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query_token, std=INIT_STD)
        nn.init.trunc_normal_(self.kv.weight, std=INIT_STD)
        nn.init.zeros_(self.kv.bias)
        nn.init.trunc_normal_(self.linear.weight, std=INIT_STD)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n, d = tokens.shape
        h = self.num_heads
        q = self.query_token.view(1, h, 1, d // h).expand(b, -1, -1, -1)  # (B, h, 1, d_h)
        k, v = self.kv(tokens).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, N, d_h)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, h, 1, d_h)
        return self.linear(pooled.reshape(b, d))


def _largest_divisor(dim: int, at_most: int) -> int:
    return max(d for d in range(1, min(dim, at_most) + 1) if dim % d == 0)
