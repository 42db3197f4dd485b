"""Token coordinates used by RoPE: patch grid and "edge" register layout."""

import torch
from torch import Tensor

__all__ = ["patch_coordinates", "edge_register_coordinates", "scale_to_extent"]


def patch_coordinates(h: int, w: int, *, device=None, dtype=None) -> Tensor:
    """(h*w, 2) coordinates (row, col) in [0, 1], row-major; a side of length 1 gets coordinate 0."""
    rows = torch.linspace(0, 1, h, device=device, dtype=dtype)
    cols = torch.linspace(0, 1, w, device=device, dtype=dtype)
    return torch.cartesian_prod(rows, cols).reshape(h * w, 2)


def edge_register_coordinates(n: int, *, device=None, dtype=None) -> Tensor:
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
