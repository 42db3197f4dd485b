"""Every bad-input path of the loader gives a clear error naming the file/name and what to do."""

import io

import numpy as np
import pytest
import torch
from checkpoint_files import TINY_CONFIG, tiny_model, write_official_checkpoint
from PIL import Image
from skimage import data

from capi_backbones import from_pretrained
from capi_backbones.pretrained import CheckpointError, save_safetensors


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
    with pytest.raises(CheckpointError, match="could not be read as a PyTorch checkpoint") as info:
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
