"""Where weights come from: the registry of released weights, URLs, Hugging Face Hub repos and local paths.

``fetch_checkpoint(source)`` turns a registered name, URL or path into a local path (downloading into the torch
hub cache); ``download_hub_files`` does the same for ``hf-hub:owner/repo[@revision]``. The registry is data: the
four official ViT-L/14 checkpoints (Apache-2.0), with the paper's k-NN ADE20K mIoU and attentive-probe
ImageNet-1k top-1. Names follow the official torch.hub entry points; ``full_name`` reads ``arch.tag`` as in timm.
huggingface_hub is imported only when a Hub repo is fetched.
"""

import logging
import os
from pathlib import Path

from capi_backbones.models import ARCHITECTURES
from capi_backbones.pretrained.download import check_reachable, download_url
from capi_backbones.pretrained.errors import DownloadError, local_copy_hint
from capi_backbones.pretrained.files import HUB_CONFIG_FILE, HUB_WEIGHTS_FILE
from capi_backbones.weights_registry import (  # re-exported: the registry is data, kept torch-free for `list`
    WEIGHT_ALIASES,
    WEIGHTS,
    PretrainedWeights,
    get_weights,
    is_registered,
    weights_names,
)

__all__ = [
    "HF_HUB_PREFIX",
    "PretrainedWeights",
    "WEIGHTS",
    "WEIGHT_ALIASES",
    "download_hub_files",
    "fetch_checkpoint",
    "get_weights",
    "is_registered",
    "parse_hub_source",
    "weights_names",
]

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def _looks_like_path(source: str) -> bool:
    return os.sep in source or "/" in source or source.endswith(_FILE_SUFFIXES) or source.startswith(".")


def fetch_checkpoint(source: str | os.PathLike) -> tuple[Path, PretrainedWeights | None]:
    """Local path of a checkpoint source (downloading URLs and registered weights into the torch hub cache),
    and the registered weights it came from, if any. ``hf-hub:`` sources are handled by ``from_pretrained``."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        return download_url(text), None
    if not isinstance(source, os.PathLike) and is_registered(text):
        weights = get_weights(text)
        return download_url(weights.url, file_name=weights.file_name, sha256=weights.sha256), weights
    path = Path(text).expanduser()
    if path.exists():
        return path, None
    if isinstance(source, os.PathLike) or _looks_like_path(text):
        raise FileNotFoundError(
            f"Checkpoint {path} does not exist. Check the path, or pass a registered name "
            f"({', '.join(sorted(WEIGHTS))}), a URL or 'hf-hub:owner/repo'."
        )
    without_weights = sorted(set(ARCHITECTURES) - {w.arch for w in WEIGHTS.values()})
    raise ValueError(
        f"Unknown model or weights {text!r}. Available weights: {', '.join(weights_names())}. "
        f"Architectures without weights: {', '.join(without_weights)} (use create_model). "
        "Or pass a local .pth/.safetensors file or folder, an http(s) URL, or 'hf-hub:owner/repo'."
    )


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
        f"and pass the folder: {local_copy_hint('DIR')}."
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
