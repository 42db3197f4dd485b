"""The feature explorer: one self-contained HTML page to look at what a backbone sees, and to compare two.

The page (no server, no network: scripts, styles, photos and features are all inside the file) shows

- the photos in a grid, each at the size the model saw it (the shorter side ``image_size``);
- per photo its PCA map, per image or joint, made by :func:`capi_backbones.viz.pca_map` /
  :func:`~capi_backbones.viz.joint_pca_maps` (whitened, skewness-sign-fixed components 1-3 as RGB), with the
  foreground threshold as a slider over :data:`FOREGROUND_THRESHOLDS` (each position precomputed here);
- a click (or, when asked, the mouse hovering) on a patch of any photo: the cosine similarity of that patch to every
  patch of every photo, as heatmaps over the photos, with a colour bar and the value under the cursor;
- the photos ranked by the cosine similarity of their pooled embeddings (the predictor pooling, the official
  ``global_repr``) to the selected photo;
- with two models (for example random init against trained weights, or two training runs), both side by side.

Features travel in the page as unit-normalised float16 vectors: a cosine similarity computed from them differs from
the float32 one by at most :data:`FLOAT16_COSINE_BOUND` (``2**-10``; the page states this bound and the largest
error measured on sample query patches). With ``dims=K`` they are first projected on the top K right singular vectors
of all unit-normalised patch features of the model (the best rank-K approximation of their dot products); the error
then grows with what the dropped directions hold, and the page states the error measured on sample query patches.

Limits (:func:`check_limits`, checked before any model loads where the inputs allow it): at most
:data:`MAX_PHOTOS` photos, :data:`MAX_PATCHES` patches per model over all photos (64 photos of 3:2 aspect at 224 px)
and :data:`MAX_STORED_VALUES` feature values over all models (patches x stored dimensions): the click-to-heatmap
time grows with the latter (docs/explorer.md gives the figures measured by benchmarks/bench_explore.py).

Python: ``build_explorer(images, extractor_or_features, ...)`` returns the page as a string, ``write_explorer(path,
...)`` writes it atomically. Command line: ``capi-backbones explore IMAGES... --out explore.html``.
This module imports numpy, Pillow and (through ``viz.pca``) scikit-learn; a
:class:`~capi_backbones.features.FeatureExtractor` passed in brings torch.
"""

import base64
import html
import io
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from capi_backbones.atomic_files import atomic_write_text
from capi_backbones.constants import EXPLORER_MAX_PATCHES as MAX_PATCHES
from capi_backbones.constants import EXPLORER_MAX_PHOTOS as MAX_PHOTOS
from capi_backbones.constants import EXPLORER_MAX_STORED_VALUES as MAX_STORED_VALUES
from capi_backbones.constants import EXPLORER_TITLE, PATCH_SIZE
from capi_backbones.viz.colormap import COOLWARM_ANCHORS
from capi_backbones.viz.pca import joint_pca_maps, pca_map

__all__ = [
    "FLOAT16_COSINE_BOUND",
    "FOREGROUND_THRESHOLDS",
    "MAX_PATCHES",
    "MAX_PHOTOS",
    "MAX_STORED_VALUES",
    "ExplorerLimitError",
    "ModelFeatures",
    "build_explorer",
    "check_extractor_limits",
    "check_limits",
    "extract_model_features",
    "write_explorer",
]

MAX_MODELS = 2  # side by side
FLOAT16_COSINE_BOUND = 2.0**-10  # |cos(fp16(a), fp16(b)) - cos(a, b)| for unit a, b (2 x 2**-11, plus rounding)
FOREGROUND_THRESHOLDS = tuple(round(-0.5 + 0.25 * i, 2) for i in range(11))  # -0.5 .. 2.0 standard deviations
N_ERROR_QUERIES = 64  # query patches on which the stored similarities are compared with the exact ones
PHOTO_QUALITY = 85  # JPEG quality of the photos in the page
ASSETS = "explore_assets"


class ExplorerLimitError(ValueError):
    """The inputs exceed what one page holds; the message names the limit and what to change."""


