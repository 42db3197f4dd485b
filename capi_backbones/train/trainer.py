"""The CAPI pretraining loop: it builds the models and optimizers and runs the steps, in order.

What a checkpoint holds, writing and resuming it: ``train.checkpointing``. The run directory's other files (config,
metrics, curves) and the progress shown: ``train.run_dir``. The k-NN monitor: ``train.monitor``.

One step (spec section 7): teacher forward + clustering loss backward; student forward + CAPI loss backward;
AdamW step on the student; EMA update of the teacher; clustering optimizer step. A step whose losses are not
finite skips all three updates; ``train.nan_limit`` such steps in a row stop the run.

SIGTERM or SIGUSR1 asks for a checkpoint at the end of the current step and a clean exit. Resuming from a
checkpoint restores models, optimizers, step counter (hence schedules and data order) and the RNG states,
so an interrupted run continues bit for bit (on CPU).
"""

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from capi_backbones.images import load_image
from capi_backbones.models import CapiModel
from capi_backbones.runtime.distributed import (
    DistributedContext,
    all_reduce_grads_mean,
    broadcast_parameters,
    init_distributed,
    reducers,
    shutdown_distributed,
)
from capi_backbones.runtime.precision import native_bf16, resolve_precision
from capi_backbones.runtime.seeding import rank_seed
from capi_backbones.runtime.signals import handle_stop_signals
from capi_backbones.schedules import warmup_truncated_cosine
from capi_backbones.train import checkpointing
from capi_backbones.train.clustering import OnlineClustering
from capi_backbones.train.config import TrainConfig
from capi_backbones.train.data import (
    ImageStream,
    PositionMaskingCollate,
    StepBatchSampler,
    TrainTransform,
    build_loader,
    find_images,
)
from capi_backbones.train.ema import ema_update_
from capi_backbones.train.heads import L2NormLinear
from capi_backbones.train.losses import capi_loss
from capi_backbones.train.masking import MaskedBatch, MaskingCollator
from capi_backbones.train.metrics import MetricsWriter
from capi_backbones.train.param_groups import apply_schedules, build_param_groups
from capi_backbones.train.run_dir import (
    METRICS_FILE,
    draw_run_curves,
    log_window,
    prepare_run_dir,
    progress_bar,
)
from capi_backbones.train.step import StudentNet, assignment_entropies, teacher_assignments, teacher_targets

__all__ = ["NonFiniteLossError", "StepMetrics", "TrainResult", "Trainer", "train"]

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


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int  # steps already done when this run started (0, or the resumed checkpoint's)
    end_step: int  # steps done when it stopped
    history: list[StepMetrics] = field(default_factory=list)  # one entry per step run by this call
    stopped_by_signal: bool = False
    last_checkpoint: Path | None = None

    @property
    def losses(self) -> list[float]:
        return [m.loss for m in self.history]


