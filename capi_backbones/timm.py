"""CAPI backbones in timm: ``import capi_backbones.timm`` registers ``capi_vits14``, ``capi_vitb14`` and
``capi_vitl14`` (tags ``.lvd``, ``.p205``, ``.in22k``, ``.in1k``) with ``timm.create_model``.

Paper: "Cluster and Predict Latent Patches for Improved Masked Image Modeling", Darcet et al., 2025
(https://arxiv.org/abs/2502.08769). ``CapiTimmModel`` wraps a ``CapiModel`` (``model.model``) and adds timm's
interface around it without changing the native model's methods, so the numbers are the native model's:

- ``forward_features(x)`` -> (B, R + h*w, D) ``enc_norm``-ed tokens, the 16 registers first (timm's "prefix
  tokens", ``num_prefix_tokens = 16``).
- ``forward_head(x, pre_logits=False, grid_size=None)`` pools the tokens with ``global_pool``: ``"pred"``
  (default, the official predictor pooling = ``model(x)[0]`` of the native model), ``"avg"`` (mean of the patch
  tokens), ``"pred_avg"`` (both, concatenated, as DINOv2's linear heads do with the class token) or ``""`` (no
  pooling), then applies ``head`` (``Identity`` when ``num_classes=0``, the default).
  Predictor pooling needs the patch grid: it is inferred for square grids, else pass ``grid_size=(h, w)``.
- ``model(x)`` is ``forward_head(forward_features(x))`` (a tensor, as in timm), not the official 3-tuple.
- Only what the pooling uses is in the model: predictor block 1 and the mask token with ``"pred"`` / ``"pred_avg"``,
  no predictor at all with ``"avg"`` / ``""``, so every parameter gets a gradient (plain DDP works). Checkpoints
  holding the whole predictor load: the unused tensors are dropped with one log line.
- ``forward_intermediates`` / ``prune_intermediate_layers`` / ``feature_info`` as in timm's ViT, so
  ``features_only=True`` works; ``num_features``, ``head_hidden_size``, ``reset_classifier``, ``get_classifier``.
- Fine-tuning: ``group_matcher`` (one layer-decay group per encoder block; the predictor sits with the head),
  ``no_weight_decay`` (the pretraining recipe's exclusions), ``set_grad_checkpointing``.
- Input sizes: sides must be multiples of 14 (the pretrained config says ``fixed_input_size=True`` at 224, so
  timm's tooling feeds 224); ``dynamic_img_pad=True`` pads the right and bottom to the next multiple, as timm's
  ViTs do, and its config then declares any size. ``img_size=224`` or ``(h, w)`` sets the data config's input size
  only: RoPE needs no resizing.
- ``torch.jit.script`` and ``torch.fx`` (``symbolic_trace``, torchvision's feature extraction) work.

State-dict keys are the native ones under ``model.`` (plus ``head.*``). Official checkpoints (``backbone.*``), native
``CapiModel`` state dicts and timm ones load through ``model.load_state_dict``, ``timm.models.load_checkpoint``,
``create_model(..., checkpoint_path=...)`` and ``pretrained=True``: the keys are mapped, checked (missing,
unexpected, shapes, integer, NaN/Inf values: ``CheckpointError``) and the load stays strict. Pretrained files
(released URLs, fetched by ``capi_backbones.pretrained``, or ``pretrained_cfg_overlay=dict(file=...)``) are read
by the package's checked loader (``_read_checked``): the format is told by the bytes, no pickle runs.
"""

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Final

import torch
import torch.nn.functional as F
from timm.models import (
    adapt_input_conv,
    build_model_with_cfg,
    generate_default_cfgs,
    is_model,
    register_model,
    resolve_pretrained_cfg,
)
from torch import Tensor, nn

