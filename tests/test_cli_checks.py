"""The command line checks before it loads: each mistake gives one line naming the option, exit status 2, and
torch is never imported; messages speak in command-line flags, not in Python keywords."""

import json
import logging
import re
import subprocess
import sys
import textwrap

import pytest

from capi_backbones.cli import checks
from capi_backbones.cli.errors import CliError
from capi_backbones.cli.main import main

PYTHON_WORDS = re.compile(r"\b(arch|weights|overwrite|image_size|device|precision|keep_aspect|pretrained)=|\w\(")

# (arguments, what the one error line says); run in a fresh interpreter, where torch must stay unimported
MISTAKES = [
    (["extract", "nophotos", "--out", "f"], "Image path 'nophotos' does not exist"),
    (["extract", "empty", "--out", "f"], "No image files found in directory 'empty'"),
    (["extract", "notes.txt", "--out", "f"], "'notes.txt' is not an image file"),
    (["extract", "hidden", "--out", "f"], "No image files found in directory 'hidden'"),  # ._a.jpg, .cache/b.jpg
    (["extract", "a.png", "--out", "f", "--model", "capi_vits14"], "--model capi_vits14 is an architecture without"),
    (["extract", "a.png", "--out", "f", "--random-init", "--weights", "a.png"], "leave out --weights PATH"),
    (
        ["extract", "a.png", "--out", "f", "--image-size", "100"],
        "--image-size must be a multiple of 14 between 14 and 7168, got 100 (nearest: 98 or 112)",
    ),
    (["extract", "a.png", "--out", "f", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["extract", "a.png", "--out", "f", "--workers", "-1"], "--workers must be at least 0, got -1"),
    (["extract", "a.png", "--out", "f", "--device", "cpu", "--precision", "fp16"], "--precision fp16 is only allowed"),
    (["pca", "a.png", "--out", "x.jpg"], "--out must be a .png file, got 'x.jpg'"),
    (["pca", "a.png", "--out", "empty"], "--out must be a .png file"),
    (["pca", "a.png", "--out", "a.png/x.png"], "'a.png' is a file, not a folder"),
    (["pca", "a.png", "--out", "x.png", "--device", "nonsense"], "--device nonsense is not a device"),
    (["pca", "a.png", "--out", "x.png", "--weights", "missing.pth"], "--weights missing.pth does not exist"),
    (["pca", "a.png", "--out", "x.png", "--model", "capi_vitx"], "--model capi_vitx is unknown"),
    (["pca", "a.png", "--out", "x.png", "--components", "0"], "--components must be between 1 and"),
    (
        ["pca", "a.png", "--out", "x.png", "--random-init", "--model", "capi_vitx"],
        "capi_vitx is unknown; with --random",
    ),
    (["export-torch", "x.pt2", "--random-init", "--device", "gpu"], "--device gpu is not a device"),
    (["info", "missing.pth"], "CHECKPOINT missing.pth does not exist"),
    (["info", "a.png", "--model", "vit_small"], "--model vit_small is not an architecture; use one of capi_vits14"),
    (["convert", "missing.pth", "out.safetensors"], "CHECKPOINT missing.pth does not exist"),
    (["convert", "a.png", "notes.txt"], "notes.txt already exists; add --overwrite to replace it"),
    (["convert", "a.png", "a.png", "--overwrite"], "CHECKPOINT and OUTPUT are the same path"),
    (["pca", "a.png", "--out", "old.png", "--random-init"], "--out 'old.png' already exists; add --overwrite"),
    (["explore", "a.png", "--out", "old.html", "--random-init"], "--out 'old.html' already exists; add --overwrite"),
    (["export", "empty", "old.pth"], "OUT 'old.pth' already exists; add --overwrite to replace it"),
    (["export", "empty", "teacher.onnx"], "OUT must be a .safetensors or .pth or .pt file, got 'teacher.onnx'"),
    (
        ["eval", "classify", "empty", "--out", "o", "--random-init", "--representations", "cls"],
        "--representations cls: unknown; choose from pooled, avg_patch, pooled+avg_patch, patch, registers",
    ),
    (["eval", "classify", "empty", "--out", "o", "--random-init", "--knn-k", "0"], "--knn-k, --head-dim and"),
]

SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from capi_backbones.cli import checks
    from capi_backbones.cli.main import main

    results = []
    for args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(args)
        results.append([code, err.getvalue(), "torch" in sys.modules])
    print(json.dumps({"results": results, "no_cuda": checks.cuda_is_certainly_missing()}))
    """
)


def run_in_fresh_interpreter(cases: list[list[str]], cwd) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(cases)], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")  # never read: the arguments fail first
    (tmp_path / "notes.txt").write_text("hi")
    for name in ("old.png", "old.html", "old.pth"):  # a user's files: never replaced without --overwrite
        (tmp_path / name).write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "hidden" / ".cache").mkdir(parents=True)  # what the finder skips: hidden names
    (tmp_path / "hidden" / "._a.jpg").write_bytes(b"")
    (tmp_path / "hidden" / ".cache" / "b.jpg").write_bytes(b"")
    (tmp_path / "hidden" / "loop").symlink_to(tmp_path / "hidden")  # a link cycle is searched once
    return tmp_path


def test_mistakes_fail_in_one_line_before_torch_is_imported(folder):
    cases = [args for args, _ in MISTAKES] + [["pca", "a.png", "--out", "x.png", "--device", "cuda"]]
    output = run_in_fresh_interpreter(cases, folder)
    if not output["no_cuda"]:
        cases, output["results"] = cases[:-1], output["results"][:-1]  # a GPU driver here: torch decides later
    expected = [message for _, message in MISTAKES] + ["--device cuda was asked for, but CUDA is not available"]
    for args, message, (code, err, torch_imported) in zip(cases, expected, output["results"], strict=False):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (args, code, err)
        assert lines[0].startswith(f"capi-backbones {args[0]}: error: ") and message in lines[0], (args, lines)
        assert not PYTHON_WORDS.search(lines[0].split(": error: ", 1)[1]), lines[0]
        assert not torch_imported, f"{args}: torch was imported before the mistake was reported"
    assert not (folder / "f").exists() and not (folder / "x.png").exists()
    assert all((folder / name).read_text() == "mine" for name in ("old.png", "old.html", "old.pth"))


def test_devices(monkeypatch):
    checks.check_device("cpu")
    checks.check_device("cuda:1" if not checks.cuda_is_certainly_missing() else "cpu")
    for bad in ("nonsense", "cuda:", "CPU", "cuda:x"):
        with pytest.raises(CliError, match=f"--device {re.escape(bad)} is not a device"):
            checks.check_device(bad)
    monkeypatch.setattr(checks, "cuda_is_certainly_missing", lambda: True)
    with pytest.raises(CliError, match="CUDA is not available here; use --device cpu"):
        checks.check_device("cuda:0")
    checks.check_device("mps")  # not ours to judge: torch says later
    monkeypatch.setattr(checks, "cuda_is_certainly_missing", lambda: False)
    checks.check_device("cuda")  # maybe: torch decides after it is imported


def test_image_size_and_output_file(tmp_path):
    checks.check_image_size(224)
    for bad, nearest in ((100, "nearest: 98 or 112"), (7, "e.g. 224"), (0, "e.g. 224"), (7182, "e.g. 224")):
        with pytest.raises(CliError, match=f"--image-size must be a multiple of 14 .*, got {bad} \\({nearest}\\)"):
            checks.check_image_size(bad)
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(CliError, match="'.*x.onnx' already exists; add --overwrite to replace it"):
        checks.check_output_file(str(tmp_path / "x.onnx"), (".onnx",), flag="OUTPUT", overwrite=False)
    checks.check_output_file(str(tmp_path / "x.onnx"), (".onnx",), flag="OUTPUT", overwrite=True)
    assert checks.check_output_file(str(tmp_path / "new" / "y.onnx"), (".onnx",), flag="OUTPUT").name == "y.onnx"
    with pytest.raises(CliError, match=r"OUTPUT must be a \.onnx file, got 'y\.pt2'; e\.g\. OUTPUT y\.onnx"):
        checks.check_output_file("y.pt2", (".onnx",), flag="OUTPUT")


def test_plural():
    assert [checks.plural(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]


def test_weights_of_another_architecture_than_model_are_named_in_flags(tmp_path, capsys):
    import torch

    import capi_backbones
    from capi_backbones.pretrained import save_official_checkpoint

    torch.manual_seed(0)
    save_official_checkpoint(capi_backbones.create_model("capi_vits14"), tmp_path / "vits.pth")
    (tmp_path / "a.png").write_bytes(b"")
    args = ["pca", str(tmp_path / "a.png"), "--out", str(tmp_path / "x.png"), "--weights", str(tmp_path / "vits.pth")]
    assert main([*args, "--model", "capi_vitb14", "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds capi_vits14 weights, but --model capi_vitb14 is capi_vitb14; leave out --model" in line, line
    assert "arch=" not in line and "pass" not in line


def test_logging_leaves_other_libraries_at_warning():
    """The CLI shows our INFO lines, not those of every library it imports (onnxscript: hundreds per export)."""
    code = textwrap.dedent(
        """
        import logging
        from capi_backbones.cli.main import _configure_logging
        _configure_logging(False)
        assert logging.getLogger("capi_backbones.features").isEnabledFor(logging.INFO)
        assert not logging.getLogger("capi_backbones.features").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("onnxscript").isEnabledFor(logging.INFO)
        logging.getLogger("onnxscript").info("flood")
        logging.getLogger("capi_backbones.x").info("ours")
        _configure_logging(True)
        assert logging.getLogger("capi_backbones.x").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("onnxscript").isEnabledFor(logging.DEBUG)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "INFO ours\n"


def test_python_dash_m_capi_backbones():
    from capi_backbones import __version__

    result = subprocess.run(
        [sys.executable, "-m", "capi_backbones", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.strip() == f"capi-backbones {__version__}", result


def test_a_command_can_add_its_own_check(monkeypatch, capsys):
    """main runs the command's set_defaults(check=...) before its handler."""
    from capi_backbones.cli import model_commands

    def refuse(args):
        raise CliError("--json is refused here")

    def register(subparsers, original=model_commands.register):
        original(subparsers)
        subparsers.choices["list"].set_defaults(check=refuse)

    monkeypatch.setattr(model_commands, "register", register)
    assert main(["list", "--json"]) == 2
    assert capsys.readouterr().err.strip() == "capi-backbones list: error: --json is refused here"


def test_logging_is_not_set_on_the_root_logger_by_main(folder):
    output = subprocess.run(
        [
            sys.executable,
            "-c",
            "import logging, sys; from capi_backbones.cli.main import main; main(['list']);"
            "print(logging.getLogger().level)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
    )
    assert output.returncode == 0, output.stderr
    assert int(output.stdout.strip().splitlines()[-1]) == logging.WARNING


def test_progress_bars_on_terminals_only(monkeypatch):
    import argparse
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or a log file
    assert not checks.progress_wanted(argparse.Namespace(no_progress=False))
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert checks.progress_wanted(argparse.Namespace(no_progress=False))
    assert not checks.progress_wanted(argparse.Namespace(no_progress=True))
