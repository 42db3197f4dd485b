"""Stop signals: SIGINT (Ctrl-C), SIGTERM (schedulers, ``kill``, torchrun) and SIGUSR1 (SLURM's warning before the
time limit) all mean "save what is finished and stop cleanly".

Two styles share these helpers: a loop that can stop anywhere turns the signals into :class:`Interrupted` (a
``KeyboardInterrupt`` carrying the exit code 128 + signal number) with :func:`interrupt_on_stop_signals`; a loop
that stops at step boundaries routes them to its own flag with :func:`handle_stop_signals`. While the finished
work is being saved, :func:`stop_signals_ignored` keeps a second Ctrl-C from losing it, and
:func:`quiet_after_stop` makes a second Ctrl-C during the exit that follows end the process without a traceback.
Signal handlers can only be set in the main thread: elsewhere these helpers do nothing.
"""

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

__all__ = [
    "STOP_SIGNALS",
    "Interrupted",
    "exit_code_of",
    "handle_stop_signals",
    "ignore_stop_signals_in_worker",
    "interrupt_on_stop_signals",
    "quiet_after_stop",
    "stop_signals_ignored",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_NOT_SIGINT = (signal.SIGTERM, signal.SIGUSR1)  # Python already turns SIGINT into KeyboardInterrupt


class Interrupted(KeyboardInterrupt):
    """A stop signal other than Ctrl-C, raised like Ctrl-C. ``exit_code`` = 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum
        self.exit_code = 128 + signum


def exit_code_of(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the run (Ctrl-C: 130)."""
    return getattr(interrupt, "exit_code", 128 + signal.SIGINT)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handle_stop_signals(handler: Callable | int, signals: tuple[int, ...] = _NOT_SIGINT) -> Iterator[None]:
    """Route ``signals`` (SIGTERM and SIGUSR1 by default) to ``handler`` for the duration, then restore."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def interrupt_on_stop_signals(exception: type[Interrupted] = Interrupted) -> contextlib.AbstractContextManager:
    """SIGTERM and SIGUSR1 raise ``exception(signum)`` (an :class:`Interrupted`) in the main thread, as Ctrl-C
    raises KeyboardInterrupt."""

    def interrupt(signum, frame):
        raise exception(signum)

    return handle_stop_signals(interrupt)


def stop_signals_ignored() -> contextlib.AbstractContextManager:
    """Ignore every stop signal for the duration: the final save after a stop must finish."""
    return handle_stop_signals(signal.SIG_IGN, STOP_SIGNALS)


def quiet_after_stop() -> None:
    """After a stop has been handled: a further stop signal ends the process at once, with the usual 128 + N
    status and no traceback (Python's own handling would raise KeyboardInterrupt inside the clean-up)."""
    if not _in_main_thread():
        return

    def leave(signum, frame):
        os._exit(128 + signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, leave)


def ignore_stop_signals_in_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` for DataLoader workers: ignore SIGTERM and SIGUSR1, so that when a scheduler signals the
    whole process group the main process saves its work and then shuts its workers down itself."""
    for sig in _NOT_SIGINT:
        signal.signal(sig, signal.SIG_IGN)
