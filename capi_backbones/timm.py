"""CAPI backbones in timm: ``import capi_backbones.timm`` registers ``capi_vits14``, ``capi_vitb14`` and
``capi_vitl14`` (tags ``.lvd``, ``.p205``, ``.in22k``, ``.in1k``) with ``timm.create_model``.

Paper: "Cluster and Predict Latent Patches for Improved Masked Image Modeling", Darcet et al., 2025
(https://arxiv.org/abs/2502.08769). ``CapiTimmModel`` wraps a ``CapiModel`` (``model.model``) and adds timm's
interface around it without changing the native model's methods, so code written for ``CapiModel`` takes
``model.model`` and the numbers are the native model's:

- ``forward_features(x)`` -> (B, R + h*w, D) ``enc_norm``-ed tokens, the 16 registers first (timm's "prefix
  tokens", ``num_prefix_tokens = 16``).
- ``forward_head(x, pre_logits=False, grid_size=None)`` pools the tokens with ``global_pool``: ``"pred"``
  (default, the official predictor pooling = ``model(x)[0]`` of the native model), ``"avg"`` (mean of the patch
  tokens), ``"pred_avg"`` (both, concatenated, as DINOv2's linear heads do with the class token) or ``""`` (no
  pooling), then applies ``head`` (``Identity`` when ``num_classes=0``, the default).
  Predictor pooling needs the patch grid: it is inferred for square grids, else pass ``grid_size=(h, w)``.
- ``model(x)`` is ``forward_head(forward_features(x))`` (a tensor, as in timm), not the official 3-tuple.
- ``forward_intermediates`` / ``prune_intermediate_layers`` / ``feature_info`` as in timm's ViT, so
  ``features_only=True`` works; ``num_features``, ``head_hidden_size``, ``reset_classifier``, ``get_classifier``.
- Fine-tuning: ``group_matcher`` (one layer-decay group per encoder block; the predictor sits with the head),
  ``no_weight_decay`` (the pretraining recipe's exclusions), ``set_grad_checkpointing``.
- ``img_size=224`` or ``(h, w)`` is accepted and sets the default data config's input size only: RoPE needs no
  resizing, so one model runs at any multiple of 14.

State-dict keys are the native ones under ``model.`` (plus ``head.*``). Official checkpoints (``backbone.*``) and
native state dicts go through ``checkpoint_filter_fn`` before a strict load. Pretrained weights load only through
the strict CAPI loader: released URLs are fetched by ``capi_backbones.pretrained`` (fails fast offline) and loaded by
``load_pretrained``; a local file given as ``pretrained_cfg_overlay=dict(file=...)`` goes through
``checkpoint_filter_fn`` and a strict ``load_state_dict``.
"""

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence

import torch
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    is_model,
    register_model,
    resolve_pretrained_cfg,
)
from torch import Tensor, nn

from capi_backbones.models import ARCHITECTURES, CapiConfig, CapiModel
from capi_backbones.pretrained import (
    WEIGHTS,
    CheckpointError,
    PretrainedWeights,
    compare_state_dict,
    download_url,
    loading_interface,
    read_checkpoint,
)
from capi_backbones.pretrained import checkpoint_filter_fn as capi_checkpoint_filter

__all__ = ["CapiTimmModel", "GLOBAL_POOL_TYPES", "checkpoint_filter_fn", "default_cfgs", "register_timm_models"]

logger = logging.getLogger(__name__)

GLOBAL_POOL_TYPES = ("pred", "avg", "pred_avg", "")
CROP_PCT = 0.875  # timm's standard evaluation crop: resize the shorter side to 224 / 0.875 = 256, centre crop 224
MODEL_PREFIX = "model."  # state-dict keys of the wrapped CapiModel


