"""``capi-backbones list | info | convert`` in a subprocess, on checkpoints the tests write themselves."""

import json
import subprocess
import sys

import pytest
import torch
from checkpoint_files import TINY_CONFIG, tiny_model, write_official_checkpoint

from capi_backbones import from_pretrained
from capi_backbones.cli.main import main
from capi_backbones.pretrained import WEIGHTS


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "capi_backbones.cli.main", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def official(tmp_path):
    model = tiny_model()
    path = tmp_path / "official.pth"
    write_official_checkpoint(model, path, dtype=torch.bfloat16)  # like the released files, probably
    return model, path


def test_list():
    result = run_cli("list")
    assert result.returncode == 0, result.stderr
    for weights in WEIGHTS.values():
        assert weights.name in result.stdout and weights.url in result.stdout
        assert weights.pretraining_data in result.stdout
    assert "capi_vitl14_i22k.pth" in result.stdout and "83.8" in result.stdout and "35.2" in result.stdout
    assert "302.7M" in result.stdout and "151.0M" in result.stdout  # ViT-L/14 encoder and predictor


def test_list_json(capsys):
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in listing["architectures"]] == ["capi_vits14", "capi_vitb14", "capi_vitl14"]
    assert {w["name"]: w["url"] for w in listing["weights"]}["capi_vitl14_in22k"].endswith("capi_vitl14_i22k.pth")


def test_info(official):
    _, path = official
    result = run_cli("info", path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "custom" in out and "[inferred]" in out and "dim 64, depth 2" in out
    assert "44 in file, 40 backbone (backbone. prefix)" in out
    assert "dropped:      head.* (4)" in out and "dtypes:       bfloat16 (40)" in out
    assert "strict load:  OK" in out


def test_info_against_another_arch_fails(official, capsys):
    _, path = official
    assert main(["info", str(path), "--model", "capi_vits14"]) == 1
    out = capsys.readouterr().out
    assert "strict load:  FAILS" in out and "registers: (1, 16, 64) vs (1, 16, 384)" in out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ""])
def test_convert_round_trip_gives_identical_outputs(official, tmp_path, suffix):
    model, path = official
    output = tmp_path / f"converted{suffix}"
    result = run_cli("convert", path, output) if suffix == ".safetensors" else None
    if result is not None:
        assert result.returncode == 0, result.stderr
        assert "verified: all 40 tensors read back identical" in result.stdout
    else:
        assert main(["convert", str(path), str(output)]) == 0
    original, converted = from_pretrained(path), from_pretrained(output)
    assert converted.config == TINY_CONFIG
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        for a, b in zip(original(x), converted(x), strict=True):
            assert torch.equal(a, b)


def test_convert_refuses_to_overwrite(official, tmp_path, capsys):
    _, path = official
    (tmp_path / "out.safetensors").write_text("precious")
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert "already exists; add --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "out.safetensors").read_text() == "precious"


def test_user_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    result = run_cli("info", tmp_path / "notes.txt")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capi-backbones info: error:") and "not a checkpoint" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "missing.pth"], "does not exist"),
        (["convert", "capi_vitx", "out.safetensors"], "Unknown model or weights 'capi_vitx'"),
        (["info", "hf-hub:bad"], "expected 'hf-hub:owner/repo"),
    ],
)
def test_other_user_errors(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["list", "info", "convert"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: capi-backbones " + command in capsys.readouterr().out


def write_with_registers(tmp_path, registers: torch.Tensor):
    tensors = {"backbone." + k: v for k, v in tiny_model().state_dict().items()} | {"backbone.registers": registers}
    torch.save(tensors, tmp_path / "odd.pth")
    return tmp_path / "odd.pth"


def test_non_finite_checkpoint_info_and_convert(tmp_path, capsys):
    registers = tiny_model().registers.detach().clone()
    registers[0, 1, 2] = float("nan")
    path = write_with_registers(tmp_path, registers)
    assert main(["info", str(path)]) == 1
    out = capsys.readouterr().out
    assert "strict load:  FAILS" in out and "NaN or Inf values in 1 tensors (1 values; registers (1))" in out
    output = tmp_path / "out.safetensors"
    assert main(["convert", str(path), str(output)]) == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and "Verification failed" not in err and len(err.strip().splitlines()) == 1
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["odd.pth"]


@pytest.mark.parametrize("command", ["info", "convert"])
def test_integer_checkpoint_is_one_line(tmp_path, capsys, command):
    path = write_with_registers(tmp_path, torch.ones(1, 16, 64, dtype=torch.int64))
    code = main([command, str(path)] + ([str(tmp_path / "out.pth")] if command == "convert" else []))
    captured = capsys.readouterr()
    assert code == (1 if command == "info" else 2)
    text = captured.out if command == "info" else captured.err
    lines = [line for line in text.splitlines() if "not floating point" in line]
    assert len(lines) == 1 and "stores 1 weight tensors as int64" in lines[0]
    assert not (tmp_path / "out.pth").exists()


def test_convert_removes_an_output_that_fails_verification(official, tmp_path, capsys, monkeypatch):
    import capi_backbones.cli.model_commands as model_commands

    _, path = official
    monkeypatch.setattr(model_commands, "_same_bits", lambda a, b: False)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert "Verification failed: 40 tensors differ" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_offline_hint_names_the_weights_option(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))
    assert main(["info", "http://127.0.0.1:9/capi_vitl14_lvd.pth"]) == 3  # a failed download: environment failure
    err = capsys.readouterr().err
    assert "--weights /path/to/capi_vitl14_lvd.pth" in err and "from_pretrained(" not in err
