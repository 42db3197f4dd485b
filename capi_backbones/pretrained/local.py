"""Loading from local files: the one load path behind every door.

``load(source, options, model_cls=...)`` resolves any source (``sources.resolve_source``), fetches it to a local
file or folder (``sources.fetch``) and calls ``load_local``: read the file (``files``), choose the architecture
(``matching``), assign strictly with every check (``assign``). ``CapiHubModel`` and the public loader both import
this module; it imports neither of them (the model class is the caller's choice).
"""

import os
from pathlib import Path

from capi_backbones.models import CapiModel
from capi_backbones.pretrained.assign import load_state_into_new_model
from capi_backbones.pretrained.errors import CheckpointError
from capi_backbones.pretrained.files import HUB_CONFIG_FILE, folder_files, read_checkpoint
from capi_backbones.pretrained.matching import choose_config
from capi_backbones.pretrained.options import LoadOptions
from capi_backbones.pretrained.sources import ResolvedSource, fetch, resolve_source

__all__ = ["load", "load_local"]


def load_local(
    path: str | os.PathLike, options: LoadOptions | None = None, *, model_cls: type[CapiModel] = CapiModel
) -> CapiModel:
    """A ``.pth`` / ``.safetensors`` file, or a folder with ``model.safetensors`` (+ ``config.json``), loaded
    strictly into a new ``model_cls`` (eval mode)."""
    options = options or LoadOptions()
    path = Path(path)
    weights_file, stored = folder_files(path) if path.is_dir() else (path, None)
    checkpoint = read_checkpoint(weights_file)
    if checkpoint.config is not None and stored is not None and checkpoint.config != stored:
        raise CheckpointError(
            f"{path / HUB_CONFIG_FILE} ({stored}) disagrees with the config stored in {weights_file} "
            f"({checkpoint.config}). Fix or delete config.json, or pass arch= explicitly."
        )
    stored = checkpoint.config or stored
    config = choose_config(options.arch, stored, checkpoint.tensors, str(weights_file))
    model = load_state_into_new_model(
        checkpoint.tensors,
        config,
        model_cls=model_cls,
        device=options.device,
        dtype=options.dtype,
        strict=options.strict,
        source=str(weights_file),
        memory_mapped=checkpoint.memory_mapped,
        allow_non_finite=options.allow_non_finite,
    )
    if checkpoint.image_size is not None:
        model.default_image_size = checkpoint.image_size
    return model


def load(
    source: "str | os.PathLike | ResolvedSource",
    options: LoadOptions | None = None,
    *,
    model_cls: type[CapiModel] = CapiModel,
) -> CapiModel:
    """Any source (registered name, local file or folder, URL, ``hf-hub:owner/repo[@revision]``) -> a strictly
    loaded ``model_cls``. Registered weights load into their own architecture unless ``options.arch`` says
    otherwise. Sets ``pretrained_weights`` on the model (the registered weights, else None)."""
    options = options or LoadOptions()
    resolved = source if isinstance(source, ResolvedSource) else resolve_source(source)
    path = fetch(resolved, options)
    if resolved.weights is not None and options.arch is None:
        options = options.replace(arch=resolved.weights.arch)
    model = load_local(path, options, model_cls=model_cls)
    model.pretrained_weights = resolved.weights
    return model
