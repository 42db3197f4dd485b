"""Many probes trained at once, the official way: one module holding a probe per (representation, lr, wd),
one AdamW (betas 0.9/0.95, no weight decay on biases, lr scaled by batch / 256), linear warmup then a cosine to 0,
one cross-entropy over all probes; the best (lr, wd) of each representation is picked on held-out data.

The official launcher runs the script on 8 processes of 128 images: a global batch of 1024 and lr = grid lr x
1024 / 256. ``ProbeTrainingConfig`` defaults to that global batch, computed in one process (or in micro-batches
whose gradients add up to the batch's, ``micro_batch_size``), so the numbers do not depend on the machine.

Training reads its batches from a function of the iteration (``batches(i) -> (features, labels)``), so an
interrupted run resumes from its checkpoint on exactly the same data: see ``CachedBatches`` for features held in
memory and ``classification.AugmentedBatches`` for images augmented through the frozen backbone.
"""

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from capi_backbones.atomic_files import atomic_path
from capi_backbones.evals.defaults import (
    DEFAULT_PROBE_DTYPE,
    DEFAULT_PROBE_SEED,
    LR_REFERENCE_BATCH,
    OFFICIAL_BATCH_SIZE,
    OFFICIAL_ITERATIONS,
    OFFICIAL_LEARNING_RATES,
    OFFICIAL_WARMUP_ITERATIONS,
    OFFICIAL_WEIGHT_DECAYS,
    PROBE_DTYPES,
)
from capi_backbones.evals.probes import ATTENTION_HEAD_DIM, AttentiveProbe, LinearProbe
from capi_backbones.runtime.precision import native_bf16
from capi_backbones.runtime.seeding import probe_order_seed
from capi_backbones.schedules import probe_lr_schedule
from capi_backbones.zip_checksums import zip_damage

__all__ = [
    "OFFICIAL_BATCH_SIZE",
    "OFFICIAL_LEARNING_RATES",
    "OFFICIAL_WEIGHT_DECAYS",
    "PROBE_DTYPES",
    "CachedBatches",
    "ProbeGrid",
    "ProbeTrainingConfig",
    "predict_grid",
    "resolve_probe_dtype",
    "train_probe_grid",
]

logger = logging.getLogger(__name__)

BETAS = (0.9, 0.95)
Batches = Callable[[int], tuple[dict[str, Tensor], Tensor]]


@dataclass(frozen=True)
class ProbeTrainingConfig:
    """How the grid is trained (the defaults are the official ones)."""

    iterations: int = OFFICIAL_ITERATIONS  # optimisation steps
    warmup_iterations: int = OFFICIAL_WARMUP_ITERATIONS  # linear warmup from 0, then a cosine down to 0 at the end
    batch_size: int = OFFICIAL_BATCH_SIZE  # the global batch; lr = grid lr * batch_size / 256
    learning_rates: tuple[float, ...] = OFFICIAL_LEARNING_RATES
    weight_decays: tuple[float, ...] = OFFICIAL_WEIGHT_DECAYS
    seed: int = DEFAULT_PROBE_SEED  # probe initialisation and data order
    checkpoint_every: int = 1_250  # iterations between checkpoints (when a checkpoint path is given)
    micro_batch_size: int | None = None  # compute each batch in pieces of this size (same step, less memory)
    dtype: str = DEFAULT_PROBE_DTYPE  # "bfloat16": forward and backward under bf16 autocast (faster; not official)

    def __post_init__(self) -> None:
        if self.iterations < 1 or not 0 <= self.warmup_iterations <= self.iterations:
            raise ValueError(
                f"Need iterations >= 1 and 0 <= warmup_iterations <= iterations, got {self.iterations} and "
                f"{self.warmup_iterations}."
            )
        if self.batch_size < 1 or not self.learning_rates or not self.weight_decays:
            raise ValueError("batch_size must be positive and the lr and wd grids non-empty.")
        if not all(math.isfinite(v) and v > 0 for v in self.learning_rates) or not all(
            math.isfinite(v) and v >= 0 for v in self.weight_decays
        ):
            raise ValueError(
                f"Learning rates must be finite and above 0, weight decays finite and 0 or more; got "
                f"{list(self.learning_rates)} and {list(self.weight_decays)}."
            )
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be positive, got {self.micro_batch_size}.")
        if self.dtype not in PROBE_DTYPES:
            raise ValueError(f"The probe dtype must be 'float32' or 'bfloat16', got '{self.dtype}'.")

    @property
    def is_official(self) -> bool:
        """Whether this is the official schedule, batch and grid (the seed and checkpointing aside)."""
        return (
            self.iterations == OFFICIAL_ITERATIONS
            and self.warmup_iterations == OFFICIAL_WARMUP_ITERATIONS
            and self.batch_size == OFFICIAL_BATCH_SIZE
            and tuple(self.learning_rates) == OFFICIAL_LEARNING_RATES
            and tuple(self.weight_decays) == OFFICIAL_WEIGHT_DECAYS
            and self.dtype == "float32"
        )


