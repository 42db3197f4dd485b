"""The one derivation of seeds: a well-mixed 63-bit seed for ``(seed, tag, value)``.

``tag`` separates the purposes one run draws seeds for (data order, augmentation, masks, a rank's dropout, ...)
and ``value`` the position (step, sample, epoch). numpy's SeedSequence hashing mixes them, so nearby seeds, tags
and values give unrelated streams.
"""

__all__ = ["derive_seed", "seeded_generator"]


def derive_seed(seed: int, tag: int, value: int) -> int:
    """A well-mixed 63-bit seed for ``(seed, tag, value)`` (numpy SeedSequence hashing)."""
    import numpy as np

    high, low = np.random.SeedSequence([seed, tag, value]).generate_state(2, dtype=np.uint32)
    return ((int(high) & 0x7FFFFFFF) << 32) | int(low)


def seeded_generator(seed: int, tag: int, value: int):
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed`."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, tag, value))