@dataclass
class ModelFeatures:
    """What the page shows of one model: patch feature maps and pooled embeddings of every photo."""

    name: str  # shown above the model's column
    feature_maps: list[np.ndarray]  # (h, w, D) per photo
    pooled: np.ndarray | None = None  # (N, D_pred): the photo ranking; None leaves it out
    description: str = ""  # where the weights came from
    details: dict = field(default_factory=dict)


def check_limits(n_photos: int, n_patches: int | None = None, stored_values: int | None = None) -> None:
    """Raise :class:`ExplorerLimitError` when one page cannot hold the inputs: ``n_photos`` photos, ``n_patches``
    patches per model over all photos, ``stored_values`` feature values over all models."""
    if n_photos < 1:
        raise ExplorerLimitError("No photos to show; give at least one image.")
    if n_photos > MAX_PHOTOS:
        raise ExplorerLimitError(
            f"{n_photos} photos exceed the limit of {MAX_PHOTOS} photos per page; split them into several pages."
        )
    if n_patches is not None and n_patches > MAX_PATCHES:
        raise ExplorerLimitError(
            f"{n_photos} photos make {n_patches} patches, over the limit of {MAX_PATCHES} patches per page; "
            "use fewer photos or a smaller --image-size."
        )
    if stored_values is not None and stored_values > MAX_STORED_VALUES:
        raise ExplorerLimitError(
            f"The features take {stored_values} values, over the limit of {MAX_STORED_VALUES} values per page "
            "(patches x stored dimensions, summed over models); use --dims K (fewer stored dimensions), fewer photos "
            "or a smaller --image-size."
        )


def check_extractor_limits(images: Sequence[Image.Image], extractors: Sequence, dims: int | None = None) -> None:
    """:func:`check_limits` for ``images`` (PIL) run through ``extractors`` (FeatureExtractor), before they run."""
    sizes = [extractors[0].processed_size(image.height, image.width) for image in images]
    n_patches = sum(h * w for h, w in sizes) // extractors[0].model.patch_size ** 2
    check_limits(len(images), n_patches)
    check_limits(len(images), n_patches, n_patches * sum(dims or e.model.embed_dim for e in extractors))


def extract_model_features(
    images: Sequence, extractor, *, name: str | None = None, progress: bool = False
) -> ModelFeatures:
    """Patch features and pooled embeddings of ``images`` (PIL images or paths) from a ``FeatureExtractor``, a batch
    at a time (with a progress bar if ``progress``)."""
    from tqdm.auto import tqdm

    images = list(images)
    outputs = []
    with tqdm(total=len(images), desc=name or "features", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), extractor.batch_size):
            batch = images[start : start + extractor.batch_size]
            outputs.extend(extractor.extract(batch, pooled=True))
            bar.update(len(batch))
    return ModelFeatures(
        name=name or getattr(extractor, "model_description", "model"),
        feature_maps=[output.patch_features[0].numpy() for output in outputs],
        pooled=np.concatenate([output.pooled.numpy() for output in outputs]),
        description=getattr(extractor, "model_description", ""),
        details={"image_size": extractor.image_size},
    )


