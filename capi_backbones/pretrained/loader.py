"""Public entry points: ``list_models``, ``create_model``, ``from_pretrained``, and ``resolve_model_spec`` (the
decision FeatureExtractor and the CLI delegate to). Every one of them resolves its source with
``sources.resolve_source`` and loads through ``local.load``; they differ only in their keyword arguments.

``from_pretrained(source)`` accepts, in this order of recognition:
``"hf-hub:owner/repo[@revision]"``, an ``http(s)://`` URL, a registered weights name (``capi_vitl14_lvd``, ...,
``capi_vitl14`` = LVD), or a local ``.pth`` / ``.safetensors`` file or ``save_pretrained`` folder.
"""

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from capi_backbones.models import ARCHITECTURES, CapiConfig, CapiModel
from capi_backbones.pretrained.hub_model import CapiHubModel
from capi_backbones.pretrained.local import load
from capi_backbones.pretrained.options import LoadOptions
from capi_backbones.pretrained.sources import WEIGHTS, ResolvedSource, resolve_source

__all__ = ["ModelSpec", "create_model", "from_pretrained", "list_models", "model_config", "resolve_model_spec"]


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Names ``create_model`` accepts (architectures and weights), sorted; only those with weights if
    ``pretrained``; filtered by a shell-style ``pattern``."""
    with_weights = {w.arch for w in WEIGHTS.values()}  # an architecture name means its default weights
    names = set(WEIGHTS) | (with_weights if pretrained else set(ARCHITECTURES))
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def from_pretrained(
    source: str | os.PathLike,
    *,
    arch: str | CapiConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    allow_non_finite: bool = False,
    options: LoadOptions | None = None,
) -> CapiHubModel:
    """Load CAPI weights into a new model (eval mode, float32 unless ``dtype``), strictly.

    source: registered name, local file/folder, URL or ``"hf-hub:owner/repo[@revision]"``.
    arch: architecture name or ``CapiConfig``; by default the registered weights' arch, the config stored with
    the weights, or the one inferred from the tensor shapes. ``strict=False`` only tolerates unexpected keys.
    Weights holding NaN/Inf are refused (``CheckpointError``) unless ``allow_non_finite=True``.
    options: a ``LoadOptions`` (also download settings: cache_dir, download_timeout, revision, ...); when given,
    it replaces the keyword arguments above, which must then keep their defaults.
    """
    given = LoadOptions(arch=arch, device=device, dtype=dtype, strict=strict, allow_non_finite=allow_non_finite)
    if options is not None and given != LoadOptions():
        raise ValueError(
            "Pass either options=LoadOptions(...) or the keyword arguments arch/device/dtype/..., not both."
        )
    return load(source, options or given, model_cls=CapiHubModel)


def model_config(name: str, **config_overrides) -> CapiConfig:
    """The ``CapiConfig`` of a model name (architecture or weights), with field overrides."""
    try:
        arch_name = resolve_source(name).arch if isinstance(name, str) else None
    except (ValueError, FileNotFoundError):
        arch_name = None
    if arch_name is None:
        raise ValueError(f"Unknown model {name!r}. Available: {', '.join(list_models())}.")
    if "arch" in config_overrides:
        raise ValueError(
            f"arch= cannot be combined with the model name {name!r}, which already names the architecture "
            f"{arch_name!r}; choose the model by its name ({', '.join(ARCHITECTURES)})."
        )
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
    config = model_config(name, **config_overrides)
    if not pretrained:
        return CapiHubModel(config, device=device, dtype=dtype)
    resolved = resolve_source(name)
    if resolved.weights is None:
        raise ValueError(
            f"No pretrained weights were released for {name!r} (only ViT-L/14: {', '.join(sorted(WEIGHTS))}). "
            f"Pass pretrained=False for a randomly initialised model, or load your own checkpoint with "
            f'from_pretrained("/path/to/checkpoint.pth", arch="{resolved.arch}").'
        )
    return load(resolved, LoadOptions(arch=config, device=device or "cpu", dtype=dtype), model_cls=CapiHubModel)


@dataclass(frozen=True)
class ModelSpec:
    """A decided model: an instance given by the caller, a source to load, or an architecture to build with
    random weights. ``load()`` returns the model; ``description`` says in a few words what it is."""

    description: str
    source: ResolvedSource | None = None  # what to load
    options: LoadOptions = LoadOptions()
    model: CapiModel | None = None  # a model the caller built
    random_init: str | None = None  # architecture to build with random weights

    def load(self) -> CapiModel:
        if self.model is not None:
            return self.model
        if self.random_init is not None:  # the official init, on the default device (seed it for repeatable weights)
            return create_model(self.random_init, pretrained=False)
        return load(self.source, self.options, model_cls=CapiHubModel)


def resolve_model_spec(
    model: "CapiModel | str | None",
    weights: "str | os.PathLike | None" = None,
    options: LoadOptions | None = None,
    *,
    random_init: bool = False,
) -> ModelSpec:
    """Decide what FeatureExtractor / the CLI's ``model`` and ``weights`` arguments mean (nothing is loaded):

    - a ``CapiModel``: used as is (``weights`` must be None);
    - an architecture name (``capi_vits14``, ``capi_vitl14``, ...) with ``weights`` = a local file or folder:
      those weights in that architecture;
    - ``None`` with ``weights``: the local file or folder, architecture read off the checkpoint;
    - any other source (``capi_vitl14_lvd``, a path, a URL, ``hf-hub:owner/repo``): that source, as
      ``from_pretrained`` reads it;
    - ``random_init=True`` with a weights or architecture name: that architecture with random weights.
    """
    options = options or LoadOptions()
    if isinstance(model, CapiModel):
        if weights is not None or random_init:
            raise ValueError("Pass either a CapiModel or weights, not both. Load weights into the model yourself.")
        return ModelSpec("custom CapiModel", model=model)
    if model is not None and not isinstance(model, str):
        raise TypeError(f"model must be a CapiModel, a model name or None, got {type(model).__name__}.")
    if random_init:
        if weights is not None:
            raise ValueError("random_init uses random weights; leave out weights (or random_init).")
        arch = _named_architecture(model)
        if arch is None:
            raise ValueError(f"Unknown model {model!r} for random init; use one of {', '.join(ARCHITECTURES)}.")
        return ModelSpec("random weights", options=options, random_init=arch)
    if weights is not None:
        if model is not None and model not in ARCHITECTURES:
            raise ValueError(
                f"weights can only go with an architecture name ({', '.join(ARCHITECTURES)}), got model='{model}'."
            )
        if model is not None:
            options = options.replace(arch=model)
        resolved = resolve_source(Path(weights))  # a Path: never mistaken for a registered name
        where = os.fspath(weights)
        return ModelSpec(f"{model} from {where}" if model else where, source=resolved, options=options)
    if model is None:
        raise ValueError("Give a model: a CapiModel, a pretrained name such as 'capi_vitl14_lvd', or weights=PATH.")
    resolved = resolve_source(model)
    if resolved.kind == "architecture":
        raise ValueError(
            f"'{model}' is an architecture, not a set of weights. Pass weights=PATH to a checkpoint, a pretrained "
            f"name such as 'capi_vitl14_lvd', or a model you built yourself, e.g. "
            f"FeatureExtractor(create_model('{model}', pretrained=False)) for random weights."
        )
    return ModelSpec(model, source=resolved, options=options)


def _named_architecture(name: str | None) -> str | None:
    try:
        return resolve_source(name).arch if name is not None else None
    except (ValueError, FileNotFoundError):
        return None
