"""What an evaluation run writes: ``results.json`` (config, versions, results) and a printed table."""

import contextlib
import json
import os
import platform
import sys
from pathlib import Path

from capi_backbones.atomic_files import atomic_write_text
from capi_backbones.features.folder_lock import FolderBusyError, FolderLock

__all__ = ["format_table", "locked_output", "versions", "write_results"]

RESULTS_NAME = "results.json"


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries a result depends on."""
    import numpy
    import sklearn
    import torch

    import capi_backbones

    return {
        "capi_backbones": capi_backbones.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def write_results(out_dir: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` plus ``versions`` as ``out_dir/results.json`` (atomically)."""
    path = Path(out_dir) / RESULTS_NAME
    atomic_write_text(path, json.dumps({**payload, "versions": versions()}, indent=2))
    return path


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table; floats in [0, 1] are shown as percentages with one decimal."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{100 * value:.1f}" if 0 <= value <= 1 else f"{value:g}"
        return str(value)

    cells = [[cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@contextlib.contextmanager
def locked_output(out_dir: Path):
    """Hold the run lock of an evaluation's ``--out`` folder (created if needed) for the whole run, so that a second
    run into it stops at once, before it deletes or writes anything."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = FolderLock(out_dir)
        lock.acquire()
    except FolderBusyError:
        raise FolderBusyError(
            f"'{out_dir}' is used by another evaluation run. Wait for it to finish, or use another --out folder."
        ) from None
    try:
        yield
    finally:
        lock.release()
