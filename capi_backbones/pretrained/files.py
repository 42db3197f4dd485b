"""Checkpoint files: tell their format by structure, read them safely, write them atomically.

Reading: a mis-named, truncated or non-checkpoint file gets a clear ``CheckpointError``. PyTorch files go through
``torch.load(weights_only=True, mmap=True)`` (no arbitrary unpickling), after the CRC-32 of every member of their zip
is checked (``torch.load`` does not check it, so a changed byte would load as a wrong weight); safetensors through
``safe_open`` (the format has no checksum). A
``save_pretrained`` folder holds ``model.safetensors`` (config also in its metadata) and ``config.json``.
Writing goes to a temporary file in the target folder, renamed only once complete.
"""

import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from capi_backbones.atomic_files import atomic_path, atomic_write_text
from capi_backbones.models import CapiConfig
from capi_backbones.models.config import MAX_IMAGE_SIZE
from capi_backbones.pretrained.errors import CheckpointError
from capi_backbones.pretrained.matching import add_backbone_prefix, architecture_name
from capi_backbones.zip_checksums import zip_damage

__all__ = [
    "CONFIG_METADATA_KEY",
    "HUB_CONFIG_FILE",
    "HUB_WEIGHTS_FILE",
    "IMAGE_SIZE_METADATA_KEY",
    "LoadedCheckpoint",
    "check_complete",
    "folder_files",
    "read_checkpoint",
    "read_config_json",
    "save_official_checkpoint",
    "save_pretrained_folder",
    "save_safetensors",
    "sniff_format",
]

logger = logging.getLogger(__name__)

CONFIG_METADATA_KEY = "capi_config"  # safetensors metadata entry holding CapiConfig as JSON
IMAGE_SIZE_METADATA_KEY = "image_size"  # safetensors metadata: the training crop side in pixels, e.g. "224"
HUB_WEIGHTS_FILE = "model.safetensors"  # the weights of a save_pretrained folder / Hub repo
HUB_CONFIG_FILE = "config.json"  # CapiConfig.to_dict() as JSON, next to it
_MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit on the JSON header

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
    image_size: int | None = None  # the training image size, from safetensors metadata, when present
    skipped: tuple[str, ...] = field(default=())  # non-tensor entries (epoch counters, ...)
    memory_mapped: bool = False  # tensors are views of a file mapping, not private memory


def _fix_hint(path: Path) -> str:
    return (
        f"If it was downloaded, delete {path} and download it again; "
        "otherwise pass a PyTorch .pth (torch.save of a state dict) or a .safetensors file."
    )


def _safetensors_header(f: BinaryIO, file_size: int) -> tuple[int, dict] | None:
    """(length, parsed JSON header) when the file starts like safetensors (u64 little-endian length, then that
    many bytes of a JSON object), else None."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        return None
    length = int.from_bytes(head, "little")
    if not 2 <= length <= min(file_size - 8, _MAX_SAFETENSORS_HEADER):
        return None
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, ValueError):
        return None
    return (length, header) if isinstance(header, dict) else None


def sniff_format(path: str | os.PathLike) -> str:
    """``"pytorch-zip"``, ``"safetensors"`` or ``"pytorch-legacy"``, told by the file's structure: the zip
    signature of ``torch.save``, a safetensors header that parses, or (only then) a pickle's protocol byte.
    Raises ``CheckpointError`` naming what the file looks like otherwise (HTML page, image, text, ...)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if not head:
            raise CheckpointError(f"Checkpoint {path} is empty (0 bytes). {_fix_hint(path)}")
        if head.startswith(b"PK\x03\x04"):
            return "pytorch-zip"
        if _safetensors_header(f, size) is not None:
            return "safetensors"
        length = int.from_bytes(head[:8], "little")
        if len(head) > 8 and head[8:9] == b"{" and 2 <= length <= _MAX_SAFETENSORS_HEADER:  # safetensors' layout
            what = (
                f"cut inside its header (the header is {length} bytes, the file has {size - 8} after the length)"
                if length > size - 8
                else "damaged: its header is not a JSON object"
            )
            raise CheckpointError(f"{path} is a safetensors file {what}. {_fix_hint(path)}")
    if head[:1] == b"\x80":  # legacy pickle-based torch.save (pickle protocol 2+)
        return "pytorch-legacy"
    what = next((desc for magic, desc in _MAGIC if head.lstrip().lower().startswith(magic.lower())), None)
    if what is None:
        is_text = all(32 <= b < 127 or b in b"\t\r\n" for b in head)
        what = "a text file" if is_text else f"an unknown format (first bytes {head[:8]!r})"
    raise CheckpointError(f"{path} is not a checkpoint: it looks like {what}. {_fix_hint(path)}")


