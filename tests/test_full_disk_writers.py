"""`convert` and teacher `export` on a disk that cannot take the file: a real failing write (the file-size limit,
RLIMIT_FSIZE: write() fails with EFBIG in torch's C++ writer and in safetensors' Rust writer, as a full disk fails
with ENOSPC) and an injected ENOSPC (at the fsync before the rename). Each time: one line naming the output, exit 3
(the environment), the previous file at the final name untouched, no temporary left."""

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_files import tiny_model, write_official_checkpoint

from capi_backbones.cli.main import main

SUFFIXES = ["out.safetensors", "out.pth", "out_folder"]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "source.pth"
    write_official_checkpoint(tiny_model(), path)  # about 1 MB: far over the limit below
    return path


def _previous(path: Path) -> dict[str, bytes]:
    """A previous output at ``path`` (a file, or a folder with a model.safetensors), as {relative name: bytes}."""
    if path.suffix:
        path.write_bytes(b"the previous file")
        return {"": b"the previous file"}
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"the previous weights")
    return {"model.safetensors": b"the previous weights"}


def _contents(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def _cli_on_a_small_disk(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m capi_backbones ARGS`` where no file may grow past 64 KiB (writes fail with EFBIG)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "capi_backbones", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, preexec_fn=_limit_file_size, timeout=300, cwd=cwd
    )


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _one_error_line(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("INFO ")]


@pytest.mark.parametrize("name", SUFFIXES)
def test_convert_on_a_disk_that_refuses_the_write(source, tmp_path, name):
    out = tmp_path / name
    previous = _previous(out)
    done = _cli_on_a_small_disk("convert", str(source), str(out), "--overwrite", cwd=tmp_path)
    errors = _one_error_line(done.stderr)
    assert done.returncode == 3, done.stderr
    assert len(errors) == 1 and "File too large" in errors[0] and str(out) in errors[0], done.stderr
    assert _contents(out) == previous
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("name", SUFFIXES)
def test_convert_when_the_disk_fills_at_the_fsync(source, tmp_path, monkeypatch, capsys, name):
    out = tmp_path / name
    previous = _previous(out)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["convert", str(source), str(out), "--overwrite"]) == 3
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "No space left on device" in errors[0], errors
    assert _contents(out) == previous
    assert _temporaries(tmp_path) == []


def _tiny_run(tmp_path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent / "train"))
    try:
        from test_loop import tiny_config
    finally:
        sys.path.pop(0)
    from capi_backbones.train import Trainer

    Trainer(tiny_config(tmp_path, "optim.total_steps=1")).run()
    return tmp_path / "run"


@pytest.mark.parametrize("name", ["teacher.safetensors", "teacher.pth"])
def test_teacher_export_on_a_disk_that_refuses_the_write(tmp_path, name):
    run = _tiny_run(tmp_path)
    out = tmp_path / "exports" / name
    out.parent.mkdir()
    out.write_bytes(b"the previous export")
    done = _cli_on_a_small_disk("export", str(run), str(out), "--overwrite", cwd=tmp_path)
    errors = _one_error_line(done.stderr)
    assert done.returncode == 3, done.stderr
    assert len(errors) == 1 and "Cannot write" in errors[0] and str(out) in errors[0], done.stderr
    assert out.read_bytes() == b"the previous export"
    assert _temporaries(out.parent) == []


@pytest.mark.parametrize(
    "message",
    [
        "Error while serializing: I/O error: File too large (os error 27)",  # safetensors 0.5 and later
        'Error while serializing: IoError(Os { code: 27, kind: FileTooLarge, message: "File too large" })',  # 0.4
    ],
)
def test_a_safetensors_write_error_in_either_wording_is_an_os_error(tmp_path, message):
    from capi_backbones.pretrained.files import _os_error_of

    error = _os_error_of(RuntimeError(message), tmp_path / "out.safetensors")
    assert isinstance(error, OSError) and error.errno == errno.EFBIG, error