from capi_backbones.models import ARCHITECTURES, CapiConfig, CapiModel
from capi_backbones.models.capi import checked_input_grid
from capi_backbones.models.param_rules import param_multipliers
from capi_backbones.pretrained import (
    WEIGHTS,
    CheckpointError,
    LoadOptions,
    PretrainedWeights,
    compare_state_dict,
    download_url,
    load_local,
    loading_interface,
)
from capi_backbones.pretrained import checkpoint_filter_fn as capi_checkpoint_filter
from capi_backbones.pretrained.assign import (
    find_non_finite,
    find_non_floating,
    non_finite_message,
    non_floating_message,
)

__all__ = ["CapiTimmModel", "GLOBAL_POOL_TYPES", "checkpoint_filter_fn", "default_cfgs", "register_timm_models"]

logger = logging.getLogger(__name__)

GLOBAL_POOL_TYPES = ("pred", "avg", "pred_avg", "")
PREDICTOR_POOLS = ("pred", "pred_avg")  # poolings that run predictor block 1
CROP_PCT = 0.875  # timm's standard evaluation crop: resize the shorter side to 224 / 0.875 = 256, centre crop 224
MODEL_PREFIX = "model."  # state-dict keys of the wrapped CapiModel
# first key components of CAPI state dicts: timm (model.*), official (backbone.*), native
CHECKPOINT_ROOTS = frozenset({"model", "backbone", "encoder", "decoder", "mask_token", "registers", "patch_embed"})
_DECODER_BLOCK = re.compile(r"^decoder\.blocks\.(\d+)\.")


def pad_to_patch_multiple(x: Tensor, patch_size: int) -> Tensor:
    """Zero-pad the bottom and right of (B, C, H, W) images to the next multiple of ``patch_size`` (timm's ViT
    ``dynamic_img_pad``). A ``torch.fx`` leaf."""
    pad_h = (patch_size - x.shape[-2] % patch_size) % patch_size
    pad_w = (patch_size - x.shape[-1] % patch_size) % patch_size
    return F.pad(x, [0, pad_w, 0, pad_h])


torch.fx.wrap("pad_to_patch_multiple")
torch.fx.wrap("checked_input_grid")  # fx leaves are per module: the input check is one here too


