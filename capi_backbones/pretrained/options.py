"""``LoadOptions``: the one options object of every load (from_pretrained, create_model, torch.hub, timm,
``CapiHubModel``, FeatureExtractor, the CLI). Doors keep their familiar keyword arguments and build one of these."""

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from capi_backbones.constants import DOWNLOAD_TIMEOUT_ENV

if TYPE_CHECKING:  # torch is imported by the loaders, not by this data module
    import torch

    from capi_backbones.models import CapiConfig

__all__ = ["DOWNLOAD_TIMEOUT_ENV", "LoadOptions"]


@dataclass(frozen=True)
class LoadOptions:
    """How weights are fetched and loaded.

    Loading: ``arch`` (architecture name or ``CapiConfig``; default: the registered weights' arch, the config
    stored with the weights, else the one the tensor shapes give), ``device`` ("cpu"), ``dtype`` (float32),
    ``strict`` (``False`` only tolerates unexpected keys), ``allow_non_finite`` (load NaN/Inf values instead of
    refusing them).

    Fetching: ``cache_dir`` (URLs and registered weights: default the torch hub checkpoints folder; ``hf-hub:``
    repos: default the Hugging Face cache), ``download_timeout`` (seconds for a whole download; default
    ``$CAPI_DOWNLOAD_TIMEOUT`` or 3600), and for ``hf-hub:`` repos ``revision``, ``token``, ``force_download``,
    ``local_files_only``.
    """

    arch: "str | CapiConfig | None" = None
    device: "torch.device | str" = "cpu"
    dtype: "torch.dtype | str | None" = None
    strict: bool = True
    allow_non_finite: bool = False
    cache_dir: str | os.PathLike | None = None
    download_timeout: float | None = None
    revision: str | None = None
    token: str | bool | None = None
    force_download: bool = False
    local_files_only: bool = False

    def replace(self, **changes: Any) -> "LoadOptions":
        return replace(self, **changes)
