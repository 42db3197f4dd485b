"""PCA maps and pictures (capi_backbones.viz) on synthetic features whose structure is known, checked against an
independent numpy eigendecomposition and against the definitions (unit variance, positive skewness)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from capi_backbones.viz import (
    coolwarm,
    fit_pca_projection,
    joint_pca_maps,
    pca_grid,
    pca_map,
    save_png,
    upsample,
)
from capi_backbones.viz.colormap import COOLWARM_ANCHORS


def skewed_features(h=6, w=7, dim=16, seed=0) -> np.ndarray:
    """(h, w, dim) features with three strong, skewed directions and small isotropic noise."""
    rng = np.random.default_rng(seed)
    latent = rng.exponential(size=(h * w, 3)) * np.array([5.0, 3.0, 2.0])  # skewed, decreasing variance
    mixing = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:3]  # (3, dim) orthonormal rows
    flat = latent @ mixing + 0.1 * rng.normal(size=(h * w, dim)) + rng.normal(size=dim)
    return flat.reshape(h, w, dim)


def skewness(values: np.ndarray) -> np.ndarray:
    centered = values - values.mean(axis=0)
    return (centered**3).mean(axis=0) / centered.std(axis=0) ** 3


def reference_components(flat: np.ndarray, k: int) -> np.ndarray:
    """Whitened principal components by an eigendecomposition of the covariance (sign not fixed)."""
    centered = flat - flat.mean(axis=0)
    eigvals, eigvecs = np.linalg.eigh(np.cov(centered, rowvar=False))
    order = np.argsort(eigvals)[::-1][:k]
    return centered @ eigvecs[:, order] / np.sqrt(eigvals[order])


# ---- PCA -------------------------------------------------------------------------------------------------------
def test_components_are_whitened_sign_fixed_principal_components():
    features = skewed_features()
    result = pca_map(features, n_components=3)
    z = result.components.reshape(-1, 3)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-10)
    np.testing.assert_allclose(z.var(axis=0, ddof=1), 1, rtol=1e-10)
    assert (skewness(z) > 0).all()
    ref = reference_components(features.reshape(-1, 16), 3)
    np.testing.assert_allclose(z, ref * np.sign(skewness(ref)), atol=1e-8)
    np.testing.assert_allclose(result.explained_variance_ratio.sum(), 1, atol=0.02)  # 3 strong directions


def test_sign_of_features_does_not_change_the_picture():
    features = skewed_features()
    plain, flipped = pca_map(features, n_components=4), pca_map(-features, n_components=4)
    np.testing.assert_allclose(flipped.components, plain.components, atol=1e-8)
    np.testing.assert_allclose(flipped.rgb, plain.rgb, atol=1e-6)


def test_rgb_is_the_affine_display_map_of_the_first_three_components():
    result = pca_map(skewed_features(), n_components=5, value_range=2.0)
    assert result.rgb.shape == (6, 7, 3) and result.rgb.dtype == np.float32
    assert result.components.shape == (6, 7, 5) and result.explained_variance_ratio.shape == (5,)
    expected = np.clip((result.components[..., :3] + 2.0) / 4.0, 0, 1)
    np.testing.assert_allclose(result.rgb, expected, atol=1e-6)
    assert result.rgb.min() >= 0 and result.rgb.max() <= 1
    assert result.foreground is None and result.grid_size == (6, 7)


def test_joint_of_one_image_equals_per_image():
    features = skewed_features()
    single, joint = pca_map(features, n_components=4), joint_pca_maps([features], n_components=4)
    assert len(joint) == 1
    np.testing.assert_array_equal(joint[0].components, single.components)
    np.testing.assert_array_equal(joint[0].rgb, single.rgb)


def test_joint_pca_is_one_fit_over_all_patches():
    maps = [skewed_features(seed=0), skewed_features(h=4, w=9, seed=1), skewed_features(seed=2) + 3.0]
    joint = joint_pca_maps(maps, n_components=3)
    assert [r.components.shape for r in joint] == [(6, 7, 3), (4, 9, 3), (6, 7, 3)]
    z = np.concatenate([r.components.reshape(-1, 3) for r in joint])
    np.testing.assert_allclose(z.var(axis=0, ddof=1), 1, rtol=1e-10)  # whitened over the union, not per image
    assert (skewness(z) > 0).all()
    flat = np.concatenate([m.reshape(-1, 16) for m in maps])
    ref = reference_components(flat, 3)
    np.testing.assert_allclose(z, ref * np.sign(skewness(ref)), atol=1e-8)
    per_image = pca_map(maps[2], n_components=3).components
    assert not np.allclose(joint[2].components, per_image)  # image 2 is shifted: the joint fit sees it differently
    assert all(np.array_equal(r.explained_variance_ratio, joint[0].explained_variance_ratio) for r in joint)


def test_foreground_mask_thresholds_component_one_and_refits_on_foreground():
    rng = np.random.default_rng(0)
    h, w, dim = 8, 8, 12
    obj = np.zeros((h, w), bool)
    obj[2:5, 3:6] = True  # 9 "object" patches, far from the 55 background ones
    flat = 0.3 * rng.normal(size=(h * w, dim))
    flat[obj.ravel()] += 4.0 * np.eye(dim)[0]
    features = flat.reshape(h, w, dim)
    result = pca_map(features, n_components=3, foreground_threshold=0.0)
    np.testing.assert_array_equal(result.foreground, obj)  # the minority group is on the positive side
    assert np.isnan(result.components[~obj]).all() and (result.rgb[~obj] == 0).all()
    z = result.components[obj]  # (9, 3): whitened over the foreground patches only
    np.testing.assert_allclose(z.var(axis=0, ddof=1), 1, rtol=1e-10)
    ref = reference_components(flat[obj.ravel()], 3)
    np.testing.assert_allclose(z, ref * np.sign(skewness(ref)), atol=1e-8)
    with pytest.raises(ValueError, match="keeps 0 of 64 patches"):
        pca_map(features, foreground_threshold=100.0)


def test_foreground_threshold_is_in_standard_deviations_of_the_whitened_component():
    features = 10.0 * skewed_features(h=12, w=12)  # component 1 has a raw standard deviation far from 1
    flat = features.reshape(-1, features.shape[-1])
    first = reference_components(flat, 1)[:, 0]
    first = first * np.sign(skewness(first[:, None]))[0]  # whitened, sign fixed like the picture
    raw = first * np.sqrt(np.linalg.eigvalsh(np.cov(flat, rowvar=False))[-1])  # the same component, not whitened
    for threshold in (1.0, -0.5):
        expected = (first > threshold).reshape(12, 12)
        assert 3 < expected.sum() < 141 and not np.array_equal(expected.ravel(), raw > threshold)
        np.testing.assert_array_equal(pca_map(features, foreground_threshold=threshold).foreground, expected)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda f: pca_map(f[..., :2]), "at most min"),
        (lambda f: pca_map(f[0]), r"expected \(h, w, D\)"),
        (lambda f: joint_pca_maps(f), "single"),
        (lambda f: joint_pca_maps([f, f[..., :8]]), "different feature dimensions"),
        (lambda f: joint_pca_maps([]), "at least one"),
        (lambda f: pca_map(np.ones_like(f)), "non-zero variance"),
        (lambda f: pca_map(np.repeat(f[..., :1], 16, axis=-1)), "non-zero variance"),  # rank 1
        (lambda f: pca_map(f, value_range=0), "positive"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(skewed_features())


def test_projection_transform_is_pure():
    flat = skewed_features().reshape(-1, 16)
    copy = flat.copy()
    projection = fit_pca_projection(flat, 3)
    projection.transform(flat)
    np.testing.assert_array_equal(flat, copy)


# ---- pictures --------------------------------------------------------------------------------------------------
def test_coolwarm_known_colors():
    np.testing.assert_array_equal(coolwarm(np.array([0.0, 0.5, 1.0])), [[59, 76, 192], [221, 221, 221], [180, 4, 38]])
    np.testing.assert_array_equal(coolwarm(np.array([-3.0, 7.0])), [[59, 76, 192], [180, 4, 38]])  # clipped
    np.testing.assert_array_equal(coolwarm(np.array([np.nan])), [[0, 0, 0]])
    assert len(COOLWARM_ANCHORS) == 17


def test_coolwarm_close_to_matplotlib():
    from matplotlib import colormaps  # a dev dependency, only for this check

    t = np.linspace(0, 1, 256)
    reference = colormaps["coolwarm"](t)[:, :3] * 255
    assert np.abs(coolwarm(t) - reference).max() <= 8


def test_upsample_nearest_repeats_patches_and_other_modes_keep_shape():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    big = upsample(values, (42, 56))
    np.testing.assert_array_equal(big, np.kron(values, np.ones((14, 14))))
    assert upsample(np.zeros((3, 4, 3)), (50, 61), "bicubic").shape == (50, 61, 3)
    smooth = upsample(values, (30, 40), "bilinear")
    assert smooth.min() >= values.min() - 1e-5 and smooth.max() <= values.max() + 1e-5
    with pytest.raises(ValueError, match="Allowed: nearest"):
        upsample(values, (4, 4), "lanczos")


def test_grid_layout_png_roundtrip(tmp_path):
    maps = [skewed_features(), skewed_features(h=4, w=8, seed=1)]
    results = joint_pca_maps(maps, n_components=4)
    images = [np.full((60, 70, 3), 200, np.uint8), Image.new("RGB", (100, 50), (10, 20, 30))]
    grid = pca_grid(images, results, n_heatmaps=2, tile_height=56, labels=False)
    # 4 columns (input, rgb, 2 heatmaps), widths max over rows: row 1 is 56 * 7/6 = 65 wide, row 2 112 wide
    assert grid.size == (4 * 112 + 5 * 8, 2 * 56 + 3 * 8)
    old_umask = os.umask(0o022)
    try:
        path = save_png(grid, tmp_path / "sub" / "grid.png")
    finally:
        os.umask(old_umask)
    with Image.open(path) as loaded:
        assert loaded.format == "PNG" and loaded.size == grid.size
        pixels = np.asarray(loaded.convert("RGB"))
    # the RGB tile of row 2 (second column, centred, nearest upsampling): patch (0, 0) fills its first 14 x 14
    x0, y0 = 8 + 112 + 8, 8 + 56 + 8
    expected = np.rint(results[1].rgb[0, 0] * 255)
    np.testing.assert_allclose(pixels[y0 : y0 + 14, x0 : x0 + 14], np.broadcast_to(expected, (14, 14, 3)), atol=1)
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644  # the umask's permissions, not mkstemp's 0600
    labelled = pca_grid(images, results, tile_height=56)
    assert labelled.height > grid.height and labelled.width == 6 * 112 + 7 * 8


def test_grid_rejects_mismatched_inputs():
    results = [pca_map(skewed_features())]
    with pytest.raises(ValueError, match="2 images but 1"):
        pca_grid([np.zeros((5, 5, 3), np.uint8)] * 2, results)
    with pytest.raises(ValueError, match="n_heatmaps"):
        pca_grid([np.zeros((5, 5, 3), np.uint8)], results, n_heatmaps=4)


def test_save_png_rejects_other_suffix_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.png"):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "x.jpg")
    assert not list(tmp_path.iterdir())


def test_import_capi_backbones_does_not_import_sklearn_or_viz():
    code = (
        "import sys, capi_backbones; "
        "bad = [m for m in ('sklearn', 'capi_backbones.viz', 'matplotlib') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
