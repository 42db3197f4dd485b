"""``capi-backbones extract`` end to end in a subprocess (a tiny model saved in the official checkpoint layout,
architecture inferred by the loader), resuming, and one-line user errors without tracebacks."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from capi_backbones.cli.main import main
from capi_backbones.features import FeatureExtractor, load_index, load_saved_features
from capi_backbones.models import CapiConfig, CapiModel

TINY = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=48, pred_depth=2, pred_num_heads=2)


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = CapiModel(TINY).eval()
    weights = tmp_path / "tiny.pth"
    torch.save({f"backbone.{k}": v for k, v in model.state_dict().items()}, weights)  # the official layout
    images = tmp_path / "images"
    (images / "cats").mkdir(parents=True)
    Image.fromarray(data.astronaut()[::8, ::8]).save(images / "astronaut.jpg")
    Image.fromarray(data.chelsea()[::6, ::6]).save(images / "cats" / "chelsea.png")
    Image.fromarray(data.camera()[::8, ::8]).save(images / "camera.png")
    return model, weights, images


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "capi_backbones.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.mark.slow
def test_extract_end_to_end_and_resume(setup, tmp_path):
    model, weights, images = setup
    out = tmp_path / "features"
    args = [
        "extract",
        images,
        "--out",
        out,
        "--weights",
        weights,
        "--image-size",
        "28",
        "--shard-size",
        "2",
        "--workers",
        "1",
        "--no-progress",
    ]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "3 images written" in result.stderr
    index = load_index(out)
    assert sorted(f for s in index["shards"] for f in s["files"]) == ["astronaut.jpg", "camera.png", "cats/chelsea.png"]
    expected = FeatureExtractor(model, image_size=28)
    for shard in load_saved_features(out):
        for row, name in enumerate(shard.files):
            torch.testing.assert_close(shard.pooled[row], expected(images / name).pooled[0], rtol=1e-4, atol=1e-5)

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert "0 images written in 0 shard(s), 3 already done" in again.stderr


@pytest.mark.slow
def test_user_error_is_one_line_without_traceback_in_a_subprocess(setup, tmp_path):
    _, _, images = setup
    result = run_cli("extract", images, "--out", tmp_path / "out", "--weights", tmp_path / "nope.pth")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "capi-backbones extract: error:" in result.stderr and "nope.pth" in result.stderr
    help_text = run_cli("extract", "--help")
    assert help_text.returncode == 0 and "--shard-size" in help_text.stdout and "--no-pooled" in help_text.stdout


def error_line(capsys, *args) -> str:
    assert main(["extract", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_user_errors_print_one_clear_line(setup, tmp_path, capsys):
    _, weights, images = setup
    (tmp_path / "empty").mkdir()
    assert "No image files found" in error_line(
        capsys, tmp_path / "empty", "--out", tmp_path / "o", "--weights", weights
    )
    assert "does not exist" in error_line(
        capsys, tmp_path / "missing.jpg", "--out", tmp_path / "o", "--weights", weights
    )
    (tmp_path / "notes.txt").write_text("hi")
    assert "not an image file" in error_line(
        capsys, tmp_path / "notes.txt", "--out", tmp_path / "o", "--weights", weights
    )
    assert "missing.pth" in error_line(capsys, images, "--out", tmp_path / "o", "--weights", tmp_path / "missing.pth")
    assert "is an architecture without weights" in error_line(
        capsys, images, "--out", tmp_path / "o", "--model", "capi_vits14"
    )
    assert "--image-size must be a multiple of 14 between 14 and 7168, got 100 (nearest: 98 or 112)" in error_line(
        capsys, images, "--out", tmp_path / "o", "--weights", weights, "--image-size", "100"
    )
    assert "only allowed on CUDA" in error_line(
        capsys, images, "--out", tmp_path / "o", "--weights", weights, "--device", "cpu", "--precision", "fp16"
    )
    assert not (tmp_path / "o").exists()


def test_failed_images_give_exit_code_1_and_are_listed(setup, tmp_path, capsys):
    _, weights, images = setup
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code = main(
        [
            "extract",
            str(images),
            "--out",
            str(tmp_path / "o"),
            "--weights",
            str(weights),
            "--image-size",
            "28",
            "--workers",
            "0",
            "--no-progress",
            "--format",
            "npy",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "3 images written" in err and "1 failed" in err and "failed: broken.jpg: Cannot read image" in err
    assert [f["file"] for f in load_index(tmp_path / "o")["failed"]] == ["broken.jpg"]


def test_extract_imports_no_training_code(setup, tmp_path):
    """Extraction gets ranks, signals and devices from capi_backbones.runtime, never from another command."""
    _, weights, images = setup
    code = (
        "import sys\n"
        "from capi_backbones.cli.main import main\n"
        f"code = main(['extract', {str(images)!r}, '--out', {str(tmp_path / 'o')!r}, '--weights', {str(weights)!r},"
        " '--image-size', '28', '--workers', '0', '--no-progress'])\n"
        "assert code == 0, code\n"
        "print(sorted(m for m in sys.modules if m.startswith(('capi_backbones.train', 'capi_backbones.evals'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    # also the imports made only under torchrun (inside functions), read off the source
    import ast
    import importlib

    for module in ["capi_backbones.cli.feature_commands", *FEATURE_MODULES]:
        tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in imported if m.startswith(("capi_backbones.train", "capi_backbones.evals"))], module


FEATURE_MODULES = [
    "capi_backbones.features." + info.name
    for info in __import__("pkgutil").iter_modules(__import__("capi_backbones.features").features.__path__)
]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nophotos", "--out", "o"], "Image path 'nophotos' does not exist"),
        (["photos", "--out", ""], "The output folder is an empty path"),
        (["photos", "--out", "o", "--image-size", "99999998"], "--image-size must be a multiple of 14 between"),
        (["photos", "--out", "o", "--shard-size", "0"], "--shard-size must be at least 1, got 0."),
        (["photos", "--out", "notes.txt"], "Output path 'notes.txt' exists and is not a directory."),
    ],
)
def test_mistakes_are_reported_before_torch_is_imported(tmp_path, args, message):
    """issue 18: a typo costs a fraction of a second, not a model load."""
    (tmp_path / "photos").mkdir()
    Image.fromarray(data.camera()[::8, ::8]).save(tmp_path / "photos" / "camera.png")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "w.pth").write_bytes(b"")  # exists: the weights are read only after the checks
    code = (
        "import sys, time\n"
        "from capi_backbones.cli.main import main\n"
        "start = time.perf_counter()\n"
        f"code = main(['extract', *{args!r}, '--weights', 'w.pth'])\n"
        "print(code, 'torch' in sys.modules, round(time.perf_counter() - start, 3))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    exit_code, torch_imported, _seconds = result.stdout.split()
    assert (exit_code, torch_imported) == ("2", "False"), result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "o").exists()


def test_no_progress_bar_is_written_into_logs(setup, tmp_path, capsys):
    """issue 18: stderr redirected to a file (not a terminal) gets the summary, not a progress bar."""
    _, weights, images = setup
    args = ["extract", images, "--out", tmp_path / "o", "--weights", weights, "--image-size", "28", "--workers", "0"]
    assert main([*map(str, args)]) == 0
    err = capsys.readouterr().err
    assert "3 images written" in err and "img/s" not in err and "|" not in err
