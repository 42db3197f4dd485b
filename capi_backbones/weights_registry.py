"""The released CAPI weights: their names, files, URLs, paper metrics and preprocessing (data; no torch).

A new release is one entry in ``WEIGHTS``: the loaders, ``list_models``, ``capi-backbones list``, the torch.hub
entry points (``capi_backbones.hub``, ``hubconf.py``) and the timm configs all read this table.

Kept apart from ``capi_backbones.pretrained.sources`` (which downloads them, and imports torch) so that
``capi-backbones list`` starts without torch.
"""

from dataclasses import dataclass

from capi_backbones.constants import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "PretrainedWeights",
    "WEIGHTS",
    "WEIGHT_ALIASES",
    "get_weights",
    "is_registered",
    "weight_aliases",
    "weights_names",
]

_BASE_URL = "https://dl.fbaipublicfiles.com/capi/"


@dataclass(frozen=True)
class PretrainedWeights:
    name: str  # registered name, also the official torch.hub entry point
    arch: str  # key of capi_backbones.models.ARCHITECTURES
    tag: str  # pretraining-data tag, as in "capi_vitl14.lvd"
    file_name: str  # file name behind the URL (and in the torch hub cache)
    pretraining_data: str  # human-readable dataset name
    knn_ade20k_miou: float  # paper: k-NN semantic segmentation on ADE20K (mIoU)
    attentive_in1k_top1: float  # paper: attentive probe on ImageNet-1k (top-1 %)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)  # pretraining resolution
    interpolation: str = "bicubic"  # resize interpolation used in pretraining
    license: str = "Apache-2.0"
    paper: str = "https://arxiv.org/abs/2502.08769"
    sha256: str | None = None  # hex digest of the file; downloads are checked against it when set

    @property
    def url(self) -> str:
        return _BASE_URL + self.file_name

    @property
    def full_name(self) -> str:
        return f"{self.arch}.{self.tag}"


WEIGHTS: dict[str, PretrainedWeights] = {
    w.name: w
    for w in (
        PretrainedWeights("capi_vitl14_lvd", "capi_vitl14", "lvd", "capi_vitl14_lvd.pth", "LVD-142M", 32.1, 83.8),
        PretrainedWeights("capi_vitl14_p205", "capi_vitl14", "p205", "capi_vitl14_p205.pth", "Places205", 35.2, 79.2),
        # the file behind the hub name "in22k" is called "i22k"
        PretrainedWeights(
            "capi_vitl14_in22k", "capi_vitl14", "in22k", "capi_vitl14_i22k.pth", "ImageNet-22k", 29.7, 83.6
        ),
        PretrainedWeights("capi_vitl14_in1k", "capi_vitl14", "in1k", "capi_vitl14_in1k.pth", "ImageNet-1k", 29.2, 82.9),
    )
}


def weight_aliases() -> dict[str, str]:
    """Other accepted spellings, read off ``WEIGHTS``: an architecture name means its first registered weights
    (``capi_vitl14`` -> ``capi_vitl14_lvd``), and ``arch.tag`` as in timm."""
    aliases: dict[str, str] = {}
    for w in WEIGHTS.values():
        aliases.setdefault(w.arch, w.name)
    return aliases | {w.full_name: w.name for w in WEIGHTS.values()}


WEIGHT_ALIASES: dict[str, str] = weight_aliases()  # as registered at import; the functions below read WEIGHTS


def weights_names() -> list[str]:
    """Every name ``get_weights`` accepts, sorted."""
    return sorted(set(WEIGHTS) | set(weight_aliases()))


def is_registered(name: str) -> bool:
    return name in WEIGHTS or name in weight_aliases()


def get_weights(name: str) -> PretrainedWeights:
    """Look up registered weights by name, alias or ``arch.tag``."""
    key = weight_aliases().get(name, name)
    if key not in WEIGHTS:
        raise ValueError(
            f"Unknown pretrained weights {name!r}. Available: {', '.join(weights_names())}. "
            "For your own checkpoint pass a file path, a URL or 'hf-hub:owner/repo'."
        )
    return WEIGHTS[key]
