"""Extraction throughput of FeatureExtractor.extract_to_disk on a folder of real JPEGs (CPU by default).

Builds a folder of varied JPEGs from skimage.data and scikit-learn's sample images (random crops, flips and
resizes), runs a randomly initialised capi_vits14 over it with a few loader settings, and reports images/s and
the share of wall time spent outside the model forward (decoding, resizing, batching, writing). The forward time
is measured by timing every ``FeatureExtractor.forward`` call (the model on one preprocessed batch).

    .venv/bin/python benchmarks/bench_extract.py --n-images 240 --workers 0 1 2

``--integrity`` instead measures what guards a resumed extraction, as a share of the extraction time of the
folder: the weights fingerprint (SHA-256 of every tensor, computed once per run) and the cheap verify-on-resume
(every listed shard present with its recorded size, leftovers listed), and a whole no-op resume run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_extract.py --integrity --n-images 200 --threads 1
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capi_backbones import create_model
from capi_backbones.features import FeatureExtractor, load_index
from capi_backbones.features import writer as writer_module
from capi_backbones.features.extractor import weights_fingerprint
from capi_backbones.features.verification import check_listed_shards, find_leftovers


def source_images() -> list[np.ndarray]:
    """Real RGB images (H, W, 3) uint8 from skimage and scikit-learn."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = [
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "cat",
        "immunohistochemistry",
        "hubble_deep_field",
        "colorwheel",
        "camera",
        "coins",
        "moon",
        "page",
        "text",
        "clock",
        "brick",
        "grass",
        "gravel",
    ]
    images = []
    for name in names:
        image = getattr(data, name)()
        images.append(np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3])
    images.extend(load_sample_images().images)  # china, flower (427, 640, 3)
    return images


ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9)  # width / height of common photo formats


