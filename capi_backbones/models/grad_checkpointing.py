"""Activation checkpointing of one transformer block: ``full`` or ``selective``.

``full`` keeps only the block's inputs and recomputes the whole block in the backward pass. ``selective``
keeps the outputs of the matrix multiplications and of attention, and recomputes the cheap elementwise ops
(norms, RoPE, GELU, residual adds), in the spirit of the official CAPI / torchtitan selective policy.
Both recompute with the RNG state of the forward (stochastic depth draws the same subset), so the loss and
the gradients are those of the plain block.
"""

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["GRAD_CHECKPOINTING_MODES", "checkpointed_call"]

GRAD_CHECKPOINTING_MODES = ("full", "selective")

# op packets whose outputs are kept; everything else in the block is recomputed
_SAVED_OPS = frozenset(
    getattr(torch.ops.aten, name)
    for name in (
        "mm",
        "addmm",
        "bmm",
        "convolution",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)


def _keep_matmuls(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    saved = getattr(func, "overloadpacket", func) in _SAVED_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def checkpointed_call(mode: str, block: Callable[..., Tensor], *args, **kwargs) -> Tensor:
    """``block(*args, **kwargs)`` under activation checkpointing (``mode``: one of GRAD_CHECKPOINTING_MODES)."""
    if mode == "selective":
        context_fn = _selective_contexts
    elif mode == "full":
        context_fn = torch.utils.checkpoint.noop_context_fn
    else:
        raise ValueError(f"Unknown grad checkpointing mode {mode!r}; use one of {GRAD_CHECKPOINTING_MODES}.")
    return checkpoint(block, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
