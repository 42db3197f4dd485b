"""fp32 against bf16 (and dynamic int8) on this CPU: ``model(x)`` and extraction, each beside its dtype's GEMM.

Reports:
  * whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX, as ``capi_backbones.runtime.precision`` detects
    it, which is what ``precision="auto"`` follows);
  * per architecture at 224x224 and each ``--batch-sizes`` (default 4 and 16): images/s and GFLOP/s of ``model(x)``
    in fp32, in bf16 (bf16 weights and input, under autocast: what ``FeatureExtractor`` runs) and in bf16 autocast
    over the fp32 weights (``autocast``: what it ran before), optionally with dynamic int8 Linears (``--int8``,
    torch.ao), each next to a plain 2048x1024 @ 1024x4096 GEMM of its dtype timed interleaved with it; and the
    relative difference of the bf16 (int8) outputs to fp32 on photos;
  * extraction: ``FeatureExtractor`` images/s over a folder of photos of mixed sizes (several patch grids, so several
    input shapes) against the model's own steady-state rate (``extractor.model.forward_features`` on the same
    batches: the fp32 model, or the extractor's bf16 weights) at 56 and 224 px, batch ``--extract-batch-size``,
    with the shapes new (first run) and seen; and the cost of the first forward at a new shape.
Without native bf16 only fp32 is measured (``--force-bf16`` measures the emulated path anyway).

Clock: ``--clock cpu`` counts this process's CPU time, which other jobs on a shared machine barely disturb; use it
with one thread (``OMP_NUM_THREADS=1``), since waiting threads also count, and with ``--workers 0`` (decoding
workers are other processes: their time would not count). ``--clock wall`` (default) is real time.
Ratios are measured within one run. ViT-L/14 is optional (``--vitl``); the default run takes a few minutes on one
thread.

Run: OMP_NUM_THREADS=1 python benchmarks/bench_precision.py --clock cpu [--vitl] [--int8]
"""

import argparse
import contextlib
import functools
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from flop_count import count_flops  # FlopCounterMode plus the CPU attention kernels (benchmarks/ is on sys.path)
from PIL import Image
from skimage import data
from torch import nn

from capi_backbones.features import FeatureExtractor
from capi_backbones.models import ARCHITECTURES, CapiModel
from capi_backbones.runtime.precision import cpu_bf16_support

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")
GEMM_SHAPE = (2048, 1024, 4096)


def clock_function(name: str):
    return time.process_time if name == "cpu" else time.perf_counter


def timed(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def photos(size: int) -> torch.Tensor:
    """The photos as a normalised (N, 3, size, size) batch."""
    from torchvision.transforms.functional import normalize, resize

    images = [torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1) for name in PHOTOS]
    images = [resize(image[:3], [size, size], antialias=True).float() / 255 for image in images]
    return normalize(torch.stack(images), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def int8_model(model: CapiModel) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def variants(arch: str, bf16: bool, int8: bool) -> dict:
    """name -> (model, input dtype, autocast dtype or None, GEMM dtype): the same weights in each."""
    torch.manual_seed(0)
    fp32 = CapiModel(ARCHITECTURES[arch]).eval().requires_grad_(False)  # FlopCounterMode needs no-grad parameters
    out = {"fp32": (fp32, torch.float32, None, torch.float32)}
    if bf16:
        low = CapiModel(ARCHITECTURES[arch]).eval().requires_grad_(False)
        low.load_state_dict(fp32.state_dict())
        out["bf16"] = (low.to(torch.bfloat16), torch.bfloat16, torch.bfloat16, torch.bfloat16)
        out["autocast"] = (fp32, torch.float32, torch.bfloat16, torch.bfloat16)
    if int8:
        out["int8"] = (int8_model(fp32), torch.float32, None, "int8")
    return out


def run_model(model, x, autocast):
    context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), context:
        return model(x)


def model_alone(model, autocast, x):
    """``model.forward_features(x)`` as the extractor runs it (inference mode, its autocast), nothing around it."""
    context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), context:
        return model.forward_features(x, pooled=True)


def gemm_fn(dtype):
    m, k, n = GEMM_SHAPE
    torch.manual_seed(0)
    if dtype == "int8":  # the dynamic int8 Linear kernel itself, on a (m, k) input and a (n, k) weight
        linear = int8_model(nn.Sequential(nn.Linear(k, n, bias=False)))
        a = torch.randn(m, k)
        return lambda: linear(a)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return lambda: a @ b


def bench_models(args, clock, bf16: bool) -> None:
    m, k, n = GEMM_SHAPE
    print(f"\nmodel(x) at 224x224; GEMM {m}x{k} @ {k}x{n} of the same dtype, interleaved")
    print(
        f"{'arch':<13}{'batch':>6} {'dtype':<9}{'img/s':>8}{'GFLOP/s':>9}{'GEMM GFLOP/s':>14}{'% GEMM':>8}{'x fp32':>8}"
        f"{'rel. diff to fp32':>19}"
    )
    photo_batch = photos(224)
    archs = list(args.archs) + (["capi_vitl14"] if args.vitl and "capi_vitl14" not in args.archs else [])
    for arch in archs:
        models = variants(arch, bf16, args.int8)
        for batch_size in args.batch_sizes:
            bench_arch(args, clock, arch, models, batch_size, photo_batch)


