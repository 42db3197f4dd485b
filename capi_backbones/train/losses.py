"""CAPI's loss: cross-entropy between soft cluster assignments and tempered predictions.

The student predicts, for each masked patch, the soft assignment that the teacher's online
clustering gives that patch (Darcet et al., 2025, "Cluster and Predict Latent Patches",
arXiv 2502.08769, Sec. 3). The same formula trains the clustering layer itself.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["capi_loss"]


def capi_loss(student_logits: Tensor, target_assignments: Tensor, temperature: float = 0.12) -> Tensor:
    """Mean over tokens of ``-sum_k t_k * log_softmax(s / temperature)_k``, in fp32.

    student_logits, target_assignments: (*, K) with the same shape. Targets are treated as constants
    (no gradient flows into them). Tokens are summed in fp64, as the official code does, and the mean is
    returned as an fp32 scalar.
    """
    if student_logits.shape != target_assignments.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and target_assignments "
            f"{tuple(target_assignments.shape)} must have the same shape (*, K)."
        )
    if student_logits.ndim < 1 or student_logits.numel() == 0:
        raise ValueError(f"capi_loss needs at least one token, got logits of shape {tuple(student_logits.shape)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    n_prototypes = student_logits.shape[-1]
    logits = student_logits.float().reshape(-1, n_prototypes)  # (n_tokens, K)
    targets = target_assignments.detach().float().reshape(-1, n_prototypes)
    per_token = -torch.sum(targets * F.log_softmax(logits / temperature, dim=-1), dim=-1)  # (n_tokens,)
    return (per_token.double().sum() / per_token.shape[0]).float()
