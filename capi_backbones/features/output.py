"""The result type of feature extraction."""

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FeatureOutput"]


@dataclass
class FeatureOutput:
    """Features of a batch of images that share one processed size. Tensors are float32 on the CPU.

    patch_features: (B, h, w, D) ``enc_norm``-ed patch tokens (channels last).
    pooled: (B, D_pred) predictor pooling (the official ``global_repr``), or None when pooling was skipped.
    registers: (B, 16, D) ``enc_norm``-ed register tokens.
    grid_size: (h, w) patch grid.
    image_size: (H, W) processed input size in pixels (H = 14 h, W = 14 w).
    """

    patch_features: Tensor
    pooled: Tensor | None
    registers: Tensor
    grid_size: tuple[int, int]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return self.patch_features.shape[0]

    def select(self, index: int | slice | Tensor) -> "FeatureOutput":
        """The images at ``index`` (an int keeps the batch dimension: B = 1; a LongTensor picks and reorders)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        pooled = None if self.pooled is None else self.pooled[index]
        return FeatureOutput(self.patch_features[index], pooled, self.registers[index], self.grid_size, self.image_size)

    @classmethod
    def concatenate(cls, outputs: "list[FeatureOutput]") -> "FeatureOutput":
        """Join outputs of the same patch grid along the batch dimension."""
        if not outputs:
            raise ValueError("Cannot concatenate an empty list of FeatureOutput.")
        sizes = {o.image_size for o in outputs}
        if len(sizes) > 1:
            raise ValueError(f"Cannot concatenate features of different image sizes {sorted(sizes)}.")
        pooled = None if outputs[0].pooled is None else torch.cat([o.pooled for o in outputs])
        return cls(
            torch.cat([o.patch_features for o in outputs]),
            pooled,
            torch.cat([o.registers for o in outputs]),
            outputs[0].grid_size,
            outputs[0].image_size,
        )