class CapiTimmModel(nn.Module):
    """A ``CapiModel`` (``self.model``) with timm's model interface (see the module docstring)."""

    dynamic_img_pad: Final[bool]
    pool_pred: Final[bool]  # global_pool runs the predictor (TorchScript constants: set by reset_classifier)
    pool_avg: Final[bool]
    __jit_unused_properties__ = ["config", "patch_size", "head_hidden_size"]

    def __init__(
        self,
        config: CapiConfig | None = None,
        *,
        num_classes: int = 0,
        global_pool: str = "pred",
        drop_rate: float = 0.0,
        img_size: int | Sequence[int] | None = None,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
        **config_overrides,
    ) -> None:
        super().__init__()
        config = config or CapiConfig()
        if config_overrides:
            config = dataclasses.replace(config, **config_overrides)  # e.g. in_chans, drop_path_rate from timm
        self.img_size = _check_img_size(img_size, config.patch_size)
        self.dynamic_img_pad = bool(dynamic_img_pad)
        self.model = CapiModel(config, device=device, dtype=dtype)
        self.num_classes = num_classes
        self.num_features = config.embed_dim
        self.num_prefix_tokens = config.n_registers
        self._set_pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = self._make_head(num_classes, device=device, dtype=dtype)
        self.feature_info = [
            dict(module=f"model.encoder.blocks.{i}", num_chs=config.embed_dim, reduction=config.patch_size)
            for i in range(config.depth)
        ]
        self.register_load_state_dict_pre_hook(_accept_capi_checkpoints)

    @property
    def config(self) -> CapiConfig:
        """The architecture (the whole predictor's size included, as in the checkpoints)."""
        return self.model.config

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    # ---- head -------------------------------------------------------------------------------------------------
    @property
    def head_hidden_size(self) -> int:
        widths = {"pred": self.config.pred_embed_dim, "pred_avg": self.config.pred_embed_dim + self.config.embed_dim}
        return widths.get(self.global_pool, self.config.embed_dim)

    @property
    def predictor_blocks(self) -> int:
        """Predictor blocks held (1 for the predictor poolings, else 0; checkpoints hold ``config.pred_depth``)."""
        return len(self.model.decoder.blocks)

    def _set_pool(self, global_pool: str) -> None:
        """Set the pooling and drop the predictor parts it does not use (parameters without a gradient break DDP).
        Parts once dropped cannot come back."""
        global_pool = _check_pool(global_pool)
        native = self.model
        needs_predictor = global_pool in PREDICTOR_POOLS
        if needs_predictor and native.mask_token is None:
            raise ValueError(
                f"global_pool={global_pool!r} needs the predictor, which this model was built without (global_pool="
                f"{self.global_pool!r}). Create the model with global_pool={global_pool!r} instead."
            )
        native.decoder.blocks = native.decoder.blocks[: 1 if needs_predictor else 0]
        if not needs_predictor:
            native.mask_token = None
        self.global_pool = global_pool
        self.pool_pred = needs_predictor
        self.pool_avg = global_pool in ("avg", "pred_avg")

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
            self._set_pool(global_pool)
        reference = self.model.registers
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, device=reference.device, dtype=reference.dtype)

    # ---- fine-tuning --------------------------------------------------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer decay: the stem (patch embedding, registers), one group per encoder
        block; the rest (the predictor, which is the pooling path, and its mask token) stays with the head."""
        return dict(stem=r"^model\.(?:patch_embed|registers)", blocks=r"^model\.encoder\.blocks\.(\d+)")

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that the pretraining recipe never decays (``models.param_rules``: biases)."""
        owners = {id(p): m for m in self.modules() for p in m.parameters(recurse=False)}
        return {name for name, p in self.named_parameters() if param_multipliers(name, owners[id(p)])[1] == 0.0}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in the backward pass (``CapiModel.set_grad_checkpointing``)."""
        self.model.set_grad_checkpointing(enable)

    # ---- forward ----------------------------------------------------------------------------------------------
    def _pad(self, x: Tensor) -> Tensor:
        if self.dynamic_img_pad:
            return pad_to_patch_multiple(x, self.model.patch_size)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, R + h*w, D) ``enc_norm``-ed tokens: registers, then patches in row-major order."""
        tokens, _, _ = self.model.encode(self._pad(x))
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

    def _pool(self, tokens: Tensor, h: int, w: int) -> Tensor:
        pooled: list[Tensor] = []
        if self.pool_pred:
            coords, all_coords = self.model.token_coordinates(h, w, None, reference=tokens)
            pooled.append(self.model.pool(tokens, coords, all_coords))  # (B, D_pred)
        if self.pool_avg:
            pooled.append(tokens[:, self.num_prefix_tokens :].mean(dim=1))  # (B, D)
        if len(pooled) == 0:
            return tokens
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)

    def pool(self, tokens: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """Pool (B, R + h*w, D) tokens with ``global_pool``."""
        if not self.pool_pred:  # the grid matters only to predictor pooling
            return self._pool(tokens, 0, 0)
        return self._pool(tokens, *self._grid_of(tokens, grid_size))

    def _head(self, x: Tensor, pre_logits: bool) -> Tensor:
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False, grid_size: tuple[int, int] | None = None) -> Tensor:
        return self._head(self.pool(x, grid_size), pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        x = self._pad(x)
        h, w = checked_input_grid(x, self.model.in_chans, self.model.patch_size)
        return self._head(self._pool(self.forward_features(x), h, w), False)

    @torch.jit.unused
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
            self._pad(x),
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
    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also takes official (``backbone.*``) and native CAPI state dicts:
        mapped and checked by ``checkpoint_filter_fn`` (a pre-hook); ``strict=False`` tolerates missing and
        unexpected keys there too."""
        self._strict_load = strict  # torch passes strict=True to the pre-hooks whatever the caller asked
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self._strict_load = True

    def load_pretrained(self, checkpoint_path: str | os.PathLike) -> None:
        """Load a CAPI checkpoint file (official ``backbone.``-prefixed .pth, ours, .safetensors, a
        ``save_pretrained`` folder) through the package's checked loader, strictly. Called by timm for
        ``pretrained=True`` (released URLs after their download, ``pretrained_cfg_overlay=dict(file=...)``).

        A classifier head keeps its init; with ``in_chans`` other than the checkpoint's (``input_size[0]`` of
        the pretrained config), the patch embedding is adapted as timm does (``adapt_input_conv``).
        Raises ``CheckpointError`` naming the file and what is wrong."""
        pretrained_cfg = getattr(self, "pretrained_cfg", None) or {}
        source_chans = (pretrained_cfg.get("input_size") or (3,))[0]
        tensors = _read_checked(checkpoint_path, dataclasses.replace(self.config, in_chans=source_chans))
        state = checkpoint_filter_fn(tensors, self, source=str(checkpoint_path))
        state.update(self.head.state_dict(prefix="head."))  # a new classifier keeps its init
        self.load_state_dict(state, strict=True)


def _read_checked(path: str | os.PathLike, config: CapiConfig) -> dict[str, Tensor]:
    """The one place the timm door reads a checkpoint file: the package's checked loader (format told by the
    bytes, no pickle executed, keys and shapes checked against ``config``, integer and NaN/Inf weights refused)."""
    return load_local(path, LoadOptions(arch=config)).state_dict()


def _is_unused_predictor_key(key: str, predictor_blocks: int) -> bool:
    """Native key of a predictor part that a model holding ``predictor_blocks`` blocks does not have."""
    match = _DECODER_BLOCK.match(key)
    if match:
        return int(match.group(1)) >= predictor_blocks
    return key == "mask_token" and predictor_blocks == 0


def _adapt_in_chans(state: dict[str, Tensor], native: CapiModel) -> None:
    """Adapt the patch embedding of a checkpoint with another channel count, as timm does for its own models."""
    key = "patch_embed.weight"
    target = native.config.in_chans
    if key in state and state[key].ndim == 4 and state[key].shape[1] != target:
        source = state[key].shape[1]
        state[key] = adapt_input_conv(target, state[key])
        logger.info("Adapted the patch embedding from %d to %d input channels", source, target)


def checkpoint_filter_fn(
    state_dict: Mapping[str, Tensor], model: CapiTimmModel, *, source: str = "state dict", complete: bool = True
) -> dict[str, Tensor]:
    """A CAPI checkpoint in any layout -> this model's keys, checked for a strict load (timm's ``filter_fn``).

    Official files (``backbone.*``) and native ``CapiModel`` state dicts go through the CAPI filter (training heads
    dropped); ``CapiTimmModel`` state dicts (``model.*``) keep their ``head.*`` tensors. The predictor parts this
    model does not hold are dropped (one log line), the patch embedding is adapted to ``in_chans``, then the
    backbone is checked: keys and shapes, no integer weights, no NaN/Inf. Raises ``CheckpointError``.
    ``complete=False`` (a ``load_state_dict(..., strict=False)``) tolerates missing and unexpected keys, as torch
    does; shapes and values are still checked."""
    native = model.model
    if any(key.startswith(MODEL_PREFIX) for key in state_dict):
        backbone = {k[len(MODEL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(MODEL_PREFIX)}
    else:
        backbone = capi_checkpoint_filter(state_dict, model.config)  # the whole architecture, predictor included
        rest = {}
    unused = [k for k in backbone if _is_unused_predictor_key(k, model.predictor_blocks)]
    if unused:
        logger.info(
            "Dropped %d predictor tensors that global_pool=%r does not use", len(unused), model.global_pool or ""
        )
        backbone = {k: v for k, v in backbone.items() if k not in set(unused)}
    _adapt_in_chans(backbone, native)
    diff = compare_state_dict(backbone, {k: tuple(v.shape) for k, v in native.state_dict().items()})
    if not complete:
        diff = dataclasses.replace(diff, missing=(), unexpected=())
    if not diff.ok:
        c = model.config
        raise diff.error(f"{source} (loaded by timm)", hint=f"The model has embed_dim {c.embed_dim}, depth {c.depth}.")
    non_floating = find_non_floating(backbone, native.state_dict())
    if non_floating:
        raise CheckpointError(non_floating_message(source, non_floating))
    non_finite = find_non_finite(backbone)
    if non_finite:
        what = non_finite_message(source, non_finite).split(": the weights")[0]
        raise CheckpointError(
            f"{what}: the weights are damaged or come from a diverged run. Use an earlier checkpoint."
        )
    return {MODEL_PREFIX + k: v for k, v in backbone.items()} | rest


def _accept_capi_checkpoints(
    module: CapiTimmModel, state_dict: dict, prefix: str, local_metadata, strict: bool, *args
) -> None:
    """``load_state_dict`` hook: official, native and timm CAPI state dicts load into the model
    (``checkpoint_filter_fn``: mapped, checked, unused predictor tensors dropped); the load stays as strict as
    asked. A dict without backbone keys (a head alone, with ``strict=False``) is left to torch."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    if not any(k[len(prefix) :].split(".", 1)[0] in CHECKPOINT_ROOTS for k in keys):
        return
    complete = getattr(module, "_strict_load", True)
    filtered = checkpoint_filter_fn({k[len(prefix) :]: state_dict[k] for k in keys}, module, complete=complete)
    for key in keys:
        del state_dict[key]
    state_dict.update({prefix + k: v for k, v in filtered.items()})


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


