"""Pretrained CAPI weights: registry, safe reading/writing, strict meta-device loading, downloads, Hub mixin.

Imports point one way: this package uses ``capi_backbones.models``; models never import it.
"""

from capi_backbones.pretrained.architecture import (
    ParameterCounts,
    architecture_name,
    count_parameters,
    infer_config,
    resolve_architecture,
)
from capi_backbones.pretrained.assign import load_state_into_new_model
from capi_backbones.pretrained.checkpoint_filter import StateDictDiff, checkpoint_filter_fn, compare_state_dict
from capi_backbones.pretrained.checkpoint_io import (
    LoadedCheckpoint,
    read_checkpoint,
    save_official_checkpoint,
    save_safetensors,
)
from capi_backbones.pretrained.errors import CheckpointError, DownloadError
from capi_backbones.pretrained.hf_hub_model import CapiHubModel
from capi_backbones.pretrained.inspection import CheckpointInfo, inspect_checkpoint
from capi_backbones.pretrained.loader import (
    create_model,
    from_pretrained,
    list_models,
    model_config,
    resolve_checkpoint,
)
from capi_backbones.pretrained.network import download_hub_files, download_url
from capi_backbones.pretrained.weights import WEIGHTS, PretrainedWeights, get_weights

__all__ = [
    "WEIGHTS",
    "CapiHubModel",
    "CheckpointError",
    "CheckpointInfo",
    "DownloadError",
    "LoadedCheckpoint",
    "ParameterCounts",
    "PretrainedWeights",
    "StateDictDiff",
    "architecture_name",
    "checkpoint_filter_fn",
    "compare_state_dict",
    "count_parameters",
    "create_model",
    "download_hub_files",
    "download_url",
    "from_pretrained",
    "get_weights",
    "infer_config",
    "inspect_checkpoint",
    "list_models",
    "load_state_into_new_model",
    "model_config",
    "read_checkpoint",
    "resolve_architecture",
    "resolve_checkpoint",
    "save_official_checkpoint",
    "save_safetensors",
]