def resolve_probe_dtype(dtype: str, device: str | torch.device) -> str:
    """The probe training dtype for ``dtype``: ``"float32"`` (the official one) and ``"bfloat16"`` as they are;
    ``"auto"``: ``"bfloat16"`` where ``device`` multiplies bf16 natively (CUDA sm80+, CPUs with AVX512-BF16 or AMX;
    ``capi_backbones.runtime.precision.native_bf16``), else ``"float32"`` (emulated bf16 is slower)."""
    if dtype == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    if dtype not in PROBE_DTYPES:
        raise ValueError(f"The probe dtype must be 'auto', 'float32' or 'bfloat16', got '{dtype}'.")
    return dtype


class ProbeGrid(nn.Module):
    """One probe per (representation, learning rate, weight decay).

    ``dims``: ``{representation: (kind, D)}`` with kind ``"linear"`` (inputs (B, D)) or ``"attentive"`` (inputs
    (B, N, D)). ``forward(features)`` takes ``{representation: tensor}`` and returns the logits of every probe,
    stacked as (B, C, P) in the order of ``keys``.
    """

    def __init__(
        self,
        dims: dict[str, tuple[str, int]],
        num_classes: int,
        *,
        learning_rates: Sequence[float] = OFFICIAL_LEARNING_RATES,
        weight_decays: Sequence[float] = OFFICIAL_WEIGHT_DECAYS,
        head_dim: int = ATTENTION_HEAD_DIM,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"Classification needs at least 2 classes, got {num_classes}.")
        self.dims = dict(dims)
        self.num_classes = num_classes
        self.keys: list[tuple[str, float, float]] = []
        probes = []
        for name, (kind, dim) in self.dims.items():
            for lr in learning_rates:
                for wd in weight_decays:
                    if kind == "linear":
                        probes.append(LinearProbe(dim, num_classes))
                    elif kind == "attentive":
                        probes.append(AttentiveProbe(dim, num_classes, head_dim=head_dim))
                    else:
                        raise ValueError(f"Unknown probe kind '{kind}' for '{name}': use 'linear' or 'attentive'.")
                    self.keys.append((name, float(lr), float(wd)))
        self.probes = nn.ModuleList(probes)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return torch.stack(
            [probe(features[name]) for probe, (name, _, _) in zip(self.probes, self.keys, strict=True)], dim=-1
        )

    def param_groups(self, batch_size: int) -> list[dict]:
        """AdamW groups: lr = grid lr * batch_size / 256 (stored as ``base_lr``), no weight decay on biases."""
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for probe, (_, lr, wd) in zip(self.probes, self.keys, strict=True):
            for name, param in probe.named_parameters():
                key = (lr * batch_size / LR_REFERENCE_BATCH, 0.0 if name.endswith("bias") else wd)
                groups.setdefault(key, []).append(param)
        return [{"params": params, "base_lr": lr, "lr": 0.0, "weight_decay": wd} for (lr, wd), params in groups.items()]


@dataclass
class CachedBatches:
    """Shuffled batches of features held in memory: batch ``i`` is a function of ``seed`` and ``i`` only.

    Each epoch is a seeded permutation, cut into ``len // batch_size`` full batches (the last partial one is
    dropped, as the official loader does; a set smaller than one batch gives one batch of all of it).
    """

    features: dict[str, Tensor]
    labels: Tensor
    batch_size: int
    seed: int = DEFAULT_PROBE_SEED
    _order: tuple[int, Tensor] | None = field(default=None, init=False, repr=False)

    @property
    def effective_batch_size(self) -> int:
        return min(self.batch_size, len(self.labels))

    def __call__(self, iteration: int) -> tuple[dict[str, Tensor], Tensor]:
        size = self.effective_batch_size
        per_epoch = len(self.labels) // size
        epoch, position = divmod(iteration, per_epoch)
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(probe_order_seed(self.seed, epoch))
            self._order = (epoch, torch.randperm(len(self.labels), generator=generator))
        index = self._order[1][position * size : (position + 1) * size]
        return {name: tensor[index] for name, tensor in self.features.items()}, self.labels[index]


