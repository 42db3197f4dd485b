"""Every script in examples/ runs offline (--random-init, a small image size) and writes sane outputs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
OFFLINE = ["--random-init", "--model", "capi_vits14", "--device", "cpu", "--image-size", "56"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # small models: threads only add contention

pytestmark = pytest.mark.slow  # each script starts a Python process with torch (several seconds)


def run_example(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(EXAMPLES / name), *OFFLINE, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_extract_features_prints_shapes():
    out = run_example("extract_features.py").stdout
    assert "capi_vits14 (random init)" in out
    assert "astronaut: image (56, 56) -> patch grid (4, 4); patch_features (1, 4, 4, 384), pooled (1, 384)" in out
    assert "coffee: image (56, 84) -> patch grid (4, 6); patch_features (1, 4, 6, 384)" in out
    assert "registers (1, 16, 384)" in out


def test_pca_visualisation_writes_png(tmp_path):
    out = tmp_path / "pca.png"
    stdout = run_example("pca_visualisation.py", "--out", str(out), "--joint", "--photos", "astronaut", "coffee").stdout
    assert f"wrote {out}" in stdout and "coffee: grid (4, 6)" in stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 4 * 224 and image.height > 2 * 224
        assert np.asarray(image.convert("RGB")).std() > 20


def test_knn_classification_beats_chance():
    stdout = run_example("knn_classification.py", "--limit", "150").stdout
    chance = float(re.search(r"chance: ([\d.]+)", stdout).group(1))
    accuracies = [float(a) for a in re.findall(r"accuracy ([\d.]+)", stdout)]
    assert "predictor pooling" in stdout and "mean of patch features" in stdout and len(accuracies) == 2
    assert all(chance + 0.1 < a <= 1 for a in accuracies), stdout  # even random features separate digits


def test_patch_similarity_writes_png_and_checks_the_patch(tmp_path):
    out = tmp_path / "sim.png"
    stdout = run_example(
        "patch_similarity.py", "--image", "coffee", "--row", "1", "--col", "5", "--out", str(out)
    ).stdout
    assert "patch (1, 5) of a 4 x 6 grid" in stdout and "max 1.000" in stdout  # the patch itself
    with Image.open(out) as image:
        assert image.size == (3 * 84 + 4 * 8, 56 + 2 * 8)  # three panels at the processed size 56 x 84
    bad = run_example("patch_similarity.py", "--row", "9", "--out", str(tmp_path / "x.png"), check=False)
    assert bad.returncode == 2 and "outside the source grid" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.png").exists()


def test_finetune_timm_beats_the_linear_probe():
    """Small scale: a random-init 2-block model (the linear probe on its random features is the baseline), 200 steps
    of timm AdamW with layer decay from the probe as the head. The released weights do this at --image-size 112."""
    small = ["embed_dim=64", "depth=2", "num_heads=2", "pred_embed_dim=64", "pred_depth=1", "pred_num_heads=2"]
    stdout = run_example(
        "finetune_timm.py", "--image-size", "42", "--steps", "200", "--lr", "2e-3", "--model-kwarg", *small
    ).stdout
    probe = float(re.search(r"linear probe on frozen features: accuracy ([\d.]+)", stdout).group(1))
    tuned = float(re.search(r"fine-tuned \(200 steps, layer decay 0.75\): accuracy ([\d.]+)", stdout).group(1))
    assert 0.5 < probe < tuned, stdout  # chance is 0.1
    assert "fine-tuning beats the linear probe" in stdout
