"""The crops shared by training and evaluation (capi_backbones.transforms), and the layering they allow: the
evaluation imports neither the training nor the visualisation packages."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from capi_backbones.transforms import CROP_RESIZE_RATIO, center_crop


@pytest.mark.parametrize("size", [(300, 400), (517, 233), (224, 224)])
def test_center_crop_is_the_official_resize_256_then_center_crop_224(size):
    T = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    official = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    ours = center_crop(image, 224)
    assert ours.size == (224, 224)
    assert np.array_equal(np.asarray(ours), np.asarray(official(image)))
    assert CROP_RESIZE_RATIO == 256 / 224


def test_center_crop_keeps_its_256_224_margin_at_other_sizes():
    image = Image.new("RGB", (640, 480))
    assert center_crop(image, 448).size == (448, 448)
    # the shorter side is resized to 448 * 256 / 224 = 512 first: a 64-pixel margin, 32 on each side
    gradient = Image.fromarray(np.tile(np.arange(640, dtype=np.uint8)[None, :, None] // 3, (480, 1, 3)))
    cropped = np.asarray(center_crop(gradient, 448))
    resized = np.asarray(gradient.resize((682, 512), Image.Resampling.BICUBIC))
    assert np.array_equal(cropped, resized[32:480, 117:565])


def test_the_evaluation_imports_neither_training_nor_visualisation():
    code = (
        "import sys, capi_backbones.evals, capi_backbones.evals.classification_protocol, "
        "capi_backbones.evals.segmentation_protocol, capi_backbones.evals.figure, capi_backbones.cli.eval_commands; "
        "print(sorted(m for m in sys.modules if m.startswith(('capi_backbones.train', 'capi_backbones.viz'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_evaluation_module_imports_training_or_visualisation_even_lazily():
    import ast
    from pathlib import Path

    import capi_backbones

    package = Path(capi_backbones.__file__).parent
    for path in [*sorted((package / "evals").glob("*.py")), package / "cli" / "eval_commands.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("capi_backbones.train", "capi_backbones.viz")), f"{path.name}: {name}"
