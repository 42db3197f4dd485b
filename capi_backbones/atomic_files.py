"""Atomic file output, the one writer of the package: write to a temporary name in the target folder, fsync,
then rename; fsync the folder so the rename survives a power cut.

A crash or an error never leaves a half-written file (or folder) under the final name. Files get the usual
permissions (0666 minus the umask, 0644 by default) whatever the library that fills them does (safetensors
creates its files 0600). A failure of the file system (disk full, permission, read-only) raises
:class:`WriteError`, one line that names the final path.
"""

import errno
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "ENVIRONMENT_ERRNOS",
    "WriteError",
    "atomic_folder",
    "atomic_path",
    "atomic_write_text",
    "remove_stale_temporaries",
    "temporary_target",
]

# errno values that mean "the machine cannot take this write", not "the caller made a mistake" (the CLI maps
# them to exit code 3)
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.EIO,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOLCK,
    }
)


class WriteError(OSError):
    """Writing a file failed because of the environment (disk full, no permission, read-only file system)."""

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno, reason, str(path))
        self.path = Path(path)
        self.message = (
            f"Cannot write {self.path}: {reason}. Free some space, fix the permissions of {self.path.parent}, "
            "or choose another output folder."
        )

    def __str__(self) -> str:
        return self.message


_TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def temporary_target(name: str) -> str | None:
    """The file name a temporary of this module stands for (``.NAME.PID.XXXXXXXX.tmp`` -> ``NAME``), else None."""
    match = _TEMPORARY_NAME.match(name)
    return None if match is None else match.group("name")


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, *, min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporaries that atomic writes left in ``folder`` when their process died (``kill -9``, power
    cut), and return them. Temporaries of live processes on this machine are kept, so call it only for a folder
    that no other machine writes to at the same time, or pass ``min_age_s``: then only temporaries unmodified for
    that long are removed (a writer on another machine that still writes keeps its file)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for path in folder.iterdir():
        match = _TEMPORARY_NAME.match(path.name)
        if match is None or _process_alive(int(match.group("pid"))):
            continue
        try:
            if min_age_s and now - path.lstat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        _fsync(folder)
    except OSError as error:  # some file systems cannot fsync a folder; the data itself is synced
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR, errno.EACCES):
            raise


def _is_environment_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and not isinstance(error, WriteError) and error.errno in ENVIRONMENT_ERRNOS


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path`` (created empty, usual permissions); once the block ends
    it is fsynced, given the usual permissions and renamed to ``path``; on failure it is deleted. Creates the
    parent folder. File-system failures, in the block or here, raise :class:`WriteError` naming ``path``."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 minus the umask
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
    except OSError as error:
        raise WriteError(path, error) from error
    try:
        yield tmp
        os.chmod(tmp, mode)  # writers that recreate the file (safetensors: 0600) lose the umask's mode
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        if _is_environment_error(error):
            raise WriteError(path, error) from error
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Like ``atomic_path`` for a folder; ``path`` must not exist yet (folders cannot be replaced atomically).
    Every file inside gets the usual permissions and is fsynced before the rename."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # mode 0777 minus the umask
        file_mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666
    except OSError as error:
        raise WriteError(path, error) from error
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                os.chmod(child, file_mode)
                _fsync(child)
        _fsync_folder(tmp)
        os.rename(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        if _is_environment_error(error):
            raise WriteError(path, error) from error
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
