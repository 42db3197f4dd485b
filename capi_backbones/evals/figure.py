"""The pictures an evaluation writes beside ``results.json``, drawn with PIL only (evals import neither viz nor train).

``classification_figure``: for each probe kind and representation, a heatmap of the validation top-1 over the
lr x wd grid (the selected cell outlined), then the test top-1 of every probe and representation side by side.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from capi_backbones.atomic_files import atomic_path

__all__ = ["classification_figure", "save_png"]

CELL = 34  # heatmap cell, pixels
MARGIN = 8
TEXT = (20, 20, 20)
# a perceptual ramp (viridis at 5 stops): dark purple for low accuracy, yellow for high
RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
PROBE_COLOURS = {"knn": (99, 110, 250), "linear": (239, 85, 59), "attentive": (0, 160, 120)}


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` as a PNG file atomically (a temporary name, then a rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _colour(value: float, low: float, high: float) -> tuple[int, int, int]:
    t = 0.0 if high <= low else (value - low) / (high - low)
    position = np.clip(t, 0, 1) * (len(RAMP) - 1)
    i = min(int(position), len(RAMP) - 2)
    mixed = RAMP[i] + (RAMP[i + 1] - RAMP[i]) * (position - i)
    return tuple(int(round(c)) for c in mixed)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _heatmap(grid: dict, title: str, font) -> Image.Image:
    """One panel: rows are learning rates, columns weight decays, cells the validation top-1 in percent."""
    lrs, wds, scores = grid["learning_rates"], grid["weight_decays"], np.asarray(grid["val_top1"], dtype=np.float64)
    label_w, head_h = 58, 34
    width = label_w + CELL * len(wds) + MARGIN
    height = head_h + CELL * len(lrs) + 18
    panel = Image.new("RGB", (max(width, 150), height), "white")
    draw = ImageDraw.Draw(panel)
    draw.text((MARGIN, 2), title, fill=TEXT, font=font)
    low, high = float(scores.min()), float(scores.max())
    for j, wd in enumerate(wds):
        draw.text((label_w + j * CELL + 2, 18), f"{wd:g}", fill=TEXT, font=font)
    for i, lr in enumerate(lrs):
        y = head_h + i * CELL
        draw.text((2, y + CELL // 3), f"{lr:g}", fill=TEXT, font=font)
        for j in range(len(wds)):
            x = label_w + j * CELL
            colour = _colour(scores[i, j], low, high)
            draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), fill=colour)
            ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
            draw.text((x + 3, y + CELL // 3), f"{100 * scores[i, j]:.1f}", fill=ink, font=font)
    i, j = grid["selected"]
    x, y = label_w + j * CELL, head_h + i * CELL
    draw.rectangle((x, y, x + CELL - 1, y + CELL - 1), outline=(255, 0, 0), width=3)
    draw.text((2, height - 15), "rows: lr, columns: wd", fill=TEXT, font=font)
    return panel


def _bars(rows: Sequence[dict], font) -> Image.Image:
    """Test top-1 of the selected setting of each probe, grouped by representation."""
    selected = [r for r in rows if r.get("selected")]
    representations = list(dict.fromkeys(r["representation"] for r in selected))
    probes = list(dict.fromkeys(r["probe"] for r in selected))
    bar_w, gap, plot_h, axis_w, top = 24, 22, 160, 34, 34
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    groups = []  # (representation, its rows, group width)
    for representation in representations:
        own = [r for p in probes for r in selected if r["representation"] == representation and r["probe"] == p]
        groups.append((representation, own, max(len(own) * bar_w, _text_size(scratch, representation, font)[0])))
    width = axis_w + sum(w + gap for _, _, w in groups) + gap + 110
    image = Image.new("RGB", (max(width, 300), top + plot_h + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 2), "test top-1 (%) of the selected setting", fill=TEXT, font=font)
    for tick in (0, 25, 50, 75, 100):
        y = top + plot_h - tick * plot_h // 100
        draw.line((axis_w, y, width - 110, y), fill=(225, 225, 225))
        draw.text((2, y - 6), f"{tick}", fill=TEXT, font=font)
    x = axis_w + gap
    for representation, own, group_w in groups:
        left = x + (group_w - len(own) * bar_w) // 2
        for row in own:
            y = top + plot_h - int(round(row["top1"] * plot_h))
            colour = PROBE_COLOURS.get(row["probe"], (120, 120, 120))
            draw.rectangle((left, y, left + bar_w - 3, top + plot_h), fill=colour)
            draw.text((left, y - 12), f"{100 * row['top1']:.0f}", fill=TEXT, font=font)
            left += bar_w
        draw.text((x, top + plot_h + 4), representation, fill=TEXT, font=font)
        x += group_w + gap
    for k, probe in enumerate(probes):  # legend
        y = top + 10 + 16 * k
        draw.rectangle((width - 100, y, width - 88, y + 10), fill=PROBE_COLOURS.get(probe, (120, 120, 120)))
        draw.text((width - 82, y - 1), probe, fill=TEXT, font=font)
    return image


def classification_figure(grids: dict, rows: Sequence[dict]) -> Image.Image:
    """``grids``: ``{probe: {representation: {"learning_rates", "weight_decays", "val_top1" (lr x wd),
    "selected" (i, j)}}}``; ``rows``: the result rows (``probe``, ``representation``, ``top1``, ``selected``)."""
    font = ImageFont.load_default()
    panels = [_heatmap(grid, f"{probe} {rep}: val top-1", font) for probe, by_rep in grids.items()
              for rep, grid in by_rep.items()]  # fmt: skip
    bars = _bars(rows, font)
    heat_w = sum(p.width for p in panels) + MARGIN * max(len(panels) - 1, 0)
    heat_h = max((p.height for p in panels), default=0)
    canvas = Image.new("RGB", (max(heat_w, bars.width), heat_h + bars.height + MARGIN), "white")
    x = 0
    for panel in panels:
        canvas.paste(panel, (x, 0))
        x += panel.width + MARGIN
    canvas.paste(bars, (0, heat_h + MARGIN))
    return canvas
