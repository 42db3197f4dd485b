"""CAPI model definitions. Knows nothing of features, visualisation or training."""

from capi_backbones.models.capi import BackboneOutput, CapiModel, Transformer, nearest_valid_sizes
from capi_backbones.models.config import ARCHITECTURES, CapiConfig
from capi_backbones.models.coordinates import edge_register_coordinates, patch_coordinates, scale_to_extent

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
