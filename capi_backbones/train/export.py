"""Export the teacher (EMA) backbone of a training run: what the official releases are (``student_ema``).

``.safetensors`` carries the architecture and the training image size in its metadata (loaded models get it back
as ``model.default_image_size``, which feature extraction uses by default); ``.pth`` / ``.pt`` is the official
layout (``torch.save`` of ``{"backbone." + key: tensor}``), which has no room for the image size.
Both load with ``capi_backbones.from_pretrained``.
"""

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from capi_backbones.constants import TEACHER_EXPORT_FORMATS
from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.train.checkpointing import find_resume_checkpoint, load_checkpoint
from capi_backbones.train.config import config_from_dict

__all__ = [
    "EXPORT_FORMATS",
    "ExportResult",
    "TeacherCheckpoint",
    "export_teacher",
    "load_teacher",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = TEACHER_EXPORT_FORMATS  # suffix -> format


@dataclass
class TeacherCheckpoint:
    model: CapiModel  # the EMA backbone, eval mode, fp32 on CPU, no stochastic depth
    step: int  # training steps done when the checkpoint was written
    checkpoint: Path
    image_size: int  # side of the square training crops (data.image_size)


@dataclass
class ExportResult:
    path: Path
    format: str  # "safetensors" | "official"
    step: int
    config: CapiConfig
    checkpoint: Path
    image_size: int  # the training image size (recorded in the file for .safetensors)


def load_teacher(source: str | Path) -> TeacherCheckpoint:
    """The teacher backbone of a training checkpoint file, or of a run directory's newest checkpoint."""
    path = find_resume_checkpoint(source)
    state = load_checkpoint(path)
    train_config = config_from_dict(state["config"])
    config = dataclasses.replace(train_config.model, drop_path_rate=0.0)
    model = CapiModel(config, device="meta")
    model.load_state_dict(state["teacher"], strict=True, assign=True)
    model.default_image_size = train_config.data.image_size
    return TeacherCheckpoint(
        model=model.float().eval(), step=int(state["step"]), checkpoint=path, image_size=train_config.data.image_size
    )


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
    from capi_backbones.pretrained import save_official_checkpoint, save_safetensors  # not at import time

    teacher = load_teacher(source)
    if fmt == "safetensors":
        save_safetensors(teacher.model, out)  # records teacher.model.default_image_size
    else:
        save_official_checkpoint(teacher.model, out)
        logger.info(
            "The official .pth layout cannot record the training image size (%d); export to .safetensors to keep it.",
            teacher.image_size,
        )
    logger.info("Exported the teacher of %s (step %d) to %s", teacher.checkpoint, teacher.step, out)
    return ExportResult(
        path=out,
        format=fmt,
        step=teacher.step,
        config=teacher.model.config,
        checkpoint=teacher.checkpoint,
        image_size=teacher.image_size,
    )
