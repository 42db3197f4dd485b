"""The cost of extraction's integrity records (issue 20): the SHA-256 checksum of every shard and the identity
stamp of every image file, as a fraction of the extraction time of the same run (one run, so the machine's noise
cancels out).

    python benchmarks/bench_checksum.py --arch capi_vitb14 --images 64 --device cpu

Prints the seconds spent hashing shards (in a thread, overlapping the file write: ``hash``) and the part of it that
was not hidden behind the write (``exposed``), the seconds spent stamping files, and their share of the total; then
the check a resume runs before it trusts the listed shards (size and SHA-256 of each), against the same total.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import capi_backbones.features.extractor as extractor_module
import capi_backbones.features.shards as shards_module
from capi_backbones.features import FeatureExtractor, load_index
from capi_backbones.features.index import check_listed_shards
from capi_backbones.pretrained import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="capi_vitb14")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()

    timings = {"hash": 0.0, "write": 0.0, "stamp": 0.0, "exposed": 0.0}
    real_checksum, real_write, real_stamp = shards_module.checksum_of_bytes, shards_module.write_bytes, None
    real_stamp = extractor_module.file_stamp
    last = {}

    def checksum(data):
        start = time.perf_counter()
        try:
            return real_checksum(data)
        finally:
            last["hash"] = time.perf_counter() - start
            timings["hash"] += last["hash"]

    def write(path, data):
        start = time.perf_counter()
        try:
            return real_write(path, data)
        finally:
            last["write"] = time.perf_counter() - start
            timings["write"] += last["write"]

    def stamp(path):
        start = time.perf_counter()
        try:
            return real_stamp(path)
        finally:
            timings["stamp"] += time.perf_counter() - start

    real_write_shard = shards_module.write_shard

    def write_shard(path, shard, *, format):
        result = real_write_shard(path, shard, format=format)
        timings["exposed"] += max(0.0, last.get("hash", 0.0) - last.get("write", 0.0))
        return result

    shards_module.checksum_of_bytes, shards_module.write_bytes = checksum, write
    extractor_module.file_stamp = stamp
    import capi_backbones.features.writer as writer_module

    writer_module.write_shard = write_shard

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")
        torch.manual_seed(0)
        extractor = FeatureExtractor(
            create_model(args.arch, pretrained=False), device=args.device, batch_size=args.batch_size, num_workers=0
        )
        start = time.perf_counter()
        extractor.extract_to_disk(folder, folder / "out", shard_size=args.shard_size, progress=False)
        total = time.perf_counter() - start
        start = time.perf_counter()
        resume_check = check_listed_shards(folder / "out", load_index(folder / "out"))  # what every resume runs
        timings["resume"] = time.perf_counter() - start
        assert not resume_check, resume_check
    print(f"{args.arch} on {args.device}, {args.images} images, shards of {args.shard_size}: total {total:.2f} s")
    for key in ("hash", "exposed", "write", "stamp"):
        print(f"  {key:8s} {timings[key]:.4f} s = {100 * timings[key] / total:.3f} % of the run")
    cost = timings["exposed"] + timings["stamp"]
    print(f"integrity cost on the critical path (exposed hash + stamps): {100 * cost / total:.3f} %")
    print(f"a resume's shard check (size and SHA-256 of every shard): {timings['resume']:.4f} s = "
          f"{100 * timings['resume'] / total:.3f} % of the extraction")


if __name__ == "__main__":
    main()
