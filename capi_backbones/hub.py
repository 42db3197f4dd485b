"""torch.hub entry points (``hubconf.py`` re-exports them), in the style of DINOv2's ``hub/backbones.py``.

    model = torch.hub.load("<owner>/capi-backbones", "capi_vitl14")                 # LVD-142M weights
    model = torch.hub.load("<owner>/capi-backbones", "capi_vitl14", weights="p205")
    model = torch.hub.load("<repo dir>", "capi_vits14", source="local")                   # random init (warns)
    model = torch.hub.load("<repo dir>", "capi_vits14", source="local", weights="mine.pth")

The entry points are generated from the weights registry (``capi_backbones.weights_registry.WEIGHTS``) and the
architectures (``capi_backbones.models.ARCHITECTURES``): one per architecture, named after it, and one per
registered weights, named after them (the official hub names). A new release is one registry entry.

``weights`` is a ``Weights`` member or its value (a release tag), or any ``from_pretrained`` source (a local
``.pth`` / ``.safetensors`` file, a folder, a URL, ``"hf-hub:owner/repo"``), which is then loaded strictly into the
entry point's architecture; ``pretrained=False`` together with such a source is an error. Other keyword arguments
go to ``create_model``: ``device``, ``dtype`` and ``CapiConfig`` overrides such as ``drop_path_rate``. Error hints
name ``weights=PATH`` as the offline fix. An architecture without released weights loaded without ``weights=``
warns once that its weights are random.
"""

import re
import warnings
from collections.abc import Callable
from enum import Enum

from capi_backbones.models import ARCHITECTURES, CapiModel
from capi_backbones.pretrained import WEIGHTS, create_model, from_pretrained, loading_interface, model_config
from capi_backbones.pretrained.errors import local_copy_hint

__all__ = ["Weights", "entry_point", "entry_point_names", "entry_points", "hubconf_dir"]

# the release tags in registry order ("lvd", "p205", "in22k", "in1k"); a string tag is accepted as well
Weights = Enum("Weights", {w.tag.upper(): w.tag for w in WEIGHTS.values()}, module=__name__)
Weights.__doc__ = "Release tags of the registered weights (``Weights.LVD`` = LVD-142M, ...)."

_CACHE: dict[tuple, Callable[..., CapiModel]] = {}


def _released_tag(weights: "Weights | str | None") -> str | None:
    if isinstance(weights, Enum):
        return weights.value
    if isinstance(weights, str) and weights in {w.tag for w in WEIGHTS.values()}:
        return weights
    return None


def _check_kwargs(name: str, kwargs: dict) -> None:
    if "arch" in kwargs:
        raise ValueError(
            f"arch= is not an option of torch.hub entry points: {name!r} names the architecture. Load another "
            f"architecture through its own entry point ({', '.join(ARCHITECTURES)}), with weights=PATH if needed."
        )


def _random_weights_warning(arch: str) -> None:
    warnings.warn(
        f"{arch}: no pretrained weights were released for this architecture, so the model has RANDOM weights. "
        f"Load yours with {local_copy_hint('/path/to/checkpoint.pth')} (a file, folder, URL or 'hf-hub:owner/repo'), "
        "or pass pretrained=False to say that random weights are meant.",
        UserWarning,
        stacklevel=4,  # the caller of the entry point
    )


def _make_capi(arch: str, /, *, pretrained: bool | None, weights: "Weights | str | None", **kwargs) -> CapiModel:
    """pretrained=None (the default of architectures without weights): load ``weights`` when given (a release tag
    there has no weights, an error), else random init with a warning."""
    _check_kwargs(arch, kwargs)
    tag = _released_tag(weights)
    source = weights if weights is not None and tag is None else None  # a file, folder, URL or hf-hub: repo
    if pretrained is False and source is not None:
        raise ValueError(
            f"pretrained=False contradicts weights={source!r}: drop pretrained=False to load that checkpoint, "
            "or drop weights= for a randomly initialised model."
        )
    if pretrained is False or (pretrained is None and weights is None):
        if pretrained is None:
            with loading_interface("torch.hub"):
                _random_weights_warning(arch)
        return create_model(arch, pretrained=False, **kwargs)
    with loading_interface("torch.hub"):
        released = next((w for w in WEIGHTS.values() if w.arch == arch and w.tag == tag), None)
        if released is not None:
            return create_model(released.name, pretrained=True, **kwargs)
        if source is None:
            raise ValueError(
                f"No pretrained weights were released for {arch} (only {', '.join(sorted(WEIGHTS))}). Pass "
                "pretrained=False for a randomly initialised model, or weights='/path/to/checkpoint.pth' to load a "
                "local file."
            )
        device, dtype = kwargs.pop("device", None) or "cpu", kwargs.pop("dtype", None)
        return from_pretrained(source, arch=model_config(arch, **kwargs), device=device, dtype=dtype)


