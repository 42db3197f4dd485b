"""A first GPU run of CAPI: precision, inference speed and training speed on one CUDA device (< 8 min on an H100).

Random weights, synthetic data made on the GPU. Reports:
  1. precision: bf16 autocast against fp32 (matmuls and convolutions at full fp32 precision, no TF32) for the
     ViT-L/14 outputs ``model(x)``: relative difference ||bf16 - fp32|| / ||fp32|| per output (target <= 1e-2);
  2. inference: ViT-L/14 images/s of ``model(x)`` at batch 64 (bf16 autocast), eager and ``torch.compile``-d,
     against the official forward that runs all 12 predictor blocks and keeps block 1 (interleaved, same run),
     and the achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode) against the card's dense bf16 peak;
  3. training: ``vits14`` and ``vitl14`` steps through the public ``capi_backbones.train.Trainer``
     (``train.compile=true``, bf16 autocast as the trainer does on CUDA) as steps/s and MFU (FLOPs of one step,
     forward and backward, counted on an eager trainer), next to the eager steps/s (``--skip-vitl-training``
     leaves ViT-L/14 out).

Prints a summary and writes all figures as JSON to --out. Without CUDA it stops with a one-line error;
``--dry-run`` runs every code path on tiny sizes (CPU allowed) to check the script itself.

Run: python benchmarks/gpu_check.py --out gpu_check.json [--train-batch 128] [--vitl-train-batch 64] [--train-steps 20]
"""

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_model import official_forward  # the all-predictor-blocks forward, shared with the CPU benchmark
from flop_count import count_flops  # FlopCounterMode plus the CPU attention kernels

from capi_backbones.atomic_files import atomic_write_text
from capi_backbones.models import ARCHITECTURES, CapiConfig, CapiModel
from capi_backbones.train import Trainer, load_config
from capi_backbones.train.masking import MaskedBatch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendor data sheets. Matched in order against
# torch.cuda.get_device_name(), so the more specific names come first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 125.0),  # before "A10", which it contains
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
)
PRECISION_TARGET = 1e-2
TRAINING_SECTIONS = ("training", "training_vitl14")  # vits14, then vitl14


@dataclass(frozen=True)
class Sizes:
    """What each check runs on: the real sizes, or tiny ones for --dry-run."""

    inference_config: CapiConfig
    inference_name: str
    precision_batch: int
    throughput_batch: int
    image_size: int
    repeats: int
    train_preset: str
    train_overrides: tuple[str, ...]
    large_train_preset: str  # the second training check (ViT-L/14 on real sizes)


FULL = Sizes(ARCHITECTURES["capi_vitl14"], "capi_vitl14", 8, 64, 224, 10, "vits14", (), "vitl14")
DRY = Sizes(
    CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2),
    "tiny (dry run)",
    2,
    2,
    56,
    2,
    "tiny",
    ("data.image_size=56", "clustering.n_prototypes=64"),
    "tiny",
)


def bf16_peak_tflops(device_name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference).norm() / reference.norm())


