"""Speed and memory of the evaluation probes (CPU by default; --device cuda to run them on a GPU).

1. k-NN classification: 10k queries against 60k train features of D=1024 (1000 classes, k in {10, 20}), and a plain
   lower bound measured in the same run: the same query blocks, one matmul and one top-k each (normalised inputs).
2. The attentive probe grid (10 lr x 3 wd = 30 probes) over cached patch features (N tokens of D channels per image):
   images/s of training steps (batch 128), and the time of one epoch over --images images (extrapolated from
   --steps steps when that is shorter than an epoch).
3. Peak memory of k-NN segmentation with 1M train patches of D=1024 (stored as float16, 2 GiB, as the features of a
   ViT-L would be cached to fit) and 196 pixel labels each (int16), in a fresh process: peak RSS, target < 4 GiB.

Run: python benchmarks/bench_evals.py [--device cpu] [--skip-knn] [--skip-attentive] [--skip-segmentation]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from capi_backbones.evals import CachedBatches, ProbeGrid, ProbeTrainingConfig, knn_classify, train_probe_grid


def knn_benchmark(device: str, n_train: int, n_query: int, dim: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(n_train, dim, generator=g).to(device)
    labels = torch.randint(0, 1000, (n_train,), generator=g).to(device)
    queries = torch.randn(n_query, dim, generator=g).to(device)
    chunk = max(1, 2**26 // n_train)  # the block size knn_classify picks

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    a, b = F.normalize(queries, dim=1), F.normalize(train, dim=1)  # normalised outside the timing

    def lower_bound():
        for start in range(0, n_query, chunk):
            (a[start : start + chunk] @ b.T).topk(20, dim=1)
        sync()

    def ours():
        knn_classify(train, labels, queries, num_classes=1000, ks=(10, 20), query_chunk=chunk)
        sync()

    lower_bound(), ours()  # warm-up
    times = {"lower": [], "ours": []}
    for _ in range(repeats):  # interleaved, best of
        for name, fn in (("lower", lower_bound), ("ours", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    lower, mine = min(times["lower"]), min(times["ours"])
    print(f"\n# k-NN classification: {n_query} queries x {n_train} train, D={dim}, 1000 classes, k=10,20 ({device})")
    print(f"knn_classify: {mine:.2f} s | matmul + top-k lower bound: {lower:.2f} s | ratio {mine / lower:.2f}x")


def attentive_benchmark(device: str, n_images: int, tokens: int, dim: int, steps: int) -> None:
    torch.manual_seed(0)
    grid = ProbeGrid({"patch": ("attentive", dim)}, 1000)  # the official 10 x 3 grid: 30 probes
    batch = 128
    n_cached = min(n_images, batch * (steps + 1))  # enough distinct rows for the timed steps
    features = {"patch": torch.randn(n_cached, tokens, dim)}
    labels = torch.randint(0, 1000, (n_cached,))
    iterations = min(steps, n_images // batch)
    config = ProbeTrainingConfig(iterations=iterations + 1, warmup_iterations=1, batch_size=batch)
    seen = []

    def batches(i):
        if i == 1:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seen.append(time.perf_counter())  # after the warm-up step
        return CachedBatches(features, labels, batch)(i)

    train_probe_grid(grid, batches, config, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - seen[0]
    rate = iterations * batch / seconds
    epoch = n_images / rate
    print(f"\n# Attentive probe grid: {len(grid.probes)} probes, {tokens} tokens x D={dim}, batch {batch} ({device})")
    print(f"{rate:.1f} img/s over {iterations} steps; one epoch over {n_images} images: {epoch:.0f} s"
          f"{' (extrapolated)' if iterations * batch < n_images else ''}")  # fmt: skip


def segmentation_child(n_train: int, n_query: int, dim: int, device: str) -> None:
    from capi_backbones.evals import Standardizer, knn_segment

    g = torch.Generator().manual_seed(0)
    train = torch.empty(n_train, dim, dtype=torch.float16)
    for start in range(0, n_train, 65536):  # filled by blocks: no float32 copy of the whole set
        train[start : start + 65536] = torch.randn(min(65536, n_train - start), dim, generator=g).half()
    labels = torch.empty(n_train, 196, dtype=torch.int16)
    for start in range(0, n_train, 65536):
        labels[start : start + 65536] = torch.randint(0, 150, (min(65536, n_train - start), 196), generator=g)
    queries = torch.randn(n_query, dim, generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    scaler = Standardizer.fit(train)
    knn_segment(train, labels, queries, ks=(1, 3, 10, 30), standardizer=scaler, device=device)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_gib": peak / 2**20, "before_gib": base / 2**20, "seconds": seconds}))


def segmentation_benchmark(device: str, n_train: int, n_query: int, dim: int) -> None:
    command = [sys.executable, __file__, "--segmentation-child", str(n_train), str(n_query), str(dim), device]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"\n# k-NN segmentation: {n_train} train patches (D={dim}, float16) x {n_query} query patches, "
          f"k=1,3,10,30, cosine ({device})")  # fmt: skip
    print(f"peak RSS {result['peak_gib']:.2f} GiB (before the search, inputs made: {result['before_gib']:.2f} GiB), "
          f"{result['seconds']:.0f} s")  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--segmentation-child":
        n_train, n_query, dim, device = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        return segmentation_child(n_train, n_query, dim, device)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--knn-repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=5000, help="images of the attentive probe epoch")
    parser.add_argument("--tokens", type=int, default=256, help="patch tokens per image (256: 224 px, patch 14)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="timed attentive steps (an epoch of 5k is 39)")
    parser.add_argument("--seg-train", type=int, default=1_000_000, help="train patches of the segmentation run")
    parser.add_argument("--seg-queries", type=int, default=2048, help="query patches of the segmentation run")
    parser.add_argument("--skip-knn", action="store_true")
    parser.add_argument("--skip-attentive", action="store_true")
    parser.add_argument("--skip-segmentation", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, fp32")
    if not args.skip_knn:
        knn_benchmark(args.device, 60_000, 10_000, 1024, args.knn_repeats)
    if not args.skip_attentive:
        attentive_benchmark(args.device, args.images, args.tokens, args.dim, args.steps)
    if not args.skip_segmentation:
        segmentation_benchmark(args.device, args.seg_train, args.seg_queries, 1024)


if __name__ == "__main__":
    main()
