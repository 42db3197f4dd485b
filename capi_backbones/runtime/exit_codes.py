"""The exit codes of every command (``capi-backbones ...`` and ``python -m capi_backbones.train``) and the one
mapping from an exception to its code.

0 success (training: also stopped by a signal, resumable); 1 finished, but some inputs could not be used (named),
or for ``train`` the run stopped on non-finite losses; 2 a usage or input error; 3 an environment failure (disk
full, no permission, a failed download, a missing optional dependency); 128 + N stopped by signal N (Ctrl-C: 130,
SIGTERM: 143) after saving the finished work. Anything else is a bug and keeps its traceback.
"""

from capi_backbones.atomic_files import ENVIRONMENT_ERRNOS, WriteError
from capi_backbones.constants import EXIT_ENVIRONMENT, EXIT_INPUTS_FAILED, EXIT_USAGE
from capi_backbones.runtime.signals import exit_code_of

__all__ = [
    "EXIT_ENVIRONMENT",
    "EXIT_INPUTS_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "USAGE_ERRORS",
    "exit_code_for",
    "is_environment_failure",
    "one_line",
]

EXIT_OK = 0

# Exceptions that mean "bad input". Not TypeError or KeyError (bugs keep their traceback) and not OSError in
# general (a full disk is not a user mistake: see is_environment_failure).
USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def is_environment_failure(error: BaseException) -> bool:
    """An OSError that the machine caused (see ``ENVIRONMENT_ERRNOS``), a failed write, or a network failure."""
    if isinstance(error, WriteError | ConnectionError | TimeoutError):
        return True
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS


def exit_code_for(error: BaseException) -> int | None:
    """The exit code for ``error``, or None for a bug (which keeps its traceback).

    An exception with an integer ``exit_code`` attribute states its own; a stop signal gives 128 + N; an
    environment failure or a missing optional dependency (ImportError) 3; a usage error 2."""
    if isinstance(error, KeyboardInterrupt):
        return exit_code_of(error)
    code = getattr(error, "exit_code", None)
    if isinstance(code, int):
        return code
    if is_environment_failure(error) or isinstance(error, ImportError):
        return EXIT_ENVIRONMENT
    if isinstance(error, USAGE_ERRORS):
        return EXIT_USAGE
    return None


def one_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type name when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
