"""FLOPs of a function, as torch's ``FlopCounterMode`` counts them, plus the CPU attention kernels it leaves out.

``FlopCounterMode`` knows the CUDA attention kernels (flash, memory-efficient, cuDNN) but not the CPU one,
``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), which ``F.scaled_dot_product_attention`` runs on
a CPU: without these, a CPU forward's attention (about 4% of a ViT-L/14's FLOPs at 224 px, 11% of a ViT-S/14's) would
count as free and every rate computed from the count would be too low. They are counted with torch's own formulas
for the other attention kernels (``sdpa_flop_count``, ``sdpa_backward_flop_count``).
"""

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_flops"]


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs ``fn()`` runs (GEMMs, convolutions and attention; elementwise work counts as zero)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()
