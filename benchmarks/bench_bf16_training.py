"""Does ``tiny`` pretraining learn the same in bf16 autocast as in fp32 on the CPU, and how much faster is it?

The whole user path of ``tests_long/test_pretraining_learns.py``, run per (precision, seed): sklearn's digits
upsampled to the preset's 112 px (a seeded 50/50 split; pretraining sees the train half, without labels),
``Trainer`` for STEPS ``tiny`` steps at ``train.precision=fp32|bf16`` and ``train.seed=SEED``, ``export_teacher``,
``from_pretrained`` on the export, then ``run_classification`` (the code behind ``eval classify``) with k-NN (k=20)
and linear probes on ``pooled`` and ``avg_patch``, top-1 on the held-out half. The features are extracted in fp32
for every run, so that only the training precision differs.

The seed noise of a probe is the spread of its accuracy over the seeds at one precision; bf16 learns "the same"
when the mean difference between precisions is within that spread. Steps/s is timed on wall clock and on process
CPU time (``OMP_NUM_THREADS=1`` makes CPU time the compute time even when other jobs share the machine); the runs
alternate precisions (fp32 s0, bf16 s0, fp32 s1, ...) so both see the same load. Each finished run is appended to
``--out`` (JSON lines), so an interrupted benchmark keeps what it measured; ``--summarize`` prints the tables of
such a file.

Run: OMP_NUM_THREADS=1 python benchmarks/bench_bf16_training.py [--steps 2000] [--seeds 0 1]
     [--precisions fp32 bf16] [--out /tmp/bf16_training.jsonl] [--workdir DIR]
     python benchmarks/bench_bf16_training.py --summarize /tmp/bf16_training.jsonl
"""

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from capi_backbones import FeatureExtractor, from_pretrained
from capi_backbones.evals import ProbeTrainingConfig
from capi_backbones.evals.classification_protocol import ClassificationSettings, run_classification
from capi_backbones.evals.datasets import read_classification_folders
from capi_backbones.runtime.precision import cpu_bf16_support
from capi_backbones.train.config import load_config
from capi_backbones.train.export import export_teacher
from capi_backbones.train.trainer import Trainer

BATCH = 32  # as tests_long/test_pretraining_learns.py
REPRESENTATIONS = ("pooled", "avg_patch")


