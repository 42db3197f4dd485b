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
4. (``--probe-dtypes``, only this) float32 against bfloat16 probe grids on held-out real data: sklearn's digits
   (upsampled to 56 px, the seeded 50/50 split of ``bench_bf16_training.py``) through a random-init ViT-S/14 in fp32,
   then ``run_classification`` (the code behind ``eval classify``) with linear probes on ``pooled`` and ``avg_patch``
   (``--attentive`` adds attentive probes on the registers), the official lr x wd grid, ``--probe-iters`` steps of
   ``--probe-batch`` images, for each probe seed (init and data order) and dtype. Prints the selected (lr, wd), the
   validation and test top-1 of each, the seed spread at each dtype, and the process time of the probe training
   (the features are extracted once and read from the cache after that).

Run: python benchmarks/bench_evals.py [--device cpu] [--skip-knn] [--skip-probes] [--skip-segmentation]
     OMP_NUM_THREADS=1 python benchmarks/bench_evals.py --probe-dtypes [--seeds 0 1] [--attentive]
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


def probe_dtype_benchmark(seeds: list[int], iterations: int, batch: int, attentive: bool) -> None:
    import shutil
    import tempfile
    from pathlib import Path

    from bench_bf16_training import write_digits  # benchmarks/ is the script's folder

    from capi_backbones import FeatureExtractor, create_model
    from capi_backbones.evals import classification_protocol
    from capi_backbones.evals.classification_protocol import ClassificationSettings, run_classification
    from capi_backbones.evals.datasets import read_classification_folders
    from capi_backbones.runtime.precision import cpu_bf16_support

    unit = cpu_bf16_support()
    where = unit or "no native bf16: bfloat16 is emulated"
    print(f"\n# Probe grids in float32 and bfloat16 autocast on held-out digits (this CPU: {where}); {iterations} "
          f"steps of {batch}, seeds {seeds}")  # fmt: skip
    torch.manual_seed(0)
    extractor = FeatureExtractor(create_model("capi_vits14", pretrained=False), image_size=56, keep_aspect=False,
                                 batch_size=64, device="cpu", precision="fp32")  # fmt: skip
    probes = ("linear", "attentive") if attentive else ("linear",)
    representations = ("pooled", "avg_patch", "registers") if attentive else ("pooled", "avg_patch")
    runs = []
    training_seconds = []
    train = classification_protocol.train_probe_grid

    def timed_train(*args, **kwargs):  # the probe training alone, not the extraction, k-NN or predictions
        start = time.process_time()
        grid = train(*args, **kwargs)
        training_seconds.append(time.process_time() - start)
        return grid

    classification_protocol.train_probe_grid = timed_train
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        write_digits(data, 56)
        dataset = read_classification_folders(data)
        for seed in seeds:
            for dtype in ("float32", "bfloat16"):
                out = Path(tmp) / f"{dtype}_s{seed}"
                if runs:  # the features of the first run, so that only the probes run again
                    shutil.copytree(Path(tmp) / "float32_s0" / "features", out / "features")
                training = ProbeTrainingConfig(iterations=iterations, warmup_iterations=iterations // 10,
                                               batch_size=batch, seed=seed, dtype=dtype)  # fmt: skip
                settings = ClassificationSettings(probes=probes, representations=representations, training=training,
                                                  device="cpu")  # fmt: skip
                training_seconds.clear()
                payload = run_classification(dataset, extractor, out, settings, progress=False)
                seconds = sum(training_seconds)
                rows = {(r["probe"], r["representation"]): r for r in payload["results"] if r["selected"]}
                runs.append({"seed": seed, "dtype": dtype, "seconds": seconds, "rows": rows})
                print(f"seed {seed} {dtype}: probe training {seconds:.1f} s (process time)", flush=True)
    keys = list(runs[0]["rows"])
    print("\nprobe | representation | seed | float32: selected, val, test | bfloat16: selected, val, test | same")
    print("---|---|---|---|---|---")
    for key in keys:
        for seed in seeds:
            a, b = (next(r["rows"][key] for r in runs if r["seed"] == seed and r["dtype"] == d)
                    for d in ("float32", "bfloat16"))  # fmt: skip
            print(f"{key[0]} | {key[1]} | {seed} | {a['setting']}, {a['val_top1']:.3f}, {a['top1']:.3f} | "
                  f"{b['setting']}, {b['val_top1']:.3f}, {b['top1']:.3f} | {a['setting'] == b['setting']}")  # fmt: skip
    print("\nprobe | representation | float32 test mean (seed spread) | bfloat16 test mean (seed spread) | diff")
    print("---|---|---|---|---")
    for key in keys:
        cells = {}
        for dtype in ("float32", "bfloat16"):
            values = [r["rows"][key]["top1"] for r in runs if r["dtype"] == dtype]
            cells[dtype] = (sum(values) / len(values), max(values) - min(values))
        (ma, sa), (mb, sb) = cells["float32"], cells["bfloat16"]
        print(f"{key[0]} | {key[1]} | {ma:.4f} ({sa:.4f}) | {mb:.4f} ({sb:.4f}) | {mb - ma:+.4f}")
    fp32, bf16 = (min(r["seconds"] for r in runs if r["dtype"] == d) for d in ("float32", "bfloat16"))
    print(f"\nprobe training, process time (best of the seeds): float32 {fp32:.1f} s, bfloat16 {bf16:.1f} s, "
          f"bfloat16 {fp32 / bf16:.2f}x as fast")  # fmt: skip


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
    parser.add_argument("--probe-dtypes", action="store_true", help="only: float32 vs bfloat16 probes on digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="probe seeds of --probe-dtypes")
    parser.add_argument("--probe-iters", type=int, default=1000, help="probe steps of --probe-dtypes")
    parser.add_argument("--probe-batch", type=int, default=128, help="probe batch of --probe-dtypes")
    parser.add_argument("--attentive", action="store_true", help="--probe-dtypes: add attentive probes (registers)")
    args = parser.parse_args()
    if args.probe_dtypes:
        return probe_dtype_benchmark(args.seeds, args.probe_iters, args.probe_batch, args.attentive)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device} (probes in float32)")
    if not args.skip_knn:
        knn_benchmark(args.device, 60_000, 10_000, 1024, args.knn_repeats)
    if not args.skip_probes:
        probe_grid_benchmark(args.device, args.images, args.tokens, args.dim, args.steps, args.micro_batch)
    if not args.skip_segmentation:
        segmentation_benchmark(args.device, args.seg_train, args.seg_queries, 1024)


if __name__ == "__main__":
    main()
