"""The computations of one CAPI step: the teacher's targets and the student's loss.

Spec section 7, in this order: teacher forward (EMA encoder on the full image, no grad) and the online
clustering loss; student forward (visible patches + registers through the encoder, then every predictor
block with queries at the predicted positions) and the CAPI loss through the ``L2NormLinear`` head.
The optimizer steps and the EMA update are the trainer's job.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from capi_backbones.models import CapiModel
from capi_backbones.runtime.distributed import Reduce
from capi_backbones.train.clustering import OnlineClustering
from capi_backbones.train.heads import L2NormLinear

__all__ = [
    "StudentNet",
    "TeacherAssignments",
    "TeacherTargets",
    "assignment_entropies",
    "teacher_assignments",
    "teacher_targets",
]


class StudentNet(nn.Module):
    """The student: a CapiModel backbone and its ``L2NormLinear`` head, under one ``forward`` so that DDP /
    FSDP see the whole masked-prediction computation. Attribute names follow the official
    ``student.backbone`` / ``student.head``."""

    def __init__(self, backbone: CapiModel, head: L2NormLinear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor, visible_indices: Tensor, predict_indices: Tensor) -> Tensor:
        """images (B, 3, H, W); visible_indices (B, n_vis); predict_indices (B, n_pred) -> logits (B, n_pred, K)."""
        context, context_coords, all_coords = self.backbone.encode(images, visible_indices)  # (B, R + n_vis, D)
        query_coords = all_coords[predict_indices]  # (B, n_pred, 2)
        predictions = self.backbone.predict(context, context_coords, query_coords)  # all blocks, (B, n_pred, Dp)
        return self.head(predictions)


@dataclass
class TeacherTargets:
    targets: Tensor  # (B, n_pred, K) Sinkhorn-Knopp assignments at the predicted positions, no grad
    clustering_loss: Tensor  # scalar, its graph reaches only the clustering layer


def teacher_targets(
    teacher: CapiModel | Callable[[Tensor], tuple],
    clustering: nn.Module,
    images: Tensor,
    predict_indices: Tensor,
    *,
    all_reduce_sum: Reduce | None = None,
    all_reduce_max: Reduce | None = None,
    n_registers: int,
) -> TeacherTargets:
    """Teacher encoder on the full images (no grad), then position-wise online clustering of its patches.

    ``teacher`` is the EMA CapiModel or any callable with the signature of ``CapiModel.encode``;
    ``clustering`` an ``OnlineClustering`` (or a DDP wrapper of one)."""
    encode = teacher.encode if isinstance(teacher, CapiModel) else teacher
    with torch.no_grad():
        tokens, _, _ = encode(images)  # (B, R + n, D), enc_norm-ed
    patches = tokens[:, n_registers:].transpose(0, 1)  # (n, B, D): position-wise SK balances over the batch
    out = clustering(patches, all_reduce_sum=all_reduce_sum, all_reduce_max=all_reduce_max)
    assignments = out.assignments.detach().transpose(0, 1)  # (B, n, K)
    index = predict_indices[..., None].expand(-1, -1, assignments.shape[-1])  # (B, n_pred, K)
    return TeacherTargets(targets=assignments.gather(1, index), clustering_loss=out.loss)


@dataclass
class TeacherAssignments:
    patches: Tensor  # (n, B, D) the teacher's enc_norm-ed patch tokens, position-major, no grad
    assignments: Tensor  # (n, B, K) Sinkhorn-Knopp assignments of every patch, balanced over the whole batch
    targets: Tensor  # (B, n_pred, K) the assignments at the predicted positions


@torch.no_grad()
def teacher_assignments(
    teacher: CapiModel | Callable[[Tensor], tuple],
    clustering: OnlineClustering,
    images: Tensor,
    predict_indices: Tensor,
    *,
    all_reduce_sum: Reduce | None = None,
    all_reduce_max: Reduce | None = None,
    n_registers: int,
) -> TeacherAssignments:
    """The targets of :func:`teacher_targets` without the clustering loss's graph (no grad, cheap): for
    gradient accumulation, Sinkhorn-Knopp balances over the whole batch, then the clustering loss and the
    student run on parts of it (``clustering.loss(patches[:, part], assignments[:, part])``)."""
    encode = teacher.encode if isinstance(teacher, CapiModel) else teacher
    tokens, _, _ = encode(images)  # (B, R + n, D)
    patches = tokens[:, n_registers:].transpose(0, 1)  # (n, B, D)
    logits = clustering.logits(patches)  # (n, B, K); the clustering loss is left to the parts
    assignments = clustering.balance(logits, all_reduce_sum=all_reduce_sum, all_reduce_max=all_reduce_max)
    del logits
    index = predict_indices[..., None].expand(-1, -1, assignments.shape[-1])  # (B, n_pred, K)
    targets = assignments.transpose(0, 1).gather(1, index)
    return TeacherAssignments(patches=patches, assignments=assignments, targets=targets)


@torch.no_grad()
def assignment_entropies(targets: Tensor) -> tuple[Tensor, Tensor]:
    """(mean per-token entropy of the assignments, sum over tokens of the assignments (K,)) in fp32.

    The first is the official ``target_entropy`` (log K = uniform, 0 = one-hot); the second, divided by the
    token count (over all ranks), is the prototype usage whose entropy falls to 0 when all tokens go to one
    prototype."""
    flat = targets.float().reshape(-1, targets.shape[-1])  # (n_tokens, K)
    per_token = -torch.xlogy(flat, flat).sum(dim=-1)  # (n_tokens,)
    return per_token.mean(), flat.sum(dim=0)
