"""The image representations the classification probes are trained on, built from a backbone's outputs."""

from collections.abc import Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from torch import Tensor

# no torch at import: the command line checks representation names before torch is imported

__all__ = [
    "DEFAULT_REPRESENTATIONS",
    "REPRESENTATIONS",
    "TOKEN_REPRESENTATIONS",
    "check_representations",
    "make_representations",
]

# name -> what it is. Vector representations (B, D') get linear probes and k-NN; token sets (B, N, D) get the
# attentive probe.
REPRESENTATIONS = {
    "pooled": "the predictor pooling (the official 'cls' / global_repr), (B, D_pred)",
    "avg_patch": "the mean of the patch features, (B, D)",
    "pooled+avg_patch": "pooled and avg_patch concatenated, (B, D_pred + D)",
    "patch": "all patch tokens, (B, h*w, D)",
    "registers": "the register tokens, (B, R, D)",
}
TOKEN_REPRESENTATIONS = ("patch", "registers")
DEFAULT_REPRESENTATIONS = tuple(REPRESENTATIONS)


def check_representations(names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in REPRESENTATIONS]
    if unknown or not names:
        raise ValueError(f"Unknown representation(s) {unknown or list(names)}. Choose from {list(REPRESENTATIONS)}.")
    return tuple(dict.fromkeys(names))


def make_representations(
    patch_features: "Tensor", pooled: "Tensor | None", registers: "Tensor | None", names: Sequence[str]
) -> "dict[str, Tensor]":
    """``{name: tensor}`` from patch features (B, h, w, D) or (B, N, D), the pooled embedding (B, D_pred) and the
    registers (B, R, D). Any backbone's outputs work; a representation whose input is None raises."""
    import torch

    tokens = patch_features.flatten(1, -2) if patch_features.ndim == 4 else patch_features  # (B, N, D)
    out = {}
    for name in check_representations(names):
        if name in ("pooled", "pooled+avg_patch") and pooled is None:
            raise ValueError(f"Representation '{name}' needs the pooled embedding, which these features lack.")
        if name == "registers" and (registers is None or registers.shape[1] == 0):
            raise ValueError("Representation 'registers' needs register tokens, which these features lack.")
        if name == "pooled":
            out[name] = pooled
        elif name == "avg_patch":
            out[name] = tokens.mean(dim=1)
        elif name == "pooled+avg_patch":
            out[name] = torch.cat([pooled, tokens.mean(dim=1)], dim=-1)
        elif name == "patch":
            out[name] = tokens
        else:
            out[name] = registers
    return out
