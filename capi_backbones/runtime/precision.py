"""Numeric precision: which dtype the model runs in, chosen from what the hardware does natively.

``resolve_precision(precision, device)`` turns a user's ``precision`` (``"auto"``, ``"fp32"``, ``"bf16"``,
``"fp16"``) into the one that runs:

- ``"auto"``: ``"bf16"`` (autocast) where the device multiplies bf16 matrices natively, ``"fp32"`` elsewhere.
  Native means a CUDA device with bf16 tensor cores (Ampere and later), or a CPU with AVX512-BF16 or AMX-BF16
  (Intel Xeon 4th generation and later, AMD Zen 4 and later): there bf16 matmuls run 2x to 4x faster than fp32.
  The choice is logged once, with how to ask for fp32 (``precision="fp32"``, ``--precision fp32``): bf16 features
  differ from fp32 ones by about 1e-2 relative, the official numbers are the fp32 ones.
- ``"bf16"``: allowed on any CUDA device or CPU; where it is emulated (slower than fp32) a warning says so.
- ``"fp16"``: CUDA, or a CPU with AMX-FP16; refused elsewhere (no native fp16 matmul: far slower than fp32).
- ``"fp32"``: always allowed, the official numbers.

Detection is done at run time, never assumed: on the CPU from PyTorch's own CPU feature check (the ``cpuinfo``
library it is built with, which also checks that the OS enabled the AVX-512 and AMX registers) and, on Linux, the
flags of ``/proc/cpuinfo``; both must agree where both are available. Imports torch lazily.
"""

import functools
import logging
from pathlib import Path

__all__ = [
    "PRECISIONS",
    "autocast_dtype",
    "cpu_bf16_support",
    "cuda_bf16_support",
    "native_bf16",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_CPUINFO = Path("/proc/cpuinfo")
_logged: set[tuple[str, str, str]] = set()  # (asked, chosen, device type) already logged


def _cpuinfo_flags(path: Path = _CPUINFO) -> set[str] | None:
    """The CPU flags listed by the Linux kernel, or None where there is no /proc/cpuinfo."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def _torch_cpu_check(name: str) -> bool | None:
    """One of torch.cpu's feature checks (``_is_avx512_bf16_supported``, ...), or None where torch lacks it."""
    import torch

    check = getattr(torch.cpu, name, None)
    return bool(check()) if callable(check) else None


@functools.cache
def cpu_bf16_support() -> str | None:
    """How this CPU multiplies bf16 matrices natively: ``"AMX-BF16"``, ``"AVX512-BF16"``, or None (emulated).

    A unit counts only if every available source says so: PyTorch's check (which also needs the OS to have enabled
    the registers) and the kernel's /proc/cpuinfo flags."""
    for name, flag, check in (
        ("AMX-BF16", "amx_bf16", "_is_amx_tile_supported"),
        ("AVX512-BF16", "avx512_bf16", "_is_avx512_bf16_supported"),
    ):
        if _cpu_has(flag, check):
            return name
    return None


def _cpu_has(flag: str, torch_check: str) -> bool:
    """True if every available source says the CPU has the unit: PyTorch's check and /proc/cpuinfo's ``flag``."""
    flags = _cpuinfo_flags()
    votes = [_torch_cpu_check(torch_check), None if flags is None else flag in flags]
    votes = [vote for vote in votes if vote is not None]
    return bool(votes) and all(votes)


def _amx_fp16(device) -> bool:
    return device.type == "cpu" and _cpu_has("amx_fp16", "_is_amx_fp16_supported")


def cuda_bf16_support(device) -> bool:
    """Whether the CUDA device multiplies bf16 natively (compute capability 8.0 or newer)."""
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def native_bf16(device) -> bool:
    """Whether bf16 matmuls are native on ``device`` (a ``torch.device`` or a string)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return cuda_bf16_support(device)
    if device.type == "cpu":
        return cpu_bf16_support() is not None
    return False


def _describe(device) -> str:
    if device.type == "cpu":
        unit = cpu_bf16_support()
        return f"this CPU ({unit})" if unit else "this CPU (no AVX512-BF16 or AMX)"
    return f"'{device}'"


def resolve_precision(precision: str, device, *, announce: bool = True) -> str:
    """The precision that runs (``"fp32"``, ``"bf16"`` or ``"fp16"``) for the asked ``precision`` on ``device``.

    Logs the choice of ``"auto"`` (and emulated bf16) once per process; ``announce=False`` only checks and resolves
    (to check arguments before loading weights, say). Raises a ValueError with one line for an unknown value or an
    fp16 request without native fp16."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    device = torch.device(device)
    native = native_bf16(device)
    chosen, level, message = precision, None, ""
    if precision == "auto" and native:
        chosen, level = "bf16", logging.WARNING
        message = (
            f"precision='auto' runs bf16 autocast: {_describe(device)} multiplies bf16 natively. Features differ "
            "from the official fp32 ones by about 1e-2 relative; pass precision='fp32' (--precision fp32) for them."
        )
    elif precision == "auto":
        chosen, level = "fp32", logging.INFO
        message = f"precision='auto' runs fp32: {_describe(device)} has no native bf16."
    elif precision == "bf16" and not native:
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"precision 'bf16' is only supported on CPU and CUDA devices, not '{device}'.")
        level = logging.WARNING
        message = (
            f"precision='bf16' on {_describe(device)}: bf16 is emulated there, likely slower than fp32. "
            "Pass precision='fp32' (or 'auto')."
        )
    elif precision == "fp16" and device.type != "cuda" and not _amx_fp16(device):
        raise ValueError(
            f"precision 'fp16' needs CUDA or a CPU with AMX-FP16 (device is '{device}'): fp16 matmuls are "
            "emulated and very slow elsewhere. Use precision='bf16', 'fp32' or 'auto'."
        )
    key = (precision, chosen, device.type)
    if announce and level is not None and key not in _logged:
        _logged.add(key)
        logger.log(level, message)
    return chosen


def autocast_dtype(precision: str):
    """The autocast dtype of a resolved precision: None for ``"fp32"``, else ``torch.bfloat16`` / ``torch.float16``."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
