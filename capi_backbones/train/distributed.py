"""Training's door to :mod:`capi_backbones.runtime.distributed` (rank, world size, process group, collectives),
which is where this code lives now. Errors here name the ``train.device`` setting."""

from capi_backbones.runtime import distributed as _runtime
from capi_backbones.runtime.devices import resolve_device as _resolve_device
from capi_backbones.runtime.distributed import (
    DistributedContext,
    Reduce,
    all_reduce_grads_mean,
    all_reduce_max,
    all_reduce_sum,
    broadcast_parameters,
    reducers,
    shutdown_distributed,
)

__all__ = [
    "DistributedContext",
    "Reduce",
    "all_reduce_grads_mean",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_parameters",
    "init_distributed",
    "reducers",
    "resolve_device",
    "shutdown_distributed",
]


def init_distributed(device_preference: str = "auto") -> DistributedContext:
    """:func:`capi_backbones.runtime.distributed.init_distributed`, with errors naming ``train.device``."""
    return _runtime.init_distributed(device_preference, option="train.device=")


def resolve_device(preference: str, local_rank: int = 0):
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU: one line naming ``train.device``."""
    return _resolve_device(preference, local_rank=local_rank, option="train.device=")
