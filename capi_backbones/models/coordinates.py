"""Token coordinates used by RoPE: patch grid and "edge" register layout."""

import torch
from torch import Tensor

__all__ = ["patch_coordinates", "edge_register_coordinates", "scale_to_extent"]


def unit_interval(n: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """(n,) evenly spaced points from 0 to 1 (``torch.linspace(0, 1, n)``); a single point is 0.

    Under ``torch.export`` or ``torch.compile`` ``n`` may be symbolic (a ``torch.SymInt``), and ``linspace``, whose
    ``steps`` is a plain int, would bake the traced size into the graph. There this computes linspace's own formula
    with tensor ops (``_traced_unit_interval``). That is linspace's elementwise (CUDA) kernel; the vectorised CPU
    kernel may differ in the last bit, so eager (and TorchScript) calls keep ``linspace`` and their numbers stay bit
    for bit."""
    if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript skips a block guarded by this test alone)
        if not isinstance(n, int) or torch.compiler.is_compiling():
            return _traced_unit_interval(n, device, dtype)
    return torch.linspace(0, 1, n, device=device, dtype=dtype)


def _traced_unit_interval(n, device, dtype) -> Tensor:
    """``i * step`` on the first half, ``1 - (n - 1 - i) * step`` on the second, ``step = 1 / (n - 1)`` in
    ``dtype``: linspace's formula, written with tensor ops so that ``n`` may be symbolic."""
    index = torch.arange(n, device=device, dtype=dtype)  # exact integers
    last = index[-1:].clamp(min=1)  # (1,) n - 1; 1 when n == 1, whose single point is then 0
    step = 1 / last
    return torch.where(2 * index < last, index * step, 1 - (last - index) * step)  # 2i < n - 1 <=> i < n // 2


def patch_coordinates(h: int, w: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """(h*w, 2) coordinates (row, col) in [0, 1], row-major; a side of length 1 gets coordinate 0. ``h`` and ``w``
    may be ``torch.SymInt`` (see ``unit_interval``)."""
    rows = unit_interval(h, device=device, dtype=dtype)[:, None].expand(h, w)  # (h, w)
    cols = unit_interval(w, device=device, dtype=dtype)[None, :].expand(h, w)  # (h, w)
    return torch.stack([rows, cols], dim=-1).flatten(0, 1)  # (h*w, 2)


def edge_register_coordinates(n: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """(n, 2) register coordinates walking the border of the unit square, n/4 per side."""
    side = n // 4
    c = torch.arange(side, device=device, dtype=dtype) / side
    zeros, ones = torch.zeros_like(c), torch.ones_like(c)
    top = torch.stack([c, zeros], dim=-1)
    right = torch.stack([ones, c], dim=-1)
    bottom = torch.stack([1 - c, ones], dim=-1)
    left = torch.stack([zeros, 1 - c], dim=-1)
    return torch.cat([top, right, bottom, left])


def scale_to_extent(reg_coords: Tensor, coords: Tensor) -> Tensor:
    """Rescale (n_reg, 2) register coordinates to the per-image extent of (b, n, 2) patch coordinates."""
    lo = coords.min(dim=1, keepdim=True).values  # (b, 1, 2)
    hi = coords.max(dim=1, keepdim=True).values
    return lo + reg_coords * (hi - lo)  # (b, n_reg, 2)
