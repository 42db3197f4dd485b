"""``capi-backbones export-torch | export-onnx`` in process, on a tiny checkpoint the test writes itself."""

import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_files import tiny_model, write_official_checkpoint

from capi_backbones import export
from capi_backbones.cli import export_commands
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
        (["export-torch", "existing.pt2"], "OUTPUT existing.pt2 exists; pass --overwrite to replace it"),
        (["export-onnx", "model.onnx", "--opset", "3"], "--opset 3 cannot be exported: use --opset 18"),
        (["export-onnx", "model.onnx", "--opset", "99"], "--opset 99 cannot be exported: use --opset 18 to"),
        (["export-torch", "model.pt2", "--device", "nope"], "--device nope is not a device"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_the_model_loads(
    args, message, weights, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export_commands, "load_model", not_loaded)
    (tmp_path / "existing.pt2").write_bytes(b"mine")
    assert main([*args, "--weights", str(weights[1])]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert "overwrite=True" not in err and "opset_version" not in err  # CLI flags, not Python keywords
    assert (tmp_path / "existing.pt2").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.pt2"]


def not_loaded(args):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_before_loading(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export_commands, "load_model", not_loaded)
    assert main(["export-onnx", str(tmp_path / "m.onnx"), "--weights", str(weights[1]), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda was asked for, but CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_a_folder_that_takes_no_files_is_one_line_and_exit_3(weights, monkeypatch, capsys):
    monkeypatch.setattr(export_commands, "load_model", not_loaded)
    assert main(["export-torch", "/proc/capi.pt2", "--weights", str(weights[1])]) == 3
    err = capsys.readouterr().err
    assert "Cannot write /proc/capi.pt2" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_full_disk_gives_one_line_and_exit_3_and_no_file(weights, tmp_path):
    """A real write failure (the file-size limit, EFBIG, as a full disk gives ENOSPC) in the middle of the .pt2:
    torch's C++ writer used to abort the process (exit 134)."""
    out = tmp_path / "big.pt2"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "capi_backbones.cli.main", "export-torch", str(out), "--weights", str(weights[1])]
    done = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=limit_file_size, timeout=300)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("INFO ")]
    assert done.returncode == 3, done.stderr
    assert len(errors) == 1 and "Cannot write" in errors[0] and str(out) in errors[0]
    assert list(tmp_path.iterdir()) == []  # no file, no temporary


@pytest.mark.slow
def test_export_onnx_names_dims_checks_sizes_and_logs_one_line_per_event(weights, tmp_path, caplog, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, path = weights
    out = tmp_path / "tiny.onnx"
    with caplog.at_level(logging.INFO):  # the CLI's root level: third-party INFO logs must not come through
        assert main(["export-onnx", str(out), "--weights", str(path)]) == 0
    foreign = [r for r in caplog.records if not r.name.startswith("capi_backbones")]
    assert not foreign, f"{len(foreign)} third-party log lines, e.g. {foreign[0].getMessage()}"
    assert "verified at two other sizes" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", 3, "height", "width"]]
    assert [o.shape for o in session.get_outputs()] == [
        ["batch", 64],
        ["batch", 16, 64],
        ["batch", "height_patches", "width_patches", 64],
    ]
    images = torch.randn(1, 3, 98, 70)
    (patches,) = session.run(["patch_features"], {"images": images.numpy()})
    expected = model.forward_features(images, pooled=False).patch_features
    torch.testing.assert_close(torch.from_numpy(patches), expected.detach(), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="check_size_multiple_of_14"):  # 100 px: refused by the graph itself
        session.run(None, {"images": torch.randn(1, 3, 100, 100).numpy()})


@pytest.mark.slow
def test_a_failed_onnx_export_keeps_the_previous_file(weights, tmp_path, monkeypatch, capsys):
    """An export whose file fails its check (here: asked for opset 17, torch writes 18 without a word) leaves the
    previous file as it was, and nothing at a temporary name."""
    out = tmp_path / "good.onnx"
    out.write_bytes(b"a good file")
    monkeypatch.setattr(export_commands, "MIN_OPSET", 17)
    monkeypatch.setattr(export, "check_opset", lambda opset: opset)
    args = ["export-onnx", str(out), "--weights", str(weights[1]), "--opset", "17", "--overwrite"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # torch also warns, in one line
    assert len(errors) == 1 and "ONNX export at opset 17 gave opset 18" in errors[0]
    assert out.read_bytes() == b"a good file" and [p.name for p in tmp_path.iterdir()] == ["good.onnx"]


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
