"""Fine-tuning ``capi_vits14`` through timm under plain DistributedDataParallel on CPU (gloo), and the parameter
counts of the timm models.

1. Throughput: ``timm.create_model("capi_vits14", num_classes=10)`` fine-tuned with AdamW on sklearn's digits
   (8x8 grey images upsampled to --image-size pixels, grey -> RGB, ImageNet normalisation), cross-entropy, one
   process per rank with --threads torch threads each, wrapped in ``DistributedDataParallel`` without
   ``find_unused_parameters``. Each rank runs --batch images per step. Both settings run in this one invocation
   (1 rank, then 2 ranks), after --warmup untimed steps; the table gives steps/s and images/s of the whole job
   (all ranks). On a machine with fewer free cores than ranks x threads the 2-rank figure measures contention.
2. Parameters: the timm model for each ``global_pool`` against the native ``CapiModel`` (which holds the whole
   predictor, as the checkpoints do): the timm model keeps only what the pooling uses.

Run: python benchmarks/bench_timm_ddp.py [--steps 10] [--warmup 2] [--batch 16] [--image-size 28] [--threads 1]
"""

import argparse
import os
import socket
import time

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

import capi_backbones.timm  # noqa: F401  (registers the models)
from capi_backbones.constants import IMAGENET_MEAN, IMAGENET_STD
from capi_backbones.models import ARCHITECTURES, CapiModel
from capi_backbones.timm import GLOBAL_POOL_TYPES


def digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    pixels = np.rint(data.images * (255 / 16)).astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")) for p in pixels]
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    return x, torch.from_numpy(data.target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = timm.create_model("capi_vits14", num_classes=10).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
        x, y = digits(args.image_size)
        generator = torch.Generator().manual_seed(rank)
        losses = []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                dist.barrier()
                start = time.perf_counter()
            index = torch.randint(0, len(x), (args.batch,), generator=generator)
            loss = F.cross_entropy(ddp(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        dist.barrier()
        elapsed = time.perf_counter() - start
        if rank == 0:
            results[world_size] = (elapsed, losses[0], losses[-1])
    finally:
        dist.destroy_process_group()


def throughput(args: argparse.Namespace) -> None:
    print(
        f"capi_vits14 through timm, digits at {args.image_size}px, batch {args.batch} per rank, {args.threads} "
        f"thread(s) per rank, {args.steps} timed steps after {args.warmup} warm-up steps (gloo, CPU)"
    )
    with mp.Manager() as manager:
        results = manager.dict()
        for world_size in (1, 2):
            mp.spawn(worker, args=(world_size, free_port(), args, results), nprocs=world_size, join=True)
        results = dict(results)
    print(f"{'ranks':>5} {'steps/s':>8} {'images/s':>9} {'loss first -> last (rank 0)':>28}")
    for world_size, (elapsed, first, last) in sorted(results.items()):
        steps = args.steps / elapsed
        print(f"{world_size:>5} {steps:>8.2f} {steps * args.batch * world_size:>9.1f} {first:>13.3f} -> {last:.3f}")
    ratio = (results[1][0] / results[2][0]) if 2 in results else float("nan")
    print(f"2 ranks / 1 rank: {ratio:.2f}x steps/s, {2 * ratio:.2f}x images/s")


def parameters() -> None:
    native = CapiModel(ARCHITECTURES["capi_vits14"], device="meta")
    total = sum(p.numel() for p in native.parameters())
    print(f"\nparameters of capi_vits14: native CapiModel {total / 1e6:.2f}M (encoder + 6 predictor blocks)")
    print(f"{'global_pool':>12} {'timm model':>11} {'vs native':>10}")
    for pool in GLOBAL_POOL_TYPES:
        model = timm.create_model("capi_vits14", global_pool=pool, device="meta")
        count = sum(p.numel() for p in model.parameters())
        print(f"{pool or '(none)':>12} {count / 1e6:>10.2f}M {(count - total) / 1e6:>+9.2f}M")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="images per rank and step")
    parser.add_argument("--image-size", type=int, default=28, help="a multiple of 14")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    parameters()
    throughput(args)


if __name__ == "__main__":
    main()