class CapiTimmModel(nn.Module):
    """A ``CapiModel`` (``self.model``) with timm's model interface (see the module docstring)."""

    def __init__(
        self,
        config: CapiConfig | None = None,
        *,
        num_classes: int = 0,
        global_pool: str = "pred",
        drop_rate: float = 0.0,
        img_size: int | Sequence[int] | None = None,
        device=None,
        dtype=None,
        **config_overrides,
    ) -> None:
        super().__init__()
        config = config or CapiConfig()
        if config_overrides:
            config = dataclasses.replace(config, **config_overrides)  # e.g. in_chans, drop_path_rate from timm
        self.img_size = _check_img_size(img_size, config.patch_size)
        self.model = CapiModel(config, device=device, dtype=dtype)
        self.num_classes = num_classes
        self.global_pool = _check_pool(global_pool)
        self.num_features = config.embed_dim
        self.num_prefix_tokens = config.n_registers
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = self._make_head(num_classes, device=device, dtype=dtype)
        self.feature_info = [
            dict(module=f"model.encoder.blocks.{i}", num_chs=config.embed_dim, reduction=config.patch_size)
            for i in range(config.depth)
        ]
        self.register_load_state_dict_pre_hook(_native_keys_under_model)

    @property
    def config(self) -> CapiConfig:
        return self.model.config

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    # ---- head -------------------------------------------------------------------------------------------------
    @property
    def head_hidden_size(self) -> int:
        widths = {"pred": self.config.pred_embed_dim, "pred_avg": self.config.pred_embed_dim + self.config.embed_dim}
        return widths.get(self.global_pool, self.config.embed_dim)

    def _make_head(self, num_classes: int, *, device=None, dtype=None) -> nn.Module:
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {num_classes}.")
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.head_hidden_size, num_classes, device=device, dtype=dtype)
        if head.weight.device.type != "meta":
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        return head

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        reference = self.model.mask_token
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, device=reference.device, dtype=reference.dtype)

    # ---- fine-tuning --------------------------------------------------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer decay: the stem (patch embedding, registers), one group per encoder
        block; the rest (the predictor, which is the pooling path, and its mask token) stays with the head."""
        return dict(stem=r"^model\.(?:patch_embed|registers)", blocks=r"^model\.encoder\.blocks\.(\d+)")

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that the pretraining recipe never decays (``train.param_groups``: biases)."""
        from capi_backbones.train.param_groups import param_multipliers  # the recipe's rules, in one place

        owners = {id(p): m for m in self.modules() for p in m.parameters(recurse=False)}
        return {name for name, p in self.named_parameters() if param_multipliers(name, owners[id(p)])[1] == 0.0}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in the backward pass (``CapiModel.set_grad_checkpointing``)."""
        self.model.set_grad_checkpointing(enable)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> Tensor:
        """(B, R + h*w, D) ``enc_norm``-ed tokens: registers, then patches in row-major order."""
        tokens, _, _ = self.model.encode(x)
        return tokens

    def _grid_of(self, tokens: Tensor, grid_size: tuple[int, int] | None) -> tuple[int, int]:
        n_patches = tokens.shape[1] - self.num_prefix_tokens
        if grid_size is not None:
            h, w = grid_size
            if h * w != n_patches:
                raise ValueError(f"grid_size {tuple(grid_size)} has {h * w} patches but the tokens hold {n_patches}.")
            return h, w
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(
                f"Cannot infer the patch grid of {n_patches} patch tokens (not a square). "
                "Pass grid_size=(h, w) to forward_head, or call the model on the image."
            )
        return side, side

    def pool(self, tokens: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """Pool (B, R + h*w, D) tokens with ``global_pool``."""
        if not self.global_pool:
            return tokens
        pooled = []
        if self.global_pool in ("pred", "pred_avg"):
            coords, all_coords = self.model.token_coordinates(*self._grid_of(tokens, grid_size), reference=tokens)
            pooled.append(self.model.pool(tokens, coords, all_coords))  # (B, D_pred)
        if self.global_pool in ("avg", "pred_avg"):
            pooled.append(tokens[:, self.num_prefix_tokens :].mean(dim=1))  # (B, D)
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)

    def forward_head(self, x: Tensor, pre_logits: bool = False, grid_size: tuple[int, int] | None = None) -> Tensor:
        x = self.head_drop(self.pool(x, grid_size))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        grid = self.model.grid_size(x.shape[-2], x.shape[-1])
        return self.forward_head(self.forward_features(x), grid_size=grid)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's intermediate outputs of encoder blocks (``CapiModel.intermediates``).

        indices: the last n blocks (int), 0-based block indices (negative from the end), or None for all.
        norm: apply ``enc_norm`` to the intermediates. output_fmt: "NCHW" (B, D, h, w) or "NLC" (B, h*w, D).
        Returns the intermediates, or ``(final enc_norm-ed tokens (B, R + h*w, D), intermediates)``; the final
        tokens come from the last block, or from the last one asked for with ``stop_early``. With
        ``return_prefix_tokens`` each intermediate is a ``(patches, registers (B, R, D))`` pair.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        tokens, intermediates = self.model.intermediates(
            x,
            self.model.block_indices(indices),
            norm=norm,
            reshape=output_fmt == "NCHW",
            return_registers=return_prefix_tokens,
            stop_early=stop_early or intermediates_only,
        )
        if intermediates_only:
            return intermediates
        return self.model.enc_norm(tokens), intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the encoder blocks after the last wanted one (and ``enc_norm`` / the pooling head if asked)."""
        take = self.model.block_indices(indices)
        self.model.encoder.blocks = self.model.encoder.blocks[: max(take) + 1]
        if prune_norm:
            self.model.enc_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    # ---- pretrained -------------------------------------------------------------------------------------------
    def load_pretrained(self, checkpoint_path: str | os.PathLike) -> None:
        """Strictly load a CAPI checkpoint (official ``backbone.``-prefixed .pth, or our .pth / .safetensors).

        Called by timm for pretrained configs with ``custom_load``. A classifier head, if any, keeps its init.
        Raises ``CheckpointError`` listing missing, unexpected and mismatched keys."""
        try:
            state = checkpoint_filter_fn(read_checkpoint(checkpoint_path).tensors, self)
        except CheckpointError as error:
            raise CheckpointError(
                f"{checkpoint_path}: {error}",
                missing=error.missing,
                unexpected=error.unexpected,
                mismatched=error.mismatched,
            ) from None
        self.load_state_dict(state, strict=True)


