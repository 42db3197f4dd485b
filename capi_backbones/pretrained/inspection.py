"""Describe a checkpoint without building a model: architecture, parameter counts, dtypes, dropped keys."""

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.pretrained.assign import (
    find_non_finite,
    find_non_floating,
    non_finite_message,
    non_floating_message,
)
from capi_backbones.pretrained.files import folder_files, read_checkpoint
from capi_backbones.pretrained.matching import (
    ParameterCounts,
    StateDictDiff,
    architecture_name,
    checkpoint_filter_fn,
    choose_config,
    compare_state_dict,
    count_parameters,
    dropped_key_groups,
    has_backbone_prefix,
    strip_backbone_prefix,
)
from capi_backbones.pretrained.sources import fetch, resolve_source

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
    problems: tuple[str, ...] = ()  # values a load refuses: weights stored as integers, NaN/Inf

    @property
    def loads(self) -> bool:
        """Whether a strict ``from_pretrained`` would succeed."""
        return self.diff.ok and not self.problems


def _local_file(source: str | os.PathLike) -> tuple[Path, CapiConfig | None]:
    path = fetch(resolve_source(source))
    return folder_files(path) if path.is_dir() else (path, None)


def inspect_checkpoint(source: str | os.PathLike, *, arch: str | CapiConfig | None = None) -> CheckpointInfo:
    """Read a checkpoint (any ``from_pretrained`` source) and report on it, including what a strict load would
    refuse (``diff``, ``problems``); raises ``CheckpointError`` only when the file is unreadable or its
    architecture cannot be determined."""
    path, folder_config = _local_file(source)
    checkpoint = read_checkpoint(path)
    stored = checkpoint.config or folder_config
    config = choose_config(arch, stored, checkpoint.tensors, str(path))
    kept = checkpoint_filter_fn(checkpoint.tensors, config)
    has_prefix = has_backbone_prefix(checkpoint.tensors)
    if has_prefix:
        dropped = strip_backbone_prefix(checkpoint.tensors)[1]
    else:
        dropped = [k for k in checkpoint.tensors if k not in kept]
    problems = []
    non_floating = find_non_floating(kept, CapiModel(config, device="meta").state_dict())
    if non_floating:
        problems.append(non_floating_message(str(path), non_floating))
    non_finite = find_non_finite(kept)
    if non_finite:
        problems.append(non_finite_message(str(path), non_finite))
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
        problems=tuple(problems),
    )
