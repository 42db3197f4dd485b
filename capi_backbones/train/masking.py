"""Patch masks for CAPI pretraining and the collate function that draws them.

CAPI's default is inverse block masking with roll (paper Sec. 3, Table 1b): a block of
``n_tokens - n_masked`` visible patches, aspect ratio log-uniform in [0.5, 2] (clipped so the block
fits), truncated to the exact count, placed at random and rolled on the torus; every other patch is
masked. ``n_masked = int(mask_ratio * n_tokens)`` for every strategy, so all masks of a batch have the
same counts. All randomness comes from a ``torch.Generator`` passed in: no global RNG is touched.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = [
    "MASKING_STRATEGIES",
    "BlockShape",
    "MaskedBatch",
    "MaskingCollator",
    "block_mask",
    "inverse_block_mask",
    "n_masked_tokens",
    "sample_block_shape",
    "uniform_mask",
]


def n_masked_tokens(n_tokens: int, mask_ratio: float) -> int:
    """``int(n_tokens * mask_ratio)``, as the official code counts them (16x16 at 0.65 gives 166)."""
    return int(n_tokens * mask_ratio)


def _check_grid(h: int, w: int, mask_ratio: float) -> None:
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise ValueError(f"Grid size must be two positive ints, got ({h!r}, {w!r}).")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio!r}.")


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """One integer uniform in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def uniform_mask(h: int, w: int, mask_ratio: float, *, generator: torch.Generator) -> Tensor:
    """(h, w) bool mask, True = masked, with exactly ``int(mask_ratio * h * w)`` masked patches at random."""
    _check_grid(h, w, mask_ratio)
    n_masked = n_masked_tokens(h * w, mask_ratio)
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[torch.randperm(h * w, generator=generator)[:n_masked]] = True
    return mask.reshape(h, w)


@dataclass(frozen=True)
class BlockShape:
    """A block of at least ``n`` patches: ``height`` rows by ``width`` columns, from ``aspect`` = rows / columns."""

    height: int
    width: int
    aspect: float  # the drawn aspect ratio, before rounding to whole patches


def sample_block_shape(
    h: int,
    w: int,
    n: int,
    *,
    generator: torch.Generator,
    min_aspect: float = 0.5,
    max_aspect: float = 2.0,
) -> BlockShape:
    """Draw the rectangle that holds a block of ``n`` patches in an (h, w) grid.

    The log aspect ratio is uniform over [log min_aspect, log max_aspect] intersected with the
    ratios whose rectangle fits the grid (as in the official ``BlockMasking``). Where the two ranges do
    not meet (a strongly non-square grid), fitting wins. Sides are ``ceil(sqrt(n * aspect))`` rows and
    ``ceil(sqrt(n / aspect))`` columns, then clamped to the grid while keeping ``height * width >= n``.
    """
    if not 0 < n <= h * w:
        raise ValueError(f"A block needs 1 to h*w = {h * w} patches, got n={n}.")
    if not 0 < min_aspect <= max_aspect:
        raise ValueError(f"Need 0 < min_aspect <= max_aspect, got min_aspect={min_aspect}, max_aspect={max_aspect}.")
    fit_lo = math.log(n / w**2)  # below this the block is wider than the grid
    fit_hi = math.log(h**2 / (n + 1e-5))  # above this it is taller
    lo, hi = max(math.log(min_aspect), fit_lo), min(math.log(max_aspect), fit_hi)
    if lo > hi:  # the aspect range lies outside what fits: take the nearest ratio that fits
        lo = hi = fit_lo if math.log(max_aspect) < fit_lo else fit_hi
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    aspect = math.exp(lo + (hi - lo) * u)
    height = min(max(math.ceil(math.sqrt(n * aspect)), 1), h)
    width = min(max(math.ceil(math.sqrt(n / aspect)), 1), w)
    if height * width < n:  # only after rounding at the grid's edge
        width = min(math.ceil(n / height), w)
        height = min(math.ceil(n / width), h)
    return BlockShape(height=height, width=width, aspect=aspect)


def _block(
    h: int,
    w: int,
    n: int,
    *,
    generator: torch.Generator,
    roll: bool,
    min_aspect: float,
    max_aspect: float,
) -> Tensor:
    """(h, w) bool, True on a block of exactly ``n`` patches (the first ``n`` of its rectangle, row-major)."""
    block = torch.zeros(h, w, dtype=torch.bool)
    if n == 0:
        return block
    shape = sample_block_shape(h, w, n, generator=generator, min_aspect=min_aspect, max_aspect=max_aspect)
    top = _randint(0, h - shape.height, generator)
    left = _randint(0, w - shape.width, generator)
    full_rows, rest = divmod(n, shape.width)
    block[top : top + full_rows, left : left + shape.width] = True
    if rest:
        block[top + full_rows, left : left + rest] = True
    if roll:
        shift = (_randint(0, h - 1, generator), _randint(0, w - 1, generator))
        block = torch.roll(block, shifts=shift, dims=(0, 1))
    return block


def block_mask(
    h: int,
    w: int,
    mask_ratio: float,
    *,
    generator: torch.Generator,
    min_aspect: float = 0.5,
    max_aspect: float = 2.0,
    roll: bool = True,
) -> Tensor:
    """(h, w) bool mask, True = masked: one block of exactly ``int(mask_ratio * h * w)`` masked patches."""
    _check_grid(h, w, mask_ratio)
    n_masked = n_masked_tokens(h * w, mask_ratio)
    return _block(h, w, n_masked, generator=generator, roll=roll, min_aspect=min_aspect, max_aspect=max_aspect)


