"""Download http(s) checkpoints into the torch hub cache, checked before they get their final name.

The body goes to a temporary file in the cache folder. It is renamed to its final name only after these checks:
the size announced by Content-Length, that the bytes are a whole checkpoint by structure (not an HTML page, not
cut short), and the SHA-256 when the weights registry records one. Without a network it fails within seconds (the
host or proxy is resolved and connected to with a short timeout first), and a download that outlives its overall
deadline (for instance a server that trickles bytes) is abandoned.
"""

import hashlib
import http.client
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, getproxies, proxy_bypass, urlopen

import torch
from tqdm import tqdm

from capi_backbones.atomic_files import atomic_path, remove_stale_temporaries
from capi_backbones.constants import DOWNLOAD_DEADLINE_S, DOWNLOAD_TIMEOUT_ENV
from capi_backbones.pretrained.errors import CheckpointError, DownloadError, local_copy_hint
from capi_backbones.pretrained.files import check_complete
from capi_backbones.weights_registry import WEIGHTS

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DOWNLOAD_DEADLINE_S",
    "READ_TIMEOUT_S",
    "STALE_TEMPORARY_AGE_S",
    "cache_file_name",
    "check_reachable",
    "checkpoint_cache_dir",
    "download_deadline",
    "download_url",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # DNS + TCP connect
READ_TIMEOUT_S = 60.0  # longest wait for any byte once connected
STALE_TEMPORARY_AGE_S = 2 * READ_TIMEOUT_S  # a live download writes more often (its reads time out sooner)
_CHUNK = 1 << 20


def checkpoint_cache_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``, where torch.hub keeps downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _resolve(host: str, port: int, timeout: float) -> list:
    """getaddrinfo has no timeout of its own: run it in a daemon thread and stop waiting after ``timeout``."""
    result: list = []

    def work() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as error:
            result.append(error)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise TimeoutError(f"name lookup of {host} timed out after {timeout:g} s")
    if isinstance(result[0], OSError):
        raise OSError(f"name lookup of {host} failed: {result[0]}")
    return result[0]


def check_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ``OSError`` unless a TCP connection to the URL's host (or its proxy) opens within ``timeout``."""
    parts = urlsplit(url)
    proxy = getproxies().get(parts.scheme)
    if proxy and not proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    errors = []
    for family, kind, proto, _, address in _resolve(host, port, timeout):
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                return
        except OSError as error:
            errors.append(error)
    raise OSError(f"cannot connect to {host}:{port}: {errors[0] if errors else 'no address'}")


def _verify(tmp: Path, url: str, written: int, expected: int | None, digest: str, sha256: str | None) -> None:
    if expected is not None and written != expected:
        raise DownloadError(f"Download of {url} stopped after {written} of {expected} bytes.")
    try:
        check_complete(tmp)
    except CheckpointError as error:  # e.g. an HTML error page served with status 200, or a cut-off body
        reason = str(error).split(". If it was downloaded")[0].replace(f"{tmp} is ", "").replace(f"{tmp} ", "")
        raise DownloadError(f"{url} did not send a whole checkpoint ({reason}).") from error
    if sha256 is not None and digest != sha256.lower():
        raise DownloadError(f"{url} sent a file whose SHA-256 is {digest}, expected {sha256.lower()}.")


def download_deadline(deadline_s: float | None = None) -> float:
    """``deadline_s`` if given, else ``$CAPI_DOWNLOAD_TIMEOUT``, else ``DOWNLOAD_DEADLINE_S`` (seconds, > 0)."""
    where = "deadline_s"
    if deadline_s is None:
        text = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "").strip()
        if not text:
            return DOWNLOAD_DEADLINE_S
        where = f"${DOWNLOAD_TIMEOUT_ENV}"
        try:
            deadline_s = float(text)
        except ValueError:
            raise ValueError(f"{where}={text!r} is not a number of seconds; set it to e.g. 7200 or unset it.") from None
    if not (isinstance(deadline_s, int | float) and math.isfinite(deadline_s) and deadline_s > 0):
        raise ValueError(f"{where}={deadline_s!r}: the download deadline must be a positive number of seconds.")
    return float(deadline_s)


