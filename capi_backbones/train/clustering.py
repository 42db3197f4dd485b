"""Online clustering of the teacher's patch tokens: CAPI's targets.

The teacher's patch tokens are l2-normalized and scored against K prototypes by a linear layer.
Sinkhorn-Knopp on those scores gives balanced soft assignments, the targets of the student; a
cross-entropy between the assignments and the tempered scores trains the layer (Darcet et al., 2025,
arXiv 2502.08769, Sec. 3). CAPI balances the prototypes separately at every patch position
("position-wise" Sinkhorn-Knopp), which prevents positional collapse.

Distributed reductions are passed in as callables; nothing here reads global distributed state.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capi_backbones.runtime.distributed import Reduce
from capi_backbones.train.losses import capi_loss

__all__ = ["ClusteringOutput", "OnlineClustering", "sinkhorn_knopp"]


# Added after subtracting the max, before exp: exp(50) still fits fp32/bf16 and keeps tiny values above 0.
EXP_SHIFT = {torch.float16: 0.0, torch.bfloat16: 50.0, torch.float32: 50.0, torch.float64: 50.0}


def _reduced(t: Tensor, reduce: Reduce | None, what: str) -> Tensor:
    if reduce is None:
        return t
    out = reduce(t)
    if not isinstance(out, Tensor) or out.shape != t.shape:
        raise TypeError(
            f"{what} must return the reduced tensor of shape {tuple(t.shape)}, got {type(out).__name__}"
            f"{'' if not isinstance(out, Tensor) else ' of shape ' + str(tuple(out.shape))}. "
            "Wrap an in-place all_reduce as `lambda t: dist.all_reduce(t) or t`."
        )
    return out


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor,
    n_iterations: int = 3,
    *,
    eps: float = 1e-8,
    all_reduce_sum: Reduce | None = None,
    all_reduce_max: Reduce | None = None,
) -> Tensor:
    """Balanced soft assignments from scores, as in the official CAPI code.

    scores: (*, n_samples, n_prototypes), i.e. logits / target temperature. Returns a new tensor of the
    same shape and dtype; ``scores`` is not modified.

    Stable exp: ``exp(scores + (c - max))`` with the max taken over the samples axis (dim -2, all-reduced
    with ``all_reduce_max``) and c = 50 (0 in fp16). Each iteration divides by the sum over samples
    (``+ eps``, all-reduced with ``all_reduce_sum``), then by the sum over prototypes (``+ eps``). After the
    last iteration every sample's row sums to 1; the prototypes' column sums approach n_samples / K as
    the number of iterations grows (3 is CAPI's default).

    all_reduce_sum, all_reduce_max: ``Tensor -> Tensor`` callables that reduce across ranks sharing the
    samples axis, e.g. ``lambda t: dist.all_reduce(t) or t``; None for one process.
    """
    if scores.ndim < 2:
        raise ValueError(f"scores must be (*, n_samples, n_prototypes), got shape {tuple(scores.shape)}.")
    if scores.dtype not in EXP_SHIFT:
        raise TypeError(f"scores must be a floating tensor of dtype {list(EXP_SHIFT)}, got {scores.dtype}.")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}.")
    shift = _reduced(scores.amax(dim=-2, keepdim=True), all_reduce_max, "all_reduce_max")  # (*, 1, K)
    q = torch.exp(scores + (EXP_SHIFT[scores.dtype] - shift))  # a new tensor: the input stays untouched
    for _ in range(n_iterations):
        q /= _reduced(q.sum(dim=-2, keepdim=True), all_reduce_sum, "all_reduce_sum") + eps  # per prototype
        q /= q.sum(dim=-1, keepdim=True) + eps  # per sample
    return q


@dataclass
class ClusteringOutput:
    assignments: Tensor  # same leading shape as the input, last dim K: Sinkhorn-Knopp targets (no grad)
    loss: Tensor  # scalar fp32: trains only the clustering layer


class OnlineClustering(nn.Module):
    """K prototypes scored against l2-normalized tokens; balanced assignments and their clustering loss.

    ``layer`` is ``Linear(in_dim, n_prototypes, bias)`` with weight N(0, 1) and bias 0 (official init); its
    name matches the official checkpoint key ``head.layer.*`` of the teacher.
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int = 16384,
        *,
        target_temp: float = 0.06,
        pred_temp: float = 0.12,
        n_sk_iter: int = 3,
        positionwise: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if target_temp <= 0 or pred_temp <= 0:
            raise ValueError(f"Temperatures must be > 0, got target_temp={target_temp}, pred_temp={pred_temp}.")
        self.n_prototypes = n_prototypes
        self.target_temp = target_temp
        self.pred_temp = pred_temp
        self.n_sk_iter = n_sk_iter
        self.positionwise = positionwise
        self.layer = nn.Linear(in_dim, n_prototypes, bias=bias, device=device, dtype=dtype)
        if self.layer.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.layer.weight, std=1.0)
        if self.layer.bias is not None:
            nn.init.zeros_(self.layer.bias)

    def logits(self, x: Tensor) -> Tensor:
        """Prototype scores (*, K) of the l2-normalized tokens x (*, D); x is detached (the teacher gets no grad)."""
        return self.layer(F.normalize(x.detach(), dim=-1, p=2, eps=1e-7))

    def loss(self, x: Tensor, assignments: Tensor) -> Tensor:
        """The clustering loss of tokens ``x`` (*, D) against given ``assignments`` (*, K): what ``forward``
        returns as ``loss``, for a part of the batch whose assignments were balanced over the whole batch
        (gradient accumulation)."""
        return capi_loss(self.logits(x), assignments, temperature=self.pred_temp)

    def forward(
        self,
        x: Tensor,
        *,
        all_reduce_sum: Reduce | None = None,
        all_reduce_max: Reduce | None = None,
    ) -> ClusteringOutput:
        """x: teacher patch tokens. Position-wise: (positions, batch, D), balanced over the batch at each
        position. Standard (``positionwise=False``): any (*, D), all tokens balanced together.

        The input is detached: the loss trains ``layer`` only, never the teacher.
        """
        if self.positionwise and x.ndim < 3:
            raise ValueError(
                f"Position-wise clustering needs tokens laid out (positions, batch, D), got shape {tuple(x.shape)}. "
                "Transpose the teacher's (batch, positions, D) output with .transpose(0, 1)."
            )
        if x.ndim < 2:
            raise ValueError(f"Clustering needs tokens of shape (*, D), got shape {tuple(x.shape)}.")
        logits = self.logits(x)  # (*, K)
        assignments = self.balance(logits, all_reduce_sum=all_reduce_sum, all_reduce_max=all_reduce_max)
        loss = capi_loss(logits, assignments, temperature=self.pred_temp)
        return ClusteringOutput(assignments=assignments, loss=loss)

    def balance(
        self, logits: Tensor, *, all_reduce_sum: Reduce | None = None, all_reduce_max: Reduce | None = None
    ) -> Tensor:
        """Sinkhorn-Knopp assignments (no grad) of ``logits`` (*, K) at the target temperature: per position
        over the batch (position-wise), or over all tokens together."""
        scores = logits.detach() / self.target_temp
        reduce = {"all_reduce_sum": all_reduce_sum, "all_reduce_max": all_reduce_max}
        if self.positionwise:
            return sinkhorn_knopp(scores, self.n_sk_iter, **reduce)
        flat = scores.flatten(0, -2)  # (n_tokens, K)
        return sinkhorn_knopp(flat, self.n_sk_iter, **reduce).reshape(scores.shape)
