"""CLI errors: one line on stderr, no traceback, and an exit code that says whose problem it is.

Exit codes shared by the commands: 0 success; 1 finished, but some inputs could not be used (named); 2 usage or
input error (:class:`CliError`); 3 environment failure (:class:`EnvironmentFailure`: disk full, no permission,
read-only file system, ..., naming the path; or a failed download). Anything else is a bug and keeps its traceback.
"""

from capi_backbones.atomic_files import ENVIRONMENT_ERRNOS
from capi_backbones.constants import EXIT_ENVIRONMENT, EXIT_USAGE
from capi_backbones.runtime.exit_codes import USAGE_ERRORS, is_environment_failure

__all__ = [
    "ENVIRONMENT_ERRNOS",
    "EXIT_ENVIRONMENT",
    "EXIT_USAGE",
    "CliError",
    "EnvironmentFailure",
    "USER_ERRORS",
    "is_environment_failure",
]


class CliError(Exception):
    """An error caused by the user's input, reported without a traceback (exit code 2)."""

    exit_code = EXIT_USAGE

    @classmethod
    def from_exception(cls, error: BaseException) -> "CliError":
        """The first line of a library error's message (the traceback stays available with --verbose)."""
        message = str(error).strip()
        return cls(message.splitlines()[0] if message else repr(error))


class EnvironmentFailure(CliError):
    """The machine, not the input, stopped the command: disk full, permission denied, ... (exit code 3)."""

    exit_code = EXIT_ENVIRONMENT

    @classmethod
    def from_os_error(cls, error: OSError) -> "EnvironmentFailure":
        if error.filename is None:  # e.g. a download that failed: its message says what and where
            return cls.from_exception(error)
        reason = error.strerror or str(error)
        return cls(
            f"{reason}: '{error.filename}'. Free space or fix permissions there (or choose another location), "
            "then rerun."
        )


# Library exceptions that mean "bad input", turned into CliError by the command handlers; the mapping of errors to
# exit codes lives in capi_backbones.runtime.exit_codes.
USER_ERRORS = USAGE_ERRORS
