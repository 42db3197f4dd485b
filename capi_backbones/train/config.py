"""Pretraining configuration: nested dataclasses whose defaults are the official ViT-L/14 recipe.

The official default config (facebookresearch/capi ``default_pretrain_config.yaml``) and paper Table 6:
16384 prototypes, teacher/student temperatures 0.06/0.12, 3 Sinkhorn-Knopp iterations, AdamW lr 1e-3,
betas (0.9, 0.95), weight decay 0.1, 10% warmup then cosine truncated at 80%, EMA momentum 0.999 -> 1,
inverse-block masking (65%) with roll, 5% of the masked patches predicted, crops of scale (0.6, 1) at 224 px.

Batch size: ``optim.batch_size`` is the GLOBAL batch (images per optimizer step over all ranks). Each rank
loads ``batch_size // world_size`` images, so the same config gives the same data order and the same
schedules on 1 or 64 GPUs. (The official code instead sets a per-GPU batch: 512 x 32 GPUs = 16384.)
``optim.accumulation_steps`` splits each rank's share into that many forward/backward passes of one optimizer
step: the teacher's Sinkhorn-Knopp targets are still balanced over the whole global batch, so the step is the
same up to float sums (stochastic depth draws per pass). ``train.activation_checkpointing`` (full | selective)
trades compute for memory and changes no number.

Load a YAML file (or a preset name) and apply ``section.key=value`` overrides with :func:`load_config`.
"""

import contextlib
import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from capi_backbones.atomic_files import atomic_write_text
from capi_backbones.constants import DEFAULT_IMAGE_SIZE
from capi_backbones.models import ARCHITECTURES, CapiConfig

TRAIN_EXTRA_HINT = "pip install 'capi-backbones[train]'"

__all__ = [
    "ClusteringConfig",
    "ConfigError",
    "DataConfig",
    "MonitorConfig",
    "OptimConfig",
    "PRESETS",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "architecture",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_config_text",
    "save_config",
]


class ConfigError(ValueError):
    """A config file, preset or override that does not fit the schema."""


def _yaml():
    """PyYAML, imported on first use with the install hint when it is missing."""
    try:
        import yaml
    except ImportError as error:
        raise ImportError(f"Training configs need PyYAML ({error}). Install it with: {TRAIN_EXTRA_HINT}") from None
    return yaml


ACTIVATION_CHECKPOINTING = ("none", "full", "selective")
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")
MONITOR_REPRESENTATIONS = ("pooled", "avg_patch")
RECIPE_DROP_PATH_RATE = 0.2  # batch-subset stochastic depth of the student in the official recipe


def architecture(name: str) -> dict[str, Any]:
    """The ``model`` section of a released architecture (``capi_vitl14`` ...), from the one architecture table.
    Stochastic depth is left out: it is a training setting (the recipe's 0.2)."""
    values = ARCHITECTURES[name].to_dict()
    del values["drop_path_rate"]
    return values


def _recipe_model() -> CapiConfig:
    return dataclasses.replace(ARCHITECTURES["capi_vitl14"], drop_path_rate=RECIPE_DROP_PATH_RATE)


@dataclass
class ClusteringConfig:
    n_prototypes: int = 16384  # K, prototypes of the online clustering and outputs of the student head
    target_temp: float = 0.06  # Sinkhorn-Knopp temperature of the teacher logits
    pred_temp: float = 0.12  # temperature of the clustering layer's own loss
    student_temp: float = 0.12  # temperature of the student's CAPI loss
    n_sk_iter: int = 3  # Sinkhorn-Knopp iterations
    positionwise: bool = True  # balance prototypes per patch position (the paper's SK)
    bias: bool = True  # bias of the clustering linear layer
    lr: float = 5e-4  # clustering AdamW peak lr (same schedule shape as the student)
    final_lr: float = 0.0  # lr the cosine heads to (truncated, so never reached)
    betas: tuple[float, float] = (0.9, 0.95)  # clustering AdamW betas
    weight_decay: float = 0.01  # PyTorch's AdamW default (the official config sets none)


