"""Map a foreign state dict onto a CAPI model's keys, and compare keys and shapes before a strict load."""

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.pretrained.architecture import BACKBONE_PREFIX
from capi_backbones.pretrained.errors import CheckpointError

__all__ = ["StateDictDiff", "checkpoint_filter_fn", "compare_state_dict", "dropped_key_groups", "expected_shapes"]

logger = logging.getLogger(__name__)

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
    if any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
        kept = {k[len(BACKBONE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
        dropped = [k for k in state_dict if not k.startswith(BACKBONE_PREFIX)]
    else:
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
