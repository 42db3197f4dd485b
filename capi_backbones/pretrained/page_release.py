"""Give back the resident pages of memory-mapped checkpoint tensors once they have been copied.

A bf16 file loaded into an fp32 model would otherwise keep every page of the file resident next to the
fp32 copy (1.5x the model's bytes at peak). Dropping clean pages of a file-backed mapping is safe: a later
read faults them in again from the file. Only call this on tensors that are memory-mapped from a file.
"""

import ctypes
import mmap
import sys

from torch import Tensor

__all__ = ["release_pages"]

_MADV_DONTNEED = 4
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


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
