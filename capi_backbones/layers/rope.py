"""2-D rotary position embedding as in the official CAPI code.

Channels [0, head_dim/2) rotate with the row coordinate and the rest with the column coordinate,
but ``rotate_half`` pairs channel c with c + head_dim/2, so a pair mixes two angles (sic). This is
kept on purpose: released weights were trained with it.
"""

import math

import torch
from torch import Tensor, nn

from capi_backbones.constants import ROPE_MAX_FREQ, ROPE_MIN_FREQ

__all__ = ["Rope", "apply_rope", "rotate_half", "init_rope_freqs"]

REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (..., head_dim) and cos, sin broadcastable to it.

    fp32 (and fp64) run exactly that expression: the official numbers, bit for bit. bf16 and fp16 compute the two
    halves with one multiply and one fused multiply-add each (``addcmul``) and one concatenation: half the passes
    over the tensor, no negated copy, and no intermediate rounding between the product and the sum."""
    if x.dtype != torch.bfloat16 and x.dtype != torch.float16:  # REDUCED_PRECISION, written for TorchScript
        return x * cos + rotate_half(x) * sin
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos1, cos2, sin1, sin2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    return torch.cat((torch.addcmul(x1 * cos1, x2, sin1, value=-1), torch.addcmul(x2 * cos2, x1, sin2)), dim=-1)


torch.fx.wrap("apply_rope")  # symbolic tracing records it as a call: its dtype branch runs on the real tensor


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

    def cos_sin(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin of the angles (..., n, head_dim) of coords (..., n, 2), to rotate several tensors at the same
        positions (q and k in self-attention) with one computation."""
        angle = coords @ self.freqs  # (..., n, head_dim)
        return angle.cos(), angle.sin()

    def forward(self, x: Tensor, coords: Tensor) -> Tensor:
        """x: (..., n, head_dim); coords: (..., n, 2) broadcastable to x."""
        return apply_rope(x, *self.cos_sin(coords))
