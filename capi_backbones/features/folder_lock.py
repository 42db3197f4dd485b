"""The run lock of an extraction folder: one ``extract_to_disk`` run (of one or many ranks) writes a folder at a time.

A second run into a folder that is being written refuses at once with :class:`FolderBusyError`, naming the process
holds it, instead of racing it: both would number shards alike and rewrite ``index.json`` over each other. The lock
is an ``flock`` on the folder itself (no lock file to leave behind); the kernel drops it when its process dies, even
by ``kill -9``, so a crashed run never leaves a stale lock. In a multi-rank run only rank 0 holds it; the ranks write
apart (see ``capi_backbones.features.writer``). Where ``flock`` is not supported (some network mounts) the run
stops with the OS error rather than run unlocked.
"""

import fcntl
import os
from pathlib import Path

__all__ = ["FolderBusyError", "FolderLock"]


class FolderBusyError(RuntimeError):
    """Another extraction run is writing the folder."""


class FolderLock:
    """Exclusive, non-blocking lock of ``out_dir`` for the lifetime of one run; use as a context manager."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Lock the folder (it must exist), or raise FolderBusyError at once if another run holds it."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusyError(
                f"'{self.path}' is being written by another extract run. Wait for it to finish, or write to "
                "another output folder."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
