"""Every seed the package derives, in one place: each scheme a named function, the tags that separate them here.

Two schemes, kept apart because each fixes numbers that are already out in the world:

- **Training** (data order, augmentations, masks, a rank's stochastic depth): :func:`derive_seed` hashes
  ``(seed, tag, value)`` with numpy's SeedSequence into a well-mixed 63-bit seed. ``tag`` separates the purposes
  one run draws seeds for (the ``*_TAG`` constants below) and ``value`` the position (epoch, stream position,
  step and rank), so nearby seeds, tags and values give unrelated streams.
- **Probes** (the classification protocol's batch order and augmentations): the linear scheme
  ``seed * 1_000_003 + offset`` (:func:`probe_seed`), kept as it is so that probe results (and the runs checked
  against the official numbers) stay the same. It is not hashed: seeds of nearby offsets are nearby, which
  ``torch.Generator`` (Mersenne Twister seeding) makes unrelated streams anyway.

The model initialisation seeds torch's global generator with the configured seed itself (``train.seed``, the
probes' ``seed``, ``--random-init``): no derivation, so no function here. Imports numpy and torch lazily.
"""

__all__ = [
    "AUGMENTATION_TAG",
    "EPOCH_ORDER_TAG",
    "MASK_TAG",
    "PROBE_SEED_STRIDE",
    "RANK_TAG",
    "derive_seed",
    "probe_augmentation_seed",
    "probe_order_seed",
    "probe_seed",
    "rank_seed",
    "seeded_generator",
]

# derive_seed tags of training: one per purpose, never reused for another
EPOCH_ORDER_TAG = 0  # the permutation of the images in epoch e (value: e)
AUGMENTATION_TAG = 1  # the crop and flip of the image at stream position p (value: p)
MASK_TAG = 2  # the mask of the image at stream position p (value: p)
RANK_TAG = 3  # a rank's global torch generator: stochastic depth (value: step * 4096 + rank)

PROBE_SEED_STRIDE = 1_000_003  # a prime: the probes' seeds are seed * PROBE_SEED_STRIDE + offset
_RANKS_PER_STEP = 4096  # rank_seed's value is step * 4096 + rank (at most 4096 ranks)
_PER_ITERATION = 4096  # probe_augmentation_seed's offset is iteration * 4096 + image (batches of <= 4096 images)


def derive_seed(seed: int, tag: int, value: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, tag, value)`` (numpy SeedSequence hashing)."""
    import numpy as np

    high, low = np.random.SeedSequence([seed, tag, value]).generate_state(2, dtype=np.uint32)
    return ((int(high) & 0x7FFFFFFF) << 32) | int(low)


def seeded_generator(seed: int, tag: int, value: int):
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, tag, value))


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a training rank's global torch generator (stochastic depth) from ``step`` on: at the start of a run
    (``step`` 0), and when a checkpoint written by another number of ranks is resumed at ``step``."""
    return derive_seed(seed, RANK_TAG, step * _RANKS_PER_STEP + rank)


def probe_seed(seed: int, offset: int) -> int:
    """The probes' linear scheme: ``seed * 1_000_003 + offset``."""
    return seed * PROBE_SEED_STRIDE + offset


def probe_order_seed(seed: int, epoch: int) -> int:
    """The seed of the probes' permutation of the training features in ``epoch``."""
    return probe_seed(seed, epoch)


def probe_augmentation_seed(seed: int, iteration: int, image: int) -> int:
    """The seed of the crop and flip of the ``image``-th image of the probes' batch ``iteration`` (augmented
    training). Its offsets overlap those of :func:`probe_order_seed` (epoch 4096 and iteration 1, image 0 share a
    seed), as they always have; the streams serve unrelated draws."""
    return probe_seed(seed, iteration * _PER_ITERATION + image)
