"""Errors raised while reading, downloading or loading checkpoints."""

__all__ = ["CheckpointError", "DownloadError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys/shapes do not match the model.

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
    """Weights could not be fetched (no network, HTTP error, Hugging Face Hub unreachable)."""