def _unit_rows(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def _reduction_basis(unit: np.ndarray, dims: int) -> np.ndarray:
    """(D, dims): the top right singular vectors of the (N, D) unit-normalised features (uncentered)."""
    _, eigenvectors = np.linalg.eigh(unit.T @ unit)  # eigenvalues ascending
    return eigenvectors[:, ::-1][:, :dims]


def _encode_features(
    feature_maps: list[np.ndarray], dims: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """(N, d) little-endian float16 stored rows and the description of the approximation (measured)."""
    exact = _unit_rows(np.concatenate([m.reshape(-1, m.shape[-1]) for m in feature_maps]).astype(np.float64))
    dim = exact.shape[1]
    if dims is not None and not 1 <= dims <= dim:
        raise ValueError(f"dims must be between 1 and the feature dimension {dim}, got {dims}.")
    reduced = exact if dims is None or dims == dim else exact @ _reduction_basis(exact, dims)
    stored = reduced.astype("<f2")
    queries = rng.choice(len(exact), size=min(N_ERROR_QUERIES, len(exact)), replace=False)
    errors = stored[queries].astype(np.float64) @ stored.astype(np.float64).T - exact[queries] @ exact.T
    measured = float(np.abs(errors).max())
    approximation = {
        "encoding": "float16",
        "dims": int(stored.shape[1]),
        "featureDim": int(dim),
        "measuredMaxError": measured,
        "queries": int(len(queries)),
        "bound": FLOAT16_COSINE_BOUND if reduced is exact else None,
    }
    return stored, approximation


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _pca_result(feature_maps: list[np.ndarray], photo: int | None, threshold: float | None):
    """viz's PCA map(s) of one photo (``photo``) or of all photos jointly (None), or the message of its ValueError."""
    try:
        if photo is None:
            return joint_pca_maps(feature_maps, foreground_threshold=threshold)
        return pca_map(feature_maps[photo], foreground_threshold=threshold)
    except ValueError as error:  # e.g. the threshold keeps too few patches
        return str(error)


def _pca_layers(feature_maps: list[np.ndarray], workers: int | None = None) -> dict:
    """Per mode ('image', 'joint') and threshold (None first, then FOREGROUND_THRESHOLDS): the PCA RGB of every
    photo as one base64 uint8 (sum h*w, 3) array, and why a photo (or the joint fit) has no map.

    The fits run in ``workers`` threads (default: one per CPU), each with single-threaded BLAS."""
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    thresholds = (None, *FOREGROUND_THRESHOLDS)
    tasks = [(None, t) for t in thresholds] + [(i, t) for t in thresholds for i in range(len(feature_maps))]
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool, threadpool_limits(1 if workers > 1 else None):
        results = dict(zip(tasks, pool.map(lambda task: _pca_result(feature_maps, *task), tasks), strict=True))
    sizes = [m.shape[0] * m.shape[1] for m in feature_maps]
    starts = np.cumsum([0, *sizes])
    layers = {"image": [], "joint": []}
    for threshold in thresholds:
        for mode in layers:
            if mode == "joint":
                joint = results[None, threshold]
                per_photo = [joint] * len(sizes) if isinstance(joint, str) else joint
            else:
                per_photo = [results[i, threshold] for i in range(len(sizes))]
            rgb = np.zeros((starts[-1], 3), dtype=np.uint8)
            for i, result in enumerate(per_photo):
                if not isinstance(result, str):
                    rgb[starts[i] : starts[i + 1]] = np.rint(result.rgb.reshape(-1, 3) * 255).astype(np.uint8)
            errors = [result if isinstance(result, str) else None for result in per_photo]
            layers[mode].append({"rgb": _b64(rgb), "errors": errors})
    return layers


def _pooled_similarity(pooled: np.ndarray | None) -> list[list[float]] | None:
    if pooled is None:
        return None
    unit = _unit_rows(np.asarray(pooled, dtype=np.float64))
    return np.round(unit @ unit.T, 5).tolist()


def _photo(image, size: tuple[int, int]) -> str:
    """The photo resized to (W, H) pixels as a JPEG data URI."""
    if not isinstance(image, Image.Image):
        from capi_backbones.images import load_image  # paths: the decoder the extractor uses (EXIF orientation)

        image = load_image(image)
    buffer = io.BytesIO()
    image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=PHOTO_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _label(image, index: int) -> str:
    if isinstance(image, str | os.PathLike):
        return Path(image).name
    return getattr(image, "filename", "") and Path(image.filename).name or f"photo {index + 1}"


def _check_models(models: list[ModelFeatures], n_photos: int) -> list[tuple[int, int]]:
    if not 1 <= len(models) <= MAX_MODELS:
        raise ValueError(f"The explorer shows 1 or {MAX_MODELS} models side by side, got {len(models)}.")
    grids = None
    for model in models:
        if len(model.feature_maps) != n_photos:
            raise ValueError(f"Model '{model.name}' has {len(model.feature_maps)} feature maps for {n_photos} photos.")
        model_grids = [tuple(m.shape[:2]) for m in model.feature_maps]
        if grids is not None and model_grids != grids:
            raise ValueError(
                "The two models give different patch grids for the same photos; compare them at one image size "
                "(--image-size)."
            )
        grids = model_grids
    return grids


def _explorer_data(images: list, models: list[ModelFeatures], labels: list[str], dims: int | None, title: str):
    grids = _check_models(models, len(images))
    n_patches = sum(h * w for h, w in grids)
    check_limits(len(images), n_patches)
    stored_dims = [m.feature_maps[0].shape[-1] if dims is None else dims for m in models]
    check_limits(len(images), n_patches, n_patches * sum(stored_dims))
    patch = PATCH_SIZE
    photos = [
        {"name": label, "h": h, "w": w, "src": _photo(image, (w * patch, h * patch))}
        for image, label, (h, w) in zip(images, labels, grids, strict=True)
    ]
    rng = np.random.default_rng(0)
    entries = []
    for model in models:
        stored, approximation = _encode_features(model.feature_maps, dims, rng)
        entries.append(
            {
                "name": model.name,
                "description": model.description,
                "approximation": approximation,
                "features": _b64(stored),
                "pooledSimilarity": _pooled_similarity(model.pooled),
                "pca": _pca_layers(model.feature_maps),
            }
        )
    from capi_backbones import __version__

    return {
        "title": title,
        "version": __version__,
        "patchSize": patch,
        "photos": photos,
        "models": entries,
        "thresholds": [None, *FOREGROUND_THRESHOLDS],
        "colormap": COOLWARM_ANCHORS.astype(int).tolist(),
        "limits": {"photos": MAX_PHOTOS, "patches": MAX_PATCHES, "storedValues": MAX_STORED_VALUES},
    }


def _asset(name: str) -> str:
    return resources.files("capi_backbones.viz").joinpath(ASSETS).joinpath(name).read_text(encoding="utf-8")


def _page(data: dict) -> str:
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    parts = {
        "title": html.escape(data["title"]),
        "style": _asset("explorer.css"),
        "script": _asset("explorer.js"),
        "data": payload,
    }
    return re.sub(r"\{\{(title|style|script|data)\}\}", lambda match: parts[match[1]], _asset("explorer.html"))


def _as_models(models) -> list:
    return list(models) if isinstance(models, list | tuple) else [models]


def build_explorer(
    images: Sequence,
    models,
    *,
    labels: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    dims: int | None = None,
    title: str = EXPLORER_TITLE,
) -> str:
    """The explorer page as one HTML string.

    Args:
        images: the photos: paths or PIL images, at most :data:`MAX_PHOTOS`.
        models: one or two ``FeatureExtractor`` (run here on ``images``) or :class:`ModelFeatures` (features
            computed already, one (h, w, D) map per photo), shown side by side.
        labels: a name per photo (default: the file names).
        names: a name per model (default: the extractor's description of its weights).
        dims: store this many dimensions per patch (projected, see the module docstring) instead of all.
        title: the page title.
    """
    images = list(images)
    models = _as_models(models)
    check_limits(len(images))
    if not 1 <= len(models) <= MAX_MODELS:
        raise ValueError(f"The explorer shows 1 or {MAX_MODELS} models side by side, got {len(models)}.")
    if names is not None and len(names) != len(models):
        raise ValueError(f"Got {len(names)} names for {len(models)} models.")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"Got {len(labels)} labels for {len(images)} photos.")
    labels = list(labels) if labels is not None else [_label(image, i) for i, image in enumerate(images)]
    if not all(isinstance(image, Image.Image) for image in images):
        from capi_backbones.images import load_image

        images = [image if isinstance(image, Image.Image) else load_image(image) for image in images]
    extractors = [model for model in models if not isinstance(model, ModelFeatures)]
    if extractors:
        check_extractor_limits(images, extractors, dims)  # before any model runs
    features = []
    for i, model in enumerate(models):
        if not isinstance(model, ModelFeatures):
            model = extract_model_features(images, model)
        if names is not None:
            model = replace(model, name=names[i])
        features.append(model)
    return _page(_explorer_data(images, features, labels, dims, title))


def write_explorer(path: str | os.PathLike, images: Sequence, models, **options) -> Path:
    """Build the page (see :func:`build_explorer`) and write it atomically to ``path`` (.html)."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"Output file '{path}' must end in .html.")
    atomic_write_text(path, build_explorer(images, models, **options))
    return path
