"""capi-backbones: CAPI vision backbones as an installable, tested model library."""

from capi_backbones.models import ARCHITECTURES, BackboneOutput, CapiConfig, CapiModel
from capi_backbones.pretrained import create_model, from_pretrained, list_models

__version__ = "0.1.0"

_LAZY = {"FeatureExtractor", "FeatureOutput"}  # from capi_backbones.features, imported on first use


def __getattr__(name: str):
    if name in _LAZY:  # keeps `import capi_backbones.train` (and the models) free of the features stack
        from capi_backbones import features

        return getattr(features, name)
    raise AttributeError(f"module 'capi_backbones' has no attribute {name!r}")


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
