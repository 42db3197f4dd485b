"""The files of a run directory besides the checkpoints, and the progress a run shows.

``config.yaml`` (the settings; a run resumed with other settings keeps the previous file), ``metrics.jsonl`` (one
record per log step, and one per k-NN monitor evaluation), ``loss_curves.png``, the log line of each log step and
the progress bar. The checkpoints are ``train.checkpointing``'s.
"""

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from capi_backbones.atomic_files import atomic_write_text, remove_stale_temporaries
from capi_backbones.train.checkpointing import CHECKPOINT_DIR
from capi_backbones.train.config import ConfigError, TrainConfig, config_to_dict, dump_config, load_config_text
from capi_backbones.train.metrics import MetricsWriter, draw_curves, read_metrics

__all__ = [
    "CONFIG_FILE",
    "CURVES_FILE",
    "METRICS_FILE",
    "changed_keys",
    "draw_run_curves",
    "log_window",
    "prepare_run_dir",
    "progress_bar",
    "save_run_config",
]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "loss_curves.png"
CONFIG_FILE = "config.yaml"


def prepare_run_dir(run_dir: Path, config: TrainConfig, step: int) -> MetricsWriter:
    """Create the folder, remove temporaries of interrupted writes, write config.yaml and drop the metrics records
    past ``step`` (the resumed checkpoint's: they are re-done). Rank 0 only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        for path in remove_stale_temporaries(folder):
            logger.info("Removed %s, left by an interrupted write.", path)
    save_run_config(run_dir, config, step)
    writer = MetricsWriter(run_dir / METRICS_FILE)
    writer.truncate_after(step)
    return writer


def save_run_config(run_dir: Path, config: TrainConfig, step: int) -> None:
    """Write config.yaml. A run resumed (or restarted) at ``step`` with other settings keeps the previous file as
    ``config-until-step-N.yaml`` (N = ``step``: the steps it was used for) and says which keys changed: the file is
    never overwritten with settings the existing checkpoints were not made with."""
    path = run_dir / CONFIG_FILE
    text = dump_config(config)
    if path.exists() and (old := path.read_text(encoding="utf-8", errors="replace")) != text:
        changed = changed_keys(old, config)
        archive = run_dir / f"config-until-step-{step:08d}.yaml"
        copies = 1
        while archive.exists():
            copies += 1
            archive = run_dir / f"config-until-step-{step:08d}-{copies}.yaml"
        os.replace(path, archive)
        logger.warning(
            "The settings differ from the run's %s (%s): kept it as %s; %s now holds this run's settings.",
            CONFIG_FILE, ", ".join(changed) or "unreadable", archive.name, CONFIG_FILE,
        )  # fmt: skip
    atomic_write_text(path, text)


def changed_keys(old_yaml: str, config: TrainConfig) -> list[str]:
    """The ``section.key`` names whose values differ between a saved config.yaml text and ``config`` (empty when
    the text cannot be read as a config)."""
    try:
        old = config_to_dict(load_config_text(old_yaml))
    except (ConfigError, ImportError):
        return []
    new = config_to_dict(config)
    return [f"{s}.{k}" for s in new for k in new[s] if old.get(s, {}).get(k) != new[s][k]]


def draw_run_curves(run_dir: Path) -> Path:
    """loss_curves.png: the loss, the k-NN monitor's top-1 when there is one, the clustering loss and the target
    entropy, against the step."""
    records = read_metrics(run_dir / METRICS_FILE)
    knn = [key for key in ("knn_top1", "knn_top1_student") if any(key in r for r in records)]
    return draw_curves(records, run_dir / CURVES_FILE, ("loss", *knn, "clustering_loss", "target_entropy"))


def log_window(window: Sequence[Any], writer: MetricsWriter, config: TrainConfig, knn_top1: float | None) -> None:
    """The record of a log step (means over the window's finite steps, the schedules of its last step, the rate),
    appended to metrics.jsonl and logged as one line. ``window``: the StepMetrics since the previous log step."""
    if not window:
        return
    last = window[-1]
    finite = [m for m in window if m.finite] or window
    seconds = sum(m.seconds for m in window)
    images_per_s = len(window) * config.optim.batch_size / seconds if seconds > 0 else float("nan")

    def mean(key: str) -> float:
        return sum(getattr(m, key) for m in finite) / len(finite)

    record = {
        "step": last.step + 1,  # steps done
        "loss": mean("loss"),
        "clustering_loss": mean("clustering_loss"),
        "target_entropy": mean("target_entropy"),
        "prototype_entropy": mean("prototype_entropy"),
        "lr": last.lr,
        "weight_decay": last.weight_decay,
        "momentum": last.momentum,
        "clustering_lr": last.clustering_lr,
        "images_per_s": images_per_s,
        "steps_per_s": len(window) / seconds if seconds > 0 else float("nan"),
        "skipped_steps": sum(not m.finite for m in window),
        "time": time.time(),
    }
    writer.write(record)
    logger.info(
        "step %d/%d | %.1f img/s | loss %.4f | clustering %.4f | H(target) %.3f | H(usage) %.3f | "
        "lr %.3g | mom %.5f%s",
        last.step + 1, config.optim.total_steps, images_per_s, record["loss"], record["clustering_loss"],
        record["target_entropy"], record["prototype_entropy"], last.lr, last.momentum,
        "" if knn_top1 is None else f" | k-NN top-1 {knn_top1:.3f}",
    )  # fmt: skip


@contextlib.contextmanager
def progress_bar(enabled: bool, start_step: int, end_step: int) -> Iterator[Any]:
    """A tqdm bar over the steps (rate, ETA, img/s, loss, k-NN) when ``enabled`` and stderr is a terminal; log
    lines go above it. Yields None when there is no bar."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=end_step, initial=start_step, unit="step", desc="train", disable=None, dynamic_ncols=True)
    if bar.disable:  # not a terminal: the log lines are the progress
        bar.close()
        yield None
        return
    with logging_redirect_tqdm(), bar:
        yield bar
