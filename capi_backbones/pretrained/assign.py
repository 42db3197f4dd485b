"""Strict loading onto a model built on the meta device: no random init, no second copy of the weights.

Steps: build ``model_cls(config, device="meta")``; ``checkpoint_filter_fn``; compare keys and every shape
(``CheckpointError`` listing what differs); refuse non-floating tensors; convert tensor by tensor to the target
dtype/device, giving back the pages of memory-mapped sources, and refuse NaN/Inf values unless allowed;
``load_state_dict(strict=True, assign=True)``; check nothing is left on meta; ``eval()``.

Page release: a bf16 file loaded into an fp32 model would otherwise keep every page of the file resident next to
the fp32 copy (1.5x the model's bytes at peak). Dropping clean pages of a file-backed mapping is safe: a later
read faults them in again from the file.
"""

import ctypes
import logging
import mmap
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.pretrained.errors import CheckpointError
from capi_backbones.pretrained.files import read_checkpoint
from capi_backbones.pretrained.matching import (
    architecture_name,
    checkpoint_filter_fn,
    compare_state_dict,
    infer_config,
)

__all__ = [
    "find_non_finite",
    "find_non_floating",
    "load_checkpoint_into",
    "load_state_into_new_model",
    "non_finite_message",
    "non_floating_message",
    "release_pages",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

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
    """None -> float32: the model API gives the official fp32 numbers unless a dtype is asked for."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ValueError(f"Unsupported dtype {dtype!r}. Use one of {sorted(_DTYPE_NAMES)} or a floating torch.dtype.")


def release_pages(tensor: Tensor) -> None:
    """Drop the pages lying wholly inside ``tensor``'s bytes from this process's memory (Linux; no-op elsewhere)."""
    if _LIBC is None or tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # round up: never touch a neighbour's page
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def find_non_floating(state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, str]:
    """Key -> dtype name of the tensors stored as integers/bools where the model holds floating point."""
    return {
        k: str(v.dtype).removeprefix("torch.")
        for k, v in state_dict.items()
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point()
    }


_CHECK_CHUNK = 1 << 22  # elements upcast at a time for dtypes torch cannot reduce (float8)


def _non_finite_count(tensor: Tensor) -> int:
    """NaN/Inf values of a float8 tensor (torch has no sum/isfinite for them): upcast chunk by chunk."""
    flat = tensor.reshape(-1)
    return sum(
        int((~torch.isfinite(flat[i : i + _CHECK_CHUNK].float())).sum()) for i in range(0, flat.numel(), _CHECK_CHUNK)
    )


def find_non_finite(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """Key -> number of NaN/Inf values, for the floating tensors that hold any (float8 included)."""
    counts = {}
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.element_size() == 1:
            if n := _non_finite_count(tensor):
                counts[key] = n
            continue
        # a finite sum proves every value finite (NaN and Inf propagate) in one pass with no allocation; only a
        # non-finite sum (or an overflowing one) pays for the exact count
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum())):
            n = tensor.numel() - int(torch.isfinite(tensor).sum())
            if n:
                counts[key] = n
    return counts


def non_finite_message(source: str, counts: Mapping[str, int]) -> str:
    first = ", ".join(f"{k} ({n})" for k, n in list(counts.items())[:3])
    return (
        f"{source} holds NaN or Inf values in {len(counts)} tensors ({sum(counts.values())} values; {first}): "
        "the weights are damaged or come from a diverged run. Use an earlier checkpoint, or pass "
        "allow_non_finite=True to load them anyway."
    )


def non_floating_message(source: str, dtypes: Mapping[str, str]) -> str:
    first = ", ".join(f"{k} ({d})" for k, d in list(dtypes.items())[:3])
    return (
        f"{source} stores {len(dtypes)} weight tensors as {'/'.join(sorted(set(dtypes.values())))}, not floating "
        f"point ({first}): it is not a CAPI weights file, or it was cast wrongly. Save the weights as "
        "float32/bfloat16/float16."
    )


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
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Tensor by tensor, counting NaN/Inf of the converted values (a cast to float16 can overflow); with
    ``release_source`` (memory-mapped sources) each source tensor's pages are given back once copied, so the
    peak stays near the converted model's size."""
    out, conversions, non_finite = {}, Counter(), {}
    for key in list(state_dict):
        tensor = state_dict[key]
        target = dtype if tensor.is_floating_point() else tensor.dtype
        if tensor.dtype != target:
            conversions[(tensor.dtype, target)] += 1
        out[key] = tensor.to(device=device, dtype=target)
        if release_source and out[key] is not tensor:
            release_pages(tensor)
        non_finite |= find_non_finite({key: out[key]})
    for (src, dst), n in sorted(conversions.items(), key=str):
        logger.info("Converted %d tensors from %s to %s", n, src, dst)
    return out, non_finite


def _checked_keys(
    filtered: dict[str, Tensor], model: nn.Module, strict: bool, source: str, hint: str = ""
) -> dict[str, Tensor]:
    """The key, shape and dtype checks of every load: missing keys and shape mismatches raise, unexpected keys too
    unless ``strict=False`` (then dropped with a warning), weights stored as integers are refused."""
    diff = compare_state_dict(filtered, model)
    if diff.missing or diff.mismatched or (strict and diff.unexpected):
        raise diff.error(source, hint)
    if diff.unexpected:
        logger.warning("strict=False: ignoring %d unexpected keys: %s", len(diff.unexpected), list(diff.unexpected))
        unexpected = set(diff.unexpected)
        filtered = {k: v for k, v in filtered.items() if k not in unexpected}
    non_floating = find_non_floating(filtered, model.state_dict())
    if non_floating:
        raise CheckpointError(non_floating_message(source, non_floating))
    return filtered


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
    allow_non_finite: bool = False,
) -> CapiModel:
    """Build ``model_cls(config)`` on meta and assign the (filtered, checked) tensors; returns it in eval mode.

    ``strict=False`` only tolerates unexpected keys (logged as a warning and dropped). Missing keys and shape
    mismatches always raise: a model is never returned with random or uninitialised (meta) weights.
    ``memory_mapped``: the tensors are mapped from a file, so their pages may be released after conversion.
    Weights stored as integers are refused; NaN/Inf values are refused unless ``allow_non_finite`` (then logged).
    """
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("Cannot load weights onto the meta device; pass device='cpu' or 'cuda'.")
    dtype = resolve_dtype(dtype)
    source = source or "state dict"
    model = model_cls(config, device="meta")
    filtered = checkpoint_filter_fn(state_dict, model)
    filtered = _checked_keys(filtered, model, strict, source, _shape_hint(filtered, config))
    converted, non_finite = _convert(filtered, dtype, device, memory_mapped)
    if non_finite and not allow_non_finite:
        raise CheckpointError(non_finite_message(source, non_finite))
    if non_finite:
        logger.warning("allow_non_finite=True: %s", non_finite_message(source, non_finite).split(":")[0])
    model.load_state_dict(converted, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"After loading {source}, {len(left_on_meta)} tensors are still on meta: {left_on_meta}.")
    name = architecture_name(config)
    logger.info("Loaded %d tensors from %s into %s (%s)", len(filtered), source, name or "a custom config", dtype)
    return model.eval()


