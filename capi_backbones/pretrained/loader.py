"""Public entry points: ``list_models``, ``create_model`` and ``from_pretrained``.

``from_pretrained(source)`` accepts, in this order of recognition:
``"hf-hub:owner/repo[@revision]"``, an ``http(s)://`` URL, a registered weights name (``capi_vitl14_lvd``, ...,
``capi_vitl14`` = LVD), or a local ``.pth`` / ``.safetensors`` file or ``save_pretrained`` folder.
"""

import fnmatch
import logging
import os
from pathlib import Path

import torch

from capi_backbones.models import ARCHITECTURES, CapiConfig
from capi_backbones.pretrained.hf_hub_model import CapiHubModel
from capi_backbones.pretrained.local_loading import load_local
from capi_backbones.pretrained.network import HF_HUB_PREFIX, download_url
from capi_backbones.pretrained.weights import WEIGHT_ALIASES, WEIGHTS, PretrainedWeights, get_weights, weights_names

__all__ = ["create_model", "from_pretrained", "list_models", "model_config", "resolve_checkpoint"]

logger = logging.getLogger(__name__)

_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Names ``create_model`` accepts (architectures and weights), sorted; only those with weights if
    ``pretrained``; filtered by a shell-style ``pattern``."""
    names = set(WEIGHTS) | ({"capi_vitl14"} if pretrained else set(ARCHITECTURES))
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def _is_registered(name: str) -> bool:
    return name in WEIGHTS or name in WEIGHT_ALIASES


def _looks_like_path(source: str) -> bool:
    return os.sep in source or "/" in source or source.endswith(_FILE_SUFFIXES) or source.startswith(".")


def resolve_checkpoint(source: str | os.PathLike) -> tuple[Path, PretrainedWeights | None]:
    """Local path of a checkpoint source (downloading URLs and registered weights into the torch hub cache),
    and the registered weights it came from, if any. ``hf-hub:`` sources are handled by ``from_pretrained``."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        return download_url(text), None
    if not isinstance(source, os.PathLike) and _is_registered(text):
        weights = get_weights(text)
        return download_url(weights.url, file_name=weights.file_name), weights
    path = Path(text).expanduser()
    if path.exists():
        return path, None
    if isinstance(source, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(
            f"Checkpoint {path} does not exist. Check the path, or pass a registered name "
            f"({', '.join(sorted(WEIGHTS))}), a URL or 'hf-hub:owner/repo'."
        )
    without_weights = sorted(set(ARCHITECTURES) - {w.arch for w in WEIGHTS.values()})
    raise ValueError(
        f"Unknown model or weights {text!r}. Available weights: {', '.join(weights_names())}. "
        f"Architectures without weights: {', '.join(without_weights)} (use create_model). "
        "Or pass a local .pth/.safetensors file or folder, an http(s) URL, or 'hf-hub:owner/repo'."
    )


def from_pretrained(
    source: str | os.PathLike,
    *,
    arch: str | CapiConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
) -> CapiHubModel:
    """Load CAPI weights into a new model (eval mode, float32 unless ``dtype``), strictly.

    source: registered name, local file/folder, URL or ``"hf-hub:owner/repo[@revision]"``.
    arch: architecture name or ``CapiConfig``; by default the registered weights' arch, the config stored with
    the weights, or the one inferred from the tensor shapes. ``strict=False`` only tolerates unexpected keys.
    """
    text = str(source)
    if text.startswith(HF_HUB_PREFIX):
        return CapiHubModel.from_pretrained(text, arch=arch, device=device, dtype=dtype, strict=strict)
    path, weights = resolve_checkpoint(source)
    if weights is not None and arch is None:
        arch = weights.arch
    if path.is_dir():
        model = CapiHubModel.from_pretrained(path, arch=arch, device=device, dtype=dtype, strict=strict)
    else:
        model = load_local(path, model_cls=CapiHubModel, arch=arch, device=device, dtype=dtype, strict=strict)
    model.pretrained_weights = weights
    return model


def model_config(name: str, **config_overrides) -> CapiConfig:
    """The ``CapiConfig`` of a model name (architecture or weights), with field overrides."""
    arch_name = get_weights(name).arch if _is_registered(name) else name
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
    weights = get_weights(name) if _is_registered(name) else None
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
