"""``CapiHubModel``: a ``CapiModel`` with ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``.

Design: ``capi_backbones.models.CapiModel`` stays a plain ``nn.Module`` that knows nothing of files or the Hub
(models must not import pretrained). This subclass adds the Hugging Face Hub methods users know from
``PyTorchModelHubMixin`` (same names, same folder layout) without inheriting the mixin: importing it needs no
huggingface_hub, and nothing depends on the mixin's private signatures, which change between huggingface_hub
releases. It is what ``create_model`` and ``from_pretrained`` return, so every loaded model is still a
``CapiModel``. Loading is strict: built on the meta device (no random init), weights assigned, not copied. A
folder holds ``model.safetensors`` (with the config also in its metadata), ``config.json``
(``CapiConfig.to_dict()``) and a ``README.md`` model card. huggingface_hub is imported only by ``push_to_hub``
and by loading a Hub repo.
"""

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.pretrained.files import save_pretrained_folder
from capi_backbones.pretrained.local import load
from capi_backbones.pretrained.options import LoadOptions
from capi_backbones.pretrained.sources import PretrainedWeights, ResolvedSource, parse_hub_source

__all__ = ["CapiHubModel"]


class CapiHubModel(CapiModel):
    """CAPI backbone with ``save_pretrained(dir)``, ``CapiHubModel.from_pretrained(dir or "owner/repo")`` and
    ``push_to_hub("owner/repo")``. Behaves exactly like ``CapiModel`` otherwise."""

    pretrained_weights: PretrainedWeights | None = None  # set when loaded from registered weights

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write ``model.safetensors``, ``config.json`` and a model card into ``save_directory``; with
        ``push_to_hub=True`` also upload them to ``repo_id`` (default: the folder's name)."""
        save_pretrained_folder(self, save_directory, repo_id=repo_id)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, **push_to_hub_kwargs)
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Push model using capi-backbones",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
    ) -> str:
        """Create ``repo_id`` if needed and upload the ``save_pretrained`` files; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained_folder(self, tmp, repo_id=repo_id)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
            )

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
        arch: str | CapiConfig | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        strict: bool = True,
        allow_non_finite: bool = False,
        map_location: torch.device | str | None = None,
    ) -> "CapiHubModel":
        """Load a ``save_pretrained`` folder or a Hub repo ("owner/repo", "hf-hub:owner/repo@rev"), strictly.

        ``arch`` (name or CapiConfig; default: the saved config), ``device`` ("cpu"; ``map_location`` is an alias),
        ``dtype`` (float32), ``strict`` (True). Offline, fails fast naming the repo and the local alternative.
        """
        source = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(source):
            resolved = ResolvedSource("path", source)
        elif os.path.exists(source) or source.endswith((".pth", ".pt", ".safetensors")):
            raise ValueError(f"{source} is not a folder; load single files with capi_backbones.from_pretrained.")
        else:
            repo_id, parsed_revision = parse_hub_source(source)
            resolved = ResolvedSource("hf-hub", repo_id, revision=parsed_revision)
        options = LoadOptions(
            arch=arch,
            device=device if map_location is None else map_location,
            dtype=dtype,
            strict=strict,
            allow_non_finite=allow_non_finite,
            cache_dir=cache_dir,
            revision=revision,
            token=token,
            force_download=force_download,
            local_files_only=local_files_only,
        )
        return load(resolved, options, model_cls=cls)
