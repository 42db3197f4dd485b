"""torch.hub entry points (``hubconf.py`` imports them), in the style of DINOv2's ``hub/backbones.py``.

    model = torch.hub.load("<owner>/capi-backbones", "capi_vitl14")                 # LVD-142M weights
    model = torch.hub.load("<owner>/capi-backbones", "capi_vitl14", weights="p205")
    model = torch.hub.load("<repo dir>", "capi_vits14", source="local")                   # random init
    model = torch.hub.load("<repo dir>", "capi_vits14", source="local", weights="mine.pth")

``weights`` is a ``Weights`` member or its value, or any ``from_pretrained`` source (a local ``.pth`` /
``.safetensors`` file, a folder, a URL, ``"hf-hub:owner/repo"``), which is then loaded strictly into the entry
point's architecture; ``pretrained=False`` together with such a source is an error. Other keyword arguments go to
``create_model``: ``device``, ``dtype`` and ``CapiConfig`` overrides such as ``drop_path_rate``. Error hints name
``weights=PATH`` as the offline fix.
"""

from enum import Enum

from capi_backbones.models import CapiModel
from capi_backbones.pretrained import WEIGHTS, create_model, from_pretrained, loading_interface, model_config

__all__ = [
    "Weights",
    "capi_vitb14",
    "capi_vitl14",
    "capi_vitl14_in1k",
    "capi_vitl14_in22k",
    "capi_vitl14_lvd",
    "capi_vitl14_p205",
    "capi_vits14",
]


class Weights(Enum):
    LVD = "lvd"  # LVD-142M
    P205 = "p205"  # Places205
    IN22K = "in22k"  # ImageNet-22k
    IN1K = "in1k"  # ImageNet-1k


def _released_tag(weights: "Weights | str | None") -> str | None:
    if isinstance(weights, Weights):
        return weights.value
    if isinstance(weights, str) and weights in {w.value for w in Weights}:
        return weights
    return None


def _make_capi(arch: str, *, pretrained: bool | None, weights: "Weights | str | None", **kwargs) -> CapiModel:
    """pretrained=None (the ViT-S/B default): load ``weights`` when given (a release tag there has no weights, an
    error), else random init."""
    tag = _released_tag(weights)
    source = weights if weights is not None and tag is None else None  # a file, folder, URL or hf-hub: repo
    if pretrained is False and source is not None:
        raise ValueError(
            f"pretrained=False contradicts weights={source!r}: drop pretrained=False to load that checkpoint, "
            "or drop weights= for a randomly initialised model."
        )
    if pretrained is False or (pretrained is None and weights is None):
        return create_model(arch, pretrained=False, **kwargs)
    with loading_interface("torch.hub"):
        if tag is not None and f"{arch}_{tag}" in WEIGHTS:
            return create_model(f"{arch}_{tag}", pretrained=True, **kwargs)
        if source is None:
            raise ValueError(
                f"No pretrained weights were released for {arch} (only capi_vitl14). Pass pretrained=False for a "
                "randomly initialised model, or weights='/path/to/checkpoint.pth' to load a local file."
            )
        device, dtype = kwargs.pop("device", None) or "cpu", kwargs.pop("dtype", None)
        return from_pretrained(source, arch=model_config(arch, **kwargs), device=device, dtype=dtype)


def _released_weights(weights: Weights, pretrained: bool, kwargs: dict) -> CapiModel:
    """The entry points named after one release load that release; ``weights=`` there is a mistake."""
    if "weights" in kwargs:
        raise ValueError(
            f"This entry point loads the {weights.name} release; for another checkpoint use "
            'torch.hub.load(..., "capi_vitl14", weights="/path/to/checkpoint.pth").'
        )
    return _make_capi("capi_vitl14", pretrained=pretrained, weights=weights, **kwargs)


def capi_vitl14(*, pretrained: bool = True, weights: Weights | str = Weights.LVD, **kwargs) -> CapiModel:
    """CAPI ViT-L/14 (24 blocks, dim 1024, 16 registers); LVD-142M weights by default, or weights=PATH."""
    return _make_capi("capi_vitl14", pretrained=pretrained, weights=weights, **kwargs)


def capi_vitl14_lvd(*, pretrained: bool = True, **kwargs) -> CapiModel:
    """CAPI ViT-L/14 pretrained on LVD-142M (official hub name)."""
    return _released_weights(Weights.LVD, pretrained, kwargs)


def capi_vitl14_p205(*, pretrained: bool = True, **kwargs) -> CapiModel:
    """CAPI ViT-L/14 pretrained on Places205 (official hub name)."""
    return _released_weights(Weights.P205, pretrained, kwargs)


def capi_vitl14_in22k(*, pretrained: bool = True, **kwargs) -> CapiModel:
    """CAPI ViT-L/14 pretrained on ImageNet-22k (official hub name; file capi_vitl14_i22k.pth)."""
    return _released_weights(Weights.IN22K, pretrained, kwargs)


def capi_vitl14_in1k(*, pretrained: bool = True, **kwargs) -> CapiModel:
    """CAPI ViT-L/14 pretrained on ImageNet-1k (official hub name)."""
    return _released_weights(Weights.IN1K, pretrained, kwargs)


def capi_vitb14(*, pretrained: bool | None = None, weights: str | None = None, **kwargs) -> CapiModel:
    """CAPI ViT-B/14 (no released weights): random init, or ``weights=`` a checkpoint (file, folder, URL, hf-hub:)."""
    return _make_capi("capi_vitb14", pretrained=pretrained, weights=weights, **kwargs)


def capi_vits14(*, pretrained: bool | None = None, weights: str | None = None, **kwargs) -> CapiModel:
    """CAPI ViT-S/14 (no released weights): random init, or ``weights=`` a checkpoint (file, folder, URL, hf-hub:)."""
    return _make_capi("capi_vits14", pretrained=pretrained, weights=weights, **kwargs)
