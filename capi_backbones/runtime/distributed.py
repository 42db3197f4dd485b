"""Rank and world size, and torch.distributed set-up for torchrun launches.

Launch with ``torchrun --nproc_per_node N ...``: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT, and :func:`init_distributed` joins the process group (NCCL on CUDA, gloo on CPU). A plain ``python``
launch is a single process and needs no process group. The collective helpers (sums, maxima, gradient means,
broadcasts) used by training live here too.
"""

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from capi_backbones.runtime.devices import resolve_device
from capi_backbones.runtime.ranks import env_local_rank, env_rank, env_world_size

__all__ = [
    "DistributedContext",
    "Reduce",
    "all_reduce_grads_mean",
    "all_reduce_max",
    "all_reduce_sum",
    "broadcast_parameters",
    "init_distributed",
    "process_group",
    "reducers",
    "shutdown_distributed",
]

logger = logging.getLogger(__name__)

Reduce = Callable[[Tensor], Tensor]  # a reduction over ranks (sum or max), handed to the numerics as an argument


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool = False  # this package created the process group, so it destroys it

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_preference: str = "auto", *, option: str = "device=") -> DistributedContext:
    """Join the process group described by torchrun's environment variables, or run single-process.

    ``device_preference``: ``auto``, ``cpu``, ``cuda`` (one GPU per rank: ``cuda:<LOCAL_RANK>``); a missing GPU is
    a one-line :class:`~capi_backbones.runtime.devices.DeviceUnavailableError` naming ``option``."""
    world_size = env_world_size()
    rank = env_rank()
    local_rank = env_local_rank()
    device = resolve_device(device_preference, local_rank=local_rank, option=option)
    if world_size == 1:
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    initialized_here = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        initialized_here = True
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(
            f"The process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
            f"RANK={rank} WORLD_SIZE={world_size} from the environment."
        )
    logger.debug("rank %d/%d on %s", rank, world_size, device)
    return DistributedContext(
        rank=rank, world_size=world_size, local_rank=local_rank, device=device, initialized_here=initialized_here
    )


def shutdown_distributed(context: DistributedContext) -> None:
    if context.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (returns a new tensor; the input is not modified)."""
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Element-wise max over ranks (returns a new tensor)."""
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def reducers(context: DistributedContext) -> tuple[Reduce | None, Reduce | None]:
    """The (sum, max) reductions to hand to Sinkhorn-Knopp: None when single-process."""
    if not context.is_distributed:
        return None, None
    return all_reduce_sum, all_reduce_max


@torch.no_grad()
def all_reduce_grads_mean(parameters: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``parameters`` over ranks, as DDP does (one flat all-reduce)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if world_size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank hold rank ``src``'s parameters and buffers."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)
