"""Subcommands (to be filled in)."""


def register(subparsers) -> None:
    """Add this module's subcommands to ``subparsers``."""
