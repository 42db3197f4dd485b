"""CAPI pretraining: masking, online clustering, heads, losses, EMA, schedules, parameter groups and the loop.

Run it with ``capi-backbones train CONFIG.yaml key=value ...`` or ``python -m capi_backbones.train ...``
(``torchrun --nproc_per_node N -m capi_backbones.train ...`` for several GPUs). This package imports the
models (and ``pretrained`` for export), never ``features`` or ``viz``. The config (``train.config``) is plain
data: importing it, or this package, does not import torch (``capi-backbones train --print-config`` stays light);
the torch modules are imported on first use of their names.
"""

from typing import TYPE_CHECKING

from capi_backbones.lazy_exports import lazy_exports
from capi_backbones.train.config import PRESETS, ConfigError, TrainConfig, load_config, save_config

_LAZY = {  # public name -> defining module, imported on first attribute access (PEP 562)
    "ExportResult": "capi_backbones.train.export",
    "export_teacher": "capi_backbones.train.export",
    "load_teacher": "capi_backbones.train.export",
    "NonFiniteLossError": "capi_backbones.train.step_runner",
    "StepMetrics": "capi_backbones.train.step_runner",
    "Trainer": "capi_backbones.train.trainer",
    "TrainResult": "capi_backbones.train.trainer",
    "train": "capi_backbones.train.trainer",
}

if TYPE_CHECKING:
    from capi_backbones.train.export import ExportResult, export_teacher, load_teacher
    from capi_backbones.train.step_runner import NonFiniteLossError, StepMetrics
    from capi_backbones.train.trainer import Trainer, TrainResult, train


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


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
