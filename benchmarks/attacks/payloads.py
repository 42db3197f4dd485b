"""Bad inputs for run_attacks.py, written with plain torch / safetensors / pickle / PIL (not with the package's own
writers, so that the loader is not checked against itself).

Every malicious pickle creates a marker file when it is unpickled (``open(marker, "w")`` or ``exec``): if the marker
exists after a case, the input ran code.
"""

import io
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from capi_backbones.models import CapiConfig, CapiModel

TINY = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2)
TINY_KWARGS = dict(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2)


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone().contiguous() for k, v in CapiModel(TINY).state_dict().items()}


# ---- malicious pickles ---------------------------------------------------------------------------------------------
class OpenPayload:
    """Unpickling creates the marker through ``builtins.open``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class ExecPayload:
    """Unpickling runs Python source through ``builtins.exec``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class SystemPayload:
    """Unpickling runs a shell command through ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


PICKLE_KINDS = (
    "zip_open",  # torch.save (zip) of the weights with a payload among the tensors
    "zip_exec",
    "legacy_torch",  # torch.save(_use_new_zipfile_serialization=False)
    "raw_pickle_p2",  # pickle.dumps protocol 2, named .pth
    "raw_pickle_p5_system",
    "zip_named_safetensors",  # a pickle that says it is safetensors
    "zip_wrapped_state_dict",  # {"state_dict": {...payload...}}
    "folder_pytorch_model_bin",  # a save_pretrained-like folder holding pytorch_model.bin + config.json
)


def malicious_checkpoint(kind: str, folder: Path, marker: Path) -> Path:
    """A checkpoint of ``kind`` (see PICKLE_KINDS) in ``folder`` whose loading with pickle creates ``marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    state: dict = {f"backbone.{k}": v for k, v in tiny_state().items()}
    payload = {"zip_exec": ExecPayload, "raw_pickle_p5_system": SystemPayload}.get(kind, OpenPayload)(marker)
    state["backbone.registers"] = payload
    if kind in ("zip_open", "zip_exec"):
        path = folder / "evil.pth"
        torch.save(state, path)
    elif kind == "legacy_torch":
        path = folder / "evil_legacy.pth"
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif kind == "raw_pickle_p2":
        path = folder / "evil_raw.pth"
        path.write_bytes(pickle.dumps(state, protocol=2))
    elif kind == "raw_pickle_p5_system":
        path = folder / "evil_raw5.pth"
        path.write_bytes(pickle.dumps(state, protocol=5))
    elif kind == "zip_named_safetensors":
        path = folder / "evil.safetensors"
        torch.save(state, path)
    elif kind == "zip_wrapped_state_dict":
        path = folder / "evil_wrapped.pth"
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif kind == "folder_pytorch_model_bin":
        path = folder / "evil_folder"
        path.mkdir()
        torch.save(state, path / "pytorch_model.bin")
        (path / "config.json").write_text(json.dumps({"model_type": "capi", **TINY.to_dict()}))
    else:
        raise ValueError(kind)
    return path


# ---- damaged weights -----------------------------------------------------------------------------------------------
def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _config_metadata(**changes) -> dict[str, str]:
    values = {**TINY.to_dict(), **changes}
    return {"format": "pt", "capi_config": json.dumps(values)}


WEIGHT_KINDS = (
    "cut_in_length",
    "cut_in_header",
    "cut_in_data",
    "header_length_huge",
    "header_not_json",
    "header_is_list",
    "zero_bytes",
    "html_page",
    "folder_named_safetensors",
    "int32_weights",
    "int64_weights",
    "fp8_weights",
    "nan_weight",
    "inf_weight",
    "missing_key",
    "wrong_shape",
    "config_depth_100000",
    "config_width_10m",
    "config_heads_0",
    "config_heads_not_dividing",
    "config_heads_100000",
    "config_not_json",
    "config_is_list",
    "config_negative_depth",
    "image_size_1e9",
    "image_size_text",
    "declared_huge_shape",
    "offsets_out_of_range",
    "pth_truncated_zip",
    "pth_flipped_byte",
    "pth_list_not_dict",
    "pth_nan_weight",
)


