"""Speed and memory of the evaluation probes (CPU by default; --device cuda to run them on a GPU).

1. k-NN classification: 10k queries against 60k train features of D=1024 (1000 classes, k in {10, 20}), and a plain
   lower bound measured in the same run: the same query blocks, one matmul and one top-k each (normalised inputs).
2. The default probe grids (10 lr x 3 wd = 30 probes per representation) at the official global batch of 1024:
   images/s of the linear grid (3 vector representations), the attentive grid on N patch tokens and on 16
   registers, and the time of the default protocol (12,500 steps, whatever the number of images) extrapolated
   from --steps steps.
3. Peak memory of k-NN segmentation with 1M train patches of D=1024 (stored as float16, 2 GiB, as the features of a
   ViT-L would be cached to fit) and 196 pixel labels each (int16), in a fresh process: peak RSS, target < 4 GiB
   (in the protocol's default precision: bfloat16 where the device has it natively).

Run: python benchmarks/bench_evals.py [--device cpu] [--skip-knn] [--skip-probes] [--skip-segmentation]
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


def probe_grid_benchmark(device: str, n_images: int, tokens: int, dim: int, steps: int, micro: int | None) -> None:
    """Steps of the default grids at the official global batch (1024): linear probes on the 3 vector
    representations and attentive probes on the patch tokens and the 16 registers, 30 probes each (10 lr x 3 wd).
    The default protocol is 12,500 such steps whatever the dataset size (5k images: about 2,560 epochs)."""
    from capi_backbones.evals.defaults import OFFICIAL_BATCH_SIZE, OFFICIAL_ITERATIONS

    batch = OFFICIAL_BATCH_SIZE
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 1000, (batch,), generator=g)
    setups = {
        "linear (pooled, avg_patch, pooled+avg_patch)": (
            {"pooled": ("linear", dim), "avg_patch": ("linear", dim), "pooled+avg_patch": ("linear", 2 * dim)},
            {"pooled": torch.randn(batch, dim, generator=g), "avg_patch": torch.randn(batch, dim, generator=g),
             "pooled+avg_patch": torch.randn(batch, 2 * dim, generator=g)},
        ),
        f"attentive patch ({tokens} tokens)": ({"patch": ("attentive", dim)},
                                               {"patch": torch.randn(batch, tokens, dim, generator=g)}),
        "attentive registers (16 tokens)": ({"registers": ("attentive", dim)},
                                            {"registers": torch.randn(batch, 16, dim, generator=g)}),
    }  # fmt: skip
    print(f"\n# Probe grids at the official global batch {batch}, D={dim}, 1000 classes ({device}"
          f"{f', micro-batches of {micro}' if micro else ''})")  # fmt: skip
    total = 0.0
    for name, (dims, features) in setups.items():
        torch.manual_seed(0)
        grid = ProbeGrid(dims, 1000)
        config = ProbeTrainingConfig(iterations=steps + 1, warmup_iterations=1, micro_batch_size=micro)
        stamps = []

        def batches(i, features=features, stamps=stamps):
            stamps.append(time.perf_counter())  # stamps[1]: after the warm-up step
            return CachedBatches(features, labels, batch)(i)

        train_probe_grid(grid, batches, config, device=device, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - stamps[1]) / steps
        total += per_step
        print(f"{name}: {len(grid.probes)} probes, {batch / per_step:.0f} img/s, {per_step:.2f} s/step")
    hours = total * OFFICIAL_ITERATIONS / 3600
    print(f"default protocol: {OFFICIAL_ITERATIONS} steps x {total:.2f} s = {hours:.1f} h of probe training on "
          f"{n_images} images (or any number: the steps, not the images, set the cost); --fast (1,250 steps of 256): "
          f"about {hours / 40:.2f} h")  # fmt: skip


def segmentation_child(n_train: int, n_query: int, dim: int, device: str) -> None:
    from capi_backbones.evals import Standardizer, knn_segment
    from capi_backbones.evals.segmentation import resolve_knn_dtype

    g = torch.Generator().manual_seed(0)
    train = torch.empty(n_train, dim, dtype=torch.float16)
    for start in range(0, n_train, 65536):  # filled by blocks: no float32 copy of the whole set
        train[start : start + 65536] = torch.randn(min(65536, n_train - start), dim, generator=g).half()
    labels = torch.empty(n_train, 196, dtype=torch.int16)
    for start in range(0, n_train, 65536):  # ADE20K-like: 150 classes, 0 and 255 ignored
        block = torch.randint(0, 151, (min(65536, n_train - start), 196), generator=g)
        labels[start : start + 65536] = torch.where(block == 150, 255, block)
    queries = torch.randn(n_query, dim, generator=g)
    dtype = resolve_knn_dtype("auto", device)  # the protocol's default: bfloat16 where native
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    scaler = Standardizer.fit(train)
    knn_segment(train, labels, queries, ks=(1, 3, 10, 30), standardizer=scaler, dtype=dtype, device=device)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_gib": peak / 2**20, "before_gib": base / 2**20, "seconds": seconds, "dtype": str(dtype)}))


def segmentation_benchmark(device: str, n_train: int, n_query: int, dim: int) -> None:
    command = [sys.executable, __file__, "--segmentation-child", str(n_train), str(n_query), str(dim), device]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"\n# k-NN segmentation: {n_train} train patches (D={dim}, float16) x {n_query} query patches, "
          f"k=1,3,10,30, cosine, {result['dtype']} ({device})")  # fmt: skip
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
    parser.add_argument("--steps", type=int, default=2, help="timed steps of each probe grid at batch 1024")
    parser.add_argument("--micro-batch", type=int, default=None, help="probe micro-batch (default: whole batch)")
    parser.add_argument("--seg-train", type=int, default=1_000_000, help="train patches of the segmentation run")
    parser.add_argument("--seg-queries", type=int, default=128,
                        help="query patches of the segmentation run (the memory does not depend on it)")  # fmt: skip
    parser.add_argument("--skip-knn", action="store_true")
    parser.add_argument("--skip-probes", action="store_true")
    parser.add_argument("--skip-segmentation", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device} (probes in float32)")
    if not args.skip_knn:
        knn_benchmark(args.device, 60_000, 10_000, 1024, args.knn_repeats)
    if not args.skip_probes:
        probe_grid_benchmark(args.device, args.images, args.tokens, args.dim, args.steps, args.micro_batch)
    if not args.skip_segmentation:
        segmentation_benchmark(args.device, args.seg_train, args.seg_queries, 1024)


if __name__ == "__main__":
    main()