class Trainer:
    """Builds the student, teacher, clustering layer and optimizers from a :class:`TrainConfig`, resumes
    from the run directory's newest checkpoint when ``train.resume`` is set, and runs steps."""

    def __init__(
        self, config: TrainConfig, *, context: DistributedContext | None = None, sync_free: bool | None = None
    ) -> None:
        self.config = config.validate()
        self.context = context or init_distributed(config.train.device, option="train.device=")
        self.device = self.context.device
        # sync-free steps (no host read between log steps, fused AdamW) where a host read waits for the device
        self.sync_free = self.device.type != "cpu" if sync_free is None else sync_free
        self.run_dir = Path(config.train.output_dir)
        self.step = 0
        self.nan_streak = 0
        self._pending: list[tuple[StepMetrics, Tensor]] = []  # steps whose values are still on the device
        self._unreported: list[StepMetrics] = []  # flushed steps not yet handed to run()'s callbacks
        self._signal_received = False  # set by the signal handler, on this rank only
        self._stop_agreed = False  # every rank knows some rank got a signal (from the step's all-reduce)
        mc, cc, oc = config.model, config.clustering, config.optim
        if oc.batch_size % self.context.world_size:
            raise ValueError(
                f"optim.batch_size={oc.batch_size} is the global batch and must be divisible by the "
                f"{self.context.world_size} ranks; use a multiple of {self.context.world_size}."
            )
        self.local_batch = oc.batch_size // self.context.world_size
        if self.local_batch % oc.accumulation_steps:
            raise ValueError(
                f"Each of the {self.context.world_size} ranks gets {self.local_batch} images per step, which "
                f"optim.accumulation_steps={oc.accumulation_steps} cannot split evenly; use a divisor of "
                f"{self.local_batch}."
            )
        self.image_paths = find_images(config.data.root)  # fails early on a missing or empty folder
        first_readable_image(self.image_paths, config.data.root)
        logger.info(
            "Found %d images under %s; building the student, teacher and clustering layer on %s...",
            len(self.image_paths), config.data.root, self.device,
        )  # fmt: skip
        self.monitor = self._build_monitor()
        self.last_knn = None  # the monitor's latest scores (KnnScores)
        self.grid = (config.data.image_size // mc.patch_size,) * 2
        self.masking = MaskingCollator(
            self.grid,
            mask_ratio=config.data.mask_ratio,
            prediction_ratio=config.data.prediction_ratio,
            strategy=config.data.masking,
            roll=config.data.roll,
        )

        # ---- models: identical init on every rank ----
        torch.manual_seed(config.train.seed)
        backbone = CapiModel(mc, device=self.device)
        head = L2NormLinear(mc.pred_embed_dim, cc.n_prototypes, device=self.device)
        if config.train.activation_checkpointing != "none":
            backbone.set_grad_checkpointing(mode=config.train.activation_checkpointing)
        self.student = StudentNet(backbone, head).train()
        self.teacher = CapiModel(dataclasses.replace(mc, drop_path_rate=0.0), device=self.device)
        self.teacher.load_state_dict(backbone.state_dict())
        self.teacher.requires_grad_(False).eval()
        self.clustering = OnlineClustering(
            mc.embed_dim,
            cc.n_prototypes,
            target_temp=cc.target_temp,
            pred_temp=cc.pred_temp,
            n_sk_iter=cc.n_sk_iter,
            positionwise=cc.positionwise,
            bias=cc.bias,
            device=self.device,
        ).train()
        self.precision = training_precision(config.train.precision, self.device)
        self._wrap_parallel()
        fused = {"fused": True} if self.sync_free else {}  # only the fused kernels skip a step on the device
        self.optimizer = torch.optim.AdamW(
            build_param_groups(
                self.student,
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
        self.clustering_optimizer = torch.optim.AdamW(
            self.clustering.parameters(), lr=cc.lr, betas=cc.betas, weight_decay=cc.weight_decay, **fused
        )
        self._ema_pairs = (list(self.teacher.parameters()), list(self.student.backbone.parameters()))
        self._sum, self._max = reducers(self.context)
        self._autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
            if self.precision == "bf16"
            else contextlib.nullcontext
        )
        self._student_forward = self._student_ddp if self._student_ddp is not None else self.student
        self._teacher_encode = self.teacher.encode
        if config.train.compile:
            self._student_forward = torch.compile(self._student_forward)
            self._teacher_encode = torch.compile(self._teacher_encode)
        torch.manual_seed(rank_seed(config.train.seed, self.context.rank))
        self.checkpoints = checkpointing.RunCheckpoints(
            self.run_dir,
            config,
            self.context,
            student=self.student,
            teacher=self.teacher,
            optimizer=self.optimizer,
            clustering=self.clustering,
            clustering_optimizer=self.clustering_optimizer,
        )
        self.resumed_from = self._maybe_resume()

    # ---- set-up ---------------------------------------------------------------------------------------------
    def _wrap_parallel(self) -> None:
        self._student_ddp = None
        if not self.context.is_distributed:
            return
        if self.config.train.parallel == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

            bf16_cuda = self.device.type == "cuda" and self.precision == "bf16"
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_cuda else None
            kw = {"mp_policy": policy} if policy is not None else {}
            for model in (self.student.backbone, self.teacher):
                for block in [*model.encoder.blocks, *model.decoder.blocks]:
                    fully_shard(block, **kw)
            fully_shard(self.student, **kw)
            fully_shard(self.teacher, **kw)
            register_fsdp_forward_method(self.teacher, "encode")
            register_fsdp_forward_method(self.teacher, "forward_features")  # the k-NN monitor
        else:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._student_ddp = DistributedDataParallel(self.student, device_ids=device_ids)
        # the clustering layer stays replicated: same init everywhere, gradients averaged by hand
        broadcast_parameters(self.clustering)

    def _build_monitor(self):
        """The k-NN monitor of ``monitor.data`` (None when unset), built before the models so that a bad folder
        fails early."""
        mc = self.config.monitor
        if not mc.data:
            return None
        if mc.student and self.config.train.parallel == "fsdp" and self.context.is_distributed:
            raise ValueError("monitor.student=true is not available with train.parallel=fsdp; use ddp or drop it.")
        from capi_backbones.train.monitor import KnnMonitor  # reads images (features) and scores (evals)

        return KnnMonitor(mc, self.config.data.image_size, self.device)

    def evaluate_monitor(self, writer: MetricsWriter | None = None):
        """Run the k-NN monitor on the current teacher (and student) and record its scores at ``self.step``."""
        scores = self.monitor.evaluate(self.teacher, self.student.backbone, self._autocast)
        self.last_knn = scores
        if writer is not None and self.context.is_main:
            writer.write({"step": self.step, **scores.record(), "time": time.time()})
        student = "" if scores.student is None else f", student {scores.student:.3f}"
        logger.info("step %d | k-NN top-1: teacher %.3f%s (%.1f s)", self.step, scores.teacher, student, scores.seconds)
        return scores

    def _data_loader(self, start_step: int, end_step: int):
        dc = self.config.data
        stream = ImageStream(
            self.image_paths,
            TrainTransform(dc.image_size, dc.crop_scale, dc.hflip),
            seed=self.config.train.seed,
        )
        sampler = StepBatchSampler(
            self.config.optim.batch_size,
            rank=self.context.rank,
            world_size=self.context.world_size,
            start_step=start_step,
            total_steps=end_step,
        )
        collate = PositionMaskingCollate(self.masking, seed=self.config.train.seed)
        return build_loader(
            stream,
            sampler,
            collate,
            num_workers=dc.num_workers,
            pin_memory=self.device.type == "cuda",
            seed=self.config.train.seed,
        )

    # ---- schedules ------------------------------------------------------------------------------------------
    def schedules(self, step: int) -> dict[str, float]:
        oc, cc = self.config.optim, self.config.clustering
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

    # ---- one step -------------------------------------------------------------------------------------------
    def train_step(self, batch: MaskedBatch) -> StepMetrics:
        """Run step ``self.step`` on this rank's share of the global batch and advance the step counter.

        Without host synchronisation (``sync_free``, on accelerators) the returned metrics hold NaN until
        :meth:`flush_metrics` reads the values of the pending steps from the device (``run`` does so at log steps,
        checkpoints and stops); the non-finite guard then skips the updates on the device. On the CPU a read costs
        nothing, so each step reads its values at once and skips non-finite updates on the host."""
        start = time.perf_counter()
        step = self.step
        values = self.schedules(step)
        apply_schedules(self.optimizer, lr=values["lr"], weight_decay=values["weight_decay"])
        for group in self.clustering_optimizer.param_groups:
            group["lr"] = values["clustering_lr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.clustering_optimizer.zero_grad(set_to_none=True)
        batch = batch.to(self.device, non_blocking=True)
        if self.config.optim.accumulation_steps == 1:
            loss, clustering_loss, targets = self._forward_backward(batch)
        else:
            loss, clustering_loss, targets = self._forward_backward_accumulated(batch)

        # one reduction for the logged values, the finiteness verdict and the stop request
        entropy, usage = assignment_entropies(targets)
        n_tokens = targets.shape[0] * targets.shape[1]
        stop = 1.0 if self._signal_received else 0.0
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
            self.optimizer.found_inf = self.clustering_optimizer.found_inf = skip
            self.optimizer.step()
            ema_update_(*self._ema_pairs, torch.where(finite, values["momentum"], 1.0))
            all_reduce_grads_mean(self.clustering.parameters(), self.context.world_size)
            self.clustering_optimizer.step()
        elif finite:  # a read from the CPU: free
            self.optimizer.step()
            ema_update_(*self._ema_pairs, values["momentum"])
            all_reduce_grads_mean(self.clustering.parameters(), self.context.world_size)
            self.clustering_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.clustering_optimizer.zero_grad(set_to_none=True)
        self.step += 1
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
        if not self.sync_free:
            self.flush_metrics()
        return metrics

    def flush_metrics(self) -> list[StepMetrics]:
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
            self._stop_agreed = self._stop_agreed or row[4] > 0
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
                folder = self.run_dir / checkpointing.CHECKPOINT_DIR
                raise NonFiniteLossError(
                    f"{self.nan_streak} non-finite steps in a row (last at step {metrics.step}: loss={metrics.loss}, "
                    f"clustering loss={metrics.clustering_loss}). Lower optim.lr, check the data, or raise "
                    f"train.nan_limit; restart from the last checkpoint in {folder}."
                )
        self._unreported.extend(done)
        return done

    def _run_teacher(self, compute, batch: MaskedBatch):
        """``teacher_targets`` or ``teacher_assignments`` of the batch: the EMA encoder and the online clustering."""
        with self._autocast():
            return compute(
                self._teacher_encode,
                self.clustering,
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
        with self._autocast():
            logits = self._student_forward(batch.images, batch.visible_indices, batch.predict_indices)
        loss = capi_loss(logits.float(), teacher.targets, temperature=self.config.clustering.student_temp)
        loss.backward()
        return loss, teacher.clustering_loss, teacher.targets

    def _forward_backward_accumulated(self, batch: MaskedBatch) -> tuple[Tensor, Tensor, Tensor]:
        """The same gradients in ``optim.accumulation_steps`` passes over equal parts of the local batch.

        The teacher and Sinkhorn-Knopp run once over the whole batch without grad (their balance is over the
        global batch); the clustering loss and the student run per part, each loss scaled by 1 / parts, so
        the summed gradients are those of the batch means. Gradients are synchronised across ranks once, in
        the last part."""
        parts = self.config.optim.accumulation_steps
        size = batch.images.shape[0] // parts
        teacher = self._run_teacher(teacher_assignments, batch)
        losses, clustering_losses = [], []
        for i in range(parts):
            part = slice(i * size, (i + 1) * size)
            with self._gradient_sync(enabled=i == parts - 1):
                with self._autocast():
                    clustering_loss = self.clustering.loss(teacher.patches[:, part], teacher.assignments[:, part])
                (clustering_loss / parts).backward()
                with self._autocast():
                    logits = self._student_forward(
                        batch.images[part], batch.visible_indices[part], batch.predict_indices[part]
                    )
                loss = capi_loss(logits.float(), teacher.targets[part], temperature=self.config.clustering.student_temp)
                (loss / parts).backward()
            losses.append(loss.detach())
            clustering_losses.append(clustering_loss.detach())
        return torch.stack(losses).mean(), torch.stack(clustering_losses).mean(), teacher.targets

    def _gradient_sync(self, *, enabled: bool) -> contextlib.AbstractContextManager:
        """DDP / FSDP reduce the student's gradients only in the pass where ``enabled`` (the last one)."""
        if self._student_ddp is not None and not enabled:
            return self._student_ddp.no_sync()
        if self.context.is_distributed and self.config.train.parallel == "fsdp":
            self.student.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    # ---- checkpoints (their contents: checkpointing.RunCheckpoints) -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The full training state (collective under torch.distributed: call it on every rank)."""
        return self.checkpoints.state_dict(self.step, self.nan_streak)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.nan_streak = self.checkpoints.load_state_dict(state)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-{step}.pt`` (rank 0; collective under torch.distributed)."""
        path = self.checkpoints.save(self.step, self.nan_streak)
        if self.context.is_main and self.config.train.plot_every_checkpoint:
            self.draw_curves()
        return path

    def _maybe_resume(self) -> Path | None:
        resumed = self.checkpoints.resume()
        if resumed is None:
            return None
        path, self.step, self.nan_streak = resumed
        logger.info("Resumed from %s at step %d", path, self.step)
        return path

    # ---- the loop -------------------------------------------------------------------------------------------
    def request_stop(self, signum: int | None = None, frame=None) -> None:
        """Checkpoint at the end of the current step and return (the SIGTERM / SIGUSR1 handler)."""
        if signum is not None:
            logger.warning("Received signal %d: checkpointing at the end of this step, then exiting.", signum)
        self._signal_received = True

    def draw_curves(self) -> Path:
        """loss_curves.png (see ``run_dir.draw_run_curves``)."""
        return draw_run_curves(self.run_dir)

    def _prepare_run_dir(self) -> MetricsWriter:
        writer = MetricsWriter(self.run_dir / METRICS_FILE)
        if self.context.is_main:
            writer = prepare_run_dir(self.run_dir, self.config, self.step)
        return writer

    def run(self, max_steps: int | None = None, callbacks: Sequence[Callable[[StepMetrics], None]] = ()) -> TrainResult:
        """Train until ``optim.total_steps`` (or ``max_steps`` more steps, then checkpoint), a stop signal, or
        an error. ``callbacks`` are called with each step's metrics once its values are read (at once on the CPU;
        at the next log or checkpoint step when sync-free)."""
        tc = self.config.train
        start_step = self.step
        end_step = self.config.optim.total_steps
        if max_steps is not None:
            end_step = min(end_step, start_step + max_steps)
        result = TrainResult(run_dir=self.run_dir, start_step=start_step, end_step=start_step)
        writer = self._prepare_run_dir()
        if start_step >= end_step:
            logger.info("Nothing to do: %d of %d steps already done.", start_step, self.config.optim.total_steps)
            return result
        logger.info(
            "Training steps %d..%d: global batch %d (%d per rank x %d ranks) on %s, run dir %s",
            start_step, end_step - 1, self.config.optim.batch_size, self.local_batch, self.context.world_size,
            self.device, self.run_dir,
        )  # fmt: skip
        window: list[StepMetrics] = []
        last_saved = -1
        every = self.config.monitor.every
        if self.monitor is not None and start_step == 0:
            self.evaluate_monitor(writer)  # the random init: the baseline of the curve
        bar_on = self.config.train.progress_bar and self.context.is_main
        with handle_stop_signals(self.request_stop), progress_bar(bar_on, start_step, end_step) as bar:
            tick = time.perf_counter()
            for batch in self._data_loader(start_step, end_step):
                metrics = self.train_step(batch)
                now = time.perf_counter()
                metrics.seconds, tick = now - tick, now
                result.history.append(metrics)
                window.append(metrics)
                done = self.step
                if bar is not None:
                    bar.update(1)
                # sync-free: the values are read from the device at log and checkpoint steps, the same on every rank
                alone = not self.context.is_distributed
                if (
                    done % tc.log_every == 0
                    or done % tc.checkpoint_every == 0
                    or done == end_step
                    or (self._signal_received and alone)
                ):
                    self.flush_metrics()
                flushed, self._unreported = self._unreported, []
                if bar is not None and flushed:
                    images_per_s = self.config.optim.batch_size / metrics.seconds if metrics.seconds > 0 else 0.0
                    knn = "" if self.last_knn is None else f", k-NN {self.last_knn.teacher:.3f}"
                    bar.set_postfix_str(f"{images_per_s:.1f} img/s, loss {flushed[-1].loss:.4f}{knn}", refresh=False)
                for callback in callbacks:
                    for step_metrics in flushed:
                        callback(step_metrics)
                # ranks stop together: a signal seen after this step's all-reduce counts at the next flush
                stop = self._stop_agreed or (self._signal_received and alone)
                if done % tc.log_every == 0 or done == end_step or stop:
                    self._log(window, writer)
                    window = []
                if (
                    self.monitor is not None
                    and not stop
                    and (done % every == 0 or done == self.config.optim.total_steps)
                ):
                    self.evaluate_monitor(writer)
                    tick = time.perf_counter()  # the next step's time leaves the evaluation out
                if done % tc.checkpoint_every == 0 or stop:
                    result.last_checkpoint = self.save_checkpoint()
                    last_saved = done
                if stop:
                    result.stopped_by_signal = True
                    logger.warning("Stopped at step %d on request; resume with the same command.", done)
                    break
        if last_saved != self.step:
            result.last_checkpoint = self.save_checkpoint()
        if self.context.is_main:
            self.draw_curves()
        result.end_step = self.step
        return result

    def _log(self, window: list[StepMetrics], writer: MetricsWriter) -> None:
        if self.context.is_main:
            log_window(window, writer, self.config, None if self.last_knn is None else self.last_knn.teacher)


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


def first_readable_image(paths: Sequence[Path], root: str) -> None:
    """Decode images of ``paths`` until one works; a ValueError of one line when none does (a folder of broken
    or foreign files would otherwise fail in the data loader, after the models are built)."""
    first_error = None
    for path in paths:
        try:
            load_image(path)
            return
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            first_error = first_error or error
    raise ValueError(
        f"None of the {len(paths)} image files under {root} can be read (first: {first_error}). "
        "Point data.root at a folder of readable images."
    )


def train(config: TrainConfig, *, max_steps: int | None = None) -> TrainResult:
    """Join torchrun's process group if any, train, and leave the group."""
    context = init_distributed(config.train.device, option="train.device=")
    try:
        return Trainer(config, context=context).run(max_steps=max_steps)
    finally:
        shutdown_distributed(context)
