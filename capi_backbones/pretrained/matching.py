"""Match checkpoint tensors to a CAPI model: the ``backbone.`` prefix, the architecture read off the tensor
shapes (spec section 6), the key filter for foreign layouts, and the key/shape comparison before a strict load.

Architecture inference: D comes from ``registers``, depth from the block indices, head_dim from ``rope.freqs``, the
predictor width from ``mask_token``, the patch size and input channels from ``patch_embed.weight`` and the MLP ratio
from ``fc1``. Nothing here builds a model with memory (expected shapes come from a meta-device model).
"""

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from capi_backbones.models import ARCHITECTURES, CapiConfig, CapiModel
from capi_backbones.pretrained.errors import CheckpointError

__all__ = [
    "BACKBONE_PREFIX",
    "ParameterCounts",
    "StateDictDiff",
    "add_backbone_prefix",
    "architecture_name",
    "checkpoint_filter_fn",
    "choose_config",
    "compare_state_dict",
    "count_parameters",
    "dropped_key_groups",
    "expected_shapes",
    "has_backbone_prefix",
    "infer_config",
    "resolve_architecture",
    "strip_backbone_prefix",
]

logger = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."
_BLOCK_KEY = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.")
_PREDICTOR_ROOTS = ("decoder", "mask_token", "dec_norm")


def has_backbone_prefix(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the file uses the released layout (``backbone.*`` keys, plus others such as ``head.*``)."""
    return any(k.startswith(BACKBONE_PREFIX) for k in state_dict)


def strip_backbone_prefix(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(the ``backbone.*`` tensors with the prefix stripped, the other keys), when the file uses the prefix;
    else (all tensors, [])."""
    if not has_backbone_prefix(state_dict):
        return dict(state_dict), []
    kept = {k[len(BACKBONE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
    return kept, [k for k in state_dict if not k.startswith(BACKBONE_PREFIX)]


def add_backbone_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The released layout: ``{"backbone." + key: tensor}``."""
    return {BACKBONE_PREFIX + k: v for k, v in state_dict.items()}


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
    sd, _ = strip_backbone_prefix(state_dict)
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
    for key, tensor in strip_backbone_prefix(state_dict)[0].items():
        if key.split(".", 1)[0] in _PREDICTOR_ROOTS:
            predictor += tensor.numel()
        else:
            encoder += tensor.numel()
    return ParameterCounts(encoder=encoder, predictor=predictor)


def choose_config(
    arch: str | CapiConfig | None, stored: CapiConfig | None, tensors: Mapping[str, Tensor], source: str
) -> CapiConfig:
    """The architecture to load into: the caller's ``arch``, else the config stored with the weights, else the
    one the tensor shapes give."""
    if arch is not None:
        return resolve_architecture(arch)
    if stored is not None:
        logger.info("Architecture from the config stored with %s: %s", source, architecture_name(stored) or stored)
        return stored
    config = infer_config(tensors)
    name = architecture_name(config)
    if name:
        logger.info("Inferred architecture from tensor shapes of %s: registered architecture %s", source, name)
    else:
        logger.info("Inferred architecture from tensor shapes of %s: custom %s", source, config)
    return config


_MAX_LISTED = 20  # per category in error messages; the exception carries the full lists


def expected_shapes(model_or_config: CapiModel | CapiConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model's state dict (a config is built on the meta device, no memory used)."""
    model = model_or_config
    if isinstance(model_or_config, CapiConfig):
        model = CapiModel(model_or_config, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def dropped_key_groups(keys: list[str]) -> dict[str, int]:
    """Count dropped keys by their first component, e.g. ``{"head": 4}``."""
    return dict(Counter(k.split(".", 1)[0] for k in keys))


def checkpoint_filter_fn(
    state_dict: Mapping[str, Tensor], model_or_config: CapiModel | CapiConfig
) -> dict[str, Tensor]:
    """Official or foreign layout -> the model's keys. Pure: returns a new dict, tensors untouched.

    With ``backbone.``-prefixed keys (the released files), only those are kept, prefix stripped. Without the
    prefix, keys whose first component is not a backbone module (``head.*``, ...) are dropped. Dropping is on
    purpose and logged with a count. Keys under a backbone module that the model lacks are kept, so the strict
    comparison reports them as unexpected.
    """
    kept, dropped = strip_backbone_prefix(state_dict)
    if not has_backbone_prefix(state_dict):
        roots = {k.split(".", 1)[0] for k in expected_shapes(model_or_config)}
        kept = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in roots}
        dropped = [k for k in state_dict if k.split(".", 1)[0] not in roots]
    if dropped:
        groups = ", ".join(f"{root}.* ({n})" for root, n in sorted(dropped_key_groups(dropped).items()))
        logger.info("Dropped %d non-backbone keys: %s", len(dropped), groups)
    return kept


@dataclass(frozen=True)
class StateDictDiff:
    missing: tuple[str, ...]  # in the model, not in the checkpoint
    unexpected: tuple[str, ...]  # in the checkpoint, not in the model
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (key, checkpoint shape, model shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        lines = []
        for title, items in (
            ("missing keys (in the model, not in the checkpoint)", self.missing),
            ("unexpected keys (in the checkpoint, not in the model)", self.unexpected),
            (
                "shape mismatches (checkpoint vs model)",
                [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched],
            ),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines += [f"  {item}" for item in items[:_MAX_LISTED]]
                if len(items) > _MAX_LISTED:
                    lines.append(f"  ... and {len(items) - _MAX_LISTED} more")
        return "\n".join(lines)

    def error(self, source: str, hint: str = "") -> CheckpointError:
        counts = f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched"
        message = f"Checkpoint {source} does not match the model ({counts}).{(' ' + hint) if hint else ''}\n"
        return CheckpointError(
            message + self.describe(), missing=self.missing, unexpected=self.unexpected, mismatched=self.mismatched
        )


def compare_state_dict(
    state_dict: Mapping[str, Tensor], model_or_config: CapiModel | CapiConfig | Mapping[str, tuple[int, ...]]
) -> StateDictDiff:
    """Compare keys and every shape of a (filtered) state dict against a model, config or key->shape map."""
    if isinstance(model_or_config, Mapping):
        expected = {k: tuple(v) for k, v in model_or_config.items()}
    else:
        expected = expected_shapes(model_or_config)
    got = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return StateDictDiff(
        missing=tuple(k for k in expected if k not in got),
        unexpected=tuple(k for k in got if k not in expected),
        mismatched=tuple((k, got[k], expected[k]) for k in expected if k in got and got[k] != expected[k]),
    )