def _native_keys_under_model(module: CapiTimmModel, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` hook: a native ``CapiModel`` state dict (the official key names, e.g.
    ``encoder.blocks.0...``, ``registers``) loads into the wrapped model, so its keys move under ``model.``;
    ``head.*`` and keys already under ``model.`` stay. The load stays strict."""
    native = module.model
    roots = {name for name, _ in native.named_children()} | {name for name, _ in native.named_parameters(recurse=False)}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix) :].split(".", 1)[0] in roots:
            state_dict[prefix + MODEL_PREFIX + key[len(prefix) :]] = state_dict.pop(key)


def _check_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOL_TYPES:
        raise ValueError(f"Unknown global_pool {global_pool!r}. Allowed: {GLOBAL_POOL_TYPES} ('' = no pooling).")
    return global_pool


def _check_img_size(img_size: int | Sequence[int] | None, patch_size: int) -> tuple[int, int] | None:
    """(h, w) of ``img_size`` (an int is square), checked to tile into patches; None stays None."""
    if img_size is None:
        return None
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or any(not isinstance(s, int) or s < patch_size or s % patch_size for s in size):
        raise ValueError(
            f"img_size must be an int or (height, width) of positive multiples of the patch size {patch_size}, got "
            f"{img_size!r}. It only sets the default data config: the model runs at any multiple of {patch_size}."
        )
    return size


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: CapiTimmModel) -> dict[str, Tensor]:
    """CAPI checkpoint -> this model's keys, checked for a strict load.

    A state dict of a ``CapiTimmModel`` (``model.*`` keys, e.g. a fine-tuned one) is taken as it is, head included.
    Anything else (official ``backbone.*`` files, native ``CapiModel`` state dicts) goes through the CAPI filter,
    is checked against the native model and moved under ``model.``; the model's own classifier tensors are added
    (a new head keeps its init). Raises ``CheckpointError`` listing missing, unexpected and mismatched keys."""
    c = model.config
    hint = f"The model has embed_dim {c.embed_dim} and depth {c.depth}."
    if any(key.startswith(MODEL_PREFIX) for key in state_dict):
        state = dict(state_dict)
        diff = compare_state_dict(state, model)
    else:
        backbone = capi_checkpoint_filter(state_dict, model.model)
        diff = compare_state_dict(backbone, model.model)  # errors name the official keys
        state = {MODEL_PREFIX + key: value for key, value in backbone.items()}
        state.update(model.head.state_dict(prefix="head."))
    if not diff.ok:
        raise diff.error("loaded by timm", hint=hint)
    return state


# ---- pretrained configs ---------------------------------------------------------------------------------------
def _cfg(weights: PretrainedWeights | None = None) -> dict:
    cfg = dict(
        input_size=(3, 224, 224),
        interpolation="bicubic",
        crop_pct=CROP_PCT,
        crop_mode="center",
        num_classes=0,
        first_conv="patch_embed",
        classifier=None,  # no released classifier: a new head never turns the load non-strict
        license="apache-2.0",
        paper_name="Cluster and Predict Latent Patches for Improved Masked Image Modeling",
        paper_ids="arXiv:2502.08769",
        origin_url="https://github.com/facebookresearch/capi",
    )
    if weights is not None:
        cfg.update(
            url=weights.url,
            custom_load=True,  # timm calls CapiTimmModel.load_pretrained (strict) instead of its generic loader
            input_size=weights.input_size,
            interpolation=weights.interpolation,
            mean=weights.mean,
            std=weights.std,
            license=weights.license.lower(),
            description=f"CAPI {weights.arch} pretrained on {weights.pretraining_data} "
            f"(paper: k-NN ADE20K {weights.knn_ade20k_miou} mIoU, attentive IN1k {weights.attentive_in1k_top1}%).",
        )
    return cfg


def _all_cfgs() -> dict[str, dict]:
    cfgs = {}
    for arch in ARCHITECTURES:
        tagged = sorted((w for w in WEIGHTS.values() if w.arch == arch), key=lambda w: w.tag != "lvd")  # lvd first
        for weights in tagged:
            cfgs[weights.full_name] = _cfg(weights)
        if not tagged:
            cfgs[arch] = _cfg()
    return cfgs


default_cfgs = generate_default_cfgs(_all_cfgs())


# ---- builder and entry points ---------------------------------------------------------------------------------
def _fetch_released_weights(variant: str, pretrained_cfg, pretrained_cfg_overlay, cache_dir=None) -> dict | None:
    """For a URL-sourced config, download the file with the fast-failing CAPI downloader and point the config at
    the local copy, so timm never opens the network itself. Returns the resolved config dict, or None to let
    timm resolve (a file, a state dict or a hub id was given)."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if cfg.file or cfg.state_dict or cfg.hf_hub_id or not cfg.url:
        return None
    with loading_interface("timm"):  # offline hints name pretrained_cfg_overlay=dict(file=PATH)
        path = download_url(cfg.url, cache_dir=cache_dir)  # default: the torch hub checkpoints folder
    return dataclasses.asdict(dataclasses.replace(cfg, file=str(path), custom_load=True))


def _create(variant: str, pretrained: bool = False, **kwargs) -> CapiTimmModel:
    config = ARCHITECTURES[variant]
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    if pretrained:
        resolved = _fetch_released_weights(variant, pretrained_cfg, overlay, kwargs.get("cache_dir"))
        if resolved is not None:
            pretrained_cfg, overlay = resolved, None
    img_size = _check_img_size(kwargs.get("img_size"), config.patch_size)
    if img_size is not None:  # the only effect of img_size: the default data config's input size
        input_size = dict(input_size=(kwargs.get("in_chans", config.in_chans), *img_size))
        if isinstance(pretrained_cfg, dict):
            pretrained_cfg = {**pretrained_cfg, **input_size}
        else:
            overlay = {**(overlay or {}), **input_size}
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        CapiTimmModel,
        variant,
        pretrained,
        pretrained_cfg=pretrained_cfg,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        config=config,
        **kwargs,
    )


def capi_vits14(pretrained: bool = False, **kwargs) -> CapiTimmModel:
    """CAPI ViT-S/14 (no released weights)."""
    return _create("capi_vits14", pretrained=pretrained, **kwargs)


def capi_vitb14(pretrained: bool = False, **kwargs) -> CapiTimmModel:
    """CAPI ViT-B/14 (no released weights)."""
    return _create("capi_vitb14", pretrained=pretrained, **kwargs)


def capi_vitl14(pretrained: bool = False, **kwargs) -> CapiTimmModel:
    """CAPI ViT-L/14; tags: lvd (default), p205, in22k, in1k."""
    return _create("capi_vitl14", pretrained=pretrained, **kwargs)


ENTRY_POINTS = (capi_vits14, capi_vitb14, capi_vitl14)


def register_timm_models() -> None:
    """Register the entry points with timm once (a name timm already knows is left alone, without a warning)."""
    for entry_point in ENTRY_POINTS:
        if is_model(entry_point.__name__):
            logger.debug("timm already has a model named %s; not registering it again", entry_point.__name__)
            continue
        register_model(entry_point)


register_timm_models()
