"""Releasing the pages of memory-mapped checkpoint tensors must never change what they (or the file) hold, and
must keep the loading peak near the converted model's size."""

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from checkpoint_files import tiny_model, write_official_checkpoint

import capi_backbones
from capi_backbones.models import ARCHITECTURES, CapiModel
from capi_backbones.pretrained import release_pages


def test_released_pages_fault_back_from_the_file(tmp_path):
    original = torch.randn(512, 1024)  # 2 MiB: many whole pages
    path = tmp_path / "t.pth"
    torch.save({"w": original}, path)
    mapped = torch.load(path, mmap=True, weights_only=True)["w"]
    assert torch.equal(mapped, original)  # pages now resident
    release_pages(mapped)
    assert torch.equal(mapped, original)  # read again from the file


def test_bf16_checkpoint_loads_exactly_and_leaves_the_file_intact(tmp_path):
    model = tiny_model()
    path = tmp_path / "bf16.pth"
    write_official_checkpoint(model, path, dtype=torch.bfloat16)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = capi_backbones.from_pretrained(path)
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.float32
        assert torch.equal(loaded.state_dict()[key], value.to(torch.bfloat16).float()), key
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


PEAK_PROBE = """
import re, sys, types
package = types.ModuleType("capi_backbones")  # skip the root __init__ (timm registration): only the loader runs
package.__path__ = [sys.argv[2]]
sys.modules["capi_backbones"] = package
from capi_backbones.pretrained import from_pretrained

def status_kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one
before = status_kib("VmRSS")
model = from_pretrained(sys.argv[1])
peak = status_kib("VmHWM")
print((peak - before) * 1024 / sum(t.numel() * t.element_size() for t in model.state_dict().values()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the page release and /proc/self are Linux-only")
def test_bf16_file_to_fp32_peak_memory_stays_near_the_model_size(tmp_path):
    """The page-release claim, measured: loading a bf16 ViT-S/14 file into fp32 must not keep the mapped file
    resident next to the fp32 copy. Measured on Linux: with the release the peak grows by 1.19x the fp32 bytes;
    without it by 1.7x to 2.1x (the bf16 file's 0.5x stays resident, at least)."""
    shapes = CapiModel(ARCHITECTURES["capi_vits14"], device="meta").state_dict()
    tensors = {"backbone." + k: torch.full(v.shape, 0.5, dtype=torch.bfloat16) for k, v in shapes.items()}
    torch.save(tensors, tmp_path / "vits14_bf16.pth")
    del tensors
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE, str(tmp_path / "vits14_bf16.pth"), os.path.dirname(capi_backbones.__file__)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ratio = float(result.stdout.strip().splitlines()[-1])
    assert ratio < 1.45, f"loading peaked at {ratio:.2f}x the fp32 model's bytes"
