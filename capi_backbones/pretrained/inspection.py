"""Describe a checkpoint without building a model: architecture, parameter counts, dtypes, dropped keys."""

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from capi_backbones.models import CapiConfig
from capi_backbones.pretrained.architecture import (
    BACKBONE_PREFIX,
    ParameterCounts,
    architecture_name,
    count_parameters,
)
from capi_backbones.pretrained.checkpoint_filter import (
    StateDictDiff,
    checkpoint_filter_fn,
    compare_state_dict,
    dropped_key_groups,
)
from capi_backbones.pretrained.checkpoint_io import read_checkpoint
from capi_backbones.pretrained.loader import resolve_checkpoint
from capi_backbones.pretrained.local_loading import choose_config, read_config_json
from capi_backbones.pretrained.network import (
    HF_HUB_PREFIX,
    HUB_CONFIG_FILE,
    HUB_WEIGHTS_FILE,
    download_hub_files,
    parse_hub_source,
)

__all__ = ["CheckpointInfo", "inspect_checkpoint"]


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path  # the file read
    format: str  # "pytorch" or "safetensors"
    file_bytes: int
    config: CapiConfig  # given, stored with the weights, or inferred from the shapes
    config_source: str  # "given", "stored" or "inferred"
    architecture: str | None  # registered architecture with these shapes, if any
    n_keys: int  # tensors in the file
    n_backbone_keys: int  # tensors kept by checkpoint_filter_fn
    dropped: dict[str, int]  # first key component -> count, e.g. {"head": 4}
    dtypes: dict[str, int]  # dtype name -> number of backbone tensors
    parameters: ParameterCounts  # backbone elements, encoder vs predictor
    diff: StateDictDiff  # keys and shapes against ``config`` (ok when a strict load would succeed)
    has_backbone_prefix: bool


def _local_file(source: str | os.PathLike) -> tuple[Path, CapiConfig | None]:
    text = str(source)
    if text.startswith(HF_HUB_PREFIX):
        path = download_hub_files(*parse_hub_source(text))
    else:
        path, _ = resolve_checkpoint(source)
    if not path.is_dir():
        return path, None
    config_file = path / HUB_CONFIG_FILE
    if not (path / HUB_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"Folder {path} has no {HUB_WEIGHTS_FILE}; pass the checkpoint file itself.")
    return path / HUB_WEIGHTS_FILE, read_config_json(config_file) if config_file.is_file() else None


def inspect_checkpoint(source: str | os.PathLike, *, arch: str | CapiConfig | None = None) -> CheckpointInfo:
    """Read a checkpoint (any ``from_pretrained`` source) and report on it; raises ``CheckpointError`` only when
    the file is unreadable or its architecture cannot be determined."""
    path, folder_config = _local_file(source)
    checkpoint = read_checkpoint(path)
    stored = checkpoint.config or folder_config
    config = choose_config(arch, stored, checkpoint.tensors, str(path))
    kept = checkpoint_filter_fn(checkpoint.tensors, config)
    has_prefix = any(k.startswith(BACKBONE_PREFIX) for k in checkpoint.tensors)
    if has_prefix:
        dropped = [k for k in checkpoint.tensors if not k.startswith(BACKBONE_PREFIX)]
    else:
        dropped = [k for k in checkpoint.tensors if k not in kept]
    return CheckpointInfo(
        path=path,
        format=checkpoint.format,
        file_bytes=path.stat().st_size,
        config=config,
        config_source="given" if arch is not None else ("stored" if stored is not None else "inferred"),
        architecture=architecture_name(config),
        n_keys=len(checkpoint.tensors),
        n_backbone_keys=len(kept),
        dropped=dropped_key_groups(dropped),
        dtypes=dict(Counter(str(t.dtype).removeprefix("torch.") for t in kept.values())),
        parameters=count_parameters(kept),
        diff=compare_state_dict(kept, config),
        has_backbone_prefix=has_prefix,
    )
