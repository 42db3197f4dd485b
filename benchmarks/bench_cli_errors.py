"""Time to fail: how long each command-line mistake takes to be reported (the aim: under 0.5 s, as the command line
checks its arguments before it imports torch or loads a model).

Each mistake runs as a user would type it (``python -m capi_backbones ...``) in a scratch folder holding two photos,
a ViT-S/14 checkpoint and a tiny classification dataset; the wall time is the median of ``--repeats`` runs (one run
for a mistake that takes more than 2 s). ``python -c pass`` and ``capi-backbones --help`` are printed as the floor.

    python benchmarks/bench_cli_errors.py [--repeats 3]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANDOM = ["--random-init", "--model", "capi_vits14"]
MISTAKES = [  # (what the issue calls it, arguments)
    ("floor: python -c pass", None),
    ("floor: --help", ["--help"]),
    ("extract: a missing input", ["extract", "nophotos", "--out", "features"]),
    ("extract: an architecture without weights", ["extract", "photos", "--out", "features", "--model", "capi_vits14"]),
    ("extract: --device cuda without CUDA", ["extract", "photos", "--out", "features", *RANDOM, "--device", "cuda"]),
    ("pca: --out x.jpg", ["pca", "photos", "--out", "x.jpg"]),
    ("pca: --device cuda without CUDA", ["pca", "photos", "--out", "x.png", *RANDOM, "--device", "cuda"]),
    (
        "pca: --weights of another --model",
        ["pca", "photos", "--out", "x.png", "--weights", "v.pth", "--model", "capi_vitb14"],
    ),
    ("info: a missing file", ["info", "missing.pth"]),
    ("convert: an existing output", ["convert", "v.pth", "exists.onnx"]),
    ("export-onnx: an existing output", ["export-onnx", "exists.onnx", *RANDOM]),
    ("export-onnx: a wrong extension", ["export-onnx", "v.pt2", *RANDOM]),
    ("export-torch: --device cuda without CUDA", ["export-torch", "x.pt2", *RANDOM, "--device", "cuda"]),
    ("eval: --representations cls", ["eval", "classify", "data", "--out", "ev", *RANDOM, "--representations", "cls"]),
    (
        "train: train.device=cuda without CUDA",
        ["train", "tiny", "data.root=photos", "train.device=cuda", "train.output_dir=run"],
    ),
    ("train: --print-config (not a mistake)", ["train", "tiny", "data.root=photos", "--print-config"]),
]


def prepare(root: Path) -> None:
    code = """
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

import capi_backbones
from capi_backbones.pretrained import save_official_checkpoint

torch.manual_seed(0)
save_official_checkpoint(capi_backbones.create_model("capi_vits14"), "v.pth")
for folder in ("photos", "data/train/a", "data/train/b", "data/test/a", "data/test/b"):
    __import__("os").makedirs(folder, exist_ok=True)
for name in ("china.jpg", "flower.jpg"):
    photo = Image.fromarray(load_sample_image(name))
    photo.save(f"photos/{name}")
    for split in ("train", "test"):
        for label in ("a", "b"):
            photo.resize((64, 48)).save(f"data/{split}/{label}/{name}")
open("exists.onnx", "wb").close()
"""
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def run(args: list[str] | None, root: Path) -> tuple[float, int, str]:
    command = [sys.executable, "-c", "pass"] if args is None else [sys.executable, "-m", "capi_backbones", *args]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()] or result.stderr.splitlines()
    return elapsed, result.returncode, (lines[-1] if lines else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    env_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        prepare(root)
        print(f"time to fail, median of up to {options.repeats} runs (OMP_NUM_THREADS={env_threads})")
        print(f"{'mistake':<44} {'seconds':>7} {'exit':>4}  message")
        for name, args in MISTAKES:
            times, code, message = [], 0, ""
            for _ in range(options.repeats):
                elapsed, code, message = run(args, root)
                times.append(elapsed)
                if elapsed > 2:
                    break
            print(f"{name:<44} {statistics.median(times):>7.2f} {code:>4}  {message[:110]}")


if __name__ == "__main__":
    main()