def train_probe_grid(
    grid: ProbeGrid,
    batches: Batches,
    config: ProbeTrainingConfig,
    *,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    checkpoint: str | os.PathLike | None = None,
    trained_on: str | None = None,
    progress: bool = True,
) -> ProbeGrid:
    """Train every probe of ``grid`` for ``config.iterations`` steps on ``batches(i)``; returns ``grid`` (trained).

    ``batch_size``: the real batch size of ``batches`` for the lr scaling (default ``config.batch_size``).
    With ``checkpoint`` (a file), the grid and optimizer are saved atomically every ``config.checkpoint_every``
    steps and at the end, and a run finds the checkpoint and continues from it (a finished one trains nothing).
    ``trained_on``: an identity of the training data (e.g. a hash of the feature cache) stored in the checkpoint; a
    checkpoint of other data is discarded and the grid trained from scratch, one of other settings is refused.
    Features are cast to float32 and moved to ``device``; the grid is trained there and left there. With
    ``config.micro_batch_size``, each batch runs in pieces whose gradients sum to the whole batch's.
    """
    device = torch.device(device)
    grid.to(device).train()
    optimizer = torch.optim.AdamW(grid.param_groups(batch_size or config.batch_size), betas=BETAS)
    schedule = probe_lr_schedule(config.iterations, config.warmup_iterations)
    start = _resume(grid, optimizer, config, checkpoint, trained_on)
    bar = tqdm(total=config.iterations, initial=start, unit="it", desc="probes", disable=not progress)
    for iteration in range(start, config.iterations):
        features, labels = batches(iteration)
        for group in optimizer.param_groups:
            group["lr"] = schedule[iteration].item() * group["base_lr"]
        optimizer.zero_grad(set_to_none=True)
        size = len(labels)
        piece = config.micro_batch_size or size
        dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32  # bf16: cast once, not per probe
        for first in range(0, size, piece):
            part = {name: features[name][first : first + piece].to(device, dtype) for name in grid.dims}
            part_labels = labels[first : first + piece].to(device, torch.long)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16"):
                logits = grid(part)  # (b, C, P)
            loss = F.cross_entropy(logits.float(), part_labels[:, None].expand(-1, logits.shape[-1]))
            (loss * (len(part_labels) / size) if piece < size else loss).backward()
        optimizer.step()
        bar.update(1)
        if iteration % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = iteration + 1
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.iterations):
            _save(grid, optimizer, config, done, checkpoint, trained_on)
    bar.close()
    return grid.eval()


def _checked_config(config: ProbeTrainingConfig, grid: ProbeGrid) -> dict:
    settings = {key: value for key, value in asdict(config).items() if key != "micro_batch_size"}  # same steps
    return {"config": settings, "keys": [list(k) for k in grid.keys], "num_classes": grid.num_classes}


def _save(grid: ProbeGrid, optimizer, config: ProbeTrainingConfig, iteration: int, path, trained_on) -> None:
    state = {"grid": grid.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration}
    state |= {**_checked_config(config, grid), "trained_on": trained_on}
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        try:
            torch.save(state, file)
        except RuntimeError as error:  # torch's writer turns a failed write (disk full) into a RuntimeError when it
            cause = error.__context__  # closes; the OSError of the Python file is underneath: raise that one
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from None


def _resume(grid: ProbeGrid, optimizer, config: ProbeTrainingConfig, path, trained_on) -> int:
    if path is None or not Path(path).exists():
        return 0
    damage = zip_damage(path)  # torch.load does not compare the CRC-32s
    if damage is not None:
        raise ValueError(
            f"Probe checkpoint '{path}' is {damage}. Delete it (or use another --out folder) to train the probes again."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("trained_on") != trained_on:
        logger.warning("Probe checkpoint '%s' was trained on other data (the features changed): training again.", path)
        return 0
    saved = {key: state.get(key) for key in ("config", "keys", "num_classes")}
    if saved != _checked_config(config, grid):
        raise ValueError(
            f"Probe checkpoint '{path}' was trained with other settings or classes. Delete it (or use another "
            "--out folder) to start over."
        )
    grid.load_state_dict(state["grid"])
    optimizer.load_state_dict(state["optimizer"])
    logger.info("Resuming the probes from %s at iteration %d.", path, state["iteration"])
    return int(state["iteration"])


@torch.no_grad()
def predict_grid(
    grid: ProbeGrid, features: dict[str, Tensor], *, batch_size: int = 256, device: str | torch.device | None = None
) -> Tensor:
    """Logits (N, C, P) of every probe on ``features`` (``{representation: (N, ...)}``), on the CPU."""
    device = next(grid.parameters()).device if device is None else torch.device(device)
    grid.to(device).eval()
    n = len(next(iter(features.values())))
    parts = []
    for start in range(0, n, batch_size):
        batch = {name: features[name][start : start + batch_size].to(device, torch.float32) for name in grid.dims}
        parts.append(grid(batch).cpu())
    return torch.cat(parts)
