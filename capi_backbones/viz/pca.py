"""PCA maps of dense features (the paper's Fig. 7, 12 and 13).

The features of every patch are projected on their first principal components, which are

- whitened: each component has unit variance over the patches the PCA was fitted on;
- sign-fixed: each component is flipped so that its skewness over those patches is positive. PCA signs are
  arbitrary; with this rule the small, distinct group of patches (often the object) gets the high values, and
  the picture does not change when the features change sign;
- mapped to [0, 1] for display by the affine map ``(z + r) / (2 r)`` clipped to [0, 1], with a fixed
  ``r = value_range`` (2.3 by default: about 98% of unit-variance values lie in [-2.3, 2.3]). A fixed range,
  rather than per-image min/max, keeps colours comparable between images of a joint PCA and is robust to
  outlier patches.

Components 1-3 become R, G and B. ``pca_map`` fits one PCA per image; ``joint_pca_maps`` fits one PCA on the
patches of all images, so that a colour means the same thing in every image.

Foreground mask (optional, as in DINOv2 visualisations): fit the PCA on all patches, keep the patches whose
whitened, sign-fixed first component is above ``foreground_threshold``, refit the PCA on these patches only and
show the background in black. The threshold is in standard deviations of component 1: 0 splits at the mean,
and larger values keep fewer patches. Because of the sign fix, the minority group of patches lies on the
positive side, which is usually the object. To choose T, look at the first heatmap column of a grid made
without a threshold: red patches have high values; pick the value that separates object from background
(0 to 1 works for most photos with a small object). If the object covers most of the image, the background
may come out on the positive side; then this mask is not the right tool.

This module is the only place in the package that imports scikit-learn.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from capi_backbones.constants import N_RGB
from capi_backbones.constants import PCA_VALUE_RANGE as DEFAULT_VALUE_RANGE

__all__ = ["DEFAULT_VALUE_RANGE", "PcaProjection", "PcaResult", "fit_pca_projection", "joint_pca_maps", "pca_map"]


@dataclass(frozen=True)
class PcaProjection:
    """A fitted, whitened and sign-fixed PCA: ``transform(x) = ((x - mean) @ basis.T) / scale``, the signs folded into
    ``basis``."""

    mean: np.ndarray  # (D,) mean of the fitted features
    basis: np.ndarray  # (k, D) principal axes, sign-fixed
    scale: np.ndarray  # (k,) standard deviation of each component over the fitted features
    explained_variance_ratio: np.ndarray  # (k,) share of the total variance per component

    def transform(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N, k) whitened components."""
        return ((features - self.mean) @ self.basis.T) / self.scale


@dataclass
class PcaResult:
    """PCA map of one image's patch features."""

    rgb: np.ndarray  # (h, w, 3) float32 in [0, 1]; black outside the foreground
    components: np.ndarray  # (h, w, k) whitened, sign-fixed components; NaN outside the foreground
    explained_variance_ratio: np.ndarray  # (k,) of the PCA that made the map (shared by a joint PCA)
    foreground: np.ndarray | None  # (h, w) bool mask, or None when no threshold was given
    value_range: float  # the r of the display map (z + r) / (2 r)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]

    @property
    def n_components(self) -> int:
        return self.components.shape[-1]

    def display_components(self) -> np.ndarray:
        """(h, w, k) components mapped to [0, 1] (0.5 = the mean); NaN outside the foreground."""
        return to_unit_interval(self.components, self.value_range)


def to_unit_interval(values: np.ndarray, value_range: float) -> np.ndarray:
    """Affine map of whitened values: -r -> 0, 0 -> 0.5, r -> 1, clipped. NaN stays NaN."""
    return np.clip((values + value_range) / (2 * value_range), 0.0, 1.0)


def _skewness(values: np.ndarray) -> np.ndarray:
    """Sample skewness of each column of (N, k) values."""
    centered = values - values.mean(axis=0)
    std = centered.std(axis=0)
    return (centered**3).mean(axis=0) / np.where(std > 0, std, 1.0) ** 3


