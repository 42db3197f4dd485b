"""The ``coolwarm`` diverging colormap (Moreland, "Diverging Color Maps for Scientific Visualization", 2009)
without matplotlib: linear interpolation in RGB between 17 entries of Moreland's published table, its values at
0, 1/16, ..., 1 (blue (59, 76, 192) -> grey (221, 221, 221) -> red (180, 4, 38)). Between them the straight
lines differ from the curved map (and matplotlib's 256-entry table) by at most 8 levels of 255 (0.3 on average)."""

import numpy as np

__all__ = ["COOLWARM_ANCHORS", "coolwarm"]

# (17, 3) RGB in 0..255 at positions linspace(0, 1, 17)
COOLWARM_ANCHORS = np.array(
    [
        (59, 76, 192),
        (77, 104, 215),
        (98, 130, 234),
        (119, 154, 247),
        (141, 176, 254),
        (163, 194, 255),
        (184, 208, 249),
        (204, 217, 238),
        (221, 221, 221),
        (236, 211, 197),
        (245, 196, 173),
        (247, 177, 148),
        (244, 154, 123),
        (236, 127, 99),
        (222, 96, 77),
        (203, 62, 56),
        (180, 4, 38),
    ],
    dtype=np.float64,
)
NAN_COLOR = (0, 0, 0)


def coolwarm(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) to RGB uint8 of shape ``values.shape + (3,)``. NaN becomes black."""
    values = np.asarray(values, dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(COOLWARM_ANCHORS))
    clipped = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
    rgb = np.stack([np.interp(clipped, positions, COOLWARM_ANCHORS[:, c]) for c in range(3)], axis=-1)
    rgb = np.rint(rgb).astype(np.uint8)
    rgb[np.isnan(values)] = NAN_COLOR
    return rgb
