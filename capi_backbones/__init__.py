"""capi-backbones: CAPI vision backbones as an installable, tested model library.

``__all__`` is the curated public API of the package (docs/api.md names the public modules too; tests/public_api.txt
guards both). The public names below are imported on first use, so ``import capi_backbones`` (and the ``capi-backbones``
command's ``--help``) stays free of torch and of the optional integrations. timm users register the
``capi_vit*14`` names with one line: ``import capi_backbones.timm``.
"""

from capi_backbones.lazy_exports import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first attribute access, PEP 562)
_LAZY = {
    "ARCHITECTURES": "capi_backbones.models",
    "BackboneOutput": "capi_backbones.models",
    "CapiConfig": "capi_backbones.models",
    "CapiModel": "capi_backbones.models",
    "CheckpointError": "capi_backbones.pretrained",
    "create_model": "capi_backbones.pretrained",
    "from_pretrained": "capi_backbones.pretrained",
    "list_models": "capi_backbones.pretrained",
    "FeatureExtractor": "capi_backbones.features",
    "FeatureOutput": "capi_backbones.features",
}

TYPE_CHECKING = False  # True for type checkers (mypy, pyright); saves importing typing at start-up
if TYPE_CHECKING:  # static type checkers and IDEs see the real objects
    from capi_backbones.features import FeatureExtractor, FeatureOutput
    from capi_backbones.models import ARCHITECTURES, BackboneOutput, CapiConfig, CapiModel
    from capi_backbones.pretrained import CheckpointError, create_model, from_pretrained, list_models


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "ARCHITECTURES",
    "BackboneOutput",
    "CapiConfig",
    "CapiModel",
    "CheckpointError",
    "FeatureExtractor",
    "FeatureOutput",
    "__version__",
    "create_model",
    "from_pretrained",
    "list_models",
]
