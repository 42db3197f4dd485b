"""capi-backbones: CAPI vision backbones as an installable, tested model library."""

from capi_backbones import timm_models  # noqa: F401  (registers capi_vit*14 with timm.create_model)
from capi_backbones.features import FeatureExtractor, FeatureOutput
from capi_backbones.models import ARCHITECTURES, BackboneOutput, CapiConfig, CapiModel
from capi_backbones.pretrained import create_model, from_pretrained, list_models

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "BackboneOutput",
    "CapiConfig",
    "CapiModel",
    "FeatureExtractor",
    "FeatureOutput",
    "__version__",
    "create_model",
    "from_pretrained",
    "list_models",
]
