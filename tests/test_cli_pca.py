"""``capi-backbones pca`` end to end in a subprocess, with a tiny model saved in the official layout."""

import os
import subprocess
import sys

import numpy as np
import pytest
from checkpoint_files import tiny_model, write_official_checkpoint
from PIL import Image
from skimage import data

from capi_backbones.cli.main import main
from capi_backbones.viz import pca_grid, pca_map
from capi_backbones.viz.grid import LABEL_SIZE, PADDING

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # tiny model: threads only add contention


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pca")
    write_official_checkpoint(tiny_model(), root / "tiny.pth")  # backbone.* keys plus head.*
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(data.astronaut()).resize((128, 128)).save(photos / "astronaut.png")
    Image.fromarray(data.coffee()).resize((150, 100)).save(photos / "coffee.jpg")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "capi_backbones.cli.main", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=120)


@pytest.mark.slow
def test_pca_writes_a_grid_png(workdir):
    out = workdir / "out" / "grid.png"
    args = ["pca", str(workdir / "photos"), "--out", str(out), "--weights", str(workdir / "tiny.pth")]
    result = run_cli(*args, "--joint", "--components", "2", "--image-size", "56", "--tile-height", "64")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and "2 images, joint PCA" in result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    # rows: astronaut (grid 4 x 4: 64 px wide) and coffee (grid 4 x 6: 96 px wide); 4 columns of width 96
    assert width == 4 * 96 + 5 * 8 and height > 2 * 64 + 3 * 8
    assert pixels.std() > 20  # a picture, not a blank canvas
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]


def test_pca_in_process_matches_the_library(workdir, monkeypatch):
    """The RGB tile equals pca_map of the features the extractor gives (nearest upsampling, no labels)."""
    from capi_backbones.features import FeatureExtractor

    out = workdir / "single.png"
    photo = workdir / "photos" / "astronaut.png"
    args = ["pca", str(photo), "--out", str(out), "--weights", str(workdir / "tiny.pth"), "--image-size", "56"]
    assert main([*args, "--no-labels", "--tile-height", "56", "--device", "cpu"]) == 0
    features = FeatureExtractor(weights=workdir / "tiny.pth", device="cpu", image_size=56).patch_features(photo)
    expected = pca_map(features[0].numpy()).rgb  # (4, 4, 3)
    pixels = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    tile = pixels[8 : 8 + 56, 8 + 56 + 8 : 8 + 56 + 8 + 56]  # second column of the only row
    np.testing.assert_allclose(tile[::14, ::14], np.rint(expected * 255), atol=1)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--out", "x.jpg"], "--out must be a .png file"),
        (["--out", "x.png", "--components", "0"], "--components must be between 1"),
        (["--out", "x.png", "--model", "capi_vits14"], "is an architecture without weights; add --weights PATH"),
        (["--out", "x.png", "--weights", "missing.pth"], "missing.pth"),
        (["--out", "x.png", "--image-size", "50"], "--image-size must be a multiple of 14"),
        (["--out", "x.png", "--foreground-threshold", "99"], "use a lower threshold"),
    ],
)
def test_user_errors_are_one_line_without_traceback(workdir, capsys, extra, message):
    weights = [] if "--weights" in extra or "--model" in extra else ["--weights", str(workdir / "tiny.pth")]
    extra = [str(workdir / a) if a.endswith((".png", ".jpg", ".pth")) else a for a in extra]
    assert main(["pca", str(workdir / "photos"), "--device", "cpu", *weights, *extra]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("capi-backbones pca: error:")]
    assert len(errors) == 1 and message in errors[0], stderr
    assert not (workdir / "x.png").exists()