@dataclass
class OptimConfig:
    total_steps: int = 500_000  # optimizer steps of the whole run (sets the schedules)
    batch_size: int = 16384  # GLOBAL batch: images per step summed over all ranks
    accumulation_steps: int = 1  # split each rank's share into this many forward/backward passes (same step)
    lr: float = 1e-3  # student AdamW peak lr
    final_lr: float = 0.0  # lr the cosine heads to (truncated at truncate_cos, so never reached)
    betas: tuple[float, float] = (0.9, 0.95)  # student AdamW betas
    weight_decay: float = 0.1  # student AdamW weight decay (biases 0, norm weights x norm_wd_mult)
    warmup_fraction: float = 0.1  # linear warmup over this fraction of total_steps
    truncate_cos: float = 0.8  # the cosine stops at this fraction of its course
    patch_embed_lr_mult: float = 0.2  # lr multiplier of patch_embed
    rope_lr_mult: float = 0.0  # lr multiplier of the RoPE frequencies
    norm_wd_mult: float = 0.1  # weight-decay multiplier of norm weights
    momentum_start: float = 1.0  # EMA momentum at step 0
    momentum: float = 0.999  # EMA momentum at the end of warmup
    momentum_final: float = 1.0  # EMA momentum the cosine heads to

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * self.total_steps))


@dataclass
class DataConfig:
    root: str = ""  # folder of images, searched recursively
    image_size: int = DEFAULT_IMAGE_SIZE  # square crop side in pixels (a multiple of the patch size)
    crop_scale: tuple[float, float] = (0.6, 1.0)  # RandomResizedCrop area fraction
    hflip: bool = True  # random horizontal flip
    mask_ratio: float = 0.65  # fraction of patches hidden from the student
    prediction_ratio: float = 0.05  # fraction of the masked patches the student predicts
    masking: str = "inverse_block"  # uniform | block | inverse_block
    roll: bool = True  # roll the mask on the torus (inverse_block)
    num_workers: int = 8  # DataLoader workers per rank (augmentations are seeded per sample)


@dataclass
class TrainerConfig:
    output_dir: str = "runs/capi"  # run directory: config, checkpoints, metrics, loss curves
    seed: int = 0  # seeds weights, data order, augmentations and masks
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast where native: CUDA sm80+, CPUs with AVX512-BF16/AMX) | bf16 | fp32
    parallel: str = "ddp"  # ddp | fsdp (torch.distributed.fsdp.fully_shard) when launched with torchrun
    compile: bool = False  # torch.compile the teacher and student forwards
    activation_checkpointing: str = "none"  # none | full | selective: recompute student blocks in backward
    progress_bar: bool = True  # a tqdm bar (steps, img/s, loss, ETA) on rank 0 when stderr is a terminal
    log_every: int = 20  # steps between progress lines / metric records
    checkpoint_every: int = 3750  # steps between checkpoints (also one at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept in OUTPUT_DIR/checkpoints
    resume: bool = True  # continue from the newest checkpoint of output_dir when there is one
    nan_limit: int = 3  # stop after this many non-finite steps in a row (each one skips its update)
    plot_every_checkpoint: bool = True  # redraw loss_curves.png at every checkpoint


@dataclass
class MonitorConfig:
    """A k-NN monitor while training: the teacher's k-NN top-1 on a labelled folder every ``every`` steps."""

    data: str = ""  # labelled folder: train/ + test/ (or val/) class folders, as `eval classify` reads; "" = off
    every: int = 1000  # steps between evaluations (also one before the first step of a run); 2% of a tiny run
    student: bool = False  # also the student's k-NN top-1
    k: int = 20  # neighbours of the k-NN vote (DINOv2's k-NN)
    representation: str = "pooled"  # pooled (the official global representation) | avg_patch
    max_images: int = 5000  # at most this many images per split (evenly spaced), to bound time and memory
    batch_size: int = 256  # images per forward


