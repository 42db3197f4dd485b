"""How every command logs: the package's messages on stderr, other libraries at their own level (no torch)."""

import logging

__all__ = ["configure_logging"]


def configure_logging(verbose: bool = False) -> None:
    """Our messages (the ``capi_backbones`` loggers) at INFO, or DEBUG with ``verbose``, on stderr. Other libraries
    keep the root logger's WARNING: onnxscript alone would print hundreds of INFO lines per export."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")  # no-op if already configured
    logging.getLogger("capi_backbones").setLevel(logging.DEBUG if verbose else logging.INFO)
