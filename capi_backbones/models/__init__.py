"""CAPI model definitions. Knows nothing of features, visualisation or training.

``CapiConfig`` and ``ARCHITECTURES`` are plain data (no torch), so the CLI's ``list`` reads them without importing
torch; the torch modules (``CapiModel`` and its helpers) are imported on first use.
"""

from typing import TYPE_CHECKING

from capi_backbones.lazy_exports import lazy_exports
from capi_backbones.models.config import ARCHITECTURES, CapiConfig

_LAZY = {  # public name -> defining module, imported on first attribute access (PEP 562)
    "BackboneOutput": "capi_backbones.models.capi",
    "CapiModel": "capi_backbones.models.capi",
    "Transformer": "capi_backbones.models.capi",
    "nearest_valid_sizes": "capi_backbones.models.capi",
    "edge_register_coordinates": "capi_backbones.models.coordinates",
    "patch_coordinates": "capi_backbones.models.coordinates",
    "scale_to_extent": "capi_backbones.models.coordinates",
}

if TYPE_CHECKING:
    from capi_backbones.models.capi import BackboneOutput, CapiModel, Transformer, nearest_valid_sizes
    from capi_backbones.models.coordinates import edge_register_coordinates, patch_coordinates, scale_to_extent


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "ARCHITECTURES",
    "BackboneOutput",
    "CapiConfig",
    "CapiModel",
    "Transformer",
    "edge_register_coordinates",
    "nearest_valid_sizes",
    "patch_coordinates",
    "scale_to_extent",
]
