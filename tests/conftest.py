import os
import sys
from pathlib import Path

import pytest

# Test helpers (the spec reference, checkpoint writers) are plain modules in this folder.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def lock_folders_named(monkeypatch):
    """``lock_folders_named(name)``: folders called ``name`` cannot be listed, as with ``chmod 0`` for a user who is
    not root (tests run as root in CI containers, which reads any folder)."""
    real_scandir = os.scandir

    def lock(name: str) -> None:
        def scandir(path="."):
            if os.path.basename(os.fspath(path)) == name:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)

    return lock