def write_digits(root: Path, size: int) -> None:
    """sklearn's 1797 digits, 8x8 grey upsampled (bicubic) to ``size`` px RGB, as ROOT/{train,test}/<digit>/*.png
    (the seeded 50/50 split of tests_long/test_pretraining_learns.py)."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    for position, index in enumerate(order):
        folder = root / ("train" if position < len(order) // 2 else "test") / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.rint(digits.images[index] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).convert("RGB").save(
            folder / f"{index:04d}.png"
        )


def probe_scores(weights: Path, data: Path, out_dir: Path) -> dict[str, float]:
    """``{"probe representation": test top-1}`` of a weights file, as ``eval classify`` computes them (fp32)."""
    extractor = FeatureExtractor(
        from_pretrained(weights), image_size=None, keep_aspect=False, batch_size=256, device="cpu", precision="fp32"
    )
    settings = ClassificationSettings(
        probes=("knn", "linear"),
        representations=REPRESENTATIONS,
        knn_ks=(20,),
        training=ProbeTrainingConfig(iterations=1000, warmup_iterations=100, batch_size=128),
    )
    payload = run_classification(read_classification_folders(data), extractor, out_dir, settings, progress=False)
    return {f"{row['probe']} {row['representation']}": row["top1"] for row in payload["results"]}


def train_and_probe(precision: str, seed: int, steps: int, data: Path, workdir: Path) -> dict:
    run = workdir / f"{precision}_s{seed}"
    config = load_config("tiny", [
        f"data.root={data / 'train'}", f"train.output_dir={run}", f"optim.total_steps={steps}",
        f"optim.batch_size={BATCH}", "train.device=cpu", "train.log_every=100", f"train.checkpoint_every={steps}",
        "train.progress_bar=false", "train.plot_every_checkpoint=false", f"train.precision={precision}",
        f"train.seed={seed}",
    ])  # fmt: skip
    trainer = Trainer(config)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    result = trainer.run()
    cpu_seconds, wall_seconds = time.process_time() - cpu_start, time.perf_counter() - wall_start
    step_seconds = [m.seconds for m in result.history[1:]]  # the first step warms up
    export_teacher(run, workdir / f"{precision}_s{seed}.safetensors")
    scores = probe_scores(workdir / f"{precision}_s{seed}.safetensors", data, workdir / f"eval_{precision}_s{seed}")
    return {
        "precision": precision,
        "seed": seed,
        "steps": len(result.history),
        "final_loss": result.history[-1].loss,
        "steps_per_s_wall": len(result.history) / wall_seconds,
        "steps_per_s_median_step": 1 / statistics.median(step_seconds),
        "steps_per_s_cpu": len(result.history) / cpu_seconds,  # checkpoint and export included, probes excluded
        "scores": scores,
    }


def summarize(records: list[dict]) -> None:
    print(f"\n# {len(records)} runs: test top-1 on the 899 held-out digits (features extracted in fp32)")
    probes = list(records[0]["scores"])
    print("precision | seed | steps | " + " | ".join(probes) + " | steps/s wall | steps/s median step | steps/s CPU")
    print("---|" * (len(probes) + 6))
    for r in records:
        scores = " | ".join(f"{r['scores'][p]:.3f}" for p in probes)
        rates = " | ".join(f"{r[k]:.2f}" for k in ("steps_per_s_wall", "steps_per_s_median_step", "steps_per_s_cpu"))
        print(f"{r['precision']} | {r['seed']} | {r['steps']} | {scores} | {rates}")
    precisions = dict.fromkeys(r["precision"] for r in records)
    by_precision = {p: [r for r in records if r["precision"] == p] for p in precisions}
    print("\nprecision | " + " | ".join(f"{p} mean (seed spread)" for p in probes))
    print("---|" * (len(probes) + 1))
    means = {}
    for precision, runs in by_precision.items():
        cells = []
        for probe in probes:
            values = [r["scores"][probe] for r in runs]
            means[precision, probe] = float(np.mean(values))
            cells.append(f"{np.mean(values):.3f} ({max(values) - min(values):.3f})")
        print(f"{precision} | " + " | ".join(cells))
    if {"fp32", "bf16"} <= by_precision.keys():
        print("\nprobe | bf16 - fp32 (means) | seed spread fp32 / bf16 | within noise")
        print("---|---|---|---")
        for probe in probes:
            values = [[r["scores"][probe] for r in by_precision[p]] for p in ("fp32", "bf16")]
            spreads = [max(v) - min(v) for v in values]
            diff = means["bf16", probe] - means["fp32", probe]
            print(f"{probe} | {diff:+.3f} | {spreads[0]:.3f} / {spreads[1]:.3f} | {abs(diff) <= max(spreads)}")
        for key in ("steps_per_s_cpu", "steps_per_s_median_step", "steps_per_s_wall"):
            rate = {p: float(np.median([r[key] for r in by_precision[p]])) for p in ("fp32", "bf16")}
            ratio = rate["bf16"] / rate["fp32"]
            print(f"{key}: fp32 {rate['fp32']:.2f}, bf16 {rate['bf16']:.2f}, bf16/fp32 {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bf16_training.jsonl"))
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--summarize", type=Path, default=None, help="only print the tables of this JSON-lines file")
    args = parser.parse_args()
    if args.summarize:
        summarize([json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()])
        return
    logging.basicConfig(level=logging.WARNING)
    unit = cpu_bf16_support()
    print(f"# this CPU: {unit or 'no native bf16 (bf16 is emulated: its steps/s is not the native figure)'}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        data = workdir / "digits"
        write_digits(data, load_config("tiny").data.image_size)
        records = []
        for seed in args.seeds:
            for precision in args.precisions:
                record = train_and_probe(precision, seed, args.steps, data, workdir)
                record["cpu"] = unit
                records.append(record)
                with args.out.open("a") as file:
                    file.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
        summarize(records)


if __name__ == "__main__":
    main()
