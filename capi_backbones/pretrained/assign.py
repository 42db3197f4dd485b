"""Strict loading onto a model built on the meta device: no random init, no second copy of the weights.

Steps: build ``model_cls(config, device="meta")``; ``checkpoint_filter_fn``; compare keys and every shape
(``CheckpointError`` listing what differs); convert tensor by tensor to the target dtype/device;
``load_state_dict(strict=True, assign=True)``; check nothing is left on meta; ``eval()``.
"""

import logging
from collections import Counter
from collections.abc import Mapping

import torch
from torch import Tensor

from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.pretrained.architecture import architecture_name, infer_config
from capi_backbones.pretrained.checkpoint_filter import checkpoint_filter_fn, compare_state_dict
from capi_backbones.pretrained.errors import CheckpointError
from capi_backbones.pretrained.page_release import release_pages

__all__ = ["load_state_into_new_model", "resolve_dtype"]

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """None -> float32 (the released files are probably bf16; CPU bf16 matmuls are very slow)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ValueError(f"Unsupported dtype {dtype!r}. Use one of {sorted(_DTYPE_NAMES)} or a floating torch.dtype.")


def _shape_hint(state_dict: Mapping[str, Tensor], config: CapiConfig) -> str:
    try:
        inferred = infer_config(state_dict)
    except CheckpointError:
        return ""
    if inferred == config:
        return ""
    name = architecture_name(inferred)
    what = f"the registered architecture {name!r}" if name else f"CapiConfig({inferred.to_dict()})"
    return f"Its shapes match {what}; pass arch=None to infer it, or the right arch."


def _convert(
    state_dict: dict[str, Tensor], dtype: torch.dtype, device: torch.device, release_source: bool
) -> dict[str, Tensor]:
    """Tensor by tensor; with ``release_source`` (memory-mapped sources) each source tensor's pages are given
    back once copied, so the peak stays near the converted model's size."""
    out, conversions = {}, Counter()
    for key in list(state_dict):
        tensor = state_dict[key]
        target = dtype if tensor.is_floating_point() else tensor.dtype
        if tensor.dtype != target:
            conversions[(tensor.dtype, target)] += 1
        out[key] = tensor.to(device=device, dtype=target)
        if release_source and out[key] is not tensor:
            release_pages(tensor)
    for (src, dst), n in sorted(conversions.items(), key=str):
        logger.info("Converted %d tensors from %s to %s", n, src, dst)
    return out


def load_state_into_new_model(
    state_dict: Mapping[str, Tensor],
    config: CapiConfig,
    *,
    model_cls: type[CapiModel] = CapiModel,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    source: str = "",
    memory_mapped: bool = False,
) -> CapiModel:
    """Build ``model_cls(config)`` on meta and assign the (filtered, checked) tensors; returns it in eval mode.

    ``strict=False`` only tolerates unexpected keys (logged as a warning and dropped). Missing keys and shape
    mismatches always raise: a model is never returned with random or uninitialised (meta) weights.
    ``memory_mapped``: the tensors are mapped from a file, so their pages may be released after conversion.
    """
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("Cannot load weights onto the meta device; pass device='cpu' or 'cuda'.")
    dtype = resolve_dtype(dtype)
    source = source or "state dict"
    model = model_cls(config, device="meta")
    filtered = checkpoint_filter_fn(state_dict, model)
    diff = compare_state_dict(filtered, model)
    if diff.missing or diff.mismatched or (strict and diff.unexpected):
        raise diff.error(source, _shape_hint(filtered, config))
    if diff.unexpected:
        logger.warning("strict=False: ignoring %d unexpected keys: %s", len(diff.unexpected), list(diff.unexpected))
        filtered = {k: v for k, v in filtered.items() if k not in set(diff.unexpected)}
    model.load_state_dict(_convert(filtered, dtype, device, memory_mapped), strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"After loading {source}, {len(left_on_meta)} tensors are still on meta: {left_on_meta}.")
    name = architecture_name(config)
    logger.info("Loaded %d tensors from %s into %s (%s)", len(filtered), source, name or "a custom config", dtype)
    return model.eval()
