"""``capi-backbones export-torch | export-onnx`` in process, on a tiny checkpoint the test writes itself."""

import pytest
import torch
from checkpoint_files import tiny_model, write_official_checkpoint

from capi_backbones.cli.main import main


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = tiny_model()
    path = tmp_path_factory.mktemp("weights") / "official.pth"
    write_official_checkpoint(model, path)
    return model, path


def test_export_torch_dense_only_is_verified_and_loads(weights, tmp_path, capsys):
    model, path = weights
    out = tmp_path / "dense.pt2"
    assert main(["export-torch", str(out), "--weights", str(path), "--outputs", "patch_features"]) == 0
    printed = capsys.readouterr().out
    assert "outputs: patch_features" in printed and "verified at two other sizes" in printed
    images = torch.randn(2, 3, 14, 98)
    with torch.no_grad():
        (got,) = torch.export.load(out).module()(images)
        torch.testing.assert_close(got, model.forward_features(images, pooled=False).patch_features)


@pytest.mark.parametrize(
    "args,message",
    [
        (["export-torch", "model.onnx"], "must end in .pt2"),
        (["export-onnx", "model.pt2"], "must end in .onnx"),
        (["export-torch", "existing.pt2"], "exists; pass overwrite=True (CLI: --overwrite)"),
    ],
)
def test_bad_targets_are_one_line_errors(args, message, weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing.pt2").write_bytes(b"mine")
    assert main([*args, "--weights", str(weights[1])]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "existing.pt2").read_bytes() == b"mine"


@pytest.mark.parametrize("command", ["export-onnx", "export-torch"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and "any multiples of 14" in capsys.readouterr().out


def test_random_init_exports_offline(tmp_path, capsys):
    out = tmp_path / "random.pt2"
    args = ["export-torch", str(out), "--random-init", "--model", "capi_vits14", "--outputs", "registers"]
    assert main([*args, "--no-verify"]) == 0
    captured = capsys.readouterr()
    assert "--random-init: capi_vits14 with random weights" in captured.err
    assert "random weights, --random-init" in captured.out
    (registers,) = torch.export.load(out).module()(torch.randn(1, 3, 28, 42))
    assert registers.shape == (1, 16, 384)
