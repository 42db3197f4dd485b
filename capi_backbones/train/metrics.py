"""Training metrics: one JSON object per line in the run directory, and loss curves drawn with Pillow."""

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from capi_backbones.atomic_files import WriteError, atomic_path, atomic_write_text

__all__ = ["MetricsWriter", "draw_curves", "read_metrics"]

logger = logging.getLogger(__name__)

CURVE_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def _parse(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(records, whether the last line was torn). Only the last line may be torn: a kill or a full disk
    during an append leaves it cut short; a bad line anywhere else is an error naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as error:
            if number == len(lines):
                return records, True
            raise ValueError(
                f"{path} line {number} is not a metrics record ({error}). Delete or fix that line to continue."
            ) from None
        records.append(record)
    return records, False


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL metrics file (an empty list when it does not exist). A torn last line (a kill
    or a full disk mid-append) is left out, with a warning naming the file."""
    path = Path(path)
    if not path.exists():
        return []
    records, torn = _parse(path)
    if torn:
        logger.warning("%s: ignoring its last line, cut short by an interrupted write.", path)
    return records


class MetricsWriter:
    """Appends records to ``path`` (JSON lines). ``truncate_after(step)`` drops the records whose ``step``
    (steps done) is past ``step`` (a run resumed from the checkpoint of that step re-does them) and a torn
    last line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        records, torn = _parse(self.path)
        kept = [r for r in records if r.get("step", -1) <= step]
        if len(kept) == len(records) and not torn:
            return
        if torn:
            logger.warning("%s: dropping its last line, cut short by an interrupted write.", self.path)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:
            raise WriteError(self.path, error) from error


def _nice_number(value: float) -> str:
    return f"{value:.3g}"


def draw_curves(
    records: Sequence[dict[str, Any]],
    path: str | Path,
    keys: Sequence[str] = ("loss", "clustering_loss", "target_entropy"),
    *,
    x_key: str = "step",
    panel_size: tuple[int, int] = (480, 300),
) -> Path:
    """One panel per metric (value against ``x_key``), side by side, saved as a PNG (atomically)."""
    path = Path(path)
    width, height = panel_size
    margin_left, margin_right, margin_top, margin_bottom = 64, 16, 28, 36
    canvas = Image.new("RGB", (width * len(keys), height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for panel, key in enumerate(keys):
        x0 = panel * width
        left, right = x0 + margin_left, x0 + width - margin_right
        top, bottom = margin_top, height - margin_bottom
        draw.text((x0 + margin_left, 8), key, fill="black", font=font)
        draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
        points = [
            (float(r[x_key]), float(r[key]))
            for r in records
            if key in r and x_key in r and r[key] is not None and math.isfinite(float(r[key]))
        ]
        if not points:
            draw.text((left + 8, top + 8), "no data", fill=(120, 120, 120), font=font)
            continue
        xs, ys = zip(*points, strict=True)
        x_low, x_high = min(xs), max(xs)
        y_low, y_high = min(ys), max(ys)
        if x_high == x_low:
            x_high = x_low + 1
        if y_high == y_low:
            y_low, y_high = y_low - 0.5, y_high + 0.5

        def to_pixel(x, y, x_low=x_low, x_high=x_high, y_low=y_low, y_high=y_high, left=left, right=right,
                     top=top, bottom=bottom):  # fmt: skip
            px = left + (x - x_low) / (x_high - x_low) * (right - left)
            py = bottom - (y - y_low) / (y_high - y_low) * (bottom - top)
            return px, py

        color = CURVE_COLORS[panel % len(CURVE_COLORS)]
        pixels = [to_pixel(x, y) for x, y in points]
        if len(pixels) == 1:
            px, py = pixels[0]
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=color)
        else:
            draw.line(pixels, fill=color, width=2)
        draw.text((x0 + 4, top - 4), _nice_number(y_high), fill="black", font=font)
        draw.text((x0 + 4, bottom - 8), _nice_number(y_low), fill="black", font=font)
        draw.text((left, bottom + 6), _nice_number(x_low), fill="black", font=font)
        label = f"{x_key} {_nice_number(x_high)}"
        draw.text((right - 8 * len(label) + 8, bottom + 6), label, fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
