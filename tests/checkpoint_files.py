"""Test helper: write checkpoints in the layouts found in the wild, for tiny models.

Other test modules import it as ``from checkpoint_files import ...`` (``tests/conftest.py`` puts this folder on
``sys.path``). Files are written with plain ``torch.save`` /
``safetensors``, independently of ``capi_backbones.pretrained``, so loader tests do not check the loader
against itself.
"""

import struct
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from capi_backbones.models import CapiConfig, CapiModel

__all__ = [
    "TINY_CONFIG",
    "flip_a_bit_inside_the_largest_zip_member",
    "tiny_model",
    "write_official_checkpoint",
    "write_safetensors_checkpoint",
]

TINY_CONFIG = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2)


def tiny_model(config: CapiConfig = TINY_CONFIG, seed: int = 0) -> CapiModel:
    """A randomly initialised model (official init) in eval mode, reproducible through ``seed``."""
    torch.manual_seed(seed)
    return CapiModel(config).eval()


def write_official_checkpoint(
    model: CapiModel,
    path: str | Path,
    *,
    prefix: str = "backbone.",
    with_head: bool = True,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``torch.save`` a dict like the released files: ``backbone.*`` keys plus ``head.*`` keys (a clustering head
    the loader must drop). Returns what was saved."""
    tensors = {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if with_head:
        dim = model.config.pred_embed_dim
        tensors["head.last_layer.weight_g"] = torch.ones(32, 1)
        tensors["head.last_layer.weight_v"] = torch.randn(32, dim)
        tensors["head.clustering.weight"] = torch.randn(32, model.config.embed_dim)
        tensors["head.clustering.bias"] = torch.zeros(32)
    torch.save(tensors, path)
    return tensors


def write_safetensors_checkpoint(model: CapiModel, path: str | Path) -> None:
    """Plain safetensors of the state dict, no metadata (the architecture must be inferred)."""
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))


def flip_a_bit_inside_the_largest_zip_member(path: str | Path) -> str:
    """Change one bit in the middle of the largest member of the ``torch.save`` zip at ``path`` (a tensor's bytes,
    the zip's structure intact), as a bad disk or copy would; returns the member's name. ``torch.load`` reads such a
    file without complaint."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda m: m.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[member.header_offset + 26 : member.header_offset + 30])
    start = member.header_offset + 30 + name_length + extra_length  # after the member's local header
    raw[start + member.file_size // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    return member.filename