def cache_file_name(url: str) -> str:
    """The cache name of a URL: its file name with a hash of the whole URL (host, path, query: so also the
    revision of a ``.../resolve/<revision>/model.safetensors`` URL) before the suffix, so that two URLs sharing
    a file name never share a cache entry: ``model.safetensors`` -> ``model-3f2a9c1b0d4e5f60.safetensors``.
    The registered weights' URLs keep their official file names (torch.hub's layout, shared with the official
    hubconf), which the registry keeps unique."""
    registered = {w.url: w.file_name for w in WEIGHTS.values()}
    if url in registered:
        return registered[url]
    name = os.path.basename(urlsplit(url).path) or "checkpoint.pth"
    stem, dot, suffix = name.rpartition(".")
    stem, suffix = (stem, dot + suffix) if stem else (name, "")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return f"{stem}-{digest}{suffix}"


def download_url(
    url: str,
    *,
    file_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    sha256: str | None = None,
    deadline_s: float | None = None,
) -> Path:
    """Download ``url`` into the cache (default: torch hub checkpoints) once; return the cached path.

    The cache entry is keyed by the URL (``cache_file_name``), never by its file name alone; ``file_name``
    overrides it (callers pass it only for URLs whose names are unique: the registered weights). Checked before
    the rename (see the module docstring); any failure raises ``DownloadError`` and leaves nothing under the final
    name, and temporaries left by killed downloads are removed. ``sha256``: expected hex digest. ``deadline_s``:
    limit for the whole download (default ``$CAPI_DOWNLOAD_TIMEOUT``, else 3600 s).
    """
    deadline_s = download_deadline(deadline_s)
    file_name = file_name or cache_file_name(url)
    folder = Path(cache_dir) if cache_dir is not None else checkpoint_cache_dir()
    target = folder / file_name
    if target.is_file():
        logger.info("Using cached %s", target)
        return target
    for stale in remove_stale_temporaries(folder, min_age_s=STALE_TEMPORARY_AGE_S):
        logger.info("Removed %s, left by a download that was killed", stale)
    local = local_copy_hint(f"/path/to/{os.path.basename(urlsplit(url).path) or file_name}")
    hint = f"To use a local copy instead, download it elsewhere and pass its path: {local} (or place it at {target})."
    try:
        check_reachable(url)
    except OSError as error:
        raise DownloadError(f"Cannot download {url}: {error}. No network? {hint}") from error
    logger.info("Downloading %s to %s", url, target)
    deadline = time.monotonic() + deadline_s
    try:
        request = Request(url, headers={"User-Agent": "capi-backbones"})
        with (
            urlopen(request, timeout=min(READ_TIMEOUT_S, deadline_s)) as response,
            atomic_path(target) as tmp,
        ):
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            written, hasher = 0, hashlib.sha256()
            with (
                open(tmp, "wb") as out,
                tqdm(total=expected, unit="B", unit_scale=True, desc=target.name, disable=not progress or None) as bar,
            ):
                while chunk := response.read1(_CHUNK):  # returns what has arrived, so the deadline is checked
                    out.write(chunk)
                    hasher.update(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                    if time.monotonic() > deadline:
                        raise DownloadError(
                            f"Download of {url} passed its {deadline_s:g} s deadline after {written} bytes; "
                            "the server is too slow."
                        )
            _verify(tmp, url, written, expected, hasher.hexdigest(), sha256)
    except DownloadError as error:
        raise DownloadError(f"{error} {hint}") from error
    except HTTPError as error:
        raise DownloadError(f"Cannot download {url}: HTTP {error.code} {error.reason}. {hint}") from error
    except (URLError, OSError, http.client.HTTPException) as error:
        raise DownloadError(f"Cannot download {url}: {error!r}. {hint}") from error
    return target
