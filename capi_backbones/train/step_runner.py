"""Running one training step: schedules, forward and backward (whole or accumulated), the one reduction of the logged
values, the non-finite guard and the updates (AdamW on the student, EMA of the teacher, the clustering optimizer).

What the step computes: ``train.step``. The models and optimizers it updates: ``train.build``.

Without host synchronisation (``sync_free``, on accelerators) a step's values stay on the device until
:meth:`StepRunner.flush` reads those of all pending steps in one transfer; the non-finite guard then skips the
updates on the device (fused AdamW's ``found_inf``, an EMA momentum of 1). On the CPU a read costs nothing, so each
step is read at once and a non-finite step's updates are skipped on the host. ``train.nan_limit`` non-finite steps
in a row raise :class:`NonFiniteLossError`.
"""

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from capi_backbones.runtime.distributed import DistributedContext, all_reduce_grads_mean, reducers
from capi_backbones.schedules import warmup_truncated_cosine
from capi_backbones.train.build import RunModels
from capi_backbones.train.config import TrainConfig
from capi_backbones.train.ema import ema_update_
from capi_backbones.train.losses import capi_loss
from capi_backbones.train.masking import MaskedBatch
from capi_backbones.train.param_groups import apply_schedules
from capi_backbones.train.step import assignment_entropies, teacher_assignments, teacher_targets

