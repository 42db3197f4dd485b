"""PCA visualisations of dense features: pure functions on (h, w, D) numpy arrays, pictures with Pillow.

Uses numpy, scikit-learn and Pillow only (no torch, no matplotlib). Not imported by ``import capi_backbones``:
``from capi_backbones.viz import pca_map, joint_pca_maps, pca_grid, save_png``.
"""

from capi_backbones.viz.colormap import coolwarm
from capi_backbones.viz.grid import RESAMPLE_MODES, pca_grid, save_png, upsample
from capi_backbones.viz.pca import (
    DEFAULT_VALUE_RANGE,
    PcaProjection,
    PcaResult,
    fit_pca_projection,
    joint_pca_maps,
    pca_map,
)

__all__ = [
    "DEFAULT_VALUE_RANGE",
    "RESAMPLE_MODES",
    "PcaProjection",
    "PcaResult",
    "coolwarm",
    "fit_pca_projection",
    "joint_pca_maps",
    "pca_grid",
    "pca_map",
    "save_png",
    "upsample",
]
