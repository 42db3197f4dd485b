"""Training checkpoints: atomic writes, keep-last-K, discovery in a run directory, and RNG state capture.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``loss_curves.png`` and
``checkpoints/checkpoint-{step:08d}.pt`` where ``step`` is the number of steps done (the next step to run).
Checkpoints hold only tensors and plain Python values, so they load with ``torch.load(weights_only=True)``.
"""

import dataclasses
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

from capi_backbones.atomic_files import atomic_path
from capi_backbones.runtime.distributed import DistributedContext
from capi_backbones.runtime.seeding import rank_seed
from capi_backbones.train.config import TrainConfig, config_from_dict, config_to_dict
from capi_backbones.zip_checksums import zip_damage

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointNotFoundError",
    "RunCheckpoints",
    "check_resumable",
    "capture_rng_state",
    "checkpoint_path",
    "find_resume_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_newest_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "capi-backbones-train/1"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


class CheckpointNotFoundError(FileNotFoundError):
    """No training checkpoint where one was expected."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run's checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def find_resume_checkpoint(source: str | Path) -> Path:
    """A checkpoint file, or the newest checkpoint of a run directory."""
    source = Path(source)
    if source.is_file():
        return source
    if source.is_dir():
        found = list_checkpoints(source)
        if found:
            return found[-1][1]
        raise CheckpointNotFoundError(
            f"No checkpoints in {source / CHECKPOINT_DIR}. Give a run directory of `capi-backbones train` "
            "that has saved at least one checkpoint, or a checkpoint file."
        )
    raise CheckpointNotFoundError(f"{source} is neither a checkpoint file nor a run directory.")


def save_checkpoint(state: dict[str, Any], path: str | Path, *, keep_last: int | None = None) -> Path:
    """``torch.save`` through the atomic writer (temporary file, fsync, rename, fsync of the folder).
    With ``keep_last``, older checkpoints of the same folder beyond the newest ``keep_last`` are deleted."""
    path = Path(path)
    # a file object, so that a full disk raises OSError (hence WriteError), not torch's RuntimeError
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        writer = _WriteErrorKeeper(file)
        try:
            torch.save(state, writer)
        except Exception:
            if writer.error is not None:  # torch's zip writer reports a failed write as a RuntimeError of its own
                raise writer.error from None
            raise
    logger.info("Saved checkpoint %s", path)
    if keep_last is not None and path.parent.name == CHECKPOINT_DIR:
        for _, old in list_checkpoints(path.parent.parent)[:-keep_last]:
            old.unlink(missing_ok=True)
            logger.debug("Deleted old checkpoint %s", old)
    return path


class _WriteErrorKeeper:
    """A file object for ``torch.save`` that keeps the OSError of a failed write (a full disk), which torch's zip
    writer would otherwise replace by a RuntimeError when it unwinds."""

    def __init__(self, file) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = find_resume_checkpoint(path)
    try:
        damage = zip_damage(path)  # torch.load does not compare the CRC-32s: the state would hold a wrong value
        state = None if damage else torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a foreign or unreadable file
        raise ValueError(f"Could not read training checkpoint {path}: {error}") from error
    if damage is not None:
        raise ValueError(f"Could not read training checkpoint {path}: it is {damage}.")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a capi-backbones training checkpoint (expected format {CHECKPOINT_FORMAT!r}). "
            "To load released weights use capi_backbones.from_pretrained."
        )
    return state


def load_newest_checkpoint(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """The newest readable checkpoint of ``run_dir`` as ``(path, state)``, or None when it has none.

    A newest checkpoint that cannot be read (truncated by a crash or a full disk) is skipped with a warning
    naming it, and the previous one is used; when none can be read, the error of the newest is raised."""
    found = list_checkpoints(run_dir)
    first_error = None
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path, map_location)
        except ValueError as error:
            first_error = first_error or error
            logger.warning("Skipping unreadable checkpoint %s (%s); trying the previous one.", path, error)
    if first_error is not None:
        raise first_error
    return None


# ---- RNG state (tensors and plain values only) ----------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and Python RNG states of this process."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---- the state of a run ---------------------------------------------------------------------------------------------
@dataclass
class RunCheckpoints:
    """The checkpoint side of a training run: what a checkpoint holds (full model and optimizer states, the
    clustering layer and its optimizer, the step, the non-finite streak, every rank's RNG states and the
    config), writing it to ``run_dir/checkpoints``, and resuming from the newest one.

    Model states are full (unsharded) and keyed by parameter name, for DDP, FSDP and single-process runs alike,
    so a checkpoint resumes under any of them. Saving is collective under torch.distributed (call it on every
    rank); only rank 0 writes."""

    run_dir: Path
    config: TrainConfig
    context: DistributedContext
    student: nn.Module
    teacher: nn.Module
    optimizer: Optimizer
    clustering: nn.Module
    clustering_optimizer: Optimizer

    def state_dict(self, step: int, nan_streak: int) -> dict[str, Any]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.context.is_distributed)
        rng = capture_rng_state()
        if self.context.is_distributed:
            rng_states: list[Any] = [None] * self.context.world_size
            dist.all_gather_object(rng_states, rng)
        else:
            rng_states = [rng]
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "world_size": self.context.world_size,
            "config": config_to_dict(self.config),
            "student": get_model_state_dict(self.student, options=options),
            "teacher": get_model_state_dict(self.teacher, options=options),
            "optimizer": get_optimizer_state_dict(self.student, self.optimizer, options=options),
            "clustering": self.clustering.state_dict(),
            "clustering_optimizer": self.clustering_optimizer.state_dict(),
            "nan_streak": nan_streak,
            "rng": rng_states,
        }

    def load_state_dict(self, state: dict[str, Any]) -> tuple[int, int]:
        """Restore everything; returns ``(step, nan_streak)``."""
        check_resumable(state, self.config)
        options = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(self.student, state["student"], options=options)
        set_model_state_dict(self.teacher, state["teacher"], options=options)
        set_optimizer_state_dict(self.student, self.optimizer, state["optimizer"], options=options)
        self.clustering.load_state_dict(state["clustering"])
        self.clustering_optimizer.load_state_dict(state["clustering_optimizer"])
        step = int(state["step"])
        if state["world_size"] == self.context.world_size:
            restore_rng_state(state["rng"][self.context.rank])
        else:
            logger.warning(
                "Checkpoint was written by %d ranks, this run has %d: data order and schedules continue exactly, "
                "but the stochastic-depth RNG is reseeded.", state["world_size"], self.context.world_size,
            )  # fmt: skip
            torch.manual_seed(rank_seed(self.config.train.seed, self.context.rank, step))
        return step, int(state["nan_streak"])

    def save(self, step: int, nan_streak: int) -> Path:
        """Write ``checkpoints/checkpoint-{step}.pt`` (rank 0), keeping the newest ``train.keep_checkpoints``."""
        state = self.state_dict(step, nan_streak)
        path = checkpoint_path(self.run_dir, step)
        if self.context.is_main:
            save_checkpoint(state, path, keep_last=self.config.train.keep_checkpoints)
        if self.context.is_distributed:
            dist.barrier()
        return path

    def resume(self) -> tuple[Path, int, int] | None:
        """Load the newest readable checkpoint of the run directory: ``(path, step, nan_streak)``, or None when
        it has none. Refused when ``train.resume`` is off."""
        found = list_checkpoints(self.run_dir)
        if not found:
            return None
        if not self.config.train.resume:
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints (newest: {found[-1][1].name}) and train.resume=false. "
                "Set train.resume=true to continue that run, or choose another train.output_dir."
            )
        path, state = load_newest_checkpoint(self.run_dir)
        step, nan_streak = self.load_state_dict(state)
        return path, step, nan_streak


def check_resumable(state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse a checkpoint whose model or clustering settings differ from ``config`` (its tensors would not fit);
    warn for optim and data settings (a run may be continued with, e.g., more steps)."""
    saved = config_from_dict(state["config"])
    for section in ("model", "clustering"):
        old, new = dataclasses.asdict(getattr(saved, section)), dataclasses.asdict(getattr(config, section))
        diff = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
        if diff:
            details = ", ".join(f"{section}.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"Cannot resume: the checkpoint's {section} settings differ ({details}). "
                "Use the run's own config.yaml, or a new train.output_dir."
            )
    for section in ("optim", "data"):
        if getattr(saved, section) != getattr(config, section):
            logger.warning("Resuming with %s settings that differ from the checkpoint's.", section)
