"""The explorer page's data (no browser): self-contained, features within the stated approximation, PCA maps from
viz, pooled ranking, limits; and ``capi-backbones explore`` errors (exit 2 before any model loads)."""

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from capi_backbones.cli.main import main
from capi_backbones.features import FeatureExtractor
from capi_backbones.pretrained import create_model
from capi_backbones.viz import joint_pca_maps, pca_map
from capi_backbones.viz.explore import (
    FLOAT16_COSINE_BOUND,
    FOREGROUND_THRESHOLDS,
    MAX_PATCHES,
    MAX_PHOTOS,
    MAX_STORED_VALUES,
    ExplorerLimitError,
    ModelFeatures,
    build_explorer,
    check_limits,
    extract_model_features,
    write_explorer,
)

DOCS = Path(__file__).parents[1] / "docs" / "explorer.md"
IMAGE_SIZE = 56  # 4 patches on the shorter side: few enough patches that every one is a measured query


def page_data(page: str) -> dict:
    payload = re.search(r'<script id="explorer-data" type="application/json">(.*?)</script>', page, re.S)[1]
    return json.loads(payload)


def stored_features(model: dict) -> np.ndarray:
    approximation = model["approximation"]
    values = np.frombuffer(base64.b64decode(model["features"]), dtype="<f2")
    return values.reshape(-1, approximation["dims"]).astype(np.float64)


def unit_rows(feature_maps) -> np.ndarray:
    flat = np.concatenate([np.asarray(m, dtype=np.float64).reshape(-1, m.shape[-1]) for m in feature_maps])
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def photos():
    return [
        Image.fromarray(data.astronaut()),
        Image.fromarray(data.coffee()),
        Image.fromarray(data.chelsea()),
    ]


@pytest.fixture(scope="module")
def features(photos):
    torch.manual_seed(0)
    extractor = FeatureExtractor(create_model("capi_vits14", pretrained=False), device="cpu", image_size=IMAGE_SIZE)
    return extract_model_features(photos, extractor, name="vits random")


@pytest.fixture(scope="module")
def page(photos, features):
    return build_explorer(photos, features, labels=["astronaut", "coffee", "chelsea"])


def test_page_is_one_self_contained_file(page):
    """No URL the browser would fetch: scripts and styles inline, photos as data URIs, a CSP that forbids the rest."""
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert not re.search(r"<link[^>]*stylesheet", page)
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", page)
    assert not re.search(r"url\(\s*['\"]?(?!data:)", page)
    assert "default-src 'none'" in page
    assert "{{" not in page.replace(json.dumps(page_data(page)["title"]), "")
    photos = page_data(page)["photos"]
    assert [p["name"] for p in photos] == ["astronaut", "coffee", "chelsea"]
    assert all(p["src"].startswith("data:image/jpeg;base64,") for p in photos)


def test_photos_have_the_processed_size(page, features):
    """Each photo is stored at the size the model saw it, so that the patch grid lies on it exactly."""
    for photo, feature_map in zip(page_data(page)["photos"], features.feature_maps, strict=True):
        h, w = feature_map.shape[:2]
        assert (photo["h"], photo["w"]) == (h, w)
        with Image.open(__import__("io").BytesIO(base64.b64decode(photo["src"].split(",", 1)[1]))) as image:
            assert image.size == (14 * w, 14 * h)
    assert min(features.feature_maps[0].shape[:2]) == IMAGE_SIZE // 14


def test_float16_similarities_within_the_stated_bound(page, features):
    """Dot products of the stored features differ from the float32 cosine similarities by at most the bound, and
    the page states the largest difference measured (all patches are queries here: it is the exact maximum)."""
    model = page_data(page)["models"][0]
    approximation = model["approximation"]
    exact = unit_rows(features.feature_maps)
    stored = stored_features(model)
    assert stored.shape == exact.shape and approximation["dims"] == approximation["featureDim"] == 384
    errors = np.abs(stored @ stored.T - exact @ exact.T)
    assert approximation["bound"] == FLOAT16_COSINE_BOUND
    assert errors.max() <= FLOAT16_COSINE_BOUND
    assert approximation["queries"] == len(exact)  # every patch measured
    assert approximation["measuredMaxError"] == pytest.approx(errors.max(), rel=1e-9, abs=1e-12)
    assert errors.max() > 1e-6  # float16 did round


