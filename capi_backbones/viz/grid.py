"""Pictures of PCA maps with Pillow only: upsampling, the grid image and atomic PNG writing.

The grid has one row per image: input | PCA RGB | component 1 | ... | component k, the components drawn with
the ``coolwarm`` colormap (blue = low, grey = mean, red = high). Maps are upsampled with nearest-neighbour
interpolation by default, which keeps the patch edges crisp ("bilinear"/"bicubic" look smoother but blur
small parts)."""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from capi_backbones.atomic_files import atomic_path
from capi_backbones.constants import DEFAULT_RESAMPLE, PCA_MIN_TILE_HEIGHT, PCA_TILE_HEIGHT, RESAMPLE_NAMES
from capi_backbones.viz.colormap import coolwarm
from capi_backbones.viz.pca import PcaResult

__all__ = ["RESAMPLE_MODES", "pca_grid", "save_png", "upsample"]

RESAMPLE_MODES = {name: Image.Resampling[name.upper()] for name in RESAMPLE_NAMES}
BACKGROUND = (255, 255, 255)
BORDER = (200, 200, 200)
TEXT = (40, 40, 40)
PADDING = 8  # pixels around and between tiles
LABEL_SIZE = 13


def _resample_mode(resample: str) -> Image.Resampling:
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"Unknown resample mode {resample!r}. Allowed: {', '.join(RESAMPLE_MODES)}.")
    return RESAMPLE_MODES[resample]


def upsample(values: np.ndarray, size: tuple[int, int], resample: str = DEFAULT_RESAMPLE) -> np.ndarray:
    """Resize a (h, w) or (h, w, c) float map to ``size`` = (H, W), channel by channel. Returns float32."""
    mode = _resample_mode(resample)
    values = np.asarray(values, dtype=np.float32)
    squeeze = values.ndim == 2
    if squeeze:
        values = values[..., None]  # (h, w, 1)
    if values.ndim != 3:
        raise ValueError(f"Expected a (h, w) or (h, w, c) map, got shape {values.shape}.")
    height, width = size
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(values[..., c]), mode="F").resize((width, height), mode))
        for c in range(values.shape[-1])
    ]
    out = np.stack(channels, axis=-1)  # (H, W, c)
    return out[..., 0] if squeeze else out


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"Expected an RGB image (H, W, 3), got an array of shape {array.shape}.")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)  # floats in [0, 1]
    return Image.fromarray(array[..., :3])


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_width: float) -> str:
    """``text``, shortened in the middle with an ellipsis until it is at most ``max_width`` pixels wide."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    keep = len(text)
    while (
        keep > 1 and draw.textlength(text[: keep // 2] + "..." + text[len(text) - keep // 2 :], font=font) > max_width
    ):
        keep -= 1
    return text[: keep // 2] + "..." + text[len(text) - keep // 2 :]


def _tile(values: np.ndarray, size: tuple[int, int], resample: str) -> Image.Image:
    """An (h, w, 3) RGB map in [0, 1] upsampled to ``size`` (H, W)."""
    rgb = np.clip(upsample(values, size, resample), 0.0, 1.0)
    return Image.fromarray(np.rint(rgb * 255).astype(np.uint8))


def pca_grid(
    images: Sequence,
    results: Sequence[PcaResult],
    *,
    n_heatmaps: int | None = None,
    tile_height: int = PCA_TILE_HEIGHT,
    resample: str = DEFAULT_RESAMPLE,
    labels: bool = True,
    row_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Grid picture: per row input | PCA RGB | the first ``n_heatmaps`` components (all by default).

    images: PIL images or (H, W, 3) arrays (uint8, or floats in [0, 1]), shown as the model saw them: each is
    resized to its row's tile, whose aspect ratio is the feature grid's (h, w).
    labels: draw the column titles, and ``row_labels`` (e.g. file names) above each row when given.
    """
    if len(images) != len(results):
        raise ValueError(f"Got {len(images)} images but {len(results)} PCA results; pass one result per image.")
    if row_labels is not None and len(row_labels) != len(images):
        raise ValueError(f"Got {len(row_labels)} row labels for {len(images)} images; pass one label per image.")
    if not results:
        raise ValueError("Nothing to draw: no images given.")
    if tile_height < PCA_MIN_TILE_HEIGHT:
        raise ValueError(f"tile_height must be at least {PCA_MIN_TILE_HEIGHT} pixels, got {tile_height}.")
    available = min(r.n_components for r in results)
    n_heatmaps = available if n_heatmaps is None else n_heatmaps
    if not 0 <= n_heatmaps <= available:
        raise ValueError(f"n_heatmaps must be between 0 and {available} (the components computed), got {n_heatmaps}.")
    _resample_mode(resample)

    rows = []
    for image, result in zip(images, results, strict=True):
        h, w = result.grid_size
        size = (tile_height, max(1, round(tile_height * w / h)))  # (H, W)
        tiles = [_to_pil(image).resize(size[::-1], Image.Resampling.BICUBIC), _tile(result.rgb, size, resample)]
        heat = result.display_components()[..., :n_heatmaps]  # (h, w, n) in [0, 1], NaN outside the foreground
        for c in range(n_heatmaps):
            colored = coolwarm(upsample(heat[..., c], size, resample))  # NaN (background) -> black
            tiles.append(Image.fromarray(colored))
        rows.append(tiles)

    n_cols = len(rows[0])
    col_widths = [max(row[c].width for row in rows) for c in range(n_cols)]
    font = _font(LABEL_SIZE)
    header = LABEL_SIZE + PADDING if labels else 0
    row_header = LABEL_SIZE + PADDING if labels and row_labels is not None else 0  # a file name above each row
    width = sum(col_widths) + PADDING * (n_cols + 1)
    height = header + (row_header + tile_height) * len(rows) + PADDING * (len(rows) + 1)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    xs = [PADDING + sum(col_widths[:c]) + PADDING * c for c in range(n_cols)]
    if labels:
        names = ["input", "PCA 1-3 as RGB"] + [f"component {c + 1}" for c in range(n_heatmaps)]
        for x, col_width, name in zip(xs, col_widths, names, strict=True):
            draw.text((x + col_width / 2, PADDING + LABEL_SIZE / 2), name, fill=TEXT, font=font, anchor="mm")
    for r, row in enumerate(rows):
        y = header + PADDING + r * (row_header + tile_height + PADDING) + row_header
        if row_header:
            text = _fit(draw, row_labels[r], font, width - 2 * PADDING)
            draw.text((PADDING, y - PADDING / 2), text, fill=TEXT, font=font, anchor="ls")
        for x, col_width, tile in zip(xs, col_widths, row, strict=True):
            left = x + (col_width - tile.width) // 2
            canvas.paste(tile, (left, y))
            draw.rectangle((left - 1, y - 1, left + tile.width, y + tile.height), outline=BORDER)
    return canvas


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as PNG atomically (temporary file in the same folder, then rename). Creates the folder."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"Output file {str(path)!r} must end in .png.")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path
