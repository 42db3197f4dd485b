"""Pretrained CAPI weights, in four modules a reader looks for:

- ``sources``: the registry of released weights, URLs (``download``: checked downloads), Hugging Face Hub repos;
- ``files``: reading checkpoint files safely (format told by structure) and writing them atomically;
- ``matching`` / ``assign``: the ``backbone.`` prefix, architecture inference, the key filter and comparison, and
  the strict meta-device assignment (with the page release and the NaN/Inf check);
- ``loader``: ``from_pretrained`` / ``create_model`` / ``list_models``; ``hub_model``: ``save_pretrained`` /
  ``push_to_hub``; ``inspection``: ``capi-backbones info``.

Imports point one way: this package uses ``capi_backbones.models``; models never import it. It imports no
huggingface_hub, timm or scikit-learn (huggingface_hub only inside ``push_to_hub`` and Hub downloads).
"""

from capi_backbones.pretrained.assign import load_state_into_new_model, release_pages
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
from capi_backbones.pretrained.loader import create_model, from_pretrained, list_models, load_local, model_config
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
from capi_backbones.pretrained.sources import (
    WEIGHTS,
    PretrainedWeights,
    download_hub_files,
    fetch_checkpoint,
    get_weights,
    parse_hub_source,
)

__all__ = [
    "BACKBONE_PREFIX",
    "WEIGHTS",
    "CapiHubModel",
    "CheckpointError",
    "CheckpointInfo",
    "DownloadError",
    "LoadedCheckpoint",
    "ParameterCounts",
    "PretrainedWeights",
    "StateDictDiff",
    "add_backbone_prefix",
    "architecture_name",
    "checkpoint_filter_fn",
    "compare_state_dict",
    "count_parameters",
    "create_model",
    "download_hub_files",
    "download_url",
    "fetch_checkpoint",
    "from_pretrained",
    "get_weights",
    "infer_config",
    "inspect_checkpoint",
    "list_models",
    "load_local",
    "load_state_into_new_model",
    "loading_interface",
    "model_config",
    "parse_hub_source",
    "read_checkpoint",
    "release_pages",
    "resolve_architecture",
    "save_official_checkpoint",
    "save_safetensors",
    "sniff_format",
    "strip_backbone_prefix",
]