def check_complete(path: str | os.PathLike) -> str:
    """Check by structure that ``path`` is a whole checkpoint, not a cut-off one; returns ``sniff_format``.

    A zip must have its central directory (written last), every member inside the file and every member's bytes
    matching its CRC-32; a safetensors file must end where its header's last tensor does. Legacy pickles carry no
    such structure and pass."""
    path = Path(path)
    kind = sniff_format(path)
    size = path.stat().st_size
    if kind == "pytorch-zip":
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise CheckpointError(f"{path} is a cut-off or damaged zip ({error}). {_fix_hint(path)}") from error
        end = max((m.header_offset + m.compress_size for m in members), default=0)
        if not members or end > size:
            raise CheckpointError(f"{path} is a cut-off or damaged zip (members past its end). {_fix_hint(path)}")
        _check_zip_checksums(path)
    elif kind == "safetensors":
        with open(path, "rb") as f:
            length, header = _safetensors_header(f, size)
        try:
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (KeyError, TypeError, IndexError, ValueError) as error:
            raise CheckpointError(f"{path} has a damaged safetensors header ({error!r}). {_fix_hint(path)}") from error
        expected = 8 + length + max(ends, default=0)
        if expected != size:
            raise CheckpointError(
                f"{path} is a cut-off safetensors file: its header describes {expected} bytes, the file has {size}. "
                + _fix_hint(path)
            )
    return kind


def _check_zip_checksums(path: Path) -> None:
    damage = zip_damage(path)
    if damage is not None:
        raise CheckpointError(f"{path} is {damage}. {_fix_hint(path)}")


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
        with warnings.catch_warnings():  # two lines on stderr before the one-line refusal of such a file
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            if path.suffix == ".safetensors":  # torch.load hands any path so named to safetensors: give it the bytes
                with open(path, "rb") as file:
                    obj = torch.load(file, map_location="cpu", weights_only=True)
            else:
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


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], CapiConfig | None, int | None]:
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
    image_size = metadata.get(IMAGE_SIZE_METADATA_KEY)
    if image_size is not None and not (image_size.isdigit() and 0 < int(image_size) <= MAX_IMAGE_SIZE):
        raise CheckpointError(
            f"{path} has an invalid {IMAGE_SIZE_METADATA_KEY!r} metadata entry {image_size[:20]!r} (a number of "
            f"pixels from 1 to {MAX_IMAGE_SIZE} is expected)."
        )
    return tensors, config, None if image_size is None else int(image_size)


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read every tensor of a local ``.pth`` / ``.safetensors`` file (format sniffed from its bytes)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory (pass the folder to from_pretrained instead)" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"Checkpoint file {path} {what}.")
    kind = sniff_format(path)
    config, image_size, skipped = None, None, []
    if kind == "safetensors":
        tensors, config, image_size = _read_safetensors(path)
    else:
        if kind == "pytorch-zip":
            _check_zip_checksums(path)
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
        image_size=image_size,
        skipped=tuple(skipped),
        memory_mapped=kind in ("safetensors", "pytorch-zip"),  # safe_open and torch.load(mmap=True) map the file
    )


