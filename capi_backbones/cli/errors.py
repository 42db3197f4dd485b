"""User-facing CLI errors: printed as one line, exit code 2, no traceback."""

__all__ = ["CliError", "USER_ERRORS"]


class CliError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    @classmethod
    def from_exception(cls, error: BaseException) -> "CliError":
        """The first line of a library error's message (the traceback stays available with --verbose)."""
        message = str(error).strip()
        return cls(message.splitlines()[0] if message else repr(error))


# Library exceptions that mean "bad input", turned into CliError by the command handlers.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError, OSError)