def damaged_weights(kind: str, folder: Path) -> Path:
    """A broken or hostile checkpoint of ``kind`` (see WEIGHT_KINDS) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_state()
    good = _safetensors_bytes(state, _config_metadata())
    path = folder / f"{kind}.safetensors"
    (header_length,) = struct.unpack("<Q", good[:8])
    if kind == "cut_in_length":
        path.write_bytes(good[:5])
    elif kind == "cut_in_header":
        path.write_bytes(good[: 8 + header_length // 2])
    elif kind == "cut_in_data":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "header_length_huge":
        path.write_bytes(struct.pack("<Q", 1 << 60) + good[8:])
    elif kind == "header_not_json":
        path.write_bytes(struct.pack("<Q", 12) + b"not json {{{" + good[8 + header_length :])
    elif kind == "header_is_list":
        path.write_bytes(_with_header([1, 2, 3], b""))  # type: ignore[arg-type]
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "html_page":
        path.write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n" * 20)
    elif kind == "folder_named_safetensors":
        path.mkdir()
        (path / "notes.txt").write_text("a folder, not a file")
    elif kind in ("int32_weights", "int64_weights"):
        dtype = torch.int32 if kind == "int32_weights" else torch.int64
        save_file({k: (v * 100).to(dtype) for k, v in state.items()}, str(path), metadata=_config_metadata())
    elif kind == "fp8_weights":
        save_file({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, str(path), metadata=_config_metadata())
    elif kind in ("nan_weight", "inf_weight"):
        key = "blocks.0.attn.qkv.weight" if "blocks.0.attn.qkv.weight" in state else next(iter(state))
        state[key].view(-1)[3] = float("nan") if kind == "nan_weight" else float("inf")
        save_file(state, str(path), metadata=_config_metadata())
    elif kind == "missing_key":
        state.pop(sorted(state)[len(state) // 2])
        save_file(state, str(path), metadata=_config_metadata())
    elif kind == "wrong_shape":
        key = sorted(state)[len(state) // 2]
        state[key] = torch.zeros(3, 5)
        save_file(state, str(path), metadata=_config_metadata())
    elif kind.startswith("config_"):
        changes = {
            "config_depth_100000": dict(depth=100000),
            "config_width_10m": dict(embed_dim=10_000_000),
            "config_heads_0": dict(num_heads=0),
            "config_heads_not_dividing": dict(num_heads=3),
            "config_heads_100000": dict(num_heads=100000, pred_num_heads=100000),
            "config_negative_depth": dict(depth=-4),
        }.get(kind)
        if changes is not None:
            metadata = _config_metadata(**changes)
        elif kind == "config_not_json":
            metadata = {"format": "pt", "capi_config": "{depth: 2,"}
        else:  # config_is_list
            metadata = {"format": "pt", "capi_config": "[64, 2, 2]"}
        save_file(state, str(path), metadata=metadata)
    elif kind in ("image_size_1e9", "image_size_text"):
        metadata = {**_config_metadata(), "image_size": "1000000000" if kind == "image_size_1e9" else "large"}
        save_file(state, str(path), metadata=metadata)
    elif kind in ("declared_huge_shape", "offsets_out_of_range"):
        header = json.loads(good[8 : 8 + header_length])
        key = next(k for k in header if k != "__metadata__")
        if kind == "declared_huge_shape":
            header[key]["shape"] = [1 << 20, 1 << 20]
        else:
            header[key]["data_offsets"] = [0, 1 << 40]
        path.write_bytes(_with_header(header, good[8 + header_length :]))
    elif kind.startswith("pth_"):
        path = folder / f"{kind}.pth"
        official = {f"backbone.{k}": v for k, v in state.items()}
        if kind == "pth_nan_weight":
            next(iter(official.values())).view(-1)[0] = float("nan")
        buffer = io.BytesIO()
        torch.save(list(official.values()) if kind == "pth_list_not_dict" else official, buffer)
        data = bytearray(buffer.getvalue())
        if kind == "pth_truncated_zip":
            data = data[: len(data) * 2 // 3]
        elif kind == "pth_flipped_byte":
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        raise ValueError(kind)
    return path


# ---- images --------------------------------------------------------------------------------------------------------
def good_pixels(seed: int, size=(40, 56)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def save_good(path: Path, seed: int, size=(40, 56)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(good_pixels(seed, size)).save(path, format="PNG")


IMAGE_KINDS = (
    "truncated_png",
    "truncated_jpeg",
    "zero_byte",
    "text_named_jpg",
    "decompression_bomb",
    "cmyk_jpeg",
    "png_16bit",
    "palette_png",
    "la_png",
    "rgba_png",
    "exif_rotated",
    "one_pixel",
    "very_long",
    "animated_gif",
    "multipage_tiff",
    "fifo",
    "symlink",
    "dangling_symlink",
    "symlink_loop",
    "hidden_file",
    "unreadable_file",
    "unreadable_folder",
    "folder_named_jpg",
    "two_links_one_target",
)


def odd_image(kind: str, folder: Path) -> list[str]:
    """Write one odd input of ``kind`` into ``folder`` (which already holds good images); return the names (relative
    to ``folder``) a correct extraction records for it (empty when the input must be skipped or reported)."""
    path = folder / f"odd_{kind}.png"
    if kind == "truncated_png":
        save_good(path, 7)
        path.write_bytes(path.read_bytes()[:200])
        return []
    if kind == "truncated_jpeg":
        path = path.with_suffix(".jpg")
        Image.fromarray(good_pixels(7, (200, 200))).save(path, quality=95)
        path.write_bytes(path.read_bytes()[:600])
        return []
    if kind == "zero_byte":
        path.write_bytes(b"")
        return []
    if kind == "text_named_jpg":
        path.with_suffix(".jpg").write_text("not an image at all\n")
        return []
    if kind == "decompression_bomb":  # a small file that declares 40000 x 40000 pixels
        Image.new("1", (40000, 40000)).save(path, optimize=True)
        return []
    if kind == "cmyk_jpeg":
        Image.fromarray(good_pixels(8)).convert("CMYK").save(path.with_suffix(".jpg"))
        return [path.with_suffix(".jpg").name]
    if kind == "png_16bit":
        Image.fromarray(good_pixels(9)[..., 0].astype(np.uint16) * 257).save(path)
        return [path.name]
    if kind == "palette_png":
        Image.fromarray(good_pixels(10)).convert("P").save(path)
        return [path.name]
    if kind == "la_png":
        Image.fromarray(good_pixels(11)).convert("LA").save(path)
        return [path.name]
    if kind == "rgba_png":
        Image.fromarray(good_pixels(12)).convert("RGBA").save(path)
        return [path.name]
    if kind == "exif_rotated":
        image = Image.fromarray(good_pixels(13))
        exif = image.getexif()
        exif[0x0112] = 6  # orientation: rotate 90
        image.save(path.with_suffix(".jpg"), exif=exif)
        return [path.with_suffix(".jpg").name]
    if kind == "one_pixel":
        Image.new("RGB", (1, 1), "red").save(path)
        return [path.name]
    if kind == "very_long":
        Image.fromarray(good_pixels(14, (8, 2000))).save(path)
        return []  # more than 10 times longer than wide: skipped and named
    if kind == "animated_gif":
        frames = [Image.fromarray(good_pixels(s)) for s in (15, 16)]
        frames[0].save(path.with_suffix(".gif"), save_all=True, append_images=frames[1:])
        return [path.with_suffix(".gif").name]
    if kind == "multipage_tiff":
        frames = [Image.fromarray(good_pixels(s)) for s in (17, 18)]
        frames[0].save(path.with_suffix(".tiff"), save_all=True, append_images=frames[1:])
        return [path.with_suffix(".tiff").name]
    if kind == "fifo":
        os.mkfifo(path)
        return []
    if kind == "symlink":
        save_good(folder.parent / "blobs" / "3f2a", 19)
        os.symlink(os.path.relpath(folder.parent / "blobs" / "3f2a", folder), path)
        return [path.name]
    if kind == "dangling_symlink":
        os.symlink("does_not_exist.png", path)
        return []
    if kind == "symlink_loop":
        os.symlink(path.name, path)
        return []
    if kind == "hidden_file":
        save_good(folder / ".hidden.png", 20)
        return []  # hidden files are not images of the data set (documented)
    if kind == "unreadable_file":
        save_good(path, 21)
        path.chmod(0)
        return []
    if kind == "unreadable_folder":
        save_good(folder / "locked" / "inside.png", 22)
        (folder / "locked").chmod(0)
        return []
    if kind == "folder_named_jpg":
        (folder / "odd.jpg").mkdir()
        save_good(folder / "odd.jpg" / "inner.png", 23)
        return ["odd.jpg/inner.png"]
    if kind == "two_links_one_target":
        save_good(folder.parent / "blobs" / "9b1c", 24)
        for name in ("link_a.png", "link_b.png"):
            os.symlink(os.path.relpath(folder.parent / "blobs" / "9b1c", folder), folder / name)
        return ["link_a.png", "link_b.png"]
    raise ValueError(kind)
