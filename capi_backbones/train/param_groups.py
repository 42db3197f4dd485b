"""Optimizer parameter groups with CAPI's per-parameter multipliers, and the per-step schedule update.

The multipliers (weight decay x0 for biases, x0.1 for norm weights; lr x0.2 under ``patch_embed``, x0 under ``rope``)
are the rules of ``capi_backbones.models.param_rules``, which the timm door reads too; here they are applied to the
student (backbone and head), as in the official ``get_params_groups``. Parameters with ``requires_grad=False`` are
left out, as officially.
"""

import logging

from torch import nn

from capi_backbones.models.param_rules import NORM_LAYERS, param_multipliers

__all__ = ["NORM_LAYERS", "apply_schedules", "build_param_groups", "param_multipliers"]

logger = logging.getLogger(__name__)


def build_param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    patch_embed_lr_mult: float = 0.2,
    rope_lr_mult: float = 0.0,
    norm_wd_mult: float = 0.1,
    lr: float | None = None,
) -> list[dict]:
    """Groups ``{"params", "names", "lr_mult", "wd_mult", "weight_decay"}`` (and ``"lr"`` if given), one per
    distinct (lr_mult, wd_mult), in order of first appearance. Every trainable parameter is in exactly one.
    """
    owners = {id(p): m for _, m in model.named_modules() for p in m.parameters(recurse=False)}
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult, wd_mult = param_multipliers(
            name,
            owners[id(param)],
            patch_embed_lr_mult=patch_embed_lr_mult,
            rope_lr_mult=rope_lr_mult,
            norm_wd_mult=norm_wd_mult,
        )
        group = groups.setdefault(
            (lr_mult, wd_mult),
            {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult, "weight_decay": weight_decay * wd_mult},
        )
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False).")
    out = list(groups.values())
    if lr is not None:
        for group in out:
            group["lr"] = lr * group["lr_mult"]
    for group in out:
        logger.debug("lr x%s, wd x%s: %d tensors", group["lr_mult"], group["wd_mult"], len(group["params"]))
    return out


def apply_schedules(optimizer, *, lr: float, weight_decay: float) -> None:
    """Set every group's ``lr = lr * lr_mult`` and ``weight_decay = weight_decay * wd_mult`` for this step."""
    for i, group in enumerate(optimizer.param_groups):
        if "lr_mult" not in group or "wd_mult" not in group:
            raise KeyError(
                f"Optimizer param group {i} has no 'lr_mult'/'wd_mult'; build the optimizer from build_param_groups()."
            )
        group["lr"] = lr * group["lr_mult"]
        group["weight_decay"] = weight_decay * group["wd_mult"]
