"""2-D rotary position embedding as in the official CAPI code.

Channels [0, head_dim/2) rotate with the row coordinate and the rest with the column coordinate,
but ``rotate_half`` pairs channel c with c + head_dim/2, so a pair mixes two angles (sic). This is
kept on purpose: released weights were trained with it.
"""

import math

import torch
from torch import Tensor, nn

from capi_backbones.constants import ROPE_MAX_FREQ, ROPE_MIN_FREQ

__all__ = ["Rope", "rotate_half", "init_rope_freqs"]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def init_rope_freqs(
    head_dim: int,
    max_freq: float = ROPE_MAX_FREQ,
    min_freq: float = ROPE_MIN_FREQ,
    *,
    device=None,
    dtype=None,
) -> Tensor:
    """Initial value of ``rope.freqs``: (2, head_dim) angular frequencies."""
    freqs_1d = max_freq * (max_freq / min_freq) ** torch.linspace(0, -1, head_dim // 4, device=device)
    freqs_1d = torch.cat([freqs_1d, freqs_1d])  # (head_dim/2,)
    freqs = torch.zeros(2, head_dim, device=device)
    freqs[0, : head_dim // 2] = freqs_1d  # rows
    freqs[1, -head_dim // 2 :] = freqs_1d  # columns
    return (freqs * 2 * math.pi).to(dtype or torch.get_default_dtype())


class Rope(nn.Module):
    """Applies RoPE with learnable (checkpointed) frequencies ``freqs`` of shape (2, head_dim)."""

    def __init__(self, head_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs head_dim divisible by 4, got {head_dim}.")
        self.head_dim = head_dim
        self.freqs = nn.Parameter(torch.empty(2, head_dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.freqs.copy_(init_rope_freqs(self.head_dim, device=self.freqs.device, dtype=self.freqs.dtype))

    def forward(self, x: Tensor, coords: Tensor) -> Tensor:
        """x: (..., n, head_dim); coords: (..., n, 2) broadcastable to x."""
        angle = coords @ self.freqs  # (..., n, head_dim)
        return x * angle.cos() + rotate_half(x) * angle.sin()