def test_projected_features_state_their_measured_error(photos, features):
    """dims=K keeps the best rank-K approximation of the dot products (top singular directions) and states its
    error; more dimensions, smaller error."""
    errors = {}
    exact = unit_rows(features.feature_maps)
    for dims in (8, 32):  # of 384; 64 patches: rank 64 at most
        model = page_data(build_explorer(photos, features, dims=dims))["models"][0]
        stored = stored_features(model)
        assert stored.shape == (len(exact), dims)
        actual = np.abs(stored @ stored.T - exact @ exact.T).max()
        assert model["approximation"]["bound"] is None
        assert model["approximation"]["measuredMaxError"] == pytest.approx(actual, rel=1e-9)
        singular = np.linalg.svd(exact, compute_uv=False)
        # rank-K optimum of the Gram matrix in spectral norm is the (K+1)-th eigenvalue; max entry error <= that
        assert actual <= singular[dims] ** 2 + 2 * FLOAT16_COSINE_BOUND
        errors[dims] = actual
    assert errors[32] < errors[8]


def test_pca_layers_are_the_viz_maps(page, features):
    """Per-image and joint PCA maps, at every slider position, are viz.pca_map / joint_pca_maps' RGB; thresholds that
    keep too few patches carry viz's message."""
    model = page_data(page)["models"][0]
    thresholds = page_data(page)["thresholds"]
    assert thresholds == [None, *FOREGROUND_THRESHOLDS]
    sizes = [m.shape[0] * m.shape[1] for m in features.feature_maps]
    bounds = np.cumsum([0, *sizes])
    for index in (0, 3, len(thresholds) - 1):
        threshold = thresholds[index]
        for mode in ("image", "joint"):
            layer = model["pca"][mode][index]
            rgb = np.frombuffer(base64.b64decode(layer["rgb"]), dtype=np.uint8).reshape(-1, 3)
            try:
                if mode == "joint":
                    expected = joint_pca_maps(features.feature_maps, foreground_threshold=threshold)
                else:
                    expected = []
                    for m in features.feature_maps:
                        try:
                            expected.append(pca_map(m, foreground_threshold=threshold))
                        except ValueError:
                            expected.append(None)
            except ValueError as error:
                assert layer["errors"] == [str(error)] * len(sizes)
                continue
            for i, result in enumerate(expected):
                if result is None:
                    assert "keeps" in layer["errors"][i]
                    continue
                assert layer["errors"][i] is None
                want = np.rint(result.rgb.reshape(-1, 3) * 255).astype(np.uint8)
                np.testing.assert_array_equal(rgb[bounds[i] : bounds[i + 1]], want)


def test_pooled_ranking_is_the_cosine_of_pooled_embeddings(page, features):
    model = page_data(page)["models"][0]
    pooled = features.pooled / np.linalg.norm(features.pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(model["pooledSimilarity"], pooled @ pooled.T, atol=1e-5)


def test_two_models_side_by_side_need_one_patch_grid(photos, features):
    other = ModelFeatures("other", [m[:, :-1] for m in features.feature_maps])
    with pytest.raises(ValueError, match="different patch grids"):
        build_explorer(photos, [features, other])
    second = ModelFeatures("copy", [m * 2.0 for m in features.feature_maps], features.pooled)
    models = page_data(build_explorer(photos, [features, second], names=["A", "B"]))["models"]
    assert [m["name"] for m in models] == ["A", "B"]
    np.testing.assert_array_equal(stored_features(models[0]), stored_features(models[1]))  # cosine: scale-free


def test_write_explorer_refuses_other_suffixes(tmp_path, photos, features):
    with pytest.raises(ValueError, match=r"must end in \.html"):
        write_explorer(tmp_path / "page.png", photos, features)
    assert list(tmp_path.iterdir()) == []
    path = write_explorer(tmp_path / "sub" / "page.html", photos, features)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in path.parent.iterdir()] == ["page.html"]