# ---- pretrained configs ---------------------------------------------------------------------------------------
def _cfg(weights: PretrainedWeights | None = None) -> dict:
    cfg = dict(
        input_size=(3, 224, 224),
        interpolation="bicubic",
        crop_pct=CROP_PCT,
        crop_mode="center",
        fixed_input_size=True,  # sides must be multiples of 14: tooling uses input_size (dynamic_img_pad lifts it)
        num_classes=0,
        pool_size=None,
        first_conv="model.patch_embed",
        classifier="head",  # no released classifier (num_classes=0): a new head keeps its init
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
def _resolve_pretrained(variant: str, pretrained_cfg, pretrained_cfg_overlay, cache_dir=None) -> dict | None:
    """For ``pretrained=True``: download a released URL with the fast-failing CAPI downloader (timm never opens
    the network itself), and mark a local file (downloaded or ``pretrained_cfg_overlay=dict(file=...)``)
    ``custom_load``, so that timm hands it to ``CapiTimmModel.load_pretrained`` (the package's checked loader)
    instead of its own ``torch.load``. Returns the resolved config dict, or None to let timm resolve (a state
    dict or a hub id was given: timm reads those, then ``checkpoint_filter_fn`` checks them)."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    if cfg.state_dict is not None or cfg.hf_hub_id:
        return None
    if cfg.file:
        return dataclasses.asdict(dataclasses.replace(cfg, custom_load=True))
    if not cfg.url:
        return None  # timm says there are no pretrained weights
    with loading_interface("timm"):  # offline hints name pretrained_cfg_overlay=dict(file=PATH)
        path = download_url(cfg.url, cache_dir=cache_dir)  # default: the torch hub checkpoints folder
    return dataclasses.asdict(dataclasses.replace(cfg, file=str(path), custom_load=True))


def _create(variant: str, pretrained: bool = False, **kwargs) -> CapiTimmModel:
    config = ARCHITECTURES[variant]
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    if pretrained:
        resolved = _resolve_pretrained(variant, pretrained_cfg, overlay, kwargs.get("cache_dir"))
        if resolved is not None:
            pretrained_cfg, overlay = resolved, None
    changes = {}
    img_size = _check_img_size(kwargs.get("img_size"), config.patch_size)
    if img_size is not None:  # the only effect of img_size: the default data config's input size
        changes["input_size"] = (config.in_chans, *img_size)  # the pretrained channels; in_chans is the model's
    if kwargs.get("dynamic_img_pad"):
        changes["fixed_input_size"] = False  # any size runs: padded to the next multiple of 14
    if changes and isinstance(pretrained_cfg, dict):
        pretrained_cfg = {**pretrained_cfg, **changes}
    elif changes:
        overlay = {**(overlay or {}), **changes}
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
