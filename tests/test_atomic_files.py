"""Atomic output: nothing half-written under the final name, and files get the usual permissions."""

import os
import stat

import pytest

from capi_backbones.atomic_files import atomic_folder, atomic_path, atomic_write_text


def test_success_replaces_the_file_with_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    target.parent.mkdir()
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # untouched until the block ends
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_failure_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_folder_and_text(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "shard") as tmp:
        (tmp / "a.npy").write_text("x")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(tmp_path / "shard") as tmp:
        (tmp / "a.npy").write_text("x")
    assert (tmp_path / "shard" / "a.npy").read_text() == "x"
    atomic_write_text(tmp_path / "index.json", "{}")
    assert (tmp_path / "index.json").read_text() == "{}"
