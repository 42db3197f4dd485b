"""Pretraining speed and a learning check on this machine (CPU, fp32).

1. Throughput: steps/s and images/s of full CAPI training steps (teacher + clustering + student + updates, data
   loading in the main process included) for the ``tiny`` preset and for ``vits14`` with a small batch.
2. Peak memory of a ``vits14`` training step (CPU, fp32, fresh process per setting): train.activation_checkpointing
   none / full / selective, and optim.accumulation_steps 2. Each process runs two steps (the first allocates the
   gradients and AdamW moments) and reports the peak RSS of the second; the difference to the ``none`` row is what
   the setting saves (the RSS at the step's start varies with what the allocator kept from the first step, so the
   peak itself is compared). With the recipe's 16384 prototypes the clustering phase (about 4 tensors of
   positions x batch x K in fp32) is a large part of the peak on vits14; the 1024-prototype rows isolate the
   student's activations.
3. Learning check: pretrain ``tiny`` for a fixed time budget on sklearn's digits (8x8 grey images upsampled to
   the tiny image size, grey -> RGB), then k-NN accuracy (sklearn, cosine, k=10, stratified 50/50 split) of the
   frozen teacher's (and student's) predictor-pooled features and mean-pooled patch features, against the same
   architecture at its random init (the step-0 teacher). Raw pixels give the reference of the task. Also prints
   the target entropy over training (log K = uniform assignments; a collapse shows as entropy falling to 0).

4. (``--precision``) ``tiny`` steps/s in fp32 and in bf16 autocast (``train.precision``), alternated rounds.
5. (``--monitor``) the k-NN monitor's share of ``tiny`` training time at its default period (``monitor.every``).

Run: python benchmarks/bench_train.py [--budget-seconds 300] [--vits-batch 8] [--steps 5] [--skip-throughput]
     [--skip-memory] [--memory-batch 16] [--skip-learning]
     python benchmarks/bench_train.py --precision [--rounds 2] [--steps 5]   (only 4)
     python benchmarks/bench_train.py --monitor [--steps 5]                  (only 5)
"""

import argparse
import dataclasses
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from capi_backbones.constants import IMAGENET_MEAN, IMAGENET_STD
from capi_backbones.models import CapiModel
from capi_backbones.runtime.precision import cpu_bf16_support
from capi_backbones.train.config import load_config
from capi_backbones.train.trainer import Trainer


