"""Building blocks of CAPI models. Every layer passes ``device`` and ``dtype`` through."""

from capi_backbones.layers.attention import Attention
from capi_backbones.layers.block import Block
from capi_backbones.layers.mlp import Mlp
from capi_backbones.layers.residual import Residual
from capi_backbones.layers.rope import Rope, init_rope_freqs, rotate_half

__all__ = ["Attention", "Block", "Mlp", "Residual", "Rope", "init_rope_freqs", "rotate_half"]
