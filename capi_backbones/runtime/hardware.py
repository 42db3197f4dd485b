"""What can be told about this machine's accelerators without importing torch."""

import os
import sys

__all__ = ["cuda_is_certainly_missing"]


def cuda_is_certainly_missing() -> bool:
    """True when this machine has no GPU driver at all, which can be told without importing torch (Linux: no NVIDIA
    driver in /proc, no ROCm /dev/kfd, no WSL /dev/dxg). False means "maybe": torch decides later."""
    if not sys.platform.startswith("linux"):
        return False
    return not any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg"))