def inverse_block_mask(
    h: int,
    w: int,
    mask_ratio: float = 0.65,
    *,
    generator: torch.Generator,
    roll: bool = True,
    min_aspect: float = 0.5,
    max_aspect: float = 2.0,
) -> Tensor:
    """(h, w) bool mask, True = masked: a visible block of ``h*w - int(mask_ratio*h*w)`` patches, the rest masked.

    With ``roll`` the visible block is contiguous on the torus (it may wrap around the edges).
    """
    _check_grid(h, w, mask_ratio)
    n_visible = h * w - n_masked_tokens(h * w, mask_ratio)
    visible = _block(h, w, n_visible, generator=generator, roll=roll, min_aspect=min_aspect, max_aspect=max_aspect)
    return ~visible


MASKING_STRATEGIES: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_mask,
    "block": block_mask,
    "inverse_block": inverse_block_mask,
}


@dataclass
class MaskedBatch:
    """A collated batch. Indices are per image, row-major in the (h, w) patch grid, ascending."""

    images: Tensor  # (B, 3, H, W)
    visible_indices: Tensor  # (B, n_visible) long, the patches the student encoder sees
    predict_indices: Tensor  # (B, n_predict) long, masked patches whose teacher assignment is predicted
    masks: Tensor | None = None  # (B, h, w) bool, True = masked

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MaskedBatch":
        return MaskedBatch(**{f.name: _move(getattr(self, f.name), device, non_blocking) for f in fields(self)})

    def pin_memory(self) -> "MaskedBatch":
        """Called by ``DataLoader(pin_memory=True)``."""
        return MaskedBatch(**{f.name: _pin(getattr(self, f.name)) for f in fields(self)})


def _move(t: Tensor | None, device: torch.device | str, non_blocking: bool) -> Tensor | None:
    return None if t is None else t.to(device, non_blocking=non_blocking)


def _pin(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.pin_memory()


class MaskingCollator:
    """Draws the masks of a ``(h, w)`` patch grid (``sample_indices``) and, as a ``collate_fn`` called with a
    ``generator``, stacks images and draws one mask per image. It holds no state: the trainer seeds each
    sample's mask by its stream position (``train.data.PositionMaskingCollate``), so masks do not depend on
    batches, ranks, workers or resumes."""

    def __init__(
        self,
        grid_size: tuple[int, int],
        *,
        mask_ratio: float = 0.65,
        prediction_ratio: float = 0.05,
        strategy: str = "inverse_block",
        roll: bool = True,
    ) -> None:
        h, w = grid_size
        _check_grid(h, w, mask_ratio)
        if strategy not in MASKING_STRATEGIES:
            raise ValueError(f"Unknown masking strategy {strategy!r}. Available: {sorted(MASKING_STRATEGIES)}.")
        self.grid_size = (h, w)
        self.mask_ratio = mask_ratio
        self.prediction_ratio = prediction_ratio
        self.strategy = strategy
        self.roll = roll
        self.n_tokens = h * w
        self.n_masked = n_masked_tokens(self.n_tokens, mask_ratio)
        self.n_visible = self.n_tokens - self.n_masked
        self.n_predict = int(self.n_masked * prediction_ratio)
        if self.n_visible == 0:
            raise ValueError(f"mask_ratio={mask_ratio} masks all {self.n_tokens} patches of a {h}x{w} grid; lower it.")
        if not 0 < self.n_predict <= self.n_masked:
            raise ValueError(
                f"prediction_ratio={prediction_ratio} of {self.n_masked} masked patches gives n_predict="
                f"{self.n_predict}; it must give 1 to {self.n_masked} (raise the ratio or use a larger grid)."
            )

    def _mask(self, generator: torch.Generator) -> Tensor:
        h, w = self.grid_size
        fn = MASKING_STRATEGIES[self.strategy]
        if self.strategy == "uniform":
            return fn(h, w, self.mask_ratio, generator=generator)
        return fn(h, w, self.mask_ratio, generator=generator, roll=self.roll)

    def sample_indices(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Masks (B, h, w), visible indices (B, n_visible) and predict indices (B, n_predict), both ascending."""
        masks = torch.stack([self._mask(generator) for _ in range(batch_size)])  # (B, h, w)
        flat = masks.flatten(1)  # (B, n_tokens)
        visible = (~flat).nonzero()[:, 1].reshape(batch_size, self.n_visible)  # row-major, ascending
        masked = flat.nonzero()[:, 1].reshape(batch_size, self.n_masked)
        # a uniform random subset of the masked patches of each image
        chosen = torch.rand(batch_size, self.n_masked, generator=generator).argsort(dim=1)[:, : self.n_predict]
        predict = torch.gather(masked, 1, chosen).sort(dim=1).values
        return masks, visible, predict

    def __call__(self, batch: Sequence[Tensor | Sequence], generator: torch.Generator) -> MaskedBatch:
        if len(batch) == 0:
            raise ValueError("Cannot collate an empty batch.")
        images = torch.stack([self._image(item, i) for i, item in enumerate(batch)])  # (B, 3, H, W)
        masks, visible, predict = self.sample_indices(len(batch), generator)
        return MaskedBatch(images=images, visible_indices=visible, predict_indices=predict, masks=masks)

    def _image(self, item: Tensor | Sequence, index: int) -> Tensor:
        image = item if isinstance(item, Tensor) else (item[0] if len(item) > 0 else None)
        if not isinstance(image, Tensor) or image.ndim != 3:
            raise TypeError(
                f"Batch item {index} must be an image tensor (C, H, W) or a tuple whose first element is one, "
                f"got {type(item).__name__}."
            )
        h, w = self.grid_size
        height, width = image.shape[-2:]
        if height % h or width % w or height // h != width // w:
            raise ValueError(
                f"Image {index} of size {height}x{width} does not split into a {h}x{w} grid of square patches; "
                f"resize images to (p*{h}, p*{w}) for the patch size p."
            )
        return image
