"""Read checkpoint files safely (no arbitrary unpickling) and write them atomically.

Reading sniffs the file's first bytes, so a mis-named, truncated or non-checkpoint file gets a clear
``CheckpointError``. PyTorch files go through ``torch.load(weights_only=True, mmap=True)``; safetensors through
``safe_open``. Writing goes to a temporary file in the target folder, renamed only once complete.
"""

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from capi_backbones.atomic_files import atomic_path
from capi_backbones.models import CapiConfig
from capi_backbones.pretrained.architecture import BACKBONE_PREFIX
from capi_backbones.pretrained.errors import CheckpointError

__all__ = [
    "CONFIG_METADATA_KEY",
    "LoadedCheckpoint",
    "read_checkpoint",
    "save_official_checkpoint",
    "save_safetensors",
]

logger = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "capi_config"  # safetensors metadata entry holding CapiConfig as JSON

_MAGIC = (  # (prefix, what it is) for files that are not checkpoints
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<!DOCTYPE", "an HTML page"),
    (b"<html", "an HTML page"),
    (b"<?xml", "an XML document"),
)


@dataclass
class LoadedCheckpoint:
    path: Path
    format: str  # "pytorch" or "safetensors"
    tensors: dict[str, Tensor]  # flat key -> tensor, as stored (nested dicts joined with ".")
    config: CapiConfig | None = None  # from safetensors metadata, when present
    skipped: tuple[str, ...] = field(default=())  # non-tensor entries (epoch counters, ...)
    memory_mapped: bool = False  # tensors are views of a file mapping, not private memory


def _fix_hint(path: Path) -> str:
    return (
        f"If it was downloaded, delete {path} and download it again; "
        "otherwise pass a PyTorch .pth (torch.save of a state dict) or a .safetensors file."
    )


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes). {_fix_hint(path)}")
    if head.startswith(b"PK\x03\x04"):
        return "pytorch-zip"
    if head[:1] == b"\x80":  # legacy pickle-based torch.save
        return "pytorch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    what = next((desc for magic, desc in _MAGIC if head.lstrip().lower().startswith(magic.lower())), None)
    if what is None:
        is_text = all(32 <= b < 127 or b in b"\t\r\n" for b in head)
        what = "a text file" if is_text else f"an unknown format (first bytes {head[:8]!r})"
    raise CheckpointError(f"{path} is not a checkpoint: it looks like {what}. {_fix_hint(path)}")


def _flatten(obj: Mapping, prefix: str, tensors: dict[str, Tensor], skipped: list[str]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            tensors[name] = value
        elif isinstance(value, Mapping):
            _flatten(value, name + ".", tensors, skipped)
        else:
            skipped.append(name)


def _read_pytorch(path: Path, mmap: bool) -> tuple[dict[str, Tensor], list[str]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # any failure to parse means a damaged file or one holding arbitrary objects
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            raise CheckpointError(
                f"{path} holds Python objects other than tensors, which are not unpickled for safety "
                f"({reason}). Load it yourself with torch.load(..., weights_only=False) if you trust it, and "
                "save its state dict with torch.save(model.state_dict(), path)."
            ) from error
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({reason}); it may be truncated. {_fix_hint(path)}"
        ) from error
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors. {_fix_hint(path)}")
    tensors: dict[str, Tensor] = {}
    skipped: list[str] = []
    _flatten(obj, "", tensors, skipped)
    return tensors, skipped


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], CapiConfig | None]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as error:
        raise CheckpointError(
            f"{path} could not be read as safetensors ({error}); it may be truncated. {_fix_hint(path)}"
        ) from error
    config = None
    if CONFIG_METADATA_KEY in metadata:
        try:
            config = CapiConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{path} has an invalid {CONFIG_METADATA_KEY!r} metadata entry: {error}") from error
    return tensors, config


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read every tensor of a local ``.pth`` / ``.safetensors`` file (format sniffed from its bytes)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory (pass the folder to from_pretrained instead)" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"Checkpoint file {path} {what}.")
    kind = _sniff(path)
    config, skipped = None, []
    if kind == "safetensors":
        tensors, config = _read_safetensors(path)
    else:
        tensors, skipped = _read_pytorch(path, mmap=kind == "pytorch-zip")
    if not tensors:
        raise CheckpointError(f"{path} contains no tensors. {_fix_hint(path)}")
    if skipped:
        logger.info("Ignored %d non-tensor entries of %s: %s", len(skipped), path.name, ", ".join(skipped[:10]))
    fmt = "safetensors" if kind == "safetensors" else "pytorch"
    return LoadedCheckpoint(
        path=path,
        format=fmt,
        tensors=tensors,
        config=config,
        skipped=tuple(skipped),
        memory_mapped=kind in ("safetensors", "pytorch-zip"),  # safe_open and torch.load(mmap=True) map the file
    )


def _cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    state = model.state_dict()
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:
        raise ValueError(f"Cannot save a model with tensors on the meta device ({len(on_meta)}, e.g. {on_meta[0]}).")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_safetensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's state dict as safetensors (atomic), with its ``CapiConfig`` as JSON in the metadata,
    so that ``from_pretrained(path)`` needs no ``arch``."""
    metadata = {"format": "pt", "library": "capi-backbones"}
    config = getattr(model, "config", None)
    if isinstance(config, CapiConfig):
        metadata[CONFIG_METADATA_KEY] = json.dumps(config.to_dict(), sort_keys=True)
    tensors = _cpu_state_dict(model)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    logger.info("Saved %d tensors to %s", len(tensors), path)
    return Path(path)


def save_official_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``{"backbone." + key: tensor}`` with ``torch.save`` (atomic): the layout of the released files."""
    tensors = {BACKBONE_PREFIX + k: v for k, v in _cpu_state_dict(model).items()}
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)
    logger.info("Saved %d tensors to %s", len(tensors), path)
    return Path(path)