def load_checkpoint_into(
    model: nn.Module,
    checkpoint: "str | os.PathLike | Mapping[str, Tensor]",
    *,
    filter_fn: Callable[[Mapping[str, Tensor], nn.Module], Mapping[str, Tensor]] | None = None,
    strict: bool = True,
    allow_non_finite: bool = False,
) -> nn.Module:
    """Load a checkpoint file or state dict into an existing ``model`` (in place, keeping its dtype and device),
    with the checks of every CAPI load; returns ``model``.

    A file is read by ``files.read_checkpoint`` (format told by its bytes, not its name; no code runs). The tensors
    go through ``filter_fn(state_dict, model)`` (default: ``checkpoint_filter_fn`` for a ``CapiModel``, none
    otherwise), then: missing keys and shape mismatches raise ``CheckpointError``, unexpected keys too unless
    ``strict=False`` (then dropped with a warning); weights stored as integers are refused; NaN/Inf values are
    refused unless ``allow_non_finite``. Nothing is copied into ``model`` before every check has passed.
    """
    if isinstance(checkpoint, Mapping):
        tensors, source = dict(checkpoint), "state dict"
    else:
        tensors, source = read_checkpoint(checkpoint).tensors, os.fspath(checkpoint)
    if filter_fn is None and isinstance(model, CapiModel):
        filter_fn = checkpoint_filter_fn
    filtered = dict(filter_fn(tensors, model)) if filter_fn is not None else tensors
    filtered = _checked_keys(filtered, model, strict, source)
    non_finite = find_non_finite(filtered)
    if non_finite and not allow_non_finite:
        raise CheckpointError(non_finite_message(source, non_finite))
    if non_finite:
        logger.warning("allow_non_finite=True: %s", non_finite_message(source, non_finite).split(":")[0])
    model.load_state_dict(filtered, strict=True)
    logger.info("Loaded %d tensors from %s into %s", len(filtered), source, type(model).__name__)
    return model