__all__ = ["NonFiniteLossError", "StepMetrics", "StepRunner", "scheduled_values"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a NaN or infinite loss."""


@dataclass
class StepMetrics:
    step: int  # 0-based index of the step
    loss: float  # CAPI loss of the student (mean over predicted tokens of the global batch)
    clustering_loss: float  # loss of the online clustering layer
    target_entropy: float  # mean per-token entropy of the SK targets (log K: uniform, 0: one-hot)
    prototype_entropy: float  # entropy of the mean target (prototype usage); 0 = all tokens on one prototype
    lr: float
    weight_decay: float
    momentum: float
    clustering_lr: float
    finite: bool  # False: the updates of this step were skipped
    seconds: float  # wall time of the step (in Trainer.run: since the previous step, so data loading included)


def scheduled_values(config: TrainConfig, step: int) -> dict[str, float]:
    """The lr, weight decay, EMA momentum and clustering lr of ``step`` (``capi_backbones.schedules``)."""
    oc, cc = config.optim, config.clustering
    common = dict(total_steps=oc.total_steps, warmup_steps=oc.warmup_steps, truncate_cos=oc.truncate_cos)
    return {
        "lr": warmup_truncated_cosine(step, base_value=oc.lr, final_value=oc.final_lr, **common),
        "weight_decay": oc.weight_decay,
        "momentum": warmup_truncated_cosine(
            step,
            base_value=oc.momentum,
            final_value=oc.momentum_final,
            start_warmup_value=oc.momentum_start,
            **common,
        ),
        "clustering_lr": warmup_truncated_cosine(step, base_value=cc.lr, final_value=cc.final_lr, **common),
    }


class StepRunner:
    """Runs steps on ``models`` and keeps what their metrics need: the steps not read yet, the non-finite streak and
    whether some rank asked to stop."""

    def __init__(
        self, config: TrainConfig, context: DistributedContext, models: RunModels, *, sync_free: bool, checkpoints: Path
    ) -> None:
        self.config, self.context, self.models, self.sync_free = config, context, models, sync_free
        self.checkpoints = checkpoints  # the folder named when too many steps fail
        self.nan_streak = 0
        self.stop_agreed = False  # every rank knows some rank asked to stop (from a step's all-reduce)
        self._pending: list[tuple[StepMetrics, Tensor]] = []  # steps whose values are still on the device
        self._sum, self._max = reducers(context)

    def run(self, step: int, batch: MaskedBatch, *, stop_requested: bool) -> StepMetrics:
        """Run ``step`` on this rank's share of the global batch; ``stop_requested``: this rank got a stop signal
        (summed over the ranks in the step's reduction). The metrics hold NaN until :meth:`flush` reads them."""
        m = self.models
        start = time.perf_counter()
        values = scheduled_values(self.config, step)
        apply_schedules(m.optimizer, lr=values["lr"], weight_decay=values["weight_decay"])
        for group in m.clustering_optimizer.param_groups:
            group["lr"] = values["clustering_lr"]
        m.optimizer.zero_grad(set_to_none=True)
        m.clustering_optimizer.zero_grad(set_to_none=True)
        batch = batch.to(self.context.device, non_blocking=True)
        if self.config.optim.accumulation_steps == 1:
            loss, clustering_loss, targets = self._forward_backward(batch)
        else:
            loss, clustering_loss, targets = self._forward_backward_accumulated(batch)

        # one reduction for the logged values, the finiteness verdict and the stop request
        entropy, usage = assignment_entropies(targets)
        n_tokens = targets.shape[0] * targets.shape[1]
        stop = 1.0 if stop_requested else 0.0
        scalars = torch.stack([loss.detach(), clustering_loss.detach().float(), entropy]).to(usage)
        extra = usage.new_full((2,), float(n_tokens))  # made on the device: a host copy would wait for it
        extra[0] = stop
        packed = torch.cat([scalars, extra, usage])
        if self.context.is_distributed:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        mean_usage = packed[5:] / packed[4]
        record = torch.cat(
            [packed[:3] / self.context.world_size, -torch.xlogy(mean_usage, mean_usage).sum()[None], packed[3:4]]
        )  # loss, clustering loss, target entropy, prototype entropy, stop requests
        finite = torch.isfinite(record[:2]).all()

        if self.sync_free:  # fused AdamW skips its update where found_inf is set; the EMA keeps the teacher
            skip = (~finite).float()
            m.optimizer.found_inf = m.clustering_optimizer.found_inf = skip
            m.optimizer.step()
            ema_update_(*m.ema_pairs, torch.where(finite, values["momentum"], 1.0))
            all_reduce_grads_mean(m.clustering.parameters(), self.context.world_size)
            m.clustering_optimizer.step()
        elif finite:  # a read from the CPU: free
            m.optimizer.step()
            ema_update_(*m.ema_pairs, values["momentum"])
            all_reduce_grads_mean(m.clustering.parameters(), self.context.world_size)
            m.clustering_optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
        m.clustering_optimizer.zero_grad(set_to_none=True)
        nan = float("nan")
        metrics = StepMetrics(
            step=step,
            loss=nan,
            clustering_loss=nan,
            target_entropy=nan,
            prototype_entropy=nan,
            finite=True,
            seconds=time.perf_counter() - start,
            **values,
        )
        self._pending.append((metrics, torch.cat([record, finite[None].to(record.dtype)])))
        return metrics

    def flush(self) -> list[StepMetrics]:
        """Read the values of the steps run since the last flush from the device (one transfer), fill in their
        metrics, count non-finite steps in a row and agree on stop requests; returns those metrics. Raises
        NonFiniteLossError after ``train.nan_limit`` non-finite steps in a row."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        rows = torch.stack([row for _, row in pending]).cpu().tolist()
        done = []
        for (metrics, _), row in zip(pending, rows, strict=True):
            metrics.loss, metrics.clustering_loss, metrics.target_entropy, metrics.prototype_entropy = row[:4]
            metrics.finite = row[5] > 0
            self.stop_agreed = self.stop_agreed or row[4] > 0
            done.append(metrics)
            if metrics.finite:
                self.nan_streak = 0
                continue
            self.nan_streak += 1
            logger.warning(
                "Step %d: non-finite loss (loss=%s, clustering loss=%s); skipped the update (%d in a row).",
                metrics.step, metrics.loss, metrics.clustering_loss, self.nan_streak,
            )  # fmt: skip
            if self.nan_streak >= self.config.train.nan_limit:
                raise NonFiniteLossError(
                    f"{self.nan_streak} non-finite steps in a row (last at step {metrics.step}: loss={metrics.loss}, "
                    f"clustering loss={metrics.clustering_loss}). Lower optim.lr, check the data, or raise "
                    f"train.nan_limit; restart from the last checkpoint in {self.checkpoints}."
                )
        return done

    def _run_teacher(self, compute, batch: MaskedBatch):
        """``teacher_targets`` or ``teacher_assignments`` of the batch: the EMA encoder and the online clustering."""
        with self.models.autocast():
            return compute(
                self.models.teacher_encode,
                self.models.clustering,
                batch.images,
                batch.predict_indices,
                all_reduce_sum=self._sum,
                all_reduce_max=self._max,
                n_registers=self.config.model.n_registers,
            )

    def _forward_backward(self, batch: MaskedBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients of the whole local batch in one pass; returns (loss, clustering loss, targets)."""
        # teacher: EMA encoder on the full images, online clustering (its loss trains the clustering layer only)
        teacher = self._run_teacher(teacher_targets, batch)
        teacher.clustering_loss.backward()
        # student: visible patches + registers, predictor queries at the predicted positions
        with self.models.autocast():
            logits = self.models.student_forward(batch.images, batch.visible_indices, batch.predict_indices)
        loss = capi_loss(logits.float(), teacher.targets, temperature=self.config.clustering.student_temp)
        loss.backward()
        return loss, teacher.clustering_loss, teacher.targets

    def _forward_backward_accumulated(self, batch: MaskedBatch) -> tuple[Tensor, Tensor, Tensor]:
        """The same gradients in ``optim.accumulation_steps`` passes over equal parts of the local batch.

        The teacher and Sinkhorn-Knopp run once over the whole batch without grad (their balance is over the
        global batch); the clustering loss and the student run per part, each loss scaled by 1 / parts, so
        the summed gradients are those of the batch means. Gradients are synchronised across ranks once, in
        the last part."""
        m = self.models
        parts = self.config.optim.accumulation_steps
        size = batch.images.shape[0] // parts
        teacher = self._run_teacher(teacher_assignments, batch)
        losses, clustering_losses = [], []
        for i in range(parts):
            part = slice(i * size, (i + 1) * size)
            with self._gradient_sync(enabled=i == parts - 1):
                with m.autocast():
                    clustering_loss = m.clustering.loss(teacher.patches[:, part], teacher.assignments[:, part])
                (clustering_loss / parts).backward()
                with m.autocast():
                    logits = m.student_forward(
                        batch.images[part], batch.visible_indices[part], batch.predict_indices[part]
                    )
                loss = capi_loss(logits.float(), teacher.targets[part], temperature=self.config.clustering.student_temp)
                (loss / parts).backward()
            losses.append(loss.detach())
            clustering_losses.append(clustering_loss.detach())
        return torch.stack(losses).mean(), torch.stack(clustering_losses).mean(), teacher.targets

    def _gradient_sync(self, *, enabled: bool) -> contextlib.AbstractContextManager:
        """DDP / FSDP reduce the student's gradients only in the pass where ``enabled`` (the last one)."""
        if self.models.student_ddp is not None and not enabled:
            return self.models.student_ddp.no_sync()
        if self.context.is_distributed and self.config.train.parallel == "fsdp":
            self.models.student.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
