"""``CapiHubModel``: a ``CapiModel`` with Hugging Face Hub ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

Design: ``capi_backbones.models.CapiModel`` stays a plain ``nn.Module`` that knows nothing of files or the Hub
(models must not import pretrained). This subclass mixes in ``PyTorchModelHubMixin`` and is what
``capi_backbones.create_model`` and ``capi_backbones.from_pretrained`` return, so every loaded model is still an
instance of ``CapiModel`` and can also be saved or pushed. The mixin's defaults are replaced: loading is strict,
the model is built on the meta device (no random init) and the weights are assigned, not copied. A folder holds
``model.safetensors`` (with the config also in its metadata) and ``config.json`` (``CapiConfig.to_dict()``).
"""

import json
import os
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin

from capi_backbones.atomic_files import atomic_path
from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.pretrained.checkpoint_io import save_safetensors
from capi_backbones.pretrained.local_loading import load_local
from capi_backbones.pretrained.network import HUB_CONFIG_FILE, HUB_WEIGHTS_FILE, download_hub_files, parse_hub_source
from capi_backbones.pretrained.weights import PretrainedWeights

__all__ = ["CapiHubModel"]


class CapiHubModel(
    CapiModel,
    PyTorchModelHubMixin,
    library_name="capi-backbones",
    license="apache-2.0",
    repo_url="https://github.com/facebookresearch/capi",
    paper_url="https://arxiv.org/abs/2502.08769",
    pipeline_tag="image-feature-extraction",
    tags=["capi", "vision", "self-supervised-learning"],
):
    """CAPI backbone with ``save_pretrained(dir)``, ``CapiHubModel.from_pretrained(dir or "owner/repo")`` and
    ``push_to_hub("owner/repo")``. Behaves exactly like ``CapiModel`` otherwise."""

    pretrained_weights: PretrainedWeights | None = None  # set when loaded from registered weights

    def _save_pretrained(self, save_directory: Path) -> None:
        save_safetensors(self, Path(save_directory) / HUB_WEIGHTS_FILE)
        with atomic_path(Path(save_directory) / HUB_CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs,
    ) -> "CapiHubModel":
        """Load a ``save_pretrained`` folder or a Hub repo ("owner/repo", "hf-hub:owner/repo@rev").

        Keyword arguments: ``arch`` (name or CapiConfig; default: the saved config), ``device`` ("cpu"),
        ``dtype`` (float32), ``strict`` (True). Offline, fails fast naming the repo and the local alternative.
        """
        source = str(pretrained_model_name_or_path)
        if not os.path.isdir(source):
            if os.path.exists(source) or source.endswith((".pth", ".pt", ".safetensors")):
                raise ValueError(f"{source} is not a folder; load single files with capi_backbones.from_pretrained.")
            repo_id, parsed_revision = parse_hub_source(source)
            folder = download_hub_files(
                repo_id,
                revision or parsed_revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
            source = str(folder)
        return super().from_pretrained(source, local_files_only=True, **model_kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | os.PathLike | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: CapiConfig | dict | None = None,
        arch: str | CapiConfig | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        strict: bool = True,
        map_location: torch.device | str | None = None,
    ) -> "CapiHubModel":
        """Strict, meta-device load of a local folder (``from_pretrained`` has already fetched Hub repos).

        ``map_location`` (the mixin's name) is accepted as an alias of ``device``."""
        del revision, cache_dir, force_download, local_files_only, token, config  # config.json is re-read strictly
        if map_location is not None:
            device = map_location
        return load_local(model_id, model_cls=cls, arch=arch, device=device, dtype=dtype, strict=strict)
