"""CAPI pretraining: masking, online clustering, heads, losses, EMA, schedules, parameter groups and the loop.

Run it with ``capi-backbones train CONFIG.yaml key=value ...`` or ``python -m capi_backbones.train ...``
(``torchrun --nproc_per_node N -m capi_backbones.train ...`` for several GPUs). This package imports the
models (and ``pretrained`` for export), never ``features`` or ``viz``.
"""

from capi_backbones.train.config import PRESETS, ConfigError, TrainConfig, load_config, save_config
from capi_backbones.train.export import ExportResult, export_teacher, load_teacher
from capi_backbones.train.trainer import NonFiniteLossError, StepMetrics, Trainer, TrainResult, train

__all__ = [
    "PRESETS",
    "ConfigError",
    "ExportResult",
    "NonFiniteLossError",
    "StepMetrics",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "export_teacher",
    "load_config",
    "load_teacher",
    "save_config",
    "train",
]