def fit_pca_projection(features: np.ndarray, n_components: int = N_RGB) -> PcaProjection:
    """Fit a whitened, skewness-sign-fixed PCA on (N, D) features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"Expected features of shape (N, D), got {features.shape}.")
    n, dim = features.shape
    if n_components < 1 or n_components > min(n, dim):
        raise ValueError(
            f"Cannot fit {n_components} principal components on {n} patches of dimension {dim}: "
            f"at most min(patches, dim) = {min(n, dim)}. Use fewer components or more/larger images."
        )
    if not np.isfinite(features).all():
        raise ValueError("Features contain NaN or infinite values; check the model's dtype and input.")
    message = (
        f"The features have fewer than {n_components} directions of non-zero variance "
        "(constant or duplicated patches); use fewer components or other images."
    )
    if np.ptp(features, axis=0).max() == 0:  # all patches equal: sklearn would divide by a zero total variance
        raise ValueError(message)
    pca = PCA(n_components, svd_solver="auto", random_state=0).fit(features)
    scale = np.sqrt(pca.explained_variance_)  # sklearn's variance has ddof=1: whitened components have var 1
    if (scale <= 1e-12 * np.abs(features).max()).any():
        raise ValueError(message)
    basis = pca.components_
    signs = np.where(_skewness(((features - pca.mean_) @ basis.T) / scale) < 0, -1.0, 1.0)
    return PcaProjection(
        mean=pca.mean_,
        basis=basis * signs[:, None],
        scale=scale,
        explained_variance_ratio=pca.explained_variance_ratio_.copy(),
    )


def _check_feature_maps(feature_maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    maps = [np.asarray(m, dtype=np.float64) for m in feature_maps]
    if not maps:
        raise ValueError("Expected at least one feature map, got none.")
    for i, m in enumerate(maps):
        if m.ndim != 3:
            raise ValueError(f"Feature map {i} has shape {m.shape}; expected (h, w, D) (channels last).")
    dims = {m.shape[-1] for m in maps}
    if len(dims) > 1:
        raise ValueError(f"Feature maps have different feature dimensions {sorted(dims)}; use one model for all.")
    return maps


def _fit_and_map(
    maps: list[np.ndarray], n_components: int, foreground_threshold: float | None, value_range: float
) -> list[PcaResult]:
    """One PCA over the patches of all ``maps`` (each (h, w, D)), optionally refitted on the foreground."""
    if value_range <= 0:
        raise ValueError(f"value_range must be positive, got {value_range}.")
    n_fit = max(n_components, N_RGB)
    flat = [m.reshape(-1, m.shape[-1]) for m in maps]  # (h*w, D) each
    stacked = np.concatenate(flat)  # (sum h*w, D)
    masks = None
    if foreground_threshold is not None:
        first = fit_pca_projection(stacked, 1)
        masks = [first.transform(f)[:, 0] > foreground_threshold for f in flat]  # (h*w,) each
        n_fg = int(sum(m.sum() for m in masks))
        if n_fg < n_fit:
            first_all = first.transform(stacked)[:, 0]
            raise ValueError(
                f"Foreground threshold {foreground_threshold} keeps {n_fg} of {len(stacked)} patches; at least "
                f"{n_fit} are needed. Component 1 ranges from {first_all.min():.2f} to {first_all.max():.2f} "
                "(whitened); use a lower threshold."
            )
        stacked = np.concatenate([f[m] for f, m in zip(flat, masks, strict=True)])
    projection = fit_pca_projection(stacked, n_fit)
    results = []
    for i, (m, f) in enumerate(zip(maps, flat, strict=True)):
        h, w = m.shape[:2]
        z = projection.transform(f)  # (h*w, n_fit)
        mask = None
        if masks is not None:
            mask = masks[i]
            z[~mask] = np.nan
        rgb = np.nan_to_num(to_unit_interval(z[:, :N_RGB], value_range), nan=0.0)
        results.append(
            PcaResult(
                rgb=rgb.reshape(h, w, N_RGB).astype(np.float32),
                components=z[:, :n_components].reshape(h, w, n_components),
                explained_variance_ratio=projection.explained_variance_ratio[:n_components].copy(),
                foreground=None if mask is None else mask.reshape(h, w),
                value_range=value_range,
            )
        )
    return results


def pca_map(
    features: np.ndarray,
    *,
    n_components: int = N_RGB,
    foreground_threshold: float | None = None,
    value_range: float = DEFAULT_VALUE_RANGE,
) -> PcaResult:
    """PCA map of one image: ``features`` (h, w, D) -> ``PcaResult`` with ``n_components`` components.

    Takes numpy arrays (a CPU torch tensor works too, through ``np.asarray``)."""
    maps = _check_feature_maps([features])
    return _fit_and_map(maps, n_components, foreground_threshold, value_range)[0]


def joint_pca_maps(
    feature_maps: Sequence[np.ndarray],
    *,
    n_components: int = N_RGB,
    foreground_threshold: float | None = None,
    value_range: float = DEFAULT_VALUE_RANGE,
) -> list[PcaResult]:
    """One PCA fitted on the patches of all images (each (h_i, w_i, D)), so that colours are comparable.

    A (B, h, w, D) array counts as B images."""
    if getattr(feature_maps, "ndim", None) == 3:
        raise ValueError("Got a single (h, w, D) feature map; use pca_map for one image or pass a list of maps.")
    maps = _check_feature_maps(list(feature_maps))
    return _fit_and_map(maps, n_components, foreground_threshold, value_range)