@dataclass
class TrainConfig:
    model: CapiConfig = field(default_factory=_recipe_model)  # the backbone; drop_path_rate is the student's
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> "TrainConfig":
        """Check the values that the dataclass types cannot; returns self."""
        for section in fields(self):
            for entry in fields(getattr(self, section.name)):
                value = getattr(getattr(self, section.name), entry.name)
                numbers = value if isinstance(value, tuple) else (value,)
                if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                    raise ConfigError(f"{section.name}.{entry.name} must be a finite number, got {value}.")
        if self.data.image_size % self.model.patch_size:
            p = self.model.patch_size
            raise ConfigError(
                f"data.image_size={self.data.image_size} is not a multiple of model.patch_size={p}; "
                f"use e.g. {max(self.data.image_size // p, 1) * p}."
            )
        if self.data.masking not in ("uniform", "block", "inverse_block"):
            raise ConfigError(f"data.masking={self.data.masking!r}; allowed: uniform, block, inverse_block.")
        if self.train.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.train.device!r}; allowed: auto, cpu, cuda.")
        if self.train.precision not in TRAIN_PRECISIONS:
            raise ConfigError(f"train.precision={self.train.precision!r}; allowed: {', '.join(TRAIN_PRECISIONS)}.")
        if self.monitor.representation not in MONITOR_REPRESENTATIONS:
            allowed = ", ".join(MONITOR_REPRESENTATIONS)
            raise ConfigError(f"monitor.representation={self.monitor.representation!r}; allowed: {allowed}.")
        if self.train.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel={self.train.parallel!r}; allowed: ddp, fsdp.")
        if self.train.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ConfigError(
                f"train.activation_checkpointing={self.train.activation_checkpointing!r}; "
                f"allowed: {', '.join(ACTIVATION_CHECKPOINTING)}."
            )
        positive = {
            "optim.total_steps": self.optim.total_steps,
            "optim.batch_size": self.optim.batch_size,
            "optim.accumulation_steps": self.optim.accumulation_steps,
            "clustering.n_prototypes": self.clustering.n_prototypes,
            "train.log_every": self.train.log_every,
            "train.checkpoint_every": self.train.checkpoint_every,
            "train.keep_checkpoints": self.train.keep_checkpoints,
            "train.nan_limit": self.train.nan_limit,
            "monitor.every": self.monitor.every,
            "monitor.k": self.monitor.k,
            "monitor.max_images": self.monitor.max_images,
            "monitor.batch_size": self.monitor.batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}.")
        if self.optim.batch_size % self.optim.accumulation_steps:
            raise ConfigError(
                f"optim.batch_size={self.optim.batch_size} is not divisible by "
                f"optim.accumulation_steps={self.optim.accumulation_steps}; the global batch is split evenly."
            )
        low, high = self.data.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {self.data.crop_scale}.")
        if not 0 < self.data.mask_ratio < 1 or not 0 < self.data.prediction_ratio <= 1:
            raise ConfigError(
                f"data.mask_ratio must be in (0, 1) and data.prediction_ratio in (0, 1], got "
                f"{self.data.mask_ratio} and {self.data.prediction_ratio}."
            )
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.data.num_workers}.")
        return self


# ---- presets: overrides of the ViT-L defaults ----------------------------------------------------------------------
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # A laptop-CPU run in minutes: 8x8 patches of 14 px, a 4-block 128-wide encoder, 512 prototypes.
    # prediction_ratio 0.2 keeps the official count of 8 predicted patches per image at this grid size;
    # EMA momentum 0.99 lets the teacher follow the student within a run of a few hundred steps.
    "tiny": {
        "model": dict(
            embed_dim=128, depth=4, num_heads=4, pred_embed_dim=128, pred_depth=2, pred_num_heads=4, drop_path_rate=0.1
        ),
        "clustering": dict(n_prototypes=512),
        "optim": dict(total_steps=1000, batch_size=64, lr=1e-3, momentum=0.99),
        "data": dict(image_size=112, prediction_ratio=0.2, num_workers=0),
        "train": dict(output_dir="runs/capi_tiny", log_every=10, checkpoint_every=200, device="cpu"),
    },
    **{
        size: {"model": architecture(f"capi_{size}"), "train": dict(output_dir=f"runs/capi_{size}")}
        for size in ("vits14", "vitb14", "vitl14")
    },
}