def digit_images(size: int) -> tuple[list[Image.Image], np.ndarray]:
    digits = load_digits()
    images = [
        Image.fromarray((d * (255 / 16)).astype(np.uint8), mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
        for d in digits.images
    ]
    return images, digits.target


def write_folder(images: list[Image.Image], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:05d}.png")
    return folder


def throughput(
    preset: str, batch: int, steps: int, images: Path, workdir: Path, precision: str = "fp32", run: str = ""
) -> dict:
    config = load_config(
        preset,
        [f"data.root={images}", f"train.output_dir={workdir / (run or preset)}", f"optim.batch_size={batch}",
         "optim.total_steps=1000", "train.log_every=1000", "train.checkpoint_every=100000", "train.device=cpu",
         "data.num_workers=0", "train.plot_every_checkpoint=false", f"train.precision={precision}"],
    )  # fmt: skip
    trainer = Trainer(config)
    result = trainer.run(max_steps=steps + 1)  # the first step warms up
    seconds = [m.seconds for m in result.history[1:]]
    per_step = sum(seconds) / len(seconds)
    return {
        "preset": preset,
        "batch": batch,
        "image_size": config.data.image_size,
        "prototypes": config.clustering.n_prototypes,
        "steps_per_s": 1 / per_step,
        "images_per_s": batch / per_step,
    }


def precision_throughput(steps: int, rounds: int, images: Path, workdir: Path) -> None:
    """``tiny`` steps/s in fp32 and in bf16 autocast, alternated (fp32, bf16, fp32, ...) so that both see the same
    machine load; the ratio is of the medians."""
    unit = cpu_bf16_support()
    print(f"\n# tiny training steps/s, fp32 vs bf16 autocast (this CPU: {unit or 'no native bf16: emulated'})")
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(rounds):
        for precision in rates:
            r = throughput("tiny", 64, steps, images, workdir, precision, run=f"{precision}{i}")
            rates[precision].append(r["steps_per_s"])
    median = {k: float(np.median(v)) for k, v in rates.items()}
    print("precision | steps/s (each round) | median")
    print("---|---|---")
    for precision, values in rates.items():
        print(f"{precision} | {', '.join(f'{v:.3f}' for v in values)} | {median[precision]:.3f}")
    print(f"bf16 / fp32: {median['bf16'] / median['fp32']:.2f}x")


def monitor_share(steps: int, workdir: Path, precision: str) -> None:
    """The k-NN monitor's share of training time on ``tiny`` at its default period (monitor.every): one evaluation
    on the digits (half train, half test: 899 + 898 images) against ``every`` timed steps."""
    data = workdir / "monitor_digits"
    images, labels = digit_images(112)
    order = np.random.default_rng(0).permutation(len(labels))
    for position, index in enumerate(order):
        folder = data / ("train" if position < len(order) // 2 else "test") / str(labels[index])
        folder.mkdir(parents=True, exist_ok=True)
        images[index].save(folder / f"{index:04d}.png")
    config = load_config("tiny", [
        f"data.root={data / 'train'}", f"train.output_dir={workdir / 'monitor_run'}", "train.log_every=1000",
        "train.checkpoint_every=100000", "train.plot_every_checkpoint=false", f"monitor.data={data}",
        f"train.precision={precision}",
    ])  # fmt: skip
    trainer = Trainer(config)
    evaluations = [trainer.evaluate_monitor().seconds for _ in range(2)]  # the first warms up
    result = trainer.run(max_steps=steps + 1)  # (this run evaluates at step 0 too)
    per_step = float(np.median([m.seconds for m in result.history[1:]]))
    evaluation = min(evaluations[1:] + [trainer.last_knn.seconds])
    every = config.monitor.every
    share = evaluation / (every * per_step + evaluation)
    print(f"\n# k-NN monitor on tiny ({precision}), monitor.every={every}: {len(trainer.monitor.train_labels)} train + "
          f"{len(trainer.monitor.test_labels)} test digits")  # fmt: skip
    print(f"step {per_step:.3f} s (median of {steps}), evaluation {evaluation:.2f} s: share of training time "
          f"{share:.1%} (one evaluation per {every} steps)")  # fmt: skip


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as file:
        line = next(line for line in file if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def memory_worker(
    images: str, workdir: str, batch: int, checkpointing: str, accumulation: int, prototypes: int
) -> None:
    """Two vits14 steps in this (fresh) process: the first allocates gradients and AdamW moments; then the peak
    RSS is reset (``/proc/self/clear_refs``) and the second step's peak above its starting RSS is what the
    step itself (activations, clustering, Sinkhorn-Knopp) costs. Prints one JSON line."""
    config = load_config(
        "vits14",
        [f"data.root={images}", f"train.output_dir={workdir}", f"optim.batch_size={batch}", "train.device=cpu",
         "train.precision=fp32", "optim.total_steps=10", "data.num_workers=0", "train.plot_every_checkpoint=false",
         f"train.activation_checkpointing={checkpointing}", f"optim.accumulation_steps={accumulation}",
         f"clustering.n_prototypes={prototypes}"],
    )  # fmt: skip
    trainer = Trainer(config)
    batches = iter(trainer._data_loader(0, 2))
    trainer.train_step(next(batches))
    second = next(batches)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets VmHWM, the peak RSS
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    metrics = trainer.train_step(second)
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    print(json.dumps({"before_mib": before, "peak_mib": peak, "seconds": seconds, "loss": metrics.loss}))


def peak_memory(images: Path, workdir: Path, batch: int, prototypes: int) -> None:
    print(
        f"\n# Peak memory of one vits14 step, global batch {batch} at 224 px, {prototypes} prototypes "
        "(CPU fp32, fresh process each)"
    )
    print("activation checkpointing | accumulation steps | peak RSS (MiB) | vs none (MiB) | step seconds | loss")
    print("---|---|---|---|---|---")
    reference = None
    for checkpointing, accumulation in (("none", 1), ("full", 1), ("selective", 1), ("none", 2)):
        run_dir = workdir / f"mem_{checkpointing}_{accumulation}"
        out = subprocess.run(
            [sys.executable, __file__, "--memory-worker", str(images), str(run_dir), str(batch), checkpointing,
             str(accumulation), str(prototypes)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        reference = r["peak_mib"] if reference is None else reference
        print(f"{checkpointing} | {accumulation} | {r['peak_mib']:.0f} | {r['peak_mib'] - reference:+.0f} | "
              f"{r['seconds']:.1f} | {r['loss']:.6f}")  # fmt: skip


@torch.no_grad()
def features(model: CapiModel, images: list[Image.Image], batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    pooled, patches = [], []
    model.eval()
    for start in range(0, len(images), batch):
        arrays = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images[start : start + batch]])
        x = (torch.from_numpy(arrays).permute(0, 3, 1, 2) - mean) / std  # (B, 3, S, S)
        out = model.forward_features(x, pooled=True)
        pooled.append(out.pooled)
        patches.append(out.patch_features.mean(dim=(1, 2)))  # (B, D)
    return torch.cat(pooled).numpy(), torch.cat(patches).numpy()


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 10) -> float:
    def normalise(x):
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)

    classifier = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(normalise(train_x), train_y)
    return float((classifier.predict(normalise(test_x)) == test_y).mean())


def learning_check(budget: float, workdir: Path) -> None:
    config_args = [f"train.output_dir={workdir / 'digits_run'}", "train.log_every=50", "train.device=cpu",
                   "train.precision=fp32", "train.checkpoint_every=100000",
                   "train.plot_every_checkpoint=false"]  # fmt: skip
    size = load_config("tiny").data.image_size
    images, labels = digit_images(size)
    root = write_folder(images, workdir / "digits")
    index = np.arange(len(images))
    train_idx, test_idx = train_test_split(index, test_size=0.5, stratify=labels, random_state=0)

    # calibrate the schedule length to the budget with a throw-away run of 3 steps
    probe = Trainer(load_config("tiny", [*config_args, f"data.root={root}", f"train.output_dir={workdir / 'probe'}"]))
    probe_history = probe.run(max_steps=6).history
    per_step = 1.2 * float(np.median([m.seconds for m in probe_history[1:]]))  # a margin: the machine is shared
    total_steps = max(int(budget / per_step), 10)
    config = load_config("tiny", [*config_args, f"data.root={root}", f"optim.total_steps={total_steps}"])
    trainer = Trainer(config)
    random_teacher = CapiModel(dataclasses.replace(config.model, drop_path_rate=0.0))
    random_teacher.load_state_dict(trainer.teacher.state_dict())

    start = time.perf_counter()
    rows = []

    def watch(metrics):
        rows.append((metrics.step + 1, time.perf_counter() - start, metrics))
        if time.perf_counter() - start > budget * 1.2:
            trainer.request_stop()

    print(f"\n# Learning check: tiny preset on sklearn digits ({len(images)} images at {size}px), "
          f"budget {budget:.0f} s, schedule of {total_steps} steps (calibrated at {per_step:.2f} s/step)")  # fmt: skip
    result = trainer.run(callbacks=[watch])
    elapsed = time.perf_counter() - start
    rate = result.end_step * config.optim.batch_size / elapsed
    print(f"trained {result.end_step} steps in {elapsed:.0f} s ({rate:.1f} img/s), stopped by the time limit: "
          f"{result.stopped_by_signal}")  # fmt: skip

    log_k = math.log(config.clustering.n_prototypes)
    print(f"\nstep | seconds | loss | clustering loss | H(target) | H(usage)   (log K = {log_k:.3f})")
    print("---|---|---|---|---|---")
    marks = sorted({0, *np.linspace(0, len(rows) - 1, 10).astype(int).tolist()})
    for i in marks:
        step, seconds, m = rows[i]
        print(f"{step} | {seconds:.0f} | {m.loss:.3f} | {m.clustering_loss:.3f} | {m.target_entropy:.3f} | "
              f"{m.prototype_entropy:.3f}")  # fmt: skip

    labels_train, labels_test = labels[train_idx], labels[test_idx]
    pixels = np.stack([np.asarray(im.convert("L").resize((8, 8)), dtype=np.float32).ravel() for im in images])
    print("\nfeatures | k-NN accuracy (k=10, cosine, 50/50 split)")
    print("---|---")
    print(f"raw pixels (8x8) | {knn_accuracy(pixels[train_idx], labels_train, pixels[test_idx], labels_test):.4f}")
    models = (("random init", random_teacher), ("EMA teacher", trainer.teacher), ("student", trainer.student.backbone))
    for name, model in models:
        pooled, patches = features(model, images)
        acc_pooled = knn_accuracy(pooled[train_idx], labels_train, pooled[test_idx], labels_test)
        acc_patches = knn_accuracy(patches[train_idx], labels_train, patches[test_idx], labels_test)
        print(f"{name}: predictor pooling | {acc_pooled:.4f}")
        print(f"{name}: mean of patch features | {acc_patches:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-seconds", type=float, default=300.0, help="pretraining time of the learning check")
    parser.add_argument("--vits-batch", type=int, default=8, help="global batch of the vits14 throughput run")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per throughput run (after 1 warm-up)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--precision", action="store_true", help="tiny steps/s fp32 vs bf16 (alternated rounds)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the fp32 vs bf16 comparison")
    parser.add_argument("--monitor", action="store_true", help="the k-NN monitor's share of tiny training time")
    parser.add_argument("--monitor-precision", default="auto", help="train.precision of the monitor measurement")
    parser.add_argument("--memory-batch", type=int, default=16, help="global batch of the vits14 memory runs")
    parser.add_argument("--memory-prototypes", type=int, nargs="+", default=[16384, 1024],
                        help="clustering.n_prototypes of the memory runs (16384: the recipe)")  # fmt: skip
    parser.add_argument("--memory-worker", nargs=6, metavar=("IMAGES", "WORKDIR", "BATCH", "MODE", "ACC", "K"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args()
    if args.memory_worker:
        images, workdir, batch, mode, accumulation, prototypes = args.memory_worker
        memory_worker(images, workdir, int(batch), mode, int(accumulation), int(prototypes))
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.precision or args.monitor:  # only these
            if args.precision:
                root = write_folder(digit_images(224)[0][:256], workdir / "precision_images")
                precision_throughput(args.steps, args.rounds, root, workdir)
            if args.monitor:
                monitor_share(args.steps, workdir, args.monitor_precision)
            return
        if not args.skip_throughput:
            images, _ = digit_images(224)
            root = write_folder(images[:256], workdir / "throughput_images")
            print("\n# Training throughput (full CAPI steps, data loading included)")
            print("preset | global batch | image size | prototypes | steps/s | images/s")
            print("---|---|---|---|---|---")
            for preset, batch in (("tiny", 64), ("vits14", args.vits_batch)):
                r = throughput(preset, batch, args.steps, root, workdir)
                print(f"{preset} | {r['batch']} | {r['image_size']} | {r['prototypes']} | {r['steps_per_s']:.3f} | "
                      f"{r['images_per_s']:.2f}")  # fmt: skip
        if not args.skip_memory:
            images, _ = digit_images(224)
            root = write_folder(images[: args.memory_batch], workdir / "memory_images")
            for prototypes in args.memory_prototypes:
                peak_memory(root, workdir, args.memory_batch, prototypes)
        if not args.skip_learning:
            learning_check(args.budget_seconds, workdir)


if __name__ == "__main__":
    main()
