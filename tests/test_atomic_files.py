"""Atomic output: nothing half-written under the final name, and files get the usual permissions."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from capi_backbones.atomic_files import (
    WriteError,
    atomic_folder,
    atomic_path,
    atomic_write_text,
    remove_stale_temporaries,
)


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


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_writer_gets_the_umask_mode(tmp_path, umask):
    """safetensors recreates its files 0600 and PIL / torch.save keep the mode: all end 0666 minus the umask."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        with atomic_path(tmp_path / "a.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        with atomic_path(tmp_path / "b.pt") as tmp, tmp.open("wb") as file:
            torch.save({"x": torch.zeros(2)}, file)
        with atomic_path(tmp_path / "c.png") as tmp:
            Image.new("RGB", (2, 2)).save(tmp, format="PNG")
        atomic_write_text(tmp_path / "d.json", "{}")
        with atomic_folder(tmp_path / "e") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp / "f.safetensors"))
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*tmp_path.iterdir(), tmp_path / "e" / "f.safetensors"]}
    assert modes == {
        "a.safetensors": 0o666 & ~umask, "b.pt": 0o666 & ~umask, "c.png": 0o666 & ~umask, "d.json": 0o666 & ~umask,
        "e": 0o777 & ~umask, "f.safetensors": 0o666 & ~umask,
    }  # fmt: skip


def test_the_file_and_its_folder_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    atomic_write_text(tmp_path / "index.json", "{}")
    assert len(synced) == 2 and ".index.json." in synced[0] and synced[1] == str(tmp_path)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch, code):
    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError) as caught:
        atomic_write_text(tmp_path / "index.json", "{}")
    message = str(caught.value)
    assert message.startswith(f"Cannot write {tmp_path / 'index.json'}: {os.strerror(code)}.") and "\n" not in message
    assert isinstance(caught.value, OSError) and caught.value.errno == code
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary
    with pytest.raises(WriteError, match="Cannot write .*out.bin: No space left"), atomic_path(tmp_path / "out.bin"):
        raise OSError(errno.ENOSPC, "No space left on device")  # raised by the code that fills the file


def test_other_errors_of_the_block_pass_through_unchanged(tmp_path):
    with pytest.raises(ConnectionResetError), atomic_path(tmp_path / "x"):
        raise ConnectionResetError(errno.ECONNRESET, "reset")
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "y"):
        raise FileNotFoundError(errno.ENOENT, "missing input")


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".ckpt.pt.{dead_pid}.0123abcd.tmp").write_bytes(b"half")
    (tmp_path / f".shard.{dead_pid}.89abcdef.tmp").mkdir()
    (tmp_path / f".live.pt.{os.getpid()}.0123abcd.tmp").write_bytes(b"in progress")
    (tmp_path / "notes.1.0123abcd.tmp").write_text("not ours")  # no leading dot
    (tmp_path / "ckpt.pt").write_text("final")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [f".ckpt.pt.{dead_pid}.0123abcd.tmp", f".shard.{dead_pid}.89abcdef.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".live.pt.{os.getpid()}.0123abcd.tmp",
        "ckpt.pt",
        "notes.1.0123abcd.tmp",
    ]


def test_one_temporary_naming_scheme_is_read_back_by_the_extraction_index():
    from capi_backbones.atomic_files import _temporary_name, temporary_target
    from capi_backbones.features.index import is_ours

    for final in ("shard_00012.safetensors", "shard_00003-r0001", "index.json", "index.rank00001.json"):
        temporary = _temporary_name(Path(final)).name
        assert temporary_target(temporary) == final and is_ours(temporary), temporary
    assert temporary_target("notes.1.0123abcd.tmp") is None  # no leading dot: not a temporary of ours
    assert not is_ours(_temporary_name(Path("notes.txt")).name)  # a temporary, but of a file extract never writes
