"""capi-backbones: CAPI vision backbones as an installable, tested model library."""

from capi_backbones.models import ARCHITECTURES, BackboneOutput, CapiConfig, CapiModel

__version__ = "0.1.0"

__all__ = ["ARCHITECTURES", "BackboneOutput", "CapiConfig", "CapiModel", "__version__"]
