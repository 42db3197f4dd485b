"""Export the teacher (EMA) backbone of a training run: what the official releases are (``student_ema``).

``.safetensors`` carries the architecture in its metadata; ``.pth`` / ``.pt`` is the official layout
(``torch.save`` of ``{"backbone." + key: tensor}``). Both load with ``capi_backbones.from_pretrained``.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.pretrained import save_official_checkpoint, save_safetensors
from capi_backbones.train.checkpointing import load_checkpoint, resolve_checkpoint
from capi_backbones.train.config import config_from_dict

__all__ = ["EXPORT_FORMATS", "ExportResult", "TeacherCheckpoint", "export_teacher", "load_teacher"]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = {".safetensors": "safetensors", ".pth": "official", ".pt": "official"}


@dataclass
class TeacherCheckpoint:
    model: CapiModel  # the EMA backbone, eval mode, fp32 on CPU, no stochastic depth
    step: int  # training steps done when the checkpoint was written
    checkpoint: Path


@dataclass
class ExportResult:
    path: Path
    format: str  # "safetensors" | "official"
    step: int
    config: CapiConfig
    checkpoint: Path


def load_teacher(source: str | Path) -> TeacherCheckpoint:
    """The teacher backbone of a training checkpoint file, or of a run directory's newest checkpoint."""
    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    config = config_from_dict(state["config"]).model.to_capi_config(drop_path_rate=0.0)
    model = CapiModel(config, device="meta")
    model.load_state_dict(state["teacher"], strict=True, assign=True)
    return TeacherCheckpoint(model=model.float().eval(), step=int(state["step"]), checkpoint=path)


def export_teacher(source: str | Path, out: str | Path) -> ExportResult:
    """Write the teacher backbone of ``source`` (run directory or checkpoint) to ``out``, in the format
    given by its suffix: ``.safetensors``, or ``.pth`` / ``.pt`` for the official layout."""
    out = Path(out)
    fmt = EXPORT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"Cannot tell the export format of {str(out)!r} from its suffix {out.suffix!r}. "
            f"Use one of {', '.join(EXPORT_FORMATS)} (.pth/.pt = official layout with 'backbone.' keys)."
        )
    teacher = load_teacher(source)
    save = save_safetensors if fmt == "safetensors" else save_official_checkpoint
    save(teacher.model, out)
    logger.info("Exported the teacher of %s (step %d) to %s", teacher.checkpoint, teacher.step, out)
    return ExportResult(
        path=out, format=fmt, step=teacher.step, config=teacher.model.config, checkpoint=teacher.checkpoint
    )
