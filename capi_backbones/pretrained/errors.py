"""Errors raised while reading, downloading or loading checkpoints, and the "use a local copy" hint they carry.

The hint names the fix in the caller's own interface. Callers other than Python code say which one they are:

    with loading_interface("cli"):         # capi-backbones extract/pca/info/convert
        model = from_pretrained(name)
    # "torch.hub" (hub.py), "timm" (timm.py); the default is "python".
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["INTERFACES", "CheckpointError", "DownloadError", "loading_interface", "local_copy_hint"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys/shapes/values do not fit the model.

    Key comparison failures carry the full lists in ``missing``, ``unexpected`` and ``mismatched``
    (``(name, checkpoint_shape, model_shape)`` triples); the message shows the first ones.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
        mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = (),
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


class DownloadError(ConnectionError):
    """Weights could not be fetched or failed their checks (no network, HTTP error, cut short, wrong checksum)."""


# interface -> how a user of it passes a local checkpoint instead of a name or URL
INTERFACES = {
    "python": 'from_pretrained("{path}")',
    "cli": "--weights {path} (info/convert: give {path} as CHECKPOINT)",
    "torch.hub": 'torch.hub.load(..., weights="{path}")',
    "timm": 'timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file="{path}"))',
}
_INTERFACE: ContextVar[str] = ContextVar("capi_backbones_loading_interface", default="python")


@contextmanager
def loading_interface(name: str) -> Iterator[None]:
    """Within this block, error hints name the fix for ``name`` (a key of ``INTERFACES``)."""
    if name not in INTERFACES:
        raise ValueError(f"Unknown loading interface {name!r}. Use one of {', '.join(INTERFACES)}.")
    token = _INTERFACE.set(name)
    try:
        yield
    finally:
        _INTERFACE.reset(token)


def local_copy_hint(path: str) -> str:
    """How to load ``path`` (a placeholder such as ``/path/to/x.pth``) through the interface in use."""
    return INTERFACES[_INTERFACE.get()].format(path=path)
