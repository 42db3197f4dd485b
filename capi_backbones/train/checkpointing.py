"""Training checkpoints: atomic writes, keep-last-K, discovery in a run directory, and RNG state capture.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``loss_curves.png`` and
``checkpoints/checkpoint-{step:08d}.pt`` where ``step`` is the number of steps done (the next step to run).
Checkpoints hold only tensors and plain Python values, so they load with ``torch.load(weights_only=True)``.
"""

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capi_backbones.atomic_files import atomic_path

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointNotFoundError",
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
        torch.save(state, file)
    logger.info("Saved checkpoint %s", path)
    if keep_last is not None and path.parent.name == CHECKPOINT_DIR:
        for _, old in list_checkpoints(path.parent.parent)[:-keep_last]:
            old.unlink(missing_ok=True)
            logger.debug("Deleted old checkpoint %s", old)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = find_resume_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(f"Could not read training checkpoint {path}: {error}") from error
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
