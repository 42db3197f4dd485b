"""Releasing the pages of memory-mapped checkpoint tensors must never change what they (or the file) hold."""

import hashlib

import torch
from checkpoint_files import tiny_model, write_official_checkpoint

import capi_backbones
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
