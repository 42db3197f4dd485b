"""Public entry points: ``list_models``, ``create_model``, ``from_pretrained``; and ``load_local``, the one path
every load takes: read the file (``files``), choose the architecture (``matching``), assign strictly (``assign``).

``from_pretrained(source)`` accepts, in this order of recognition:
``"hf-hub:owner/repo[@revision]"``, an ``http(s)://`` URL, a registered weights name (``capi_vitl14_lvd``, ...,
``capi_vitl14`` = LVD), or a local ``.pth`` / ``.safetensors`` file or ``save_pretrained`` folder.
"""

import fnmatch
import logging
import os
from pathlib import Path

import torch

from capi_backbones.models import ARCHITECTURES, CapiConfig, CapiModel
from capi_backbones.pretrained.assign import load_state_into_new_model
from capi_backbones.pretrained.errors import CheckpointError
from capi_backbones.pretrained.files import HUB_CONFIG_FILE, folder_files, read_checkpoint
from capi_backbones.pretrained.hub_model import CapiHubModel
from capi_backbones.pretrained.matching import choose_config
from capi_backbones.pretrained.sources import HF_HUB_PREFIX, WEIGHTS, fetch_checkpoint, get_weights, is_registered

__all__ = ["create_model", "from_pretrained", "list_models", "load_local", "model_config"]

logger = logging.getLogger(__name__)


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Names ``create_model`` accepts (architectures and weights), sorted; only those with weights if
    ``pretrained``; filtered by a shell-style ``pattern``."""
    names = set(WEIGHTS) | ({"capi_vitl14"} if pretrained else set(ARCHITECTURES))
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def load_local(
    path: str | os.PathLike,
    *,
    model_cls: type[CapiModel] = CapiModel,
    arch: str | CapiConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    allow_non_finite: bool = False,
) -> CapiModel:
    """A ``.pth`` / ``.safetensors`` file, or a folder with ``model.safetensors`` (+ ``config.json``)."""
    path = Path(path)
    weights_file, stored = folder_files(path) if path.is_dir() else (path, None)
    checkpoint = read_checkpoint(weights_file)
    if checkpoint.config is not None and stored is not None and checkpoint.config != stored:
        raise CheckpointError(
            f"{path / HUB_CONFIG_FILE} ({stored}) disagrees with the config stored in {weights_file} "
            f"({checkpoint.config}). Fix or delete config.json, or pass arch= explicitly."
        )
    stored = checkpoint.config or stored
    config = choose_config(arch, stored, checkpoint.tensors, str(weights_file))
    model = load_state_into_new_model(
        checkpoint.tensors,
        config,
        model_cls=model_cls,
        device=device,
        dtype=dtype,
        strict=strict,
        source=str(weights_file),
        memory_mapped=checkpoint.memory_mapped,
        allow_non_finite=allow_non_finite,
    )
    if checkpoint.image_size is not None:
        model.default_image_size = checkpoint.image_size
    return model


def from_pretrained(
    source: str | os.PathLike,
    *,
    arch: str | CapiConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    allow_non_finite: bool = False,
) -> CapiHubModel:
    """Load CAPI weights into a new model (eval mode, float32 unless ``dtype``), strictly.

    source: registered name, local file/folder, URL or ``"hf-hub:owner/repo[@revision]"``.
    arch: architecture name or ``CapiConfig``; by default the registered weights' arch, the config stored with
    the weights, or the one inferred from the tensor shapes. ``strict=False`` only tolerates unexpected keys.
    Weights holding NaN/Inf are refused (``CheckpointError``) unless ``allow_non_finite=True``.
    """
    options = {"arch": arch, "device": device, "dtype": dtype, "strict": strict, "allow_non_finite": allow_non_finite}
    if str(source).startswith(HF_HUB_PREFIX):
        return CapiHubModel.from_pretrained(str(source), **options)
    path, weights = fetch_checkpoint(source)
    if weights is not None and arch is None:
        options["arch"] = weights.arch
    model = load_local(path, model_cls=CapiHubModel, **options)
    model.pretrained_weights = weights
    return model


def model_config(name: str, **config_overrides) -> CapiConfig:
    """The ``CapiConfig`` of a model name (architecture or weights), with field overrides."""
    arch_name = get_weights(name).arch if is_registered(name) else name
    if arch_name not in ARCHITECTURES:
        raise ValueError(f"Unknown model {name!r}. Available: {', '.join(list_models())}.")
    try:
        return CapiConfig.from_dict(ARCHITECTURES[arch_name].to_dict() | config_overrides)
    except TypeError as error:
        raise ValueError(f"Invalid config overrides {config_overrides}: {error}") from error


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> CapiHubModel:
    """Build an architecture (``capi_vitl14``) or a weights name (``capi_vitl14_p205``), overriding config fields.

    pretrained=False: official random init (none on ``device="meta"``), train mode. pretrained=True: the
    registered weights (``capi_vitl14`` = LVD), strictly loaded, eval mode.
    """
    weights = get_weights(name) if is_registered(name) else None
    arch_name = weights.arch if weights is not None else name
    config = model_config(arch_name, **config_overrides)
    if not pretrained:
        return CapiHubModel(config, device=device, dtype=dtype)
    if weights is None:
        raise ValueError(
            f"No pretrained weights were released for {name!r} (only ViT-L/14: {', '.join(sorted(WEIGHTS))}). "
            f"Pass pretrained=False for a randomly initialised model, or load your own checkpoint with "
            f'from_pretrained("/path/to/checkpoint.pth", arch="{arch_name}").'
        )
    return from_pretrained(weights.name, arch=config, device=device or "cpu", dtype=dtype)