def make_folder(folder: Path, n_images: int, seed: int = 0) -> None:
    """``n_images`` JPEGs: random crops in common aspect ratios, random flips, resized to 0.5x-1.5x of 400 px."""
    rng = np.random.default_rng(seed)
    sources = source_images()
    for i in range(n_images):
        image = sources[i % len(sources)]
        h, w = image.shape[:2]
        aspect = ASPECTS[rng.integers(len(ASPECTS))]
        ch = int(min(h, w / aspect) * rng.uniform(0.6, 1.0))  # the largest crop of that aspect, or smaller
        cw = int(ch * aspect)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = image[top : top + ch, left : left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        height = round(400 * rng.uniform(0.5, 1.5))
        pil = Image.fromarray(np.ascontiguousarray(crop)).resize((round(height * aspect), height), Image.BICUBIC)
        pil.save(folder / f"img_{i:04d}.jpg", quality=90)


def timed_forward(extractor: FeatureExtractor) -> list[float]:
    """Wrap the extractor's forward (the model on a preprocessed batch) to record the seconds of every call."""
    durations = []
    original = extractor.forward

    def timed(x, **kwargs):
        start = time.perf_counter()
        out = original(x, **kwargs)  # outputs come back on the CPU, so the device is synchronised
        durations.append(time.perf_counter() - start)
        return out

    extractor.forward = timed
    return durations


def timed_shard_writes() -> list[float]:
    """Record the seconds of every shard write (the writer looks ``write_shard`` up in its module)."""
    durations = []
    original = writer_module.write_shard

    def timed(*args, **kwargs):
        start = time.perf_counter()
        original(*args, **kwargs)
        durations.append(time.perf_counter() - start)

    writer_module.write_shard = timed
    return durations


def run(model, folder: Path, *, workers: int, args) -> dict:
    extractor = FeatureExtractor(
        model,
        device=args.device,
        image_size=args.image_size,
        batch_size=args.batch_size,
        keep_aspect=not args.square,
        num_workers=workers,
    )
    extractor(torch.rand(args.batch_size, 3, args.image_size, args.image_size))  # warm-up, not timed
    durations = timed_forward(extractor)
    original_write = writer_module.write_shard
    writes = timed_shard_writes()
    out_dir = Path(tempfile.mkdtemp(prefix="bench_extract_out_"))
    try:
        start = time.perf_counter()
        summary = extractor.extract_to_disk(folder, out_dir, shard_size=args.shard_size, progress=False)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(out_dir)
        writer_module.write_shard = original_write
    forward = sum(durations)
    return {
        "workers": workers,
        "images": summary.n_written,
        "batches": len(durations),
        "wall_s": wall,
        "forward_s": forward,
        "write_s": sum(writes),
        "img_per_s": summary.n_written / wall,
        "outside": 1 - forward / wall,
    }


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def integrity_costs(model, folder: Path, args) -> None:
    """Fingerprint and verify-on-resume against the extraction time of ``folder`` (workers 0)."""
    extractor = FeatureExtractor(
        model, device=args.device, image_size=args.image_size, batch_size=args.batch_size, num_workers=0
    )
    out_dir = Path(tempfile.mkdtemp(prefix="bench_extract_out_"))
    try:
        start = time.perf_counter()
        summary = extractor.extract_to_disk(folder, out_dir, shard_size=args.shard_size, progress=False)
        extraction = time.perf_counter() - start
        fingerprint = best_of(5, lambda: weights_fingerprint(extractor.model))

        def cheap_verify():
            index = load_index(out_dir)
            assert not check_listed_shards(out_dir, index, read=False) and not find_leftovers(out_dir, index)

        verify = best_of(5, cheap_verify)
        resume = best_of(
            3, lambda: extractor.extract_to_disk(folder, out_dir, shard_size=args.shard_size, progress=False)
        )
    finally:
        shutil.rmtree(out_dir)
    n_params = sum(p.numel() for p in extractor.model.parameters())
    print(f"extraction of {summary.n_written} images: {extraction:.2f} s ({summary.n_written / extraction:.1f} img/s)")
    share = fingerprint / extraction
    print(f"fingerprint of all {n_params / 1e6:.1f} M weights: {fingerprint * 1e3:.1f} ms = {share:.3%}")
    print(f"verify-on-resume ({len(summary.shards)} shards): {verify * 1e3:.2f} ms = {verify / extraction:.4%}")
    print(f"together: {(fingerprint + verify) / extraction:.3%} of the extraction time (target < 2%)")
    print(f"a whole no-op resume (listing, fingerprint, checks, index): {resume:.2f} s = {resume / extraction:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=240)
    parser.add_argument("--arch", default="capi_vits14")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--square", action="store_true", help="fixed square size (one batch shape)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--integrity", action="store_true", help="measure the fingerprint and verify-on-resume cost")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp(prefix="bench_extract_images_"))
    try:
        make_folder(folder, args.n_images)
        torch.manual_seed(0)
        model = create_model(args.arch).eval()  # random init: throughput does not depend on the weights
        mode = "square" if args.square else "keep aspect"
        if args.integrity:
            threads = torch.get_num_threads()
            print(f"{args.arch}, {args.n_images} JPEGs, image_size {args.image_size}, torch threads {threads}")
            integrity_costs(model, folder, args)
            return
        print(
            f"{args.arch}, {args.n_images} JPEGs, image_size {args.image_size} ({mode}), batch {args.batch_size}, "
            f"device {args.device}, torch threads {torch.get_num_threads()}"
        )
        columns = [
            ("workers", 7, ""),
            ("images", 6, ""),
            ("batches", 7, ""),
            ("wall_s", 7, ".2f"),
            ("forward_s", 9, ".2f"),
            ("write_s", 7, ".2f"),
            ("img_per_s", 9, ".1f"),
            ("outside", 7, ".1%"),
        ]
        print(" ".join(f"{name:>{width}}" for name, width, _ in columns))
        for workers in args.workers:
            r = run(model, folder, workers=workers, args=args)
            print(" ".join(f"{r[name]:>{width}{fmt}}" for name, width, fmt in columns))
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
