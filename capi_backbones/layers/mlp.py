"""Bias-free two-layer MLP with exact (erf) GELU."""

from torch import Tensor, nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=False, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
