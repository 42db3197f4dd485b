"""Every bad-input path of the loader gives a clear error naming the file/name and what to do."""

import io
import json

import numpy as np
import pytest
import torch
from checkpoint_files import (
    TINY_CONFIG,
    flip_a_bit_inside_the_largest_zip_member,
    tiny_model,
    write_official_checkpoint,
)
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from capi_backbones import from_pretrained
from capi_backbones.models import CapiConfig
from capi_backbones.pretrained import CheckpointError, save_safetensors
from capi_backbones.pretrained.files import check_complete


class NotATensor:  # torch.load(weights_only=True) must refuse to unpickle this
    pass


@pytest.fixture
def official(tmp_path):
    path = tmp_path / "official.pth"
    write_official_checkpoint(tiny_model(), path)
    return path


def truncate(path, fraction=0.5):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])


def test_truncated_pth(official):
    truncate(official)
    with pytest.raises(CheckpointError, match="is a cut-off or damaged zip") as info:
        from_pretrained(official)
    assert str(official) in str(info.value) and "download it again" in str(info.value)


def test_truncated_safetensors(tmp_path):
    path = save_safetensors(tiny_model(), tmp_path / "m.safetensors")
    truncate(path)
    with pytest.raises(CheckpointError, match="could not be read as safetensors.*truncated") as info:
        from_pretrained(path)
    assert f"delete {path}" in str(info.value)


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        from_pretrained(tmp_path / "empty.pth")


def test_text_file(tmp_path):
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="is not a checkpoint: it looks like a text file"):
        from_pretrained(tmp_path / "notes.pth")


def test_png_file(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(data.astronaut())[::8, ::8]).save(buffer, format="PNG")
    (tmp_path / "astronaut.pth").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="it looks like a PNG image"):
        from_pretrained(tmp_path / "astronaut.pth")


def test_html_error_page(tmp_path):
    (tmp_path / "capi.pth").write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    with pytest.raises(CheckpointError, match="an HTML page"):
        from_pretrained(tmp_path / "capi.pth")