def test_limits_name_the_limit():
    check_limits(MAX_PHOTOS, MAX_PATCHES, MAX_STORED_VALUES)  # at the limits: fine
    with pytest.raises(ExplorerLimitError, match=f"limit of {MAX_PHOTOS} photos"):
        check_limits(MAX_PHOTOS + 1)
    with pytest.raises(ExplorerLimitError, match=f"limit of {MAX_PATCHES} patches"):
        check_limits(10, MAX_PATCHES + 1)
    with pytest.raises(ExplorerLimitError, match=f"limit of {MAX_STORED_VALUES} values.*--dims"):
        check_limits(10, 100, MAX_STORED_VALUES + 1)


def test_stored_values_limit_checked_before_encoding(photos):
    """Two ViT-L-wide models at the patch limit exceed the stored values; with dims=K they fit."""
    big = np.zeros((16, MAX_PATCHES // (16 * MAX_PHOTOS), 1024), dtype=np.float32)  # no copies: one array
    models = [ModelFeatures(name, [big] * MAX_PHOTOS) for name in "AB"]
    images = [photos[0]] * MAX_PHOTOS
    assert MAX_PHOTOS * big.shape[0] * big.shape[1] == MAX_PATCHES
    with pytest.raises(ExplorerLimitError, match=f"over the limit of {MAX_STORED_VALUES} values per page"):
        build_explorer(images, models)
    check_limits(MAX_PHOTOS, MAX_PATCHES, MAX_PATCHES * 2 * 512)  # what dims=512 would store


# ---- command line: every limit and usage error is one line and exit 2, before a model loads ----------------------
@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    from capi_backbones.cli import explore_commands

    monkeypatch.setattr(explore_commands, "build_extractor", refuse)


def run_explore(capsys, *args) -> tuple[int, str]:
    code = main(["explore", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_too_many_photos(tmp_path, capsys, no_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(MAX_PHOTOS + 1):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i:03d}.png")
    code, err = run_explore(capsys, folder, "--out", tmp_path / "x.html", "--random-init")
    assert code == 2
    assert err.strip().splitlines() == [
        f"capi-backbones explore: error: {MAX_PHOTOS + 1} photos exceed the limit of {MAX_PHOTOS} photos per page; "
        "split them into several pages."
    ]
    assert not (tmp_path / "x.html").exists()


def test_cli_too_many_patches(tmp_path, capsys, no_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    n = MAX_PATCHES // (32 * 32) + 1  # at 448 px a square photo has 32 x 32 patches
    for i in range(n):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(folder / f"{i:03d}.png")
    code, err = run_explore(capsys, folder, "--out", tmp_path / "x.html", "--random-init", "--image-size", "448")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert f"{n * 1024} patches, over the limit of {MAX_PATCHES} patches per page" in err
    assert not (tmp_path / "x.html").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "x.png", "--random-init"], "--out must be a .html or .htm file"),
        (["--out", "x.html", "--model", "capi_vits14"], "--model capi_vits14 is an architecture without weights"),
        (
            ["--out", "x.html", "--random-init", "--compare-model", "capi_vits14"],
            "--compare-model capi_vits14 is an architecture without weights",
        ),
        (["--out", "x.html", "--random-init", "--compare-name", "B"], "--compare-name names a second model"),
        (["--out", "x.html", "--random-init", "--dims", "0"], "--dims must be a positive"),
    ],
)
def test_cli_usage_errors(tmp_path, capsys, no_model, monkeypatch, args, message):
    photo = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(photo)
    monkeypatch.chdir(tmp_path)
    code, err = run_explore(capsys, photo, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_cli_stored_values_checked_before_loading(tmp_path, capsys, no_model):
    """Two ViT-L models at the patch limit: the widths of named models are known without loading them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(MAX_PHOTOS):
        Image.new("RGB", (30, 20), (i, 0, 0)).save(folder / f"{i:03d}.png")  # 3:2: 16 x 24 patches at 224 px
    args = [folder, "--out", tmp_path / "x.html", "--model", "capi_vitl14", "--random-init", "--compare-random-init"]
    code, err = run_explore(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{MAX_PATCHES * 2048} values, over the limit of {MAX_STORED_VALUES} values per page" in err
    assert "--dims" in err


def test_cli_writes_a_page_comparing_two_models(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "page.html"
    args = ["--model", "capi_vits14", "--random-init", "--compare-model", "capi_vitb14", "--compare-random-init"]
    code, err = run_explore(capsys, folder, "--out", out, *args, "--image-size", "56", "--device", "cpu")
    assert code == 1  # written, one photo left out
    assert "failed: " in err and "broken.jpg" in err
    assert "wrote" in err and "2 photos, 2 model(s)" in err
    page = page_data(out.read_text(encoding="utf-8"))
    assert [p["name"] for p in page["photos"]] == ["astronaut.png", "coffee.jpg"]
    assert [m["name"] for m in page["models"]] == ["capi_vits14 (random init)", "capi_vitb14 (random init)"]
    assert [m["approximation"]["featureDim"] for m in page["models"]] == [384, 768]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html", "photos"]


def test_docs_python_blocks_run_offline(tmp_path, monkeypatch):
    """docs/explorer.md's Python example runs as pasted (offline: random weights) and writes a page."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOCS.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        if not code.startswith("# needs the network"):
            exec(compile(code, str(DOCS), "exec"), {"__name__": "__docs__"})
    assert page_data((tmp_path / "explore.html").read_text(encoding="utf-8"))["photos"][1]["name"] == "flower"


def test_explore_help_does_not_import_torch():
    code = (
        "import sys\nfrom capi_backbones.cli.main import main\n"
        "try:\n    main(['explore', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'sklearn' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--compare-weights" in result.stdout
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    limits = f"{MAX_PHOTOS} photos, {MAX_PATCHES} patches per model, {MAX_STORED_VALUES} stored feature values"
    assert limits in help_text  # the help states the limits in force
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_cli_compare_random_init_takes_the_checkpoint_architecture(tmp_path, capsys):
    """--weights PATH --compare-random-init: random weights of the checkpoint's architecture, named as such; a
    checkpoint of an architecture of its own needs --compare-model."""
    from checkpoint_files import tiny_model, write_safetensors_checkpoint

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    torch.manual_seed(1)
    write_safetensors_checkpoint(create_model("capi_vits14", pretrained=False), tmp_path / "mine.safetensors")
    out = tmp_path / "page.html"
    args = ["--out", out, "--compare-random-init", "--image-size", "28", "--device", "cpu", "--no-progress"]
    args.append("--overwrite")  # the second run writes the same page
    code, err = run_explore(capsys, photo, "--weights", tmp_path / "mine.safetensors", *args)
    assert code == 0, err
    models = page_data(out.read_text(encoding="utf-8"))["models"]
    assert [m["name"] for m in models] == ["mine.safetensors", "capi_vits14 (random init)"]
    assert [m["approximation"]["featureDim"] for m in models] == [384, 384]
    write_safetensors_checkpoint(tiny_model(), tmp_path / "tiny.safetensors")
    code, err = run_explore(capsys, photo, "--weights", tmp_path / "tiny.safetensors", *args)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("capi-backbones explore: error: --compare-random-init: the --weights checkpoint has an")
