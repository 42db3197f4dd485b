"""Exponential moving average of the student: CAPI's teacher."""

import torch
from torch import Tensor

__all__ = ["ema_update_"]


@torch.no_grad()
def ema_update_(teacher_params: list[Tensor], student_params: list[Tensor], momentum: float | Tensor) -> None:
    """In place: ``t = momentum * t + (1 - momentum) * s`` for every pair, with fused foreach ops.

    momentum = 1 leaves the teacher unchanged; momentum = 0 copies the student. A 0-dim tensor ``momentum`` (on
    the parameters' device) is used without reading it on the host, as ``t + (1 - momentum) * (s - t)``: exact
    for momentum 1 while the student is finite (the trainer skips every update that is not)."""
    teacher_params, student_params = list(teacher_params), list(student_params)
    if len(teacher_params) != len(student_params):
        raise ValueError(
            f"Got {len(teacher_params)} teacher and {len(student_params)} student tensors; "
            "pass the parameters of two copies of the same modules, in the same order."
        )
    if not isinstance(momentum, Tensor) and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}.")
    for i, (t, s) in enumerate(zip(teacher_params, student_params, strict=True)):
        if t.shape != s.shape:
            raise ValueError(f"Tensor {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}.")
    if not teacher_params:
        return
    if isinstance(momentum, Tensor):  # no host read (the trainer's sync-free step)
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
        return
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