def bench_arch(args, clock, arch: str, models: dict, batch_size: int, photo_batch: torch.Tensor) -> None:
    m, k, n = GEMM_SHAPE
    gemm_flops = 2 * m * k * n
    x = torch.randn(batch_size, 3, 224, 224)
    rates, reference = {}, None
    for name, (model, in_dtype, autocast, gemm_dtype) in models.items():
        xi = x.to(in_dtype)
        if name == "fp32":  # the same FLOPs for every dtype (the counter does not see quantized kernels)
            flops = count_flops(functools.partial(run_model, model, xi, autocast))
        gemm = gemm_fn(gemm_dtype)
        gemm()
        model_times, gemm_times = [], []
        for _ in range(args.repeats):
            model_times.append(timed(functools.partial(run_model, model, xi, autocast), clock))
            gemm_times.append(timed(gemm, clock))
        outputs = run_model(model, photo_batch.to(in_dtype), autocast)
        if reference is None:
            reference, diff = outputs, ""
        else:
            worst = max((a.float() - b).norm() / b.norm() for a, b in zip(outputs, reference, strict=True))
            diff = f"{worst:.1e}"
        rate, gemm_rate = flops / min(model_times) / 1e9, gemm_flops / min(gemm_times) / 1e9
        rates[name] = batch_size / min(model_times)
        print(
            f"{arch:<13}{batch_size:>6} {name:<9}{rates[name]:>8.2f}{rate:>9.0f}{gemm_rate:>14.0f}"
            f"{100 * rate / gemm_rate:>7.0f}%{rates[name] / rates['fp32']:>7.2f}x{diff:>19}"
        )


def write_folder(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    paths = []
    for i, (h, w) in enumerate(sizes):
        image = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB").resize((w, h))
        paths.append(folder / f"img_{i:03d}.png")
        image.save(paths[-1])
    return paths


def bench_extraction(args, clock, precisions: list[str]) -> None:
    print(
        f"\nextraction with FeatureExtractor({args.extract_arch}, batch_size={args.extract_batch_size}, "
        f"keep_aspect=True, num_workers={args.workers}): images/s against extractor.model.forward_features (the model "
        "the extractor runs: fp32, or its bf16 weights) on the same batches"
    )
    print(
        f"{'px':>4} {'precision':<10}{'shapes':>7}{'images':>7}{'new shapes':>12}{'seen shapes':>13}"
        f"{'model alone':>13}{'new/model':>11}{'seen/model':>12}{'1st forward at a new shape':>30}"
    )
    torch.manual_seed(0)
    model = CapiModel(ARCHITECTURES[args.extract_arch]).eval()
    aspects = [(1.0, 1.0), (1.0, 1.5), (1.5, 1.0), (1.0, 1.34)]
    for px in (56, 224):
        for precision in precisions:
            batch_size = args.extract_batch_size
            per_shape = batch_size * 2
            sizes = [(int(px * a * 2), int(px * b * 2)) for a, b in aspects for _ in range(per_shape)]
            with tempfile.TemporaryDirectory() as tmp:
                paths = write_folder(Path(tmp), sizes)
                extractor = FeatureExtractor(
                    model, image_size=px, batch_size=batch_size, precision=precision, num_workers=args.workers
                )
                extract = functools.partial(extractor.extract, paths)
                new = timed(extract, clock)
                seen = min(timed(extract, clock) for _ in range(2))
                inputs = [extractor.preprocess(p) for p in paths]
            groups: dict[tuple, list] = {}
            for tensor in inputs:
                groups.setdefault(tuple(tensor.shape), []).append(tensor)
            batches = [
                torch.stack(g[i : i + batch_size]).to(next(extractor.model.parameters()).dtype)
                for g in groups.values()
                for i in range(0, len(g), batch_size)
            ]
            own = functools.partial(model_alone, extractor.model, extractor.autocast_dtype)
            steady = min(sum(timed(functools.partial(own, b), clock) for b in batches) for _ in range(2))
            shape = (batch_size, 3, px, px + 14 * len(groups) + 28)  # a grid no run has seen yet
            fresh = torch.randn(shape)
            first, again = (timed(functools.partial(extractor.forward, fresh), clock) for _ in range(2))
            n = len(paths)
            print(
                f"{px:>4} {precision:<10}{len(groups):>7}{n:>7}{n / new:>10.1f}/s{n / seen:>11.1f}/s"
                f"{n / steady:>11.1f}/s{steady / new:>11.0%}{steady / seen:>12.0%}"
                f"{f'{first:.3f} s, then {again:.3f} s':>30}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["capi_vits14", "capi_vitb14"], choices=list(ARCHITECTURES))
    parser.add_argument("--vitl", action="store_true", help="add capi_vitl14 (slow: about a minute on one thread)")
    parser.add_argument("--int8", action="store_true", help="add dynamic int8 Linears (torch.ao, deprecated)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16], help="model(x) batch sizes")
    parser.add_argument("--extract-batch-size", type=int, default=16, help="FeatureExtractor batch_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--extract-arch", default="capi_vits14", choices=list(ARCHITECTURES))
    parser.add_argument("--skip-extraction", action="store_true")
    parser.add_argument("--skip-models", action="store_true", help="only the extraction part")
    parser.add_argument("--workers", type=int, default=0, help="FeatureExtractor num_workers (decoding processes)")
    parser.add_argument("--force-bf16", action="store_true", help="measure bf16 even where it is emulated")
    args = parser.parse_args()
    clock = clock_function(args.clock)
    unit = cpu_bf16_support()
    bf16 = unit is not None or args.force_bf16
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock; "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; native bf16: {unit or 'no'}"
    )
    if unit is None:
        print(
            "This CPU has no AVX512-BF16 or AMX: bf16 would be emulated (slower than fp32), precision='auto' runs "
            "fp32. " + ("Measuring bf16 anyway (--force-bf16)." if bf16 else "Reporting fp32 only.")
        )
    if not args.skip_models:
        bench_models(args, clock, bf16)
    if not args.skip_extraction:
        bench_extraction(args, clock, ["fp32", "bf16"] if bf16 else ["fp32"])


if __name__ == "__main__":
    main()