def _display(arch: str) -> str:
    """``capi_vitl14`` -> ``ViT-L/14``."""
    match = re.fullmatch(r"capi_vit([a-z]+)(\d+)", arch)
    return f"ViT-{match.group(1).upper()}/{match.group(2)}" if match else arch


def _architecture_entry(arch: str) -> Callable[..., CapiModel]:
    config = ARCHITECTURES[arch]
    shape = f"{config.depth} blocks, dim {config.embed_dim}, {config.n_registers} registers"
    default = next((w for w in WEIGHTS.values() if w.arch == arch), None)  # the first registered: its default
    if default is None:

        def entry(*, pretrained: bool | None = None, weights: str | None = None, **kwargs) -> CapiModel:
            return _make_capi(arch, pretrained=pretrained, weights=weights, **kwargs)

        entry.__doc__ = (
            f"CAPI {_display(arch)} ({shape}; no released weights): random init, or weights= a checkpoint "
            "(file, folder, URL, hf-hub:)."
        )
    else:
        default_tag = Weights(default.tag) if default.tag in Weights._value2member_map_ else default.tag

        def entry(*, pretrained: bool = True, weights: Weights | str = default_tag, **kwargs) -> CapiModel:
            return _make_capi(arch, pretrained=pretrained, weights=weights, **kwargs)

        entry.__doc__ = (
            f"CAPI {_display(arch)} ({shape}); {default.pretraining_data} weights by default, or weights=PATH."
        )
    entry.__name__ = entry.__qualname__ = arch
    entry.__module__ = __name__
    return entry


def _release_entry(name: str) -> Callable[..., CapiModel]:
    weights = WEIGHTS[name]

    def entry(*, pretrained: bool = True, **kwargs) -> CapiModel:
        if "weights" in kwargs:
            raise ValueError(
                f"This entry point loads the {weights.tag} release; for another checkpoint use "
                f'torch.hub.load(..., "{weights.arch}", weights="/path/to/checkpoint.pth").'
            )
        return _make_capi(weights.arch, pretrained=pretrained, weights=weights.tag, **kwargs)

    file_note = f"; file {weights.file_name}" if weights.file_name != f"{name}.pth" else ""
    entry.__doc__ = (
        f"CAPI {_display(weights.arch)} pretrained on {weights.pretraining_data} (official hub name{file_note})."
    )
    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    return entry


def entry_point_names() -> list[str]:
    """The entry points, read off the registry now: the architectures, then the registered weights' names."""
    return [*ARCHITECTURES, *(name for name in WEIGHTS if name not in ARCHITECTURES)]


def entry_points() -> dict[str, Callable[..., CapiModel]]:
    """Name -> entry point function, one per ``entry_point_names()`` (the same function object on every call
    while its registry entry is unchanged)."""
    points = {}
    for name in entry_point_names():
        key = (name, ARCHITECTURES.get(name), WEIGHTS.get(name), tuple(w for w in WEIGHTS.values()))
        if key not in _CACHE:
            _CACHE[key] = _architecture_entry(name) if name in ARCHITECTURES else _release_entry(name)
        points[name] = _CACHE[key]
    return points


def entry_point(name: str) -> Callable[..., CapiModel]:
    """The entry point ``name``; ``AttributeError`` when the registry has none (this is the module ``__getattr__``
    of ``capi_backbones.hub`` and of ``hubconf.py``, PEP 562)."""
    points = entry_points()
    if name in points:
        return points[name]
    raise AttributeError(f"No torch.hub entry point {name!r}. Available: {', '.join(points)}.")


def hubconf_dir() -> list[str]:
    """``dir(hubconf)``: what ``torch.hub.list`` shows (the entry points) and ``dependencies``."""
    return ["dependencies", *entry_point_names()]


__getattr__ = entry_point


def __dir__() -> list[str]:
    return sorted({*globals(), *entry_point_names()})
