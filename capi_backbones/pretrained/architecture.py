"""Read a CAPI architecture off checkpoint tensor shapes (spec section 6), without building a model.

D comes from ``registers``, depth from the block indices, head_dim from ``rope.freqs``, the predictor width from
``mask_token``, the patch size and input channels from ``patch_embed.weight`` and the MLP ratio from ``fc1``.
"""

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from capi_backbones.models import ARCHITECTURES, CapiConfig
from capi_backbones.pretrained.errors import CheckpointError

__all__ = [
    "BACKBONE_PREFIX",
    "ParameterCounts",
    "architecture_name",
    "backbone_view",
    "count_parameters",
    "infer_config",
    "resolve_architecture",
]

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."
_BLOCK_KEY = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.")
_PREDICTOR_ROOTS = ("decoder", "mask_token", "dec_norm")


def backbone_view(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The backbone tensors with the ``backbone.`` prefix stripped, when the file uses it; else all tensors."""
    if any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
        return {k[len(BACKBONE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    return dict(state_dict)


def _block_count(state_dict: Mapping[str, Tensor], stack: str) -> int:
    indices = {int(m.group(2)) for k in state_dict if (m := _BLOCK_KEY.match(k)) and m.group(1) == stack}
    if not indices:
        return 0
    if indices != set(range(max(indices) + 1)):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise CheckpointError(f"The checkpoint's {stack} blocks are not numbered 0..{max(indices)}: missing {missing}.")
    return max(indices) + 1


def _shape(state_dict: Mapping[str, Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointError(
            f"Cannot infer the architecture: the checkpoint has no {key!r} tensor "
            f"(it has {len(state_dict)} tensors). Pass arch= one of {sorted(ARCHITECTURES)} or a CapiConfig."
        )
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"Cannot infer the architecture: {key!r} has shape {shape}, expected {ndim} dims.")
    return shape


def infer_config(state_dict: Mapping[str, Tensor]) -> CapiConfig:
    """The ``CapiConfig`` whose model has exactly these tensor shapes (prefixed or not).

    ``norm_eps`` and ``drop_path_rate`` are not stored in weights and keep their defaults.
    Raises ``CheckpointError`` when a needed tensor is absent or the shapes are inconsistent.
    """
    sd = backbone_view(state_dict)
    _, n_registers, dim = _shape(sd, "registers", 3)
    _, pred_dim = _shape(sd, "mask_token", 2)
    embed_out, in_chans, patch_h, patch_w = _shape(sd, "patch_embed.weight", 4)
    if patch_h != patch_w or embed_out != dim:
        raise CheckpointError(
            f"Inconsistent checkpoint: patch_embed.weight has shape {(embed_out, in_chans, patch_h, patch_w)} "
            f"but registers say the width is {dim}; expected ({dim}, C, p, p)."
        )
    depth, pred_depth = _block_count(sd, "encoder"), _block_count(sd, "decoder")
    if depth == 0 or pred_depth == 0:
        raise CheckpointError(
            f"Cannot infer the architecture: found {depth} encoder and {pred_depth} decoder blocks "
            "(keys 'encoder.blocks.<i>.*' / 'decoder.blocks.<i>.*'). Is this a CAPI backbone checkpoint?"
        )
    head_dim = _shape(sd, "encoder.blocks.0.residual1.fn.rope.freqs", 2)[1]
    pred_head_dim = _shape(sd, "decoder.blocks.0.residual1.fn.rope.freqs", 2)[1]
    hidden = _shape(sd, "encoder.blocks.0.residual2.fn.fc1.weight", 2)[0]
    pred_hidden = _shape(sd, "decoder.blocks.0.residual2.fn.fc1.weight", 2)[0]
    if dim % head_dim or pred_dim % pred_head_dim:
        raise CheckpointError(
            f"Inconsistent checkpoint: width {dim} / predictor width {pred_dim} is not a multiple of the RoPE "
            f"head dim {head_dim} / {pred_head_dim}."
        )
    if hidden * pred_dim != pred_hidden * dim:
        raise CheckpointError(
            f"The encoder MLP ratio ({hidden}/{dim}) differs from the predictor's ({pred_hidden}/{pred_dim}); "
            "CapiConfig has one mlp_ratio for both."
        )
    mlp_ratio = hidden / dim
    for _ in range(4):  # the model uses int(dim * mlp_ratio): nudge the ratio up past float rounding
        if int(dim * mlp_ratio) == hidden and int(pred_dim * mlp_ratio) == pred_hidden:
            break
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    else:
        raise CheckpointError(f"The MLP width {hidden} of width {dim} cannot be written as int({dim} * mlp_ratio).")
    try:
        return CapiConfig(
            embed_dim=dim,
            depth=depth,
            num_heads=dim // head_dim,
            pred_embed_dim=pred_dim,
            pred_depth=pred_depth,
            pred_num_heads=pred_dim // pred_head_dim,
            patch_size=patch_h,
            in_chans=in_chans,
            n_registers=n_registers,
            mlp_ratio=mlp_ratio,
        )
    except ValueError as error:
        raise CheckpointError(f"The checkpoint's shapes give an invalid architecture: {error}") from error


def architecture_name(config: CapiConfig) -> str | None:
    """The registered architecture with the same shapes as ``config`` (ignoring drop_path_rate), or None."""
    for name, registered in ARCHITECTURES.items():
        if registered.to_dict() | {"drop_path_rate": 0.0} == config.to_dict() | {"drop_path_rate": 0.0}:
            return name
    return None


def resolve_architecture(arch: "str | CapiConfig") -> CapiConfig:
    """A registered architecture name or a ``CapiConfig`` -> ``CapiConfig``."""
    if isinstance(arch, CapiConfig):
        return arch
    if isinstance(arch, str) and arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    raise ValueError(f"Unknown architecture {arch!r}. Available: {', '.join(sorted(ARCHITECTURES))} or a CapiConfig.")


@dataclass(frozen=True)
class ParameterCounts:
    encoder: int  # patch_embed, registers and encoder blocks
    predictor: int  # mask_token and decoder blocks

    @property
    def total(self) -> int:
        return self.encoder + self.predictor


def count_parameters(state_dict: Mapping[str, Tensor]) -> ParameterCounts:
    """Encoder / predictor element counts of backbone tensors (prefixed or not); works on meta tensors."""
    encoder = predictor = 0
    for key, tensor in backbone_view(state_dict).items():
        if key.split(".", 1)[0] in _PREDICTOR_ROOTS:
            predictor += tensor.numel()
        else:
            encoder += tensor.numel()
    return ParameterCounts(encoder=encoder, predictor=predictor)