# ---- 1. precision ---------------------------------------------------------------------------------------------------
def precision_inputs(sizes: Sizes, device: torch.device) -> dict[str, torch.Tensor]:
    """Gaussian noise, and real photos (scikit-learn's two sample images, squared and normalised as
    FeatureExtractor does), repeated to the precision batch."""
    from sklearn.datasets import load_sample_images

    from capi_backbones.features.preprocessing import Preprocessor

    preprocess = Preprocessor(image_size=sizes.image_size, keep_aspect=False)
    photos = torch.stack([preprocess(torch.from_numpy(a.copy()).permute(2, 0, 1)) for a in load_sample_images().images])
    photos = photos.repeat((sizes.precision_batch + 1) // 2, 1, 1, 1)[: sizes.precision_batch]
    noise = torch.randn(sizes.precision_batch, 3, sizes.image_size, sizes.image_size)
    return {"photos": photos.to(device), "gaussian noise": noise.to(device)}


def check_precision(model: CapiModel, sizes: Sizes, device: torch.device) -> dict:
    return {name: precision_of(model, x, sizes) for name, x in precision_inputs(sizes, device).items()}


def precision_of(model: CapiModel, x: torch.Tensor, sizes: Sizes) -> dict:
    device = x.device
    matmul_precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")  # a true fp32 reference: no TF32 in matmuls or convolutions
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            reference = model(x)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                low = model(x)
                weights_bf16 = copy.deepcopy(model).to(torch.bfloat16)  # what FeatureExtractor runs in bf16
                low_weights = weights_bf16(x.to(torch.bfloat16))
                del weights_bf16
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    names = ("pooled", "registers", "patch_features")
    diffs = {name: relative_difference(a, b) for name, a, b in zip(names, low, reference, strict=True)}
    weights_diffs = {name: relative_difference(a, b) for name, a, b in zip(names, low_weights, reference, strict=True)}
    return {
        "bf16_weights_relative_difference": weights_diffs,  # bf16 weights and input (FeatureExtractor's bf16)
        "batch": sizes.precision_batch,
        "image_size": sizes.image_size,
        "relative_difference": diffs,
        "max_abs_difference": {
            n: float((a.float() - b).abs().max()) for n, a, b in zip(names, low, reference, strict=True)
        },
        "target": PRECISION_TARGET,
        "within_target": max(diffs.values()) <= PRECISION_TARGET,
        "bf16_weights_within_target": max(weights_diffs.values()) <= PRECISION_TARGET,
    }


# ---- 2. inference throughput ----------------------------------------------------------------------------------------
def check_inference(model: CapiModel, sizes: Sizes, device: torch.device, peak: float | None, compile_: bool) -> dict:
    batch = sizes.throughput_batch
    x = torch.randn(batch, 3, sizes.image_size, sizes.image_size, device=device)
    weights_bf16 = copy.deepcopy(model).to(torch.bfloat16)  # FeatureExtractor's bf16: bf16 weights and input
    x_bf16 = x.to(torch.bfloat16)
    forwards = {
        "model(x)": lambda: model(x),
        "official all-predictor-blocks forward": lambda: official_forward(model, x),
        "model(x), bf16 weights": lambda: weights_bf16(x_bf16),
    }
    if compile_:
        compiled = torch.compile(model)
        forwards["model(x), torch.compile"] = lambda: compiled(x)
    rows = {}
    with torch.inference_mode():  # the FLOPs do not depend on the dtype
        flops = {name: count_flops(forwards[name]) for name in ("model(x)", "official all-predictor-blocks forward")}
    flops["model(x), torch.compile"] = flops["model(x), bf16 weights"] = flops["model(x)"]
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
        compile_seconds = None
        if compile_:
            start = time.perf_counter()
            forwards["model(x), torch.compile"]()
            synchronize(device)
            compile_seconds = time.perf_counter() - start
        times = {name: [] for name in forwards}
        for _ in range(3):  # interleaved rounds, so that clock or load changes hit every forward alike
            for name, fn in forwards.items():
                times[name].append(seconds_per_call(fn, device, sizes.repeats))
    for name, per_round in times.items():
        seconds = min(per_round)
        tflops = flops[name] / seconds / 1e12
        rows[name] = {
            "seconds_per_batch": seconds,
            "images_per_s": batch / seconds,
            "gflop_per_image": flops[name] / batch / 1e9,
            "achieved_tflops": tflops,
            "fraction_of_peak": tflops / peak if peak else None,
        }
    ours, official = rows["model(x)"], rows["official all-predictor-blocks forward"]
    return {
        "arch": sizes.inference_name,
        "batch": batch,
        "image_size": sizes.image_size,
        "dtype": "bf16 autocast, fp32 weights (and a bf16-weights row)",
        "forwards": rows,
        "speedup_over_official": official["seconds_per_batch"] / ours["seconds_per_batch"],
        "compile_seconds": compile_seconds,
    }


# ---- 3. training ----------------------------------------------------------------------------------------------------
def synthetic_batch(trainer: Trainer, batch: int, device: torch.device) -> MaskedBatch:
    size = trainer.config.data.image_size
    generator = torch.Generator().manual_seed(0)
    masks, visible, predict = trainer.masking.sample_indices(batch, generator)
    images = torch.randn(batch, 3, size, size, device=device)
    return MaskedBatch(images=images, visible_indices=visible, predict_indices=predict, masks=masks).to(device)


def make_trainer(
    sizes: Sizes, preset: str, workdir: Path, name: str, batch: int, device: torch.device, compile_: bool
) -> Trainer:
    overrides = [
        f"data.root={workdir / 'images'}",
        f"train.output_dir={workdir / name}",
        f"optim.batch_size={batch}",
        f"train.device={device.type}",
        f"train.compile={str(compile_).lower()}",
        "train.resume=false",
        "data.num_workers=0",
        *sizes.train_overrides,
    ]
    return Trainer(load_config(preset, overrides))


def timed_steps(trainer: Trainer, data: MaskedBatch, warmup: int, steps: int) -> tuple[float, float, list[float]]:
    """(seconds of the warm-up steps, seconds of the timed steps, their losses). ``train_step`` ends with a
    device-to-host copy of the logged values, so each step has finished on the device when it returns."""
    start = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(data)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    losses = [trainer.train_step(data).loss for _ in range(steps)]
    return warm, time.perf_counter() - start, losses


def eager_training(sizes: Sizes, preset: str, workdir: Path, batch: int, device: torch.device, steps: int):
    """FLOPs of one training step (forward + backward of teacher, clustering and student), eager steps/s and the
    synthetic batch, from a trainer without torch.compile (FlopCounterMode sees the aten ops of eager code)."""
    trainer = make_trainer(sizes, preset, workdir, "eager", batch, device, compile_=False)
    data = synthetic_batch(trainer, batch, device)
    flops = count_flops(lambda: trainer.train_step(data))
    _, seconds, _ = timed_steps(trainer, data, warmup=1, steps=steps)
    return flops, steps / seconds, data


def check_training(
    sizes: Sizes, preset: str, device: torch.device, peak: float | None, batch: int, steps: int, compile_: bool
):
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "images").mkdir()
        Image.new("RGB", (32, 32)).save(workdir / "images" / "placeholder.png")  # the Trainer wants a data.root
        flops, eager_steps_per_s, data = eager_training(sizes, preset, workdir, batch, device, max(steps // 4, 1))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trainer = make_trainer(sizes, preset, workdir, "compiled", batch, device, compile_=compile_)
        warm_seconds, seconds, losses = timed_steps(trainer, data, warmup=3, steps=steps)
    steps_per_s = steps / seconds
    achieved = flops * steps_per_s / 1e12
    config = trainer.config
    return {
        "preset": preset,
        "global_batch": batch,
        "image_size": config.data.image_size,
        "prototypes": config.clustering.n_prototypes,
        "compile": compile_,
        "warmup_steps_seconds": warm_seconds,
        "timed_steps": steps,
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * batch,
        "eager_steps_per_s": eager_steps_per_s,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved,
        "mfu": achieved / peak if peak else None,
        "losses_finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


# ---- driver ---------------------------------------------------------------------------------------------------------
def run_section(results: dict, name: str, fn: Callable[[], dict]) -> None:
    """Run one check; a failure is recorded (and printed) so that the other checks still report."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as error:  # noqa: BLE001 - every check must report, the error goes to JSON and stderr
        traceback.print_exc()
        results[name] = {"error": f"{type(error).__name__}: {error}"}
    results[name]["section_seconds"] = time.perf_counter() - start
    print(f"[{name}] done in {results[name]['section_seconds']:.0f} s", flush=True)


def summary(results: dict) -> str:
    env = results["environment"]
    peak = env["bf16_peak_tflops"]
    lines = [f"{env['device_name']} | torch {env['torch']} | bf16 dense peak: {peak or 'unknown'} TFLOP/s"]
    p = results["precision"]
    if "error" in p:
        lines.append(f"precision: FAILED {p['error']}")
    else:
        for inputs, row in p.items():
            if not isinstance(row, dict):
                continue  # section_seconds
            diffs = ", ".join(f"{k} {v:.2e}" for k, v in row["relative_difference"].items())
            verdict = "OK" if row["within_target"] else "ABOVE TARGET"
            lines.append(f"precision bf16 vs fp32 on {inputs} (relative, target <= {row['target']:.0e}): {diffs} -> "
                         f"{verdict}")  # fmt: skip
            weights = ", ".join(f"{k} {v:.2e}" for k, v in row["bf16_weights_relative_difference"].items())
            lines.append(f"  bf16 weights (FeatureExtractor's bf16) vs fp32 on {inputs}: {weights}")
    i = results["inference"]
    if "error" in i:
        lines.append(f"inference: FAILED {i['error']}")
    else:
        lines.append(f"inference {i['arch']} batch {i['batch']} at {i['image_size']}px, {i['dtype']}:")
        for name, row in i["forwards"].items():
            frac = f" = {100 * row['fraction_of_peak']:.1f}% of peak" if row["fraction_of_peak"] else ""
            lines.append(f"  {name:<40} {row['images_per_s']:9.1f} img/s  {row['achieved_tflops']:7.1f} TFLOP/s{frac}")
        lines.append(f"  model(x) is {i['speedup_over_official']:.2f}x faster than the official forward")
    for section in (k for k in TRAINING_SECTIONS if k in results):
        t = results[section]
        if "error" in t:
            lines.append(f"{section}: FAILED {t['error']}")
            continue
        mfu = f", MFU {100 * t['mfu']:.1f}%" if t["mfu"] else ""
        lines.append(
            f"training {t['preset']} batch {t['global_batch']} at {t['image_size']}px, compile={t['compile']}: "
            f"{t['steps_per_s']:.2f} steps/s ({t['images_per_s']:.0f} img/s), {t['achieved_tflops']:.1f} TFLOP/s{mfu}; "
            f"eager {t['eager_steps_per_s']:.2f} steps/s; warm-up {t['warmup_steps_seconds']:.0f} s; "
            f"losses finite: {t['losses_finite']}"
        )
    lines.append(f"total {results['total_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="JSON file for all figures")
    parser.add_argument("--train-batch", type=int, default=128, help="global batch of the vits14 training steps")
    parser.add_argument("--vitl-train-batch", type=int, default=64, help="global batch of the vitl14 training steps")
    parser.add_argument("--skip-vitl-training", action="store_true", help="train vits14 only")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps (after 3 warm-up steps)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (inference and training)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the card, if not in the table")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU allowed: checks the script only")
    args = parser.parse_args(argv)
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist; create it or pick another path.")
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu_check needs a CUDA device and none is visible to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine, "
              "or pass --dry-run to check the script on CPU.", file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = DRY if args.dry_run else FULL
    train_batch = 4 if args.dry_run else args.train_batch
    large_batch = 4 if args.dry_run else args.vitl_train_batch
    train_steps = 2 if args.dry_run else args.train_steps
    compile_ = not args.no_compile
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (bf16_peak_tflops(name) if device.type == "cuda" else None)
    results: dict = {
        "environment": {
            "device_name": name,
            "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "bf16_peak_tflops": peak,
            "dry_run": args.dry_run,
        }
    }
    start = time.perf_counter()
    torch.manual_seed(0)
    # no parameter requires grad: FlopCounterMode's module hooks fail on such parameters under inference_mode
    model = CapiModel(sizes.inference_config, device=device).eval().requires_grad_(False)
    run_section(results, "precision", lambda: check_precision(model, sizes, device))
    run_section(results, "inference", lambda: check_inference(model, sizes, device, peak, compile_))
    model = None  # free the ViT-L before training
    trainings = [("training", sizes.train_preset, train_batch)]
    if not args.skip_vitl_training:
        trainings.append(("training_vitl14", sizes.large_train_preset, large_batch))
    for section, preset, batch in trainings:
        run_section(
            results, section, lambda p=preset, b=batch: check_training(sizes, p, device, peak, b, train_steps, compile_)
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["total_seconds"] = time.perf_counter() - start
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print(summary(results))
    print(f"figures written to {args.out}")
    sections = [k for k in ("precision", "inference", *TRAINING_SECTIONS) if k in results]
    return 1 if any("error" in results[k] for k in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