def read_config_json(path: Path) -> CapiConfig:
    """The ``CapiConfig`` of a ``config.json`` (``"model_type"``, written for the Hub's tooling, must say capi
    when present; files written before it existed have none)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"it holds a {type(values).__name__}, not an object")
        model_type = values.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"its model_type is {model_type!r}, not {MODEL_TYPE!r}: it is not a CAPI config")
        return CapiConfig.from_dict(values)
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is not a valid CapiConfig JSON: {error}. Fix or delete it.") from error


def folder_files(path: Path) -> tuple[Path, CapiConfig | None]:
    """A ``save_pretrained`` folder -> (its weights file, the config of its ``config.json`` if present)."""
    weights_file = path / HUB_WEIGHTS_FILE
    if not weights_file.is_file():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".pt"))
        raise FileNotFoundError(
            f"Folder {path} has no {HUB_WEIGHTS_FILE} (checkpoint files there: {found or 'none'}). "
            "Pass a folder written by save_pretrained, or the checkpoint file itself."
        )
    config_file = path / HUB_CONFIG_FILE
    return weights_file, read_config_json(config_file) if config_file.is_file() else None


def _cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    state = model.state_dict()
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:
        raise ValueError(f"Cannot save a model with tensors on the meta device ({len(on_meta)}, e.g. {on_meta[0]}).")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")  # safetensors' two wordings (new, old)


def _os_error_of(error: Exception, path: Path) -> Exception:
    """The OSError behind a writer's own error (torch: the Python file's OSError underneath; safetensors: "(os error
    N)" or, in older versions, "Os { code: N" in its message), naming ``path``, so that the atomic writer reports a
    full disk as one WriteError; else ``error`` itself (a bug keeps its traceback)."""
    cause = error.__context__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if cause is not None:
        return OSError(cause.errno, cause.strerror or str(cause), str(path))
    match = _OS_ERROR.search(str(error))
    if match is not None:
        code = int(match.group(1) or match.group(2))
        return OSError(code, os.strerror(code), str(path))
    return error


def save_safetensors(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state dict as safetensors (atomic), with its ``CapiConfig`` as JSON in the metadata,
    so that ``from_pretrained(path)`` needs no ``arch``, and its ``default_image_size`` (the training image size).
    ``metadata``: extra string entries to store."""
    metadata = {**(metadata or {}), "format": "pt", "library": "capi-backbones"}
    config = getattr(model, "config", None)
    if isinstance(config, CapiConfig):
        metadata[CONFIG_METADATA_KEY] = json.dumps(config.to_dict(), sort_keys=True)
    image_size = getattr(model, "default_image_size", None)
    if image_size is not None:
        metadata[IMAGE_SIZE_METADATA_KEY] = str(image_size)
    tensors = _cpu_state_dict(model)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as error:  # a failed write (disk full) as safetensors' Rust writer words it
            raise _os_error_of(error, tmp) from error
    logger.info("Saved %d tensors to %s", len(tensors), path)
    return Path(path)


def save_official_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``{"backbone." + key: tensor}`` with ``torch.save`` (atomic): the layout of the released files."""
    tensors = add_backbone_prefix(_cpu_state_dict(model))
    with atomic_path(path) as tmp, open(tmp, "wb") as file:  # a Python file: a failed write raises OSError
        try:
            torch.save(tensors, file)
        except RuntimeError as error:  # torch's zip writer words a failed write (disk full) as its own error
            raise _os_error_of(error, tmp) from error
    logger.info("Saved %d tensors to %s", len(tensors), path)
    return Path(path)


MODEL_TYPE = "capi"  # config.json's "model_type", as the Hugging Face Hub's tooling reads it
PACKAGE_URL = "https://github.com/capi-backbones/capi-backbones"
OFFICIAL_URL = "https://github.com/facebookresearch/capi"

_MODEL_CARD = """---
library_name: capi-backbones
license: apache-2.0
pipeline_tag: image-feature-extraction
tags:
- capi
- vision
- image-feature-extraction
- self-supervised-learning
- pytorch
---

# CAPI backbone: {name}

A [CAPI](https://arxiv.org/abs/2502.08769) vision backbone ({shape}), saved with the
[capi-backbones]({package_url}) package. CAPI itself (paper code and the released weights) is
[facebookresearch/capi]({official_url}).

```python
import capi_backbones

model = capi_backbones.from_pretrained("hf-hub:{repo_id}")  # or the path of a local copy of this folder
pooled, registers, feature_map = model(images)
```
"""


def model_card(config: CapiConfig, repo_id: str | None = None) -> str:
    """The README.md of a ``save_pretrained`` folder: Hub metadata (library, pipeline tag, tags) and how to load."""
    shape = f"embed_dim {config.embed_dim}, depth {config.depth}, patch {config.patch_size}"
    return _MODEL_CARD.format(
        name=architecture_name(config) or "custom",
        shape=shape,
        package_url=PACKAGE_URL,
        official_url=OFFICIAL_URL,
        repo_id=repo_id or "<owner>/<repo>",
    )


def save_pretrained_folder(model: nn.Module, folder: str | os.PathLike, *, repo_id: str | None = None) -> Path:
    """Write ``model.safetensors`` (config in the metadata), ``config.json`` (the ``CapiConfig`` fields and
    ``"model_type": "capi"``) and, if absent, a ``README.md`` model card (naming ``repo_id`` when given) into
    ``folder`` (created if needed), each file atomically."""
    folder = Path(folder)
    config = getattr(model, "config", None)
    if not isinstance(config, CapiConfig):
        raise ValueError(f"save_pretrained needs a model with a CapiConfig .config, got {type(config).__name__}.")
    save_safetensors(model, folder / HUB_WEIGHTS_FILE)
    values = {"model_type": MODEL_TYPE, **config.to_dict()}
    atomic_write_text(folder / HUB_CONFIG_FILE, json.dumps(values, indent=2, sort_keys=True) + "\n")
    if not (folder / "README.md").exists():
        atomic_write_text(folder / "README.md", model_card(config, repo_id))
    return folder