def test_arbitrary_objects_are_not_unpickled(tmp_path):
    torch.save({"backbone.registers": torch.zeros(1, 16, 64), "trainer": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not unpickled for safety"):
        from_pretrained(tmp_path / "evil.pth")


def test_not_a_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a dict of tensors"):
        from_pretrained(tmp_path / "list.pth")


def test_missing_keys(tmp_path):
    sd = {"backbone." + k: v for k, v in tiny_model().state_dict().items()}
    del sd["backbone.encoder.blocks.1.residual2.fn.fc2.weight"], sd["backbone.patch_embed.bias"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="2 missing, 0 unexpected, 0 mismatched") as info:
        from_pretrained(tmp_path / "m.pth")
    assert set(info.value.missing) == {"encoder.blocks.1.residual2.fn.fc2.weight", "patch_embed.bias"}
    assert "  patch_embed.bias" in str(info.value)


def test_unexpected_keys(tmp_path):
    sd = {"backbone." + k: v for k, v in tiny_model().state_dict().items()}
    sd["backbone.encoder.blocks.0.residual1.fn.q_norm.weight"] = torch.ones(32)
    sd["backbone.cls_token"] = torch.zeros(1, 1, 64)
    torch.save(sd, tmp_path / "u.pth")
    with pytest.raises(CheckpointError, match="0 missing, 2 unexpected, 0 mismatched") as info:
        from_pretrained(tmp_path / "u.pth")
    assert set(info.value.unexpected) == {"encoder.blocks.0.residual1.fn.q_norm.weight", "cls_token"}


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    sd = {"backbone." + k: v for k, v in tiny_model().state_dict().items()}
    sd["backbone.mask_token"] = torch.zeros(1, 32)
    torch.save(sd, tmp_path / "s.pth")
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tmp_path / "s.pth", arch=TINY_CONFIG)
    assert "mask_token: (1, 32) vs (1, 64)" in str(info.value)
    assert info.value.mismatched == (("mask_token", (1, 32), (1, 64)),)


def test_wrong_arch_hints_at_the_inferred_one(official):
    with pytest.raises(CheckpointError, match="does not match the model") as info:
        from_pretrained(official, arch="capi_vits14")
    message = str(info.value)
    assert "registers: (1, 16, 64) vs (1, 16, 384)" in message and "pass arch=None to infer it" in message
    assert "... and" in message  # long lists are cut in the message, complete on the exception
    assert len(info.value.missing) == 9 * (12 - 2 + 6 - 2)


def test_architecture_cannot_be_inferred(tmp_path):
    torch.save({"backbone.something": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="no 'registers' tensor.*Pass arch="):
        from_pretrained(tmp_path / "x.pth")


def test_unknown_name_lists_available():
    with pytest.raises(
        ValueError, match="Unknown model or weights 'capi_vitl14_lvdd'. Available weights: capi_vitl14,"
    ) as info:
        from_pretrained("capi_vitl14_lvdd")
    assert "capi_vitl14_in22k" in str(info.value) and "hf-hub:owner/repo" in str(info.value)
    assert "Architectures without weights: capi_vitb14, capi_vits14 (use create_model)" in str(info.value)


def test_unknown_arch_lists_available(official):
    with pytest.raises(ValueError, match="Unknown architecture 'vit_large'. Available: capi_vitb14"):
        from_pretrained(official, arch="vit_large")


def test_missing_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"Checkpoint {tmp_path / 'nope.pth'} does not exist"):
        from_pretrained(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(str(tmp_path / "nope.safetensors"))


def test_folder_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        from_pretrained(tmp_path)


def test_meta_device_is_refused(official):
    with pytest.raises(ValueError, match="meta"):
        from_pretrained(official, device="meta")


def test_safetensors_whose_header_length_starts_with_0x80_keeps_its_config(tmp_path):
    """Sniffing by structure: a header length whose first byte is 0x80 (a pickle's protocol byte) is still
    safetensors, and its stored config (here a non-default norm_eps) must survive."""
    config = CapiConfig.from_dict(TINY_CONFIG.to_dict() | {"norm_eps": 1e-3})
    model = tiny_model(config)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"capi_config": json.dumps(config.to_dict(), sort_keys=True), "pad": ""}
    for pad in range(512):  # pad the metadata until the u64 header length is 0x80 modulo 256
        meta["pad"] = "x" * pad
        save_file(tensors, str(tmp_path / "m.safetensors"), metadata=meta)
        if (tmp_path / "m.safetensors").read_bytes()[0] == 0x80:
            break
    assert (tmp_path / "m.safetensors").read_bytes()[0] == 0x80
    loaded = from_pretrained(tmp_path / "m.safetensors")
    assert loaded.config.norm_eps == 1e-3 and loaded.config == config
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def official_with(tmp_path, key: str, value: torch.Tensor):
    sd = {"backbone." + k: v for k, v in tiny_model().state_dict().items()}
    sd["backbone." + key] = value
    torch.save(sd, tmp_path / "odd.pth")
    return tmp_path / "odd.pth"


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    registers = tiny_model().registers.detach().clone()
    registers[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    path = official_with(tmp_path, "registers", registers)
    with pytest.raises(CheckpointError, match=r"NaN or Inf values in 1 tensors \(3 values; registers \(3\)\)") as info:
        from_pretrained(path)
    assert "allow_non_finite=True" in str(info.value) and str(path) in str(info.value)
    loaded = from_pretrained(path, allow_non_finite=True)
    assert torch.equal(loaded.registers.isnan(), registers.isnan())


def test_float16_overflow_on_conversion_is_refused(tmp_path):
    registers = tiny_model().registers.detach().clone()
    registers[0, 0, 0] = 1e6  # finite in float32, inf in float16
    path = official_with(tmp_path, "registers", registers)
    assert from_pretrained(path).registers[0, 0, 0] == 1e6
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        from_pretrained(path, dtype=torch.float16)


def test_integer_weights_are_refused_in_one_line(tmp_path):
    path = official_with(tmp_path, "registers", torch.zeros(1, 16, 64, dtype=torch.int64))
    with pytest.raises(CheckpointError, match=r"stores 1 weight tensors as int64, not floating point \(registers") as e:
        from_pretrained(path)
    assert "\n" not in str(e.value)


def test_check_complete_finds_cut_off_files(tmp_path, official):
    """What downloads run before the rename: a whole file passes, one cut anywhere does not."""
    safetensors = save_safetensors(tiny_model(), tmp_path / "m.safetensors")
    assert check_complete(official) == "pytorch-zip" and check_complete(safetensors) == "safetensors"
    for path in (official, safetensors):
        raw = path.read_bytes()
        for cut in (0.5, 0.99):
            (tmp_path / "cut").write_bytes(raw[: int(len(raw) * cut)])
            with pytest.raises(CheckpointError, match="cut-off"):
                check_complete(tmp_path / "cut")
    flip_a_bit_inside_the_largest_zip_member(official)  # whole, but a byte changed in transfer: not cached either
    with pytest.raises(CheckpointError, match="is damaged: its member .* does not match its CRC-32"):
        check_complete(official)


def test_a_pytorch_file_named_safetensors_is_read_by_its_content(tmp_path):
    """The format is told by the bytes: torch.load alone would hand a path ending in .safetensors to safetensors."""
    import torch

    from capi_backbones.pretrained.files import read_checkpoint

    path = tmp_path / "misnamed.safetensors"
    torch.save({"a": torch.arange(3.0)}, path)
    assert torch.equal(read_checkpoint(path).tensors["a"], torch.arange(3.0))


def test_a_byte_changed_inside_a_pth_weight_is_refused(official):
    """torch.load does not check the zip's CRC-32s: without the loader's check this file loads with one wrong weight."""
    member = flip_a_bit_inside_the_largest_zip_member(official)
    with pytest.raises(CheckpointError, match="is damaged: its member .* does not match its CRC-32") as info:
        from_pretrained(official)
    assert str(official) in str(info.value) and member in str(info.value)
