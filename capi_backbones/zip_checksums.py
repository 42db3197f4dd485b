"""The CRC-32s of a ``torch.save`` file: the one check of the bytes the format records, which ``torch.load`` skips.

``torch.save`` writes a zip whose every member (each tensor's bytes, the pickle) carries a CRC-32, but
``torch.load`` never compares them, so a byte changed on disk, in a copy or in a cache loads as a wrong value.
Every reader of such files in the package (released weights and converted files, training checkpoints, probe
checkpoints) asks :func:`zip_damage` first and words its own error around the answer. It reads the file once, in
chunks: about 0.4 s per GB once the file is in the page cache, no extra memory.
"""

import os
import zipfile
import zlib

__all__ = ["zip_damage"]

_ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError)  # a zip damaged past reading its members


def zip_damage(path: str | os.PathLike) -> str | None:
    """What is wrong with the zip at ``path``, to follow "``path`` is": ``"a cut-off or damaged zip (...)"`` when
    its structure is, ``"damaged: its member 'NAME' does not match its CRC-32 (...)"`` when bytes changed after
    it was written; None when every member matches. ``OSError`` when the file cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = archive.testzip()
    except _ZIP_READ_ERRORS as error:
        return f"a cut-off or damaged zip ({error})"
    if member is None:
        return None
    return f"damaged: its member {member!r} does not match its CRC-32 (bytes changed after it was written)"
