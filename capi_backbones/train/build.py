"""The models and optimizers of a run, built from its config: what one step needs, ready to run.

The student (a CapiModel and its ``L2NormLinear`` head), the EMA teacher (the same initial weights, no stochastic
depth) and the online clustering layer start identical on every rank (``train.seed``). Under torch.distributed the
student is wrapped in DDP, or student and teacher are sharded block by block (FSDP); the clustering layer stays
replicated. Then the AdamW optimizers (fused where steps run sync-free), the autocast of ``train.precision`` and the
compiled forwards (``train.compile``). Last, each rank's global generator is seeded for its own stochastic depth.
"""

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from capi_backbones.models import CapiModel
from capi_backbones.runtime.distributed import DistributedContext, broadcast_parameters
from capi_backbones.runtime.precision import native_bf16, resolve_precision
from capi_backbones.runtime.seeding import rank_seed
from capi_backbones.train.clustering import OnlineClustering
from capi_backbones.train.config import TrainConfig
from capi_backbones.train.heads import L2NormLinear
from capi_backbones.train.param_groups import build_param_groups
from capi_backbones.train.step import StudentNet

__all__ = ["RunModels", "build_run_models", "training_precision"]

logger = logging.getLogger(__name__)


@dataclass
class RunModels:
    student: StudentNet
    teacher: CapiModel
    clustering: OnlineClustering
    optimizer: torch.optim.AdamW  # the student's
    clustering_optimizer: torch.optim.AdamW
    precision: str  # "bf16" (autocast) or "fp32"
    autocast: Callable[[], contextlib.AbstractContextManager]  # a fresh autocast context of the precision
    student_forward: Callable  # the student, through DDP where it is wrapped, compiled with train.compile
    teacher_encode: Callable  # teacher.encode, compiled with train.compile
    student_ddp: DistributedDataParallel | None  # the DDP wrapper (for no_sync), None without DDP
    ema_pairs: tuple[list, list]  # (teacher parameters, student backbone parameters) in matching order


def build_run_models(config: TrainConfig, context: DistributedContext, *, sync_free: bool) -> RunModels:
    """Build the models and optimizers of ``config`` on ``context.device`` (collective under torch.distributed)."""
    mc, cc, oc, tc = config.model, config.clustering, config.optim, config.train
    device = context.device
    torch.manual_seed(tc.seed)  # identical init on every rank
    backbone = CapiModel(mc, device=device)
    head = L2NormLinear(mc.pred_embed_dim, cc.n_prototypes, device=device)
    if tc.activation_checkpointing != "none":
        backbone.set_grad_checkpointing(mode=tc.activation_checkpointing)
    student = StudentNet(backbone, head).train()
    teacher = CapiModel(dataclasses.replace(mc, drop_path_rate=0.0), device=device)
    teacher.load_state_dict(backbone.state_dict())
    teacher.requires_grad_(False).eval()
    clustering = OnlineClustering(
        mc.embed_dim,
        cc.n_prototypes,
        target_temp=cc.target_temp,
        pred_temp=cc.pred_temp,
        n_sk_iter=cc.n_sk_iter,
        positionwise=cc.positionwise,
        bias=cc.bias,
        device=device,
    ).train()
    precision = training_precision(tc.precision, device)
    student_ddp = _wrap_parallel(student, teacher, clustering, context, tc.parallel, precision)
    fused = {"fused": True} if sync_free else {}  # only the fused kernels skip a step on the device
    optimizer = torch.optim.AdamW(
        build_param_groups(
            student,
            weight_decay=oc.weight_decay,
            patch_embed_lr_mult=oc.patch_embed_lr_mult,
            rope_lr_mult=oc.rope_lr_mult,
            norm_wd_mult=oc.norm_wd_mult,
            lr=oc.lr,
        ),
        lr=oc.lr,
        betas=oc.betas,
        weight_decay=oc.weight_decay,
        **fused,
    )
    clustering_optimizer = torch.optim.AdamW(
        clustering.parameters(), lr=cc.lr, betas=cc.betas, weight_decay=cc.weight_decay, **fused
    )
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    )
    student_forward = student_ddp if student_ddp is not None else student
    teacher_encode = teacher.encode
    if tc.compile:
        student_forward = torch.compile(student_forward)
        teacher_encode = torch.compile(teacher_encode)
    torch.manual_seed(rank_seed(tc.seed, context.rank))  # each rank's own stochastic depth from here on
    return RunModels(
        student=student,
        teacher=teacher,
        clustering=clustering,
        optimizer=optimizer,
        clustering_optimizer=clustering_optimizer,
        precision=precision,
        autocast=autocast,
        student_forward=student_forward,
        teacher_encode=teacher_encode,
        student_ddp=student_ddp,
        ema_pairs=(list(teacher.parameters()), list(student.backbone.parameters())),
    )


def _wrap_parallel(student, teacher, clustering, context: DistributedContext, parallel: str, precision: str):
    """Wrap for torch.distributed: the student in DDP (returned), or student and teacher sharded by FSDP (in place,
    None returned); the clustering layer's parameters broadcast from rank 0. Nothing without torch.distributed."""
    if not context.is_distributed:
        return None
    device, student_ddp = context.device, None
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        bf16_cuda = device.type == "cuda" and precision == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_cuda else None
        kw = {"mp_policy": policy} if policy is not None else {}
        for model in (student.backbone, teacher):
            for block in [*model.encoder.blocks, *model.decoder.blocks]:
                fully_shard(block, **kw)
        fully_shard(student, **kw)
        fully_shard(teacher, **kw)
        register_fsdp_forward_method(teacher, "encode")
        register_fsdp_forward_method(teacher, "forward_features")  # the k-NN monitor
    else:
        device_ids = [device.index] if device.type == "cuda" else None
        student_ddp = DistributedDataParallel(student, device_ids=device_ids)
    # the clustering layer stays replicated: same init everywhere, gradients averaged by hand
    broadcast_parameters(clustering)
    return student_ddp


def training_precision(asked: str, device: torch.device) -> str:
    """``"bf16"`` (autocast) or ``"fp32"`` for ``train.precision``: ``auto`` is bf16 where the device multiplies
    bf16 natively (CUDA sm80+, CPUs with AVX512-BF16 or AMX), fp32 elsewhere; said once in the log."""
    chosen = resolve_precision(asked, device, announce=False)
    if asked == "auto":
        native = "runs bf16 natively" if chosen == "bf16" else "has no native bf16"
        logger.info("Training in %s on %s (%s); train.precision=%s to change it.", chosen, device, native,
                    "fp32" if chosen == "bf16" else "bf16")  # fmt: skip
    elif chosen == "bf16" and not native_bf16(device):
        logger.warning("train.precision=bf16 on %s, where bf16 is emulated: likely slower than fp32.", device)
    return chosen
