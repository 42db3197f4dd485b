"""The pretraining recipe's per-parameter multipliers (lr and weight decay), as in the official
``get_params_groups``. Kept here, below the training code and the timm door that both read them:

- biases (and LayerScale ``gamma``): weight decay x0;
- weights of normalization layers: weight decay x ``norm_wd_mult`` (0.1);
- anything under ``patch_embed`` (its weight and its bias): lr x ``patch_embed_lr_mult`` (0.2);
- anything under ``rope`` (``rope.freqs``): lr x ``rope_lr_mult`` (0: frozen). Its weight decay stays x1,
  which does nothing at lr 0 with decoupled (AdamW) decay;
- everything else, ``registers``, ``mask_token`` and the head's ``weight_g`` / ``weight_v`` included: x1, x1.

Multipliers combine (``patch_embed.bias``: lr x0.2, wd x0). Norm layers are found by module type, the other
rules by name segment (so ``module.`` / ``_orig_mod.`` wrapper prefixes don't matter).
"""

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from capi_backbones.layers.rope import Rope

__all__ = ["NORM_LAYERS", "param_multipliers"]

NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, _BatchNorm)


def param_multipliers(
    name: str,
    owner: nn.Module,
    *,
    patch_embed_lr_mult: float = 0.2,
    rope_lr_mult: float = 0.0,
    norm_wd_mult: float = 0.1,
) -> tuple[float, float]:
    """(lr_mult, wd_mult) of the parameter ``name`` (dotted, as in ``named_parameters``) held by ``owner``."""
    segments = name.split(".")
    leaf = segments[-1]
    lr_mult, wd_mult = 1.0, 1.0
    if leaf == "bias" or leaf == "gamma":
        wd_mult = 0.0
    elif isinstance(owner, NORM_LAYERS) and leaf == "weight":
        wd_mult = norm_wd_mult
    if "patch_embed" in segments:
        lr_mult *= patch_embed_lr_mult
    if "rope" in segments or isinstance(owner, Rope):
        lr_mult *= rope_lr_mult
    return lr_mult, wd_mult
