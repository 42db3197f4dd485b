"""Architecture configuration of CAPI encoder-predictor models."""

from dataclasses import asdict, dataclass, fields
from typing import Any

from capi_backbones.constants import MAX_IMAGE_SIZE, N_REGISTERS, NORM_EPS, PATCH_SIZE

__all__ = ["CapiConfig", "ARCHITECTURES", "CONFIG_BOUNDS", "MAX_IMAGE_SIZE", "MAX_PARAMETERS"]

# What a config (so also a config stored in a file) may ask for, checked in __post_init__ before any memory is
# allocated: a file saying depth 100000 fails at once instead of building 100000 blocks. Generous: the largest
# ViTs (ViT-22B: width 6144, depth 48, 48 heads) fit with room to spare.
CONFIG_BOUNDS: dict[str, tuple[float, float]] = {  # field -> (lowest, highest), both allowed
    "embed_dim": (4, 16384),
    "depth": (1, 256),
    "num_heads": (1, 4096),
    "pred_embed_dim": (4, 16384),
    "pred_depth": (1, 256),
    "pred_num_heads": (1, 4096),
    "patch_size": (1, 128),
    "in_chans": (1, 1024),
    "n_registers": (0, 1024),
    "mlp_ratio": (0.0, 16.0),  # exclusive of 0
    "norm_eps": (0.0, 1.0),  # exclusive of 0 and 1
    "drop_path_rate": (0.0, 1.0),  # exclusive of 1
}
MAX_PARAMETERS = 50_000_000_000  # the model the config describes, encoder and predictor (ViT-22B: 22e9)
_INT_FIELDS = ("embed_dim", "depth", "num_heads", "pred_embed_dim", "pred_depth", "pred_num_heads", "patch_size",
               "in_chans", "n_registers")  # fmt: skip
_OPEN_LOW = ("mlp_ratio", "norm_eps")
_OPEN_HIGH = ("norm_eps", "drop_path_rate")


@dataclass(frozen=True)
class CapiConfig:
    embed_dim: int = 1024  # encoder width D
    depth: int = 24  # encoder blocks
    num_heads: int = 16  # encoder heads (head_dim = embed_dim / num_heads)
    pred_embed_dim: int = 1024  # predictor width
    pred_depth: int = 12  # predictor blocks
    pred_num_heads: int = 16  # predictor heads
    patch_size: int = PATCH_SIZE  # square patch side in pixels
    in_chans: int = 3  # input channels
    n_registers: int = N_REGISTERS  # learned register tokens, a multiple of 4 ("edge" coordinates)
    mlp_ratio: float = 4.0  # MLP hidden width / block width
    norm_eps: float = NORM_EPS  # RMSNorm epsilon, every norm
    drop_path_rate: float = 0.0  # stochastic depth, training only (the recipe uses 0.2)

    def __post_init__(self) -> None:
        self._check_bounds()
        for width, heads, where in (
            (self.embed_dim, self.num_heads, "encoder"),
            (self.pred_embed_dim, self.pred_num_heads, "predictor"),
        ):
            if width % heads or (width // heads) % 4:
                raise ValueError(
                    f"{where} width {width} with {heads} heads gives a head dim that is not a multiple of 4; "
                    "RoPE needs head_dim % 4 == 0."
                )
        if self.n_registers % 4:
            raise ValueError(f"n_registers must be a multiple of 4 (edge layout), got {self.n_registers}.")

    def _check_bounds(self) -> None:
        for name, (low, high) in CONFIG_BOUNDS.items():
            value = getattr(self, name)
            integral = name in _INT_FIELDS
            if isinstance(value, bool) or not isinstance(value, int if integral else int | float):
                kind = "an integer" if integral else "a number"
                raise ValueError(f"CapiConfig.{name} must be {kind}, got {value!r} ({type(value).__name__}).")
            too_low = value <= low if name in _OPEN_LOW else value < low
            too_high = value >= high if name in _OPEN_HIGH else value > high
            if too_low or too_high or value != value:  # value != value: NaN
                left = "(" if name in _OPEN_LOW else "["
                right = ")" if name in _OPEN_HIGH else "]"
                raise ValueError(
                    f"CapiConfig.{name}={value!r} is out of range {left}{low:g}, {high:g}{right}; a checkpoint or "
                    "config asking for it is damaged or not a CAPI model."
                )
        parameters = self.parameter_count()
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"CapiConfig describes {parameters / 1e9:.0f}e9 parameters, more than the {MAX_PARAMETERS / 1e9:.0f}e9 "
                f"allowed (embed_dim {self.embed_dim}, depth {self.depth}, predictor {self.pred_embed_dim} x "
                f"{self.pred_depth}); a checkpoint or config asking for it is damaged or not a CAPI model."
            )

    def parameter_count(self) -> int:
        """About how many parameters the model has (linear layers and embeddings; norms and biases ignored)."""
        enc, pred = self.embed_dim, self.pred_embed_dim
        hidden, pred_hidden = int(enc * self.mlp_ratio), int(pred * self.mlp_ratio)
        encoder = enc * self.in_chans * self.patch_size**2 + self.n_registers * enc
        encoder += self.depth * (4 * enc * enc + 2 * enc * hidden)
        predictor = pred + self.pred_depth * (2 * pred * pred + 2 * pred * enc + 2 * pred * pred_hidden)
        return encoder + predictor

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CapiConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown CapiConfig fields {unknown}. Known fields: {sorted(known)}.")
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


ARCHITECTURES: dict[str, CapiConfig] = {
    "capi_vits14": CapiConfig(embed_dim=384, depth=12, num_heads=6, pred_embed_dim=384, pred_depth=6, pred_num_heads=6),
    "capi_vitb14": CapiConfig(
        embed_dim=768, depth=12, num_heads=12, pred_embed_dim=768, pred_depth=6, pred_num_heads=12
    ),
    "capi_vitl14": CapiConfig(
        embed_dim=1024, depth=24, num_heads=16, pred_embed_dim=1024, pred_depth=12, pred_num_heads=16
    ),
}
