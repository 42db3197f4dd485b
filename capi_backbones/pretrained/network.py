"""Fetch checkpoints: http(s) URLs into the torch hub cache, and Hugging Face Hub repos.

Both fail within seconds without a network: the host (or proxy) is resolved and connected to with a short
timeout before any library call that would retry for tens of seconds.
"""

import http.client
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, getproxies, proxy_bypass, urlopen

import torch
from tqdm import tqdm

from capi_backbones.atomic_files import atomic_path
from capi_backbones.pretrained.errors import DownloadError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "HF_HUB_PREFIX",
    "HUB_CONFIG_FILE",
    "HUB_WEIGHTS_FILE",
    "check_reachable",
    "checkpoint_cache_dir",
    "download_hub_files",
    "download_url",
    "parse_hub_source",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # DNS + TCP connect
READ_TIMEOUT_S = 60.0  # per socket read once connected
HF_HUB_PREFIX = "hf-hub:"
HUB_WEIGHTS_FILE = "model.safetensors"  # what save_pretrained writes
HUB_CONFIG_FILE = "config.json"


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


def download_url(
    url: str, *, file_name: str | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Download ``url`` into the cache (default: torch hub checkpoints) once; return the cached path.

    The body goes to a temporary file that is renamed only when complete, so a failed download leaves nothing.
    """
    file_name = file_name or os.path.basename(urlsplit(url).path) or "checkpoint.pth"
    target = Path(cache_dir) if cache_dir is not None else checkpoint_cache_dir()
    target = target / file_name
    if target.is_file():
        logger.info("Using cached %s", target)
        return target
    hint = (
        f'To use a local copy instead, download it elsewhere and pass its path: from_pretrained("/path/to/{file_name}")'
        f" (or place it at {target})."
    )
    try:
        check_reachable(url)
    except OSError as error:
        raise DownloadError(f"Cannot download {url}: {error}. No network? {hint}") from error
    logger.info("Downloading %s to %s", url, target)
    try:
        request = Request(url, headers={"User-Agent": "capi-backbones"})
        with urlopen(request, timeout=READ_TIMEOUT_S) as response, atomic_path(target) as tmp:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            written = 0
            with (
                open(tmp, "wb") as out,
                tqdm(total=expected, unit="B", unit_scale=True, desc=file_name, disable=not progress or None) as bar,
            ):
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and written != expected:
                raise DownloadError(f"Download of {url} stopped after {written} of {expected} bytes. {hint}")
    except DownloadError:
        raise
    except HTTPError as error:
        raise DownloadError(f"Cannot download {url}: HTTP {error.code} {error.reason}. {hint}") from error
    except (URLError, OSError, http.client.HTTPException) as error:
        raise DownloadError(f"Cannot download {url}: {error!r}. {hint}") from error
    return target


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """``"hf-hub:owner/repo[@revision]"`` -> ``(repo_id, revision or None)``."""
    spec = source[len(HF_HUB_PREFIX) :] if source.startswith(HF_HUB_PREFIX) else source
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"Invalid Hugging Face Hub source {source!r}: expected 'hf-hub:owner/repo[@revision]'.")
    return repo_id, revision or None


def _hub_hint(repo_id: str) -> str:
    return (
        f"To load it offline, download the repo where the Hub is reachable (hf download {repo_id} --local-dir DIR) "
        'and pass the folder: from_pretrained("DIR").'
    )


def download_hub_files(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """Fetch ``model.safetensors`` (and ``config.json`` when the repo has one); return their local folder.

    Uses the Hugging Face cache first. Offline (``HF_HUB_OFFLINE=1`` or unreachable Hub) it fails in seconds with
    a message naming the repo and the local-folder alternative.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    where = f"{repo_id}@{revision}" if revision else repo_id

    def fetch(filename: str, local_only: bool) -> Path | None:
        try:
            return Path(
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download and not local_only,
                    token=token,
                    local_files_only=local_only,
                )
            )
        except HFValidationError as error:
            raise ValueError(f"Invalid Hugging Face Hub repo id {repo_id!r}: {error}") from error
        except LocalEntryNotFoundError:
            if local_only:
                return None
            raise
        except EntryNotFoundError:
            if filename == HUB_CONFIG_FILE:
                return None  # optional: the architecture is then read off the tensor shapes
            raise

    offline = local_files_only or constants.HF_HUB_OFFLINE
    weights = None if force_download else fetch(HUB_WEIGHTS_FILE, local_only=True)
    if weights is not None:
        fetch(HUB_CONFIG_FILE, local_only=True)
        return weights.parent
    if offline:
        raise DownloadError(
            f"Hugging Face Hub repo {where} is not in the local cache and downloads are off "
            f"({'HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'local_files_only=True'}). "
            + _hub_hint(repo_id)
        )
    try:
        check_reachable(constants.ENDPOINT)
    except OSError as error:
        raise DownloadError(f"Cannot reach the Hugging Face Hub for {where}: {error}. {_hub_hint(repo_id)}") from error
    try:
        weights = fetch(HUB_WEIGHTS_FILE, local_only=False)
        fetch(HUB_CONFIG_FILE, local_only=False)
    except (ValueError, DownloadError):
        raise
    except Exception as error:  # repo/revision not found, HTTP errors, connection drops
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DownloadError(f"Cannot fetch {HUB_WEIGHTS_FILE} from {where}: {reason}. {_hub_hint(repo_id)}") from error
    return weights.parent
