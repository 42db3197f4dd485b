"""What a file may ask for is bounded before memory is allocated; odd files get one line, not a traceback:
a stored config asking for depth 100000, fp8 weights, a safetensors file cut inside its header."""

import json
import time

import pytest
import torch
from checkpoint_files import TINY_CONFIG, tiny_model
from safetensors.torch import save_file

from capi_backbones.cli.main import main
from capi_backbones.models import ARCHITECTURES, CapiConfig
from capi_backbones.models.config import CONFIG_BOUNDS, MAX_PARAMETERS
from capi_backbones.pretrained import CapiHubModel, CheckpointError, from_pretrained, inspect_checkpoint


def tiny_tensors() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tiny_model().state_dict().items()}


def test_stored_depth_100000_fails_at_once(tmp_path, capsys):
    path = tmp_path / "deep.safetensors"
    huge = TINY_CONFIG.to_dict() | {"depth": 100000}
    save_file(tiny_tensors(), str(path), metadata={"capi_config": json.dumps(huge)})
    for load in (from_pretrained, inspect_checkpoint):
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=r"depth=100000 is out of range \[1, 256\]"):
            load(path)
        assert time.monotonic() - start < 1
    start = time.monotonic()
    assert main(["info", str(path)]) != 0
    assert time.monotonic() - start < 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "depth=100000 is out of range" in err[0]


def test_config_json_asking_for_too_much_fails_at_once(tmp_path):
    CapiHubModel(TINY_CONFIG).save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "config.json").write_text(json.dumps(TINY_CONFIG.to_dict() | {"embed_dim": 10**9}))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"embed_dim=1000000000 is out of range"):
        from_pretrained(tmp_path / "saved")
    assert time.monotonic() - start < 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("depth", 0),
        ("depth", 257),
        ("pred_depth", 100000),
        ("embed_dim", 32768),
        ("patch_size", 0),
        ("patch_size", 1000),
        ("in_chans", 0),
        ("n_registers", -4),
        ("n_registers", 4096),
        ("mlp_ratio", 0.0),
        ("mlp_ratio", 1e6),
        ("mlp_ratio", float("nan")),
        ("norm_eps", 0.0),
        ("drop_path_rate", 1.0),
    ],
)
def test_each_field_is_bounded(field, value):
    with pytest.raises(ValueError, match=f"CapiConfig.{field}=.* is out of range"):
        CapiConfig.from_dict(TINY_CONFIG.to_dict() | {field: value})


@pytest.mark.parametrize(("field", "value"), [("depth", "12"), ("depth", 12.0), ("depth", True), ("mlp_ratio", "4")])
def test_field_types_are_checked(field, value):
    with pytest.raises(ValueError, match=f"CapiConfig.{field} must be"):
        CapiConfig.from_dict(TINY_CONFIG.to_dict() | {field: value})


def test_total_size_is_bounded_and_real_architectures_fit():
    for config in ARCHITECTURES.values():
        assert config.parameter_count() < MAX_PARAMETERS
    widest = {"embed_dim": 16384, "pred_embed_dim": 16384, "num_heads": 128, "pred_num_heads": 128, "depth": 256}
    with pytest.raises(ValueError, match="parameters, more than the 50e9 allowed"):
        CapiConfig.from_dict(TINY_CONFIG.to_dict() | widest)
    assert set(CONFIG_BOUNDS) == set(TINY_CONFIG.to_dict())  # every field has a bound


def test_image_size_metadata_is_bounded(tmp_path):
    path = tmp_path / "big.safetensors"
    metadata = {"capi_config": json.dumps(TINY_CONFIG.to_dict()), "image_size": "99999998"}
    save_file(tiny_tensors(), str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="invalid 'image_size' metadata entry '99999998'"):
        from_pretrained(path)


@pytest.fixture
def fp8_file(tmp_path):
    path = tmp_path / "fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tiny_tensors().items()}, str(path))
    return path


def test_info_on_fp8_weights(fp8_file, capsys):
    info = inspect_checkpoint(fp8_file)
    assert info.loads and info.dtypes == {"float8_e4m3fn": info.n_keys}
    assert main(["info", str(fp8_file)]) == 0
    assert "float8_e4m3fn" in capsys.readouterr().out


def test_fp8_weights_load_as_float32_and_nan_is_found(tmp_path, fp8_file):
    loaded = from_pretrained(fp8_file)
    assert torch.equal(loaded.registers, tiny_model().registers.detach().to(torch.float8_e4m3fn).float())
    tensors = {k: v.to(torch.float8_e4m3fn) for k, v in tiny_tensors().items()}
    tensors["registers"][0, 0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan8.safetensors"))
    info = inspect_checkpoint(tmp_path / "nan8.safetensors")
    assert not info.loads and "NaN or Inf values in 1 tensors (1 values; registers (1))" in info.problems[0]
    with pytest.raises(CheckpointError, match="holds NaN or Inf values"):
        from_pretrained(tmp_path / "nan8.safetensors")


def test_safetensors_cut_inside_its_header_is_called_so(tmp_path):
    """Even when the header length's first byte is 0x80 (a pickle's protocol byte), it is not 'a PyTorch file'."""
    tensors = tiny_tensors()
    path = tmp_path / "m.safetensors"
    for pad in range(512):  # pad the metadata until the u64 header length is 0x80 modulo 256
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: 8 + length // 2])
    with pytest.raises(CheckpointError, match="is a safetensors file cut inside its header") as info:
        from_pretrained(cut)
    assert "PyTorch" not in str(info.value).split(". If")[0]
