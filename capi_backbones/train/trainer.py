"""The CAPI pretraining loop: it runs the steps in order, with their logs, k-NN monitoring, checkpoints and stops.

The models and optimizers: ``train.build``. One step (spec section 7), its metrics and the non-finite guard:
``train.step_runner`` (teacher forward + clustering loss backward; student forward + CAPI loss backward; AdamW step
on the student; EMA update of the teacher; clustering optimizer step; a step whose losses are not finite skips all
three updates, and ``train.nan_limit`` such steps in a row stop the run). What a checkpoint holds, writing and
resuming it: ``train.checkpointing``. The run directory's other files (config, metrics, curves) and the progress
shown: ``train.run_dir``. The k-NN monitor: ``train.monitor``.

SIGTERM or SIGUSR1 asks for a checkpoint at the end of the current step and a clean exit. Resuming from a
checkpoint restores models, optimizers, step counter (hence schedules and data order) and the RNG states,
so an interrupted run continues bit for bit (on CPU).
"""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capi_backbones.runtime.distributed import DistributedContext, init_distributed, shutdown_distributed
from capi_backbones.runtime.signals import handle_stop_signals
from capi_backbones.train import checkpointing
from capi_backbones.train.build import build_run_models
from capi_backbones.train.config import TrainConfig
from capi_backbones.train.data import (
    ImageStream,
    PositionMaskingCollate,
    StepBatchSampler,
    TrainTransform,
    build_loader,
    find_images,
    first_readable_image,
)
from capi_backbones.train.masking import MaskedBatch, MaskingCollator
from capi_backbones.train.metrics import MetricsWriter
from capi_backbones.train.run_dir import METRICS_FILE, draw_run_curves, log_window, prepare_run_dir, progress_bar
from capi_backbones.train.step_runner import StepMetrics, StepRunner

__all__ = ["TrainResult", "Trainer", "train"]

logger = logging.getLogger(__name__)


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
    """Pretraining of a :class:`TrainConfig`: checks the data, builds the models (``train.build``), resumes from the
    run directory's newest checkpoint when ``train.resume`` is set, and runs the steps (``train.step_runner``)."""

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
        self._unreported: list[StepMetrics] = []  # flushed steps not yet handed to run()'s callbacks
        self._signal_received = False  # set by the signal handler, on this rank only
        mc, oc = config.model, config.optim
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

        self.models = build_run_models(config, self.context, sync_free=self.sync_free)
        m = self.models  # the trainer's names for its parts
        self.student, self.teacher, self.clustering, self.precision = m.student, m.teacher, m.clustering, m.precision
        self.optimizer, self.clustering_optimizer = m.optimizer, m.clustering_optimizer
        self.stepper = StepRunner(
            config, self.context, m, sync_free=self.sync_free, checkpoints=self.run_dir / checkpointing.CHECKPOINT_DIR
        )
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
        scores = self.monitor.evaluate(self.teacher, self.student.backbone, self.models.autocast)
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

    # ---- one step (its work: step_runner.StepRunner) -------------------------------------------------------
    def train_step(self, batch: MaskedBatch) -> StepMetrics:
        """Run step ``self.step`` on this rank's share of the global batch and advance the step counter.

        Without host synchronisation (``sync_free``, on accelerators) the returned metrics hold NaN until
        :meth:`flush_metrics` reads the values of the pending steps from the device (``run`` does so at log steps,
        checkpoints and stops). On the CPU each step's values are read at once."""
        metrics = self.stepper.run(self.step, batch, stop_requested=self._signal_received)
        self.step += 1
        if not self.sync_free:
            self.flush_metrics()
        return metrics

    def flush_metrics(self) -> list[StepMetrics]:
        """Read the values of the pending steps (see ``StepRunner.flush``; raises NonFiniteLossError after
        ``train.nan_limit`` non-finite steps in a row) and keep them for ``run``'s callbacks; returns them."""
        done = self.stepper.flush()
        self._unreported.extend(done)
        return done

    @property
    def nan_streak(self) -> int:
        """Non-finite steps in a row, up to the last one read."""
        return self.stepper.nan_streak

    @nan_streak.setter
    def nan_streak(self, value: int) -> None:
        self.stepper.nan_streak = value

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
                stop = self.stepper.stop_agreed or (self._signal_received and alone)
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


def train(config: TrainConfig, *, max_steps: int | None = None) -> TrainResult:
    """Join torchrun's process group if any, train, and leave the group."""
    context = init_distributed(config.train.device, option="train.device=")
    try:
        return Trainer(config, context=context).run(max_steps=max_steps)
    finally:
        shutdown_distributed(context)
