"""Pretraining data: a folder of images, seeded augmentations and a restorable, rank-sharded order.

The data order is an infinite *stream*: epoch e is a seeded permutation of the images, and the stream is
epoch 0, epoch 1, ... one after the other. Step t consumes stream positions ``[t * G, (t + 1) * G)`` for
the global batch G, and rank r of W takes the r-th slice of G / W of them. Everything random about a sample
(which image, its crop and flip, its mask) is seeded by ``(seed, stream position)``, so:

- resuming at step t needs only t (no sampler or worker state), and is bit-exact;
- the result does not depend on the number of DataLoader workers;
- one step on W ranks sees exactly the images, crops and masks of one single-process step.
"""

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from capi_backbones.constants import IMAGE_EXTENSIONS
from capi_backbones.images import find_image_files, load_image
from capi_backbones.runtime.seeding import AUGMENTATION_TAG, EPOCH_ORDER_TAG, MASK_TAG, seeded_generator
from capi_backbones.runtime.signals import ignore_stop_signals_in_worker
from capi_backbones.train.masking import MaskedBatch, MaskingCollator
from capi_backbones.transforms import CropBox, TrainTransform, random_resized_crop_box  # shared with the evals

__all__ = [
    "CropBox",
    "ImageStream",
    "PositionMaskingCollate",
    "StepBatchSampler",
    "TrainTransform",
    "build_loader",
    "find_images",
    "first_readable_image",
    "random_resized_crop_box",
]

logger = logging.getLogger(__name__)


def find_images(root: str | Path) -> list[Path]:
    """All image files under ``root`` (recursive, extensions from ``IMAGE_EXTENSIONS``), sorted."""
    if not str(root):
        raise FileNotFoundError("No image folder given: set data.root=/path/to/images (searched recursively).")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Image folder {str(root)!r} does not exist or is not a directory. "
            "Set data.root=/path/to/images (searched recursively)."
        )
    paths = sorted(find_image_files(root))  # the package's one finder (as extraction: hidden files skipped), sorted
    if not paths:
        raise FileNotFoundError(
            f"No images found under {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}). "
            "Point data.root at a folder that holds images."
        )
    return paths


def first_readable_image(paths: Sequence[Path], root: str) -> None:
    """Decode images of ``paths`` until one works; a ValueError of one line when none does (a folder of broken
    or foreign files would otherwise fail in the data loader, after the models are built)."""
    first_error = None
    for path in paths:
        try:
            load_image(path)
            return
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            first_error = first_error or error
    raise ValueError(
        f"None of the {len(paths)} image files under {root} can be read (first: {first_error}). "
        "Point data.root at a folder of readable images."
    )


# ---- the stream -----------------------------------------------------------------------------------------------------
class ImageStream(Dataset):
    """Map-style dataset indexed by *stream position*; returns ``(image (3, S, S), position)``.

    An unreadable file is logged with its path and replaced by the next image of the same epoch's order
    (deterministic), with the crop and flip of the original position.
    """

    def __init__(self, paths: Sequence[Path], transform: TrainTransform, seed: int = 0) -> None:
        if not paths:
            raise ValueError("ImageStream needs at least one image path.")
        self.paths = list(paths)
        self.transform = transform
        self.seed = seed
        self._epoch = -1
        self._order: Tensor | None = None
        self.unreadable: set[int] = set()  # indices that failed to load (in this process)

    def epoch_order(self, epoch: int) -> Tensor:
        """The permutation of image indices for ``epoch`` (cached for the current epoch)."""
        if epoch != self._epoch:
            n = len(self.paths)
            dtype = torch.int32 if n < 2**31 else torch.int64
            self._order = torch.randperm(n, generator=seeded_generator(self.seed, EPOCH_ORDER_TAG, epoch), dtype=dtype)
            self._epoch = epoch
        return self._order

    def image_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.paths))
        return int(self.epoch_order(epoch)[offset])

    def _load(self, index: int) -> Image.Image:
        return load_image(self.paths[index])  # the package's one decoder, as extraction (EXIF orientation, modes)

    def __getitem__(self, position: int) -> tuple[Tensor, int]:
        n = len(self.paths)
        epoch, offset = divmod(position, n)
        order = self.epoch_order(epoch)
        for shift in range(n):
            index = int(order[(offset + shift) % n])
            try:
                image = self._load(index)
                break
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                level = logging.DEBUG if index in self.unreadable else logging.WARNING  # warn once per file
                self.unreadable.add(index)
                logger.log(level, "Unreadable image %s (%s); using another image instead.", self.paths[index], error)
        else:
            raise RuntimeError(f"None of the {n} images under the data root could be read; see the warnings above.")
        generator = seeded_generator(self.seed, AUGMENTATION_TAG, position)
        return self.transform(image, generator), position

    def __len__(self) -> int:
        return len(self.paths)


class StepBatchSampler(Sampler[list[int]]):
    """Yields, for steps ``start_step .. total_steps - 1``, this rank's slice of the step's stream positions."""

    def __init__(self, global_batch: int, *, rank: int, world_size: int, start_step: int, total_steps: int) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"optim.batch_size={global_batch} (the global batch) is not divisible by the {world_size} ranks; "
                f"use a multiple of {world_size}."
            )
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.start_step = start_step
        self.total_steps = total_steps

    def positions(self, step: int) -> list[int]:
        first = step * self.global_batch + self.rank * self.local_batch
        return list(range(first, first + self.local_batch))

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            yield self.positions(step)

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)


def build_loader(
    stream: ImageStream,
    sampler: StepBatchSampler,
    collate_fn,
    *,
    num_workers: int,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``sampler``'s steps. Its private generator (for worker base seeds) keeps the creation of
    an iterator from drawing from the global torch RNG, which a bit-exact resume relies on."""
    return DataLoader(
        stream,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals_in_worker if num_workers > 0 else None,
    )


class PositionMaskingCollate:
    """``collate_fn`` for :class:`ImageStream` items ``(image, position)``: stacks the images and draws each
    image's mask from a generator seeded by ``(seed, position)`` with ``MaskingCollator.sample_indices``,
    so a sample's mask does not depend on the batch it lands in, the rank, the worker or a resume."""

    def __init__(self, masking: MaskingCollator, seed: int) -> None:
        self.masking = masking
        self.seed = seed

    def __call__(self, items: Sequence[tuple[Tensor, int]]) -> MaskedBatch:
        if not items:
            raise ValueError("Cannot collate an empty batch.")
        images = torch.stack([image for image, _ in items])  # (B, 3, S, S)
        masks, visible, predict = [], [], []
        for _, position in items:
            m, v, p = self.masking.sample_indices(1, seeded_generator(self.seed, MASK_TAG, position))
            masks.append(m)
            visible.append(v)
            predict.append(p)
        return MaskedBatch(
            images=images,
            visible_indices=torch.cat(visible),  # (B, n_visible)
            predict_indices=torch.cat(predict),  # (B, n_predict)
            masks=torch.cat(masks),  # (B, h, w)
        )