def test_missing_image_and_help(workdir, capsys):
    assert main(["pca", str(workdir / "nope.jpg"), "--out", str(workdir / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["pca", "--help"])
    assert exited.value.code == 0
    helped = capsys.readouterr().out
    for option in ("--joint", "--components", "--foreground-threshold", "--model", "--weights", "--device"):
        assert option in helped
    assert "--batch-size" in helped and "--image-size" in helped


def test_unreadable_files_are_skipped_named_and_exit_1(workdir, capsys):
    """Like extract: a corrupt file is listed on stderr and left out of the grid; the others are drawn."""
    photos = workdir / "mixed"
    photos.mkdir()
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    Image.open(workdir / "photos" / "astronaut.png").save(photos / "astronaut.png")
    out = workdir / "mixed.png"
    args = ["pca", str(photos), "--out", str(out), "--weights", str(workdir / "tiny.pth"), "--device", "cpu"]
    assert main([*args, "--image-size", "56", "--tile-height", "56"]) == 1
    stderr = capsys.readouterr().err
    assert f"failed: {photos / 'broken.jpg'}: Cannot read image" in stderr, stderr
    assert "(1 image, per-image PCA" in stderr and "1 failed" in stderr, stderr
    with Image.open(out) as image:
        height = image.height
    # one row: column titles, the file name above the row, the tiles, paddings
    assert height == LABEL_SIZE + PADDING + LABEL_SIZE + PADDING + 56 + 2 * PADDING

    (photos / "astronaut.png").unlink()
    out.unlink()
    assert main([*args, "--image-size", "56"]) == 1  # nothing readable: nothing written
    assert "none of the 1 image could be used" in capsys.readouterr().err
    assert not out.exists()


def test_file_names_are_drawn_above_the_rows(workdir):
    maps = [np.random.default_rng(0).normal(size=(4, 4, 8)), np.random.default_rng(1).normal(size=(4, 6, 8))]
    photos = [np.zeros((56, 56, 3), np.uint8), np.zeros((56, 84, 3), np.uint8)]
    results = [pca_map(m) for m in maps]
    plain = np.asarray(pca_grid(photos, results, tile_height=32))
    named = np.asarray(pca_grid(photos, results, tile_height=32, row_labels=["astronaut.png", "coffee.jpg"]))
    assert named.shape[0] == plain.shape[0] + 2 * (LABEL_SIZE + PADDING) and named.shape[1] == plain.shape[1]
    header = row_header = LABEL_SIZE + PADDING  # column titles; a file name above each row
    for row in range(2):
        top = header + PADDING + row * (row_header + 32 + PADDING)
        assert (named[top : top + row_header] < 128).any(), f"no text above row {row}"  # dark text on white
    with pytest.raises(ValueError, match="one label per image"):
        pca_grid(photos, results, row_labels=["only one"])


def test_random_init_runs_offline_and_says_so(workdir, capsys):
    out = workdir / "random.png"
    photo = str(workdir / "photos" / "coffee.jpg")
    args = ["pca", photo, "--out", str(out), "--random-init", "--model", "capi_vits14", "--device", "cpu"]
    assert main([*args, "--image-size", "28", "--tile-height", "32", "--no-progress"]) == 0
    assert "--random-init: capi_vits14 with random weights" in capsys.readouterr().err
    assert out.exists()
    assert main([*args, "--weights", str(workdir / "tiny.pth")]) == 2
    assert "leave out --weights" in capsys.readouterr().err


def test_an_over_long_image_is_skipped_named_and_exit_1(workdir, capsys):
    """As extract does: one image more than 10 times longer than wide is left out, the others are drawn."""
    photos = workdir / "long"
    photos.mkdir()
    Image.new("RGB", (600, 20)).save(photos / "banner.png")
    Image.open(workdir / "photos" / "astronaut.png").save(photos / "astronaut.png")
    out = workdir / "long.png"
    args = ["pca", str(photos), "--out", str(out), "--weights", str(workdir / "tiny.pth"), "--device", "cpu"]
    assert main([*args, "--image-size", "28", "--tile-height", "32", "--no-progress"]) == 1
    stderr = capsys.readouterr().err
    assert f"failed: {photos / 'banner.png'}: 600x20 pixels, more than 10 times longer than wide" in stderr, stderr
    assert "add --square" in stderr and "keep_aspect" not in stderr
    assert "(1 image, per-image PCA" in stderr and out.exists()
    assert main([*args, "--image-size", "28", "--tile-height", "32", "--square", "--overwrite"]) == 0  # both drawn
    assert "(2 images" in capsys.readouterr().err


def test_random_init_without_model_uses_the_smallest_architecture(workdir, capsys):
    out = workdir / "smallest.png"
    photo = str(workdir / "photos" / "coffee.jpg")
    args = ["pca", photo, "--out", str(out), "--random-init", "--device", "cpu", "--image-size", "28"]
    assert main([*args, "--tile-height", "32"]) == 0
    err = capsys.readouterr().err
    assert "--random-init: capi_vits14 with random weights (seed 0), not pretrained; the smallest architecture" in err


@pytest.mark.slow
def test_no_progress_bar_into_a_log(workdir):
    """stderr is a pipe here, as in a log file: no bar, only the summary line."""
    out = workdir / "nobar.png"
    args = ["pca", str(workdir / "photos"), "--out", str(out), "--weights", str(workdir / "tiny.pth")]
    result = run_cli(*args, "--image-size", "28", "--tile-height", "32", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "img/s" not in result.stderr and "\r" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if not line.startswith(("INFO ", "WARNING "))] == [
        f"wrote {out} (2 images, per-image PCA, {Image.open(out).width}x{Image.open(out).height} px), 0 failed"
    ]
