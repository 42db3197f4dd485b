"""Load a local checkpoint file or ``save_pretrained`` folder, choosing the architecture from (in order):
the caller's ``arch``, the config stored with the weights, or the tensor shapes."""

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.pretrained.architecture import architecture_name, infer_config, resolve_architecture
from capi_backbones.pretrained.assign import load_state_into_new_model
from capi_backbones.pretrained.checkpoint_io import read_checkpoint
from capi_backbones.pretrained.errors import CheckpointError
from capi_backbones.pretrained.network import HUB_CONFIG_FILE, HUB_WEIGHTS_FILE

__all__ = ["choose_config", "load_local", "read_config_json"]

logger = logging.getLogger(__name__)


def read_config_json(path: Path) -> CapiConfig:
    try:
        return CapiConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is not a valid CapiConfig JSON: {error}. Fix or delete it.") from error


def choose_config(
    arch: str | CapiConfig | None, stored: CapiConfig | None, tensors: Mapping[str, Tensor], source: str
) -> CapiConfig:
    if arch is not None:
        return resolve_architecture(arch)
    if stored is not None:
        logger.info("Architecture from the config stored with %s: %s", source, architecture_name(stored) or stored)
        return stored
    config = infer_config(tensors)
    name = architecture_name(config)
    if name:
        logger.info("Inferred architecture from tensor shapes of %s: registered architecture %s", source, name)
    else:
        logger.info("Inferred architecture from tensor shapes of %s: custom %s", source, config)
    return config


def load_local(
    path: str | os.PathLike,
    *,
    model_cls: type[CapiModel] = CapiModel,
    arch: str | CapiConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
) -> CapiModel:
    """A ``.pth`` / ``.safetensors`` file, or a folder with ``model.safetensors`` (+ ``config.json``)."""
    path = Path(path)
    stored = None
    if path.is_dir():
        weights_file = path / HUB_WEIGHTS_FILE
        if not weights_file.is_file():
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt"))
            raise FileNotFoundError(
                f"Folder {path} has no {HUB_WEIGHTS_FILE} (checkpoint files there: {found or 'none'}). "
                "Pass a folder written by save_pretrained, or the checkpoint file itself."
            )
        if (path / HUB_CONFIG_FILE).is_file():
            stored = read_config_json(path / HUB_CONFIG_FILE)
    else:
        weights_file = path
    checkpoint = read_checkpoint(weights_file)
    if checkpoint.config is not None and stored is not None and checkpoint.config != stored:
        raise CheckpointError(
            f"{path / HUB_CONFIG_FILE} ({stored}) disagrees with the config stored in {weights_file} "
            f"({checkpoint.config}). Fix or delete config.json, or pass arch= explicitly."
        )
    stored = checkpoint.config or stored
    config = choose_config(arch, stored, checkpoint.tensors, str(weights_file))
    return load_state_into_new_model(
        checkpoint.tensors,
        config,
        model_cls=model_cls,
        device=device,
        dtype=dtype,
        strict=strict,
        source=str(weights_file),
        memory_mapped=checkpoint.memory_mapped,
    )
