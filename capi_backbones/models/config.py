"""Architecture configuration of CAPI encoder-predictor models."""

from dataclasses import asdict, dataclass, fields
from typing import Any

from capi_backbones.constants import N_REGISTERS, NORM_EPS, PATCH_SIZE

__all__ = ["CapiConfig", "ARCHITECTURES"]


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
