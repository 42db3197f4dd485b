"""Pretrained CAPI weights: resolve a source, fetch it, load it strictly.

Public API (``__all__``): ``from_pretrained`` / ``create_model`` / ``list_models`` / ``model_config``,
``CapiHubModel`` (``save_pretrained`` / ``push_to_hub``), ``LoadOptions`` (the one options object of every load),
``resolve_source`` / ``resolve_model_spec`` (what a name, path, URL or ``hf-hub:`` repo means),
``load_checkpoint_into`` (a checked load into an existing model), ``read_checkpoint``, ``inspect_checkpoint``,
the registry (``WEIGHTS``, ``get_weights``) and the errors. The modules, for readers:

- ``sources``: the registry, and the one resolver (``resolve_source``) and fetcher (``fetch``: ``download`` for
  URLs, the Hugging Face cache for ``hf-hub:``);
- ``files``: reading checkpoint files safely (format told by structure) and writing them atomically;
- ``matching`` / ``assign``: the ``backbone.`` prefix, architecture inference, the key filter and comparison, and
  the strict, checked assignment (non-floating, NaN/Inf, keys and shapes);
- ``local``: the one load path (``load``, ``load_local``) used by ``loader`` and ``hub_model``;
- ``loader``: the public entry points; ``hub_model``: ``CapiHubModel``; ``inspection``: ``capi-backbones info``.

Other names importable from here (``download_url``, ``sniff_format``, ``release_pages``, ...) are internals kept
for compatibility. Imports point one way: this package uses ``capi_backbones.models``; models never import it. It
imports no huggingface_hub, timm or scikit-learn (huggingface_hub only inside ``push_to_hub`` and Hub downloads).
"""

from capi_backbones.pretrained.assign import load_checkpoint_into, load_state_into_new_model, release_pages
from capi_backbones.pretrained.download import download_url
from capi_backbones.pretrained.errors import CheckpointError, DownloadError, loading_interface
from capi_backbones.pretrained.files import (
    LoadedCheckpoint,
    read_checkpoint,
    save_official_checkpoint,
    save_safetensors,
    sniff_format,
)
from capi_backbones.pretrained.hub_model import CapiHubModel
from capi_backbones.pretrained.inspection import CheckpointInfo, inspect_checkpoint
from capi_backbones.pretrained.loader import (
    ModelSpec,
    create_model,
    from_pretrained,
    list_models,
    model_config,
    resolve_model_spec,
)
from capi_backbones.pretrained.local import load_local
from capi_backbones.pretrained.matching import (
    BACKBONE_PREFIX,
    ParameterCounts,
    StateDictDiff,
    add_backbone_prefix,
    architecture_name,
    checkpoint_filter_fn,
    compare_state_dict,
    count_parameters,
    infer_config,
    resolve_architecture,
    strip_backbone_prefix,
)
from capi_backbones.pretrained.options import LoadOptions
from capi_backbones.pretrained.sources import (
    WEIGHTS,
    PretrainedWeights,
    ResolvedSource,
    download_hub_files,
    fetch_checkpoint,
    get_weights,
    parse_hub_source,
    resolve_source,
)

__all__ = [
    "WEIGHTS",
    "CapiHubModel",
    "CheckpointError",
    "CheckpointInfo",
    "DownloadError",
    "LoadOptions",
    "ModelSpec",
    "ParameterCounts",
    "PretrainedWeights",
    "ResolvedSource",
    "StateDictDiff",
    "checkpoint_filter_fn",
    "compare_state_dict",
    "create_model",
    "from_pretrained",
    "get_weights",
    "infer_config",
    "inspect_checkpoint",
    "list_models",
    "load_checkpoint_into",
    "model_config",
    "read_checkpoint",
    "resolve_model_spec",
    "resolve_source",
    "save_official_checkpoint",
    "save_safetensors",
]

# internals, importable for compatibility (not part of the API above)
_INTERNALS = (
    BACKBONE_PREFIX,
    LoadedCheckpoint,
    add_backbone_prefix,
    architecture_name,
    count_parameters,
    download_hub_files,
    download_url,
    fetch_checkpoint,
    load_local,
    load_state_into_new_model,
    loading_interface,
    parse_hub_source,
    release_pages,
    resolve_architecture,
    sniff_format,
    strip_backbone_prefix,
)