# ---- dict <-> dataclass (OmegaConf structured configs type and check the values) ----------------------------------
def config_to_dict(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples as lists), ready for YAML."""

    def plain(value):
        return list(value) if isinstance(value, tuple) else value

    return {
        section.name: {f.name: plain(getattr(getattr(config, section.name), f.name)) for f in fields(section.type)}
        for section in fields(TrainConfig)
    }


def _omegaconf():
    """OmegaConf, imported on first use with the install hint when it is missing."""
    try:
        import omegaconf
    except ImportError as error:
        raise ImportError(
            f"Training configs need OmegaConf and PyYAML ({error}). Install them with: {TRAIN_EXTRA_HINT}"
        ) from None
    return omegaconf


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def _valid_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in _section_types().items() for f in fields(cls)]


def _field_type(section: str, key: str | None = None) -> Any:
    """The annotation of ``section.key`` (the section's class when ``key`` is None); a ConfigError naming the
    valid keys when there is no such key."""
    sections = _section_types()
    if section not in sections:
        raise ConfigError(f"Unknown config section {section!r}. Valid keys: {', '.join(_valid_keys())}.")
    if key is None:
        return sections[section]
    hints = typing.get_type_hints(sections[section])
    if key not in hints:
        raise ConfigError(f"Unknown config key '{section}.{key}'. Valid keys: {', '.join(_valid_keys())}.")
    return hints[key]


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return f"a list of {len(typing.get_args(annotation))} values like [0.6, 1.0]"
    return getattr(annotation, "__name__", str(annotation))


def _prepared(value: Any, annotation: Any) -> Any:
    """The two readings OmegaConf does not do itself: an integral float for an int (``1e3``, which YAML and the
    command line give as a float or a string), and a ``[a, b]`` string from the command line for a tuple."""
    if annotation is int and isinstance(value, float | str) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
            if number.is_integer():
                return int(number)
    if typing.get_origin(annotation) is tuple and isinstance(value, str):
        with contextlib.suppress(Exception):
            return _yaml().safe_load(value)
    return value


def config_from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Apply a nested dict ``{section: {key: value}}`` on top of ``base`` (the defaults when None).

    The values are typed and checked by OmegaConf against the dataclasses (a structured config); its errors
    become one line naming the key, the expected type and the value."""
    if not isinstance(values, dict):
        raise ConfigError(f"A config must be a mapping of sections, got {type(values).__name__}.")
    updates: dict[str, dict[str, Any]] = {}
    for section, entries in values.items():
        _field_type(section)
        if not isinstance(entries, dict):
            raise ConfigError(f"Config section {section!r} must be a mapping of keys, got {entries!r}.")
        updates[section] = {key: _prepared(value, _field_type(section, key)) for key, value in entries.items()}
    omegaconf = _omegaconf()
    merged = omegaconf.OmegaConf.structured(base if base is not None else TrainConfig)
    try:
        merged = omegaconf.OmegaConf.merge(merged, updates)
    except omegaconf.errors.OmegaConfBaseException:
        for section, entries in updates.items():  # find the value it refused, for a message that names it
            for key, value in entries.items():
                try:
                    omegaconf.OmegaConf.merge(merged, {section: {key: value}})
                except omegaconf.errors.OmegaConfBaseException:
                    raise ConfigError(
                        f"{section}.{key} expects {_type_name(_field_type(section, key))}, got {value!r}."
                    ) from None
        raise
    try:
        return omegaconf.OmegaConf.to_object(merged)
    except omegaconf.errors.OmegaConfBaseException as error:  # an ${interpolation} that does not resolve
        raise ConfigError(f"{error.full_key}: {str(error).splitlines()[0]}.") from None
    except ValueError as error:  # CapiConfig's own checks (head dim, registers)
        raise ConfigError(f"model: {error}") from None


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.key=value`` strings, typed by the dataclass field."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(
                f"Override {item!r} is not of the form section.key=value (e.g. optim.lr=5e-4). "
                f"Valid keys: {', '.join(_valid_keys())}."
            )
        _field_type(section, key)
        nested.setdefault(section, {})[key] = value
    return config_from_dict(nested, config)


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Build a config from a preset name or a YAML file (or the defaults when None), then apply the overrides.

    A YAML file may name a preset to start from with a top-level ``preset: tiny`` entry.
    """
    config = TrainConfig()
    if source is not None:
        name = str(source)
        if name in PRESETS:
            config = config_from_dict(PRESETS[name])
        else:
            path = Path(source)
            if not path.is_file():
                raise ConfigError(
                    f"Config {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file."
                )
            values = _read_yaml(path)
            if not isinstance(values, dict):
                raise ConfigError(f"{path} must hold a mapping of sections, got {type(values).__name__}.")
            preset = values.pop("preset", None)
            if preset is not None:
                if preset not in PRESETS:
                    raise ConfigError(f"{path}: unknown preset {preset!r}. Available: {', '.join(PRESETS)}.")
                config = config_from_dict(PRESETS[preset])
            try:
                config = config_from_dict(values, config)
            except ConfigError as error:
                raise ConfigError(f"{path}: {error}") from None
    if overrides:
        config = apply_overrides(config, overrides)
    return config.validate()


def load_config_text(text: str) -> TrainConfig:
    """The config of a YAML text as ``dump_config`` writes it (a run's config.yaml)."""
    try:
        values = _yaml().safe_load(text) or {}
    except _yaml().YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}".splitlines()[0]) from None
    return config_from_dict(values)


def _read_yaml(path: Path) -> Any:
    yaml = _yaml()
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.constructor.ConstructorError as error:
        line = f" at line {error.problem_mark.line + 1}" if error.problem_mark else ""
        raise ConfigError(
            f"{path}: unsupported YAML{line}: {error.problem}. Configs hold plain values only "
            "(numbers, strings, booleans, lists, mappings; no !!python tags)."
        ) from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}: not valid YAML{line}: {getattr(error, 'problem', None) or error}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; give a YAML config or a preset name.") from None


def dump_config(config: TrainConfig) -> str:
    """The config as YAML text (what ``save_config`` writes and ``load_config`` reads back)."""
    return _yaml().safe_dump(config_to_dict(config), sort_keys=False)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML (atomically)."""
    atomic_write_text(path, dump_config(config))
