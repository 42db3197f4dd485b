"""Where weights come from: the registry of released weights, URLs, Hugging Face Hub repos and local paths.

``resolve_source(source)`` is the one place that decides what a source names (registered weights, architecture,
URL, ``hf-hub:owner/repo[@revision]``, local path); ``fetch`` turns the answer into a local file or folder
(downloading URLs and registered weights into the torch hub cache, Hub repos into the Hugging Face cache).
The registry is data (``capi_backbones.weights_registry``): the four official ViT-L/14 checkpoints
(Apache-2.0), with the paper's k-NN ADE20K mIoU and attentive-probe ImageNet-1k top-1. Names follow the
official torch.hub entry points; ``full_name`` reads ``arch.tag`` as in timm. huggingface_hub is imported only
when a Hub repo is fetched.
"""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from capi_backbones.models import ARCHITECTURES
from capi_backbones.pretrained.download import check_reachable, download_url
from capi_backbones.pretrained.errors import DownloadError, local_copy_hint
from capi_backbones.pretrained.files import HUB_CONFIG_FILE, HUB_WEIGHTS_FILE
from capi_backbones.pretrained.options import LoadOptions
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
    "ResolvedSource",
    "WEIGHTS",
    "WEIGHT_ALIASES",
    "download_hub_files",
    "fetch",
    "fetch_checkpoint",
    "get_weights",
    "is_registered",
    "parse_hub_source",
    "resolve_source",
    "weights_names",
]

logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def _looks_like_path(source: str) -> bool:
    return os.sep in source or "/" in source or source.endswith(_FILE_SUFFIXES) or source.startswith(".")


@dataclass(frozen=True)
class ResolvedSource:
    """What a model source names, decided once by ``resolve_source``.

    kind: ``"weights"`` (a registered name; ``weights`` set), ``"architecture"`` (an architecture without released
    weights: nothing to load), ``"url"``, ``"hf-hub"`` (``location`` is the repo id) or ``"path"`` (a local
    file or folder)."""

    kind: str
    location: str  # registered name, architecture name, URL, repo id or local path
    weights: PretrainedWeights | None = None
    revision: str | None = None  # hf-hub only

    @property
    def arch(self) -> str | None:
        """The architecture the source names, when it names one (registered weights, an architecture)."""
        if self.weights is not None:
            return self.weights.arch
        return self.location if self.kind == "architecture" else None


def resolve_source(source: str | os.PathLike) -> ResolvedSource:
    """Decide what ``source`` names, in this order: ``hf-hub:owner/repo[@revision]``, an ``http(s)://`` URL, a
    registered weights name (``capi_vitl14`` = LVD, ``arch.tag`` as in timm), an architecture name, a local path.
    A ``Path`` (any ``os.PathLike``) is always a local path. Fetches nothing; raises ``FileNotFoundError`` for a
    path that does not exist and ``ValueError`` for a name that is nothing of these."""
    if isinstance(source, os.PathLike):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Checkpoint {path} does not exist. Check the path.")
        return ResolvedSource("path", str(path))
    if not isinstance(source, str):
        raise TypeError(f"A model source is a name, a path, a URL or 'hf-hub:owner/repo', got {type(source).__name__}.")
    if source.startswith(HF_HUB_PREFIX):
        repo_id, revision = parse_hub_source(source)
        return ResolvedSource("hf-hub", repo_id, revision=revision)
    if source.startswith(("http://", "https://")):
        return ResolvedSource("url", source)
    if is_registered(source):
        weights = get_weights(source)
        return ResolvedSource("weights", weights.name, weights=weights)
    if source in ARCHITECTURES:
        return ResolvedSource("architecture", source)
    path = Path(source).expanduser()
    if path.exists():
        return ResolvedSource("path", str(path))
    if _looks_like_path(source):
        raise FileNotFoundError(
            f"Checkpoint {path} does not exist. Check the path, or pass a registered name "
            f"({', '.join(sorted(WEIGHTS))}), a URL or 'hf-hub:owner/repo'."
        )
    raise ValueError(
        f"Unknown model or weights {source!r}. Available weights: {', '.join(weights_names())}. "
        f"Architectures without weights: {', '.join(_architectures_without_weights())} (use create_model). "
        "Or pass a local .pth/.safetensors file or folder, an http(s) URL, or 'hf-hub:owner/repo'."
    )


def _architectures_without_weights() -> list[str]:
    return sorted(set(ARCHITECTURES) - {w.arch for w in WEIGHTS.values()})


def fetch(resolved: ResolvedSource, options: "LoadOptions | None" = None) -> Path:
    """The local file or folder of a resolved source, downloading URLs and registered weights (into the torch hub
    cache unless ``options.cache_dir``) and ``hf-hub:`` repos (into the Hugging Face cache)."""
    options = options or LoadOptions()
    download = {"cache_dir": options.cache_dir, "deadline_s": options.download_timeout}
    if resolved.kind == "url":
        return download_url(resolved.location, **download)
    if resolved.kind == "weights":
        weights = resolved.weights
        return download_url(weights.url, file_name=weights.file_name, sha256=weights.sha256, **download)
    if resolved.kind == "hf-hub":
        return download_hub_files(
            resolved.location,
            options.revision or resolved.revision,
            cache_dir=options.cache_dir,
            force_download=options.force_download,
            token=options.token,
            local_files_only=options.local_files_only,
        )
    if resolved.kind == "path":
        return Path(resolved.location)
    raise ValueError(
        f"{resolved.location!r} is an architecture without released weights (only {', '.join(sorted(WEIGHTS))} "
        f"have them): nothing to load. Use create_model({resolved.location!r}) for a randomly initialised model, "
        f'or load your own checkpoint with from_pretrained("/path/to/checkpoint.pth", arch={resolved.location!r}).'
    )


def fetch_checkpoint(source: str | os.PathLike) -> tuple[Path, PretrainedWeights | None]:
    """Local path of a checkpoint source (``fetch(resolve_source(source))``) and the registered weights it came
    from, if any."""
    resolved = resolve_source(source)
    return fetch(resolved), resolved.weights


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
