"""Inference speed and loading memory of CAPI backbones on this machine (CPU, fp32).

Reports, for each architecture at 224x224:
  * images/s of ``model(x)`` and the achieved GFLOP/s (FLOPs counted by torch's FlopCounterMode plus the CPU
    attention kernel it leaves out: ``flop_count.py``), next to a plain fp32 GEMM measured in the same run;
  * ViT-L/14: ``model(x)`` against the official forward, which runs all 12 predictor blocks and keeps block 1,
    with a bit-for-bit check that both give the same outputs;
  * peak RSS while ``from_pretrained`` loads ViT-L/14 weights (official .pth and safetensors, fp32 and bf16 files),
    against the weight bytes.

Run: python benchmarks/bench_model.py [--batch-size 4] [--repeats 3] [--archs capi_vits14 capi_vitb14 capi_vitl14]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from flop_count import count_flops  # FlopCounterMode plus the CPU attention kernels (benchmarks/ is on sys.path)

from capi_backbones.models import ARCHITECTURES, CapiModel


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_gflops(repeats: int) -> float:
    a, b = torch.randn(2048, 1024), torch.randn(1024, 4096)
    seconds = best_time(lambda: a @ b, repeats * 3)
    return 2 * 2048 * 1024 * 4096 / seconds / 1e9


def official_forward(model: CapiModel, x: torch.Tensor):
    """What facebookresearch/capi computes: every predictor block runs, block 1's output is kept."""
    b = x.shape[0]
    h, w = model.grid_size(*x.shape[-2:])
    tokens, coords, all_coords = model.encode(x)
    queries = model.mask_token[None].expand(b, all_coords.shape[0], -1)
    block_outputs = []
    for block in model.decoder.blocks:
        queries = block(queries, all_coords[None], context=tokens, context_coords=coords)
        block_outputs.append(queries)
    pooled = model.dec_norm(block_outputs[0]).mean(dim=1)
    r = model.n_registers
    return pooled, tokens[:, :r], tokens[:, r:].reshape(b, h, w, -1)


RSS_SCRIPT = """
import json, sys
import torch
from flop_count import count_flops  # FlopCounterMode plus the CPU attention kernels (benchmarks/ is on sys.path)
import capi_backbones

def status(field):  # bytes; VmHWM is this process's peak RSS (ru_maxrss would include the parent's, via fork)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

before = status("VmRSS")
model = capi_backbones.from_pretrained(sys.argv[1])
torch.stack([p.sum() for p in model.parameters()])  # touch every weight, so mapped pages count too
peak = status("VmHWM")
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"before": before, "peak": peak, "weights": weights, "dtype": str(next(model.parameters()).dtype)}))
"""


def loading_rss(tmp: Path) -> list[dict]:
    from capi_backbones.pretrained import save_safetensors

    torch.manual_seed(0)
    model = CapiModel(ARCHITECTURES["capi_vitl14"])
    files = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        state = {f"backbone.{k}": v.to(dtype) for k, v in model.state_dict().items()}
        files[f"official .pth, {name}"] = tmp / f"vitl14_{name}.pth"
        torch.save(state, files[f"official .pth, {name}"])
        del state
        files[f"safetensors, {name}"] = tmp / f"vitl14_{name}.safetensors"
        save_safetensors(model.to(dtype), files[f"safetensors, {name}"])
        model.float()
    del model
    rows = []
    for label, path in files.items():
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True)
        stats = json.loads(out.stdout.strip().splitlines()[-1])
        stats["file"] = label
        stats["file_bytes"] = path.stat().st_size
        rows.append(stats)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-rss", action="store_true", help="skip the ViT-L/14 loading memory measurement")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch {args.batch_size}, 224x224")
    gemm = gemm_gflops(args.repeats)
    print(f"plain fp32 GEMM (2048x1024 @ 1024x4096): {gemm:.1f} GFLOP/s\n")
    print(f"{'arch':<14}{'img/s':>8}{'GFLOP/img':>11}{'GFLOP/s':>9}{'% GEMM':>8}")
    x = torch.randn(args.batch_size, 3, 224, 224)
    comparison = None
    with torch.inference_mode():
        for arch in args.archs:
            model = CapiModel(ARCHITECTURES[arch]).eval().requires_grad_(False)  # FlopCounterMode under inference_mode
            flops = count_flops(lambda model=model: model(x))
            seconds = best_time(lambda model=model: model(x), args.repeats)
            rate = flops / seconds / 1e9
            print(f"{arch:<14}{args.batch_size / seconds:>8.2f}{flops / args.batch_size / 1e9:>11.1f}"
                  f"{rate:>9.1f}{100 * rate / gemm:>7.0f}%")
            if arch == "capi_vitl14":
                ours, official = model(x), official_forward(model, x)
                identical = all(torch.equal(a, b) for a, b in zip(ours, official, strict=True))
                official_flops = count_flops(lambda model=model: official_forward(model, x))
                ours_s, official_s = [], []
                for _ in range(args.repeats):  # interleaved, so that load changes hit both alike
                    ours_s.append(best_time(lambda model=model: model(x), 1))
                    official_s.append(best_time(lambda model=model: official_forward(model, x), 1))
                comparison = (min(ours_s), min(official_s), identical, official_flops / flops)
            del model
    if comparison:
        ours, official, identical, flop_ratio = comparison
        print(f"\nViT-L/14 model(x): {ours:.2f} s/batch; official all-12-blocks forward: {official:.2f} s/batch; "
              f"speed-up {official / ours:.2f}x (FLOP ratio {flop_ratio:.2f}x); outputs identical: {identical}")
    if not args.skip_rss:
        print("\nPeak RSS while loading ViT-L/14 with from_pretrained (fp32 model):")
        with tempfile.TemporaryDirectory() as tmp:
            for row in loading_rss(Path(tmp)):
                delta = row["peak"] - row["before"]
                gib = 2**30
                print(f"  {row['file']:<22} file {row['file_bytes'] / gib:.2f} GiB, weights {row['weights'] / gib:.2f}"
                      f" GiB, peak RSS {row['peak'] / 2**30:.2f} GiB (+{delta / 2**30:.2f} GiB over the "
                      f"{row['before'] / 2**30:.2f} GiB after imports) = {delta / row['weights']:.2f}x the weights")


if __name__ == "__main__":
    main()
