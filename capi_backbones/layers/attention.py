"""Multi-head (cross-)attention with RoPE on q and k, no biases."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capi_backbones.layers.rope import Rope, apply_rope

__all__ = ["Attention"]

torch.fx.wrap("apply_rope")  # its dtype branch is a leaf of symbolic tracing (fx leaves are per module)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, *, context_dim: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        context_dim = context_dim or dim
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(dim, dim, **kw)
        self.k_proj = nn.Linear(context_dim, dim, **kw)
        self.v_proj = nn.Linear(context_dim, dim, **kw)
        self.proj = nn.Linear(dim, dim, **kw)
        self.rope = Rope(self.head_dim, device=device, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        coords: Tensor,
        context: Tensor | None = None,
        context_coords: Tensor | None = None,
    ) -> Tensor:
        """x: (b, n_q, d), coords: (b or 1, n_q, 2); context: (b, n_k, d_k) or None for self-attention."""
        if context is None:
            context, context_coords = x, coords
        assert context_coords is not None, "cross-attention needs context_coords"  # also refines the type for jit
        b, n_q, d = x.shape
        n_k = context.shape[1]
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).reshape(b, n_q, h, hd)  # RoPE in this layout, the one the heads are stored in
        k = self.k_proj(context).reshape(b, n_k, h, hd)
        v = self.v_proj(context).reshape(b, n_k, h, hd).transpose(1, 2)  # (b, h, n_k, hd)
        # angles as (b or 1, 1, n, hd), seen as (b or 1, n, 1, hd): broadcast over heads. In self-attention q and k
        # share them, computed once; except when rope.freqs gets a gradient, which then sums the q and k parts in
        # the same order as before (fp32 training steps stay bit for bit)
        cos_q, sin_q = self.rope.cos_sin(coords[:, None])
        cos_q, sin_q = cos_q.transpose(1, 2), sin_q.transpose(1, 2)
        share = context_coords is coords
        if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript skips a block guarded by this test alone)
            if not isinstance(coords, torch.fx.Proxy):  # symbolically traced graphs share the angles: the same values
                share = share and not (torch.is_grad_enabled() and self.rope.freqs.requires_grad)
        if share:
            cos_k, sin_k = cos_q, sin_q
        else:
            cos_k, sin_k = self.rope.cos_sin(context_coords[:, None])
            cos_k, sin_k = cos_k.transpose(1, 2), sin_k.transpose(1, 2)
        q = apply_rope(q, cos_q, sin_q).transpose(1, 2)  # (b, h, n_q, hd)
        k = apply_rope(k, cos_k, sin_k).transpose(1, 2)  # (b, h, n_k, hd)
        x = F.scaled_dot_product_attention(q, k, v)  # (b, h, n_q, hd)
        return self.proj(x.transpose(1, 2).reshape(b, n_q, d))
