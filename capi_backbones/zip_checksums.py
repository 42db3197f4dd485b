"""The CRC-32s of a ``torch.save`` file: the one check of the bytes the format records, which ``torch.load`` skips.

``torch.save`` writes a zip whose every member (each tensor's bytes, the pickle) carries a CRC-32, but
``torch.load`` never compares them, so a byte changed on disk, in a copy or in a cache loads as a wrong value.
Every reader of such files in the package (released weights and converted files, training checkpoints, probe
checkpoints) calls :func:`damaged_zip_member` first. It reads the file once, in chunks: about 0.4 s per GB once the
file is in the page cache, no extra memory.
"""

import os
import zipfile
import zlib

__all__ = ["ZIP_READ_ERRORS", "damaged_zip_member"]

ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError)  # a zip damaged past reading its members


def damaged_zip_member(path: str | os.PathLike) -> str | None:
    """The name of the first member of the zip at ``path`` whose bytes do not match their recorded CRC-32, or None
    when all match. Raises one of ``ZIP_READ_ERRORS`` when the zip's structure is damaged or cut off, and
    ``OSError`` when the file cannot be read."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()
