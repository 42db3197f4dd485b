"""CAPI encoder and cross-attention predictor.

Paper: "Cluster and Predict Latent Patches for Improved Masked Image Modeling",
Darcet et al., 2025 (https://arxiv.org/abs/2502.08769). Official code: facebookresearch/capi.
Module attribute names are the official checkpoint keys, so released files load with strict=True.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from capi_backbones.constants import DEFAULT_IMAGE_SIZE
from capi_backbones.layers import Block
from capi_backbones.models.config import CapiConfig
from capi_backbones.models.coordinates import edge_register_coordinates, patch_coordinates, scale_to_extent
from capi_backbones.models.grad_checkpointing import GRAD_CHECKPOINTING_MODES, checkpointed_call

__all__ = ["BackboneOutput", "CapiModel", "Transformer", "nearest_valid_sizes"]


# DINOv2's ``forward_features`` keys -> how a ``BackboneOutput`` answers them (see docs/dinov2.md)
DINOV2_KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks")


@dataclass
class BackboneOutput:
    """Output of ``CapiModel.forward_features``. Also answers DINOv2's dict keys (``out["x_norm_patchtokens"]``):
    ``x_norm_patchtokens`` (B, h*w, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_clstoken`` = ``pooled`` (CAPI has no
    class token: the predictor-pooled embedding), ``x_prenorm`` (B, R + h*w, D) un-normed tokens, ``masks``."""

    patch_features: Tensor  # (B, h, w, D), enc_norm-ed patch tokens
    registers: Tensor  # (B, n_registers, D), enc_norm-ed register tokens
    pooled: Tensor | None  # (B, D_pred) predictor pooling, or None when not asked for
    prenorm: Tensor | None = None  # (B, R + h*w, D) last encoder block's tokens before enc_norm
    masks: Tensor | None = None  # DINOv2's ``masks`` argument (always None: CAPI's encoder has no mask token)

    def __getitem__(self, key: str) -> Tensor | None:
        if key == "x_norm_patchtokens":
            return self.patch_features.flatten(1, 2)
        if key == "x_norm_regtokens":
            return self.registers
        if key == "x_norm_clstoken":
            if self.pooled is None:
                raise KeyError("x_norm_clstoken: this output was computed with pooled=False; call forward_features(x).")
            return self.pooled
        if key == "x_prenorm":
            return self.prenorm
        if key == "masks":
            return self.masks
        raise KeyError(f"{key!r}: a CAPI output has DINOv2's keys {', '.join(DINOV2_KEYS)}.")

    def keys(self) -> tuple[str, ...]:
        return DINOV2_KEYS

    def __contains__(self, key: object) -> bool:
        return key in DINOV2_KEYS


class Transformer(nn.Module):
    """A stack of blocks under ``.blocks`` (the checkpoint's ``encoder.blocks.i`` / ``decoder.blocks.i``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, *, context_dim: int | None = None, **block_kw) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, context_dim=context_dim, **block_kw) for _ in range(depth)])

    def __len__(self) -> int:
        return len(self.blocks)


def nearest_valid_sizes(size: int, patch_size: int) -> tuple[int, ...]:
    lower = (size // patch_size) * patch_size
    return tuple(s for s in (lower, lower + patch_size) if s > 0)


def checked_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Patch grid (h, w) of an input of (height, width) pixels; raises ``ValueError`` on sizes that do not tile.

    Written for TorchScript, and a leaf of ``torch.fx`` tracing (``torch.fx.wrap`` below): a traced graph keeps the
    check and runs it on the actual sizes."""
    for name, size in (("height", height), ("width", width)):
        if size < patch_size or size % patch_size != 0:
            lower = size // patch_size * patch_size
            valid = str(lower + patch_size) if lower == 0 else str(lower) + " or " + str(lower + patch_size)
            raise ValueError(
                "Input "
                + name
                + " "
                + str(size)
                + " is not a positive multiple of the patch size "
                + str(patch_size)
                + ". Nearest valid "
                + name
                + ": "
                + valid
                + ". Resize or crop the image (FeatureExtractor does it for you)."
            )
    return height // patch_size, width // patch_size


def checked_input_grid(x: Tensor, in_chans: int, patch_size: int) -> tuple[int, int]:
    """Check that ``x`` is a float (B, in_chans, H, W) batch whose sides tile into patches; returns (h, w).
    A ``torch.fx`` leaf, like ``checked_grid``."""
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            "Expected images of shape (B, "
            + str(in_chans)
            + ", H, W), got "
            + str(list(x.shape))
            + ". Add a batch dimension with x[None] or convert the image to RGB."
        )
    if not x.is_floating_point():
        raise TypeError("Expected a floating point tensor, got " + str(x.dtype) + ". Normalise the image first.")
    return checked_grid(x.shape[-2], x.shape[-1], patch_size)


# symbolic tracing records these as calls (the checks run on the real sizes) instead of failing on the branches
torch.fx.wrap("checked_grid")
torch.fx.wrap("checked_input_grid")
torch.fx.wrap("patch_coordinates")


class CapiModel(nn.Module):
    """CAPI backbone. ``model(x)`` returns the official 3-tuple ``(global_repr, registers, feature_map)``.

    DINOv2 names are offered too (``get_intermediate_layers``' full signature, ``forward_features(x)["x_norm_..."]``,
    ``blocks``, ``norm``, ``n_blocks``, ``num_heads``, ``num_register_tokens``, ``num_features``): docs/dinov2.md."""

    # Side of the square crops the weights were trained at: what FeatureExtractor resizes to by default. The
    # loaders set it from a file that records it (capi-backbones export); the released weights were trained at 224.
    default_image_size: int = DEFAULT_IMAGE_SIZE
    # properties TorchScript leaves alone (they read the config dataclass or return modules)
    __jit_unused_properties__ = ["n_registers", "num_prefix_tokens", "blocks", "norm", "n_blocks"]

    def __init__(self, config: CapiConfig | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config = config or CapiConfig()
        dd = dict(device=device, dtype=dtype)
        block_kw = dict(mlp_ratio=config.mlp_ratio, norm_eps=config.norm_eps, drop_path=config.drop_path_rate, **dd)
        self.encoder = Transformer(config.embed_dim, config.depth, config.num_heads, **block_kw)
        self.decoder = Transformer(
            config.pred_embed_dim, config.pred_depth, config.pred_num_heads, context_dim=config.embed_dim, **block_kw
        )
        self.mask_token = nn.Parameter(torch.empty(1, config.pred_embed_dim, **dd))
        self.registers = nn.Parameter(torch.empty(1, config.n_registers, config.embed_dim, **dd))
        self.patch_embed = nn.Conv2d(
            config.in_chans, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size, **dd
        )
        self.enc_norm = nn.RMSNorm(config.embed_dim, eps=config.norm_eps, elementwise_affine=False, **dd)
        self.dec_norm = nn.RMSNorm(config.pred_embed_dim, eps=config.norm_eps, elementwise_affine=False, **dd)
        self.grad_checkpointing: str | None = None  # None, "full" or "selective" (set_grad_checkpointing)
        # plain ints (DINOv2's attribute names), read by the forward code, which TorchScript compiles
        self.patch_size: int = config.patch_size
        self.embed_dim: int = config.embed_dim
        self.num_features: int = config.embed_dim
        self.num_heads: int = config.num_heads
        self.num_register_tokens: int = config.n_registers
        self.in_chans: int = config.in_chans
        if device is None or torch.device(device).type != "meta":
            self.init_weights()

    # ---- properties -------------------------------------------------------------------------------------------
    @property
    def n_registers(self) -> int:
        return self.num_register_tokens

    num_prefix_tokens = n_registers

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder blocks (DINOv2's ``model.blocks``)."""
        return self.encoder.blocks

    @property
    def norm(self) -> nn.Module:
        """The encoder's final norm ``enc_norm`` (DINOv2's ``model.norm``)."""
        return self.enc_norm

    @property
    def n_blocks(self) -> int:
        """Number of encoder blocks (DINOv2's ``model.n_blocks``)."""
        return len(self.encoder.blocks)

    # ---- init -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> "CapiModel":
        """The official init: xavier-uniform linears and patch_embed, N(0, 0.02) tokens, RoPE frequencies."""
        self.patch_embed.reset_parameters()
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.embed_dim, -1))
        nn.init.normal_(self.registers, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
            elif hasattr(module, "freqs"):
                module.reset_parameters()
        return self

    def set_grad_checkpointing(self, enable: bool = True, *, mode: str = "full") -> "CapiModel":
        """Recompute encoder and predictor blocks in the backward pass (only in training with grad enabled).

        mode: ``"full"`` keeps only each block's input; ``"selective"`` also keeps matmul and attention outputs
        and recomputes the elementwise ops. Outputs and gradients are unchanged."""
        if mode not in GRAD_CHECKPOINTING_MODES:
            raise ValueError(f"Unknown grad checkpointing mode {mode!r}; use one of {GRAD_CHECKPOINTING_MODES}.")
        self.grad_checkpointing = mode if enable else None
        return self

    def _checkpointing(self) -> bool:
        return self.grad_checkpointing is not None and self.training and torch.is_grad_enabled()

    @torch.jit.unused
    def _checkpointed_encoder_block(self, i: int, tokens: Tensor, coords: Tensor) -> Tensor:
        return checkpointed_call(self.grad_checkpointing, self.encoder.blocks[i], tokens, coords)

    @torch.jit.unused
    def _checkpointed_decoder_block(
        self, i: int, queries: Tensor, query_coords: Tensor, context: Tensor, context_coords: Tensor
    ) -> Tensor:
        block = self.decoder.blocks[i]
        return checkpointed_call(
            self.grad_checkpointing, block, queries, query_coords, context=context, context_coords=context_coords
        )

    # ---- shapes -----------------------------------------------------------------------------------------------
    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (h, w) for an input of (height, width) pixels; raises on sizes that do not tile."""
        return checked_grid(height, width, self.patch_size)

    def _check_input(self, x: Tensor) -> tuple[int, int]:
        return checked_input_grid(x, self.in_chans, self.patch_size)

    # ---- encoder ----------------------------------------------------------------------------------------------
    def prepare_tokens(self, x: Tensor, visible_indices: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Embed patches, keep the visible ones and prepend registers.

        visible_indices: (B, n_visible) patch indices per image (row-major), or None for all patches.
        Returns tokens (B, R + n, D), their coordinates (B or 1, R + n, 2), and the full
        patch coordinates (h*w, 2).
        """
        b = x.shape[0]
        h, w = self._check_input(x)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, h*w, D)
        if visible_indices is not None:
            tokens = tokens.gather(1, visible_indices[..., None].expand(-1, -1, tokens.shape[-1]))
        coords, all_coords = self.token_coordinates(h, w, visible_indices, reference=tokens)
        tokens = torch.cat([self.registers.expand(b, -1, -1), tokens], dim=1)
        return tokens, coords, all_coords

    def token_coordinates(
        self, h: int, w: int, visible_indices: Tensor | None = None, *, reference: Tensor
    ) -> tuple[Tensor, Tensor]:
        """RoPE coordinates of the token sequence of ``prepare_tokens``, (B or 1, R + n, 2): registers on the
        border of the extent of the (visible) patches, then the patches; and of all patches (h*w, 2).
        ``reference`` gives the device and dtype."""
        all_coords = patch_coordinates(h, w, device=reference.device, dtype=reference.dtype)  # (h*w, 2)
        coords = all_coords[None] if visible_indices is None else all_coords[visible_indices]  # (1 or B, n, 2)
        reg_coords = edge_register_coordinates(self.num_register_tokens, device=reference.device, dtype=reference.dtype)
        reg_coords = scale_to_extent(reg_coords, coords)  # (B or 1, R, 2)
        return torch.cat([reg_coords, coords], dim=1), all_coords

    def run_encoder(
        self, tokens: Tensor, coords: Tensor, n_blocks: int | None = None, collect: list[int] | None = None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run the first ``n_blocks`` encoder blocks (all by default). Returns the last (un-normed) tokens and
        ``{i: output of block i}`` for the 0-based indices in ``collect``."""
        collected: dict[int, Tensor] = {}
        for i, block in enumerate(self.encoder.blocks):
            if n_blocks is None or i < n_blocks:
                if self._checkpointing():
                    tokens = self._checkpointed_encoder_block(i, tokens, coords)
                else:
                    tokens = block(tokens, coords)
                if collect is not None and i in collect:
                    collected[i] = tokens
        return tokens, collected

    def encode(self, x: Tensor, visible_indices: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Encoder forward: ``enc_norm``-ed tokens (B, R + n, D), their coordinates, all patch coordinates."""
        tokens, coords, all_coords = self.prepare_tokens(x, visible_indices)
        tokens, _ = self.run_encoder(tokens, coords)
        return self.enc_norm(tokens), coords, all_coords

    # ---- predictor --------------------------------------------------------------------------------------------
    def predict(
        self, context: Tensor, context_coords: Tensor, query_coords: Tensor, n_blocks: int | None = None
    ) -> Tensor:
        """Predictor: mask tokens at ``query_coords`` (B or 1, n_q, 2) cross-attend to the normed encoder
        output ``context`` (B, n_k, D). Runs the first ``n_blocks`` blocks (all by default), then ``dec_norm``."""
        b, n_q = context.shape[0], query_coords.shape[1]
        queries = self.mask_token[None].expand(b, n_q, -1)  # (B, n_q, D_pred)
        for i, block in enumerate(self.decoder.blocks):
            if n_blocks is None or i < n_blocks:
                if self._checkpointing():
                    queries = self._checkpointed_decoder_block(i, queries, query_coords, context, context_coords)
                else:
                    queries = block(queries, query_coords, context=context, context_coords=context_coords)
        return self.dec_norm(queries)

    def pool(self, tokens: Tensor, coords: Tensor, all_coords: Tensor) -> Tensor:
        """The official global representation (B, D_pred): predictor block 1 queried at every patch position
        over the normed encoder ``tokens`` (B, R + h*w, D) with their ``coords``, averaged over the queries."""
        return self.predict(tokens, coords, all_coords[None], n_blocks=1).mean(dim=1)

    # ---- inference API ----------------------------------------------------------------------------------------
    def forward_features(self, x: Tensor, masks: Tensor | None = None, *, pooled: bool = True) -> BackboneOutput:
        """Dense features, registers and (optionally) predictor-pooled embedding.

        Pooling runs only predictor block 1, which is all the official forward keeps; with
        ``pooled=False`` no predictor block runs at all. The output also answers DINOv2's keys
        (``out["x_norm_patchtokens"]``, ...). ``masks`` is DINOv2's argument: only None is accepted (CAPI's
        encoder has no mask token; masked pretraining drops patches, see ``encode(x, visible_indices)``)."""
        if masks is not None:
            raise ValueError(
                "forward_features(x, masks=...) is not supported: CAPI's encoder has no mask token (it drops masked "
                "patches instead). Pass masks=None, or run model.encode(x, visible_indices) on the kept patches."
            )
        h, w = self._check_input(x)
        tokens, coords, all_coords = self.prepare_tokens(x)
        prenorm, _ = self.run_encoder(tokens, coords)
        tokens = self.enc_norm(prenorm)
        registers = tokens[:, : self.num_register_tokens]
        patches = tokens[:, self.num_register_tokens :].unflatten(1, (h, w))  # (B, h, w, D), a view
        pooled_out = self.pool(tokens, coords, all_coords) if pooled else None  # (B, D_pred)
        return BackboneOutput(patch_features=patches, registers=registers, pooled=pooled_out, prenorm=prenorm)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Official output: ``(global_repr (B, D), registers (B, R, D), feature_map (B, h, w, D))``."""
        h, w = self._check_input(x)
        tokens, coords, all_coords = self.encode(x)
        registers = tokens[:, : self.num_register_tokens]
        patches = tokens[:, self.num_register_tokens :].unflatten(1, (h, w))  # (B, h, w, D)
        return self.pool(tokens, coords, all_coords), registers, patches

    def block_indices(self, n: int | Sequence[int] | None) -> list[int]:
        """Encoder block selection of DINOv2 and timm: None = all blocks, an int n = the last n, a sequence =
        those 0-based indices (negative from the end). Returns non-negative indices."""
        depth = len(self.encoder)
        if n is None:
            return list(range(depth))
        if isinstance(n, int):
            if not 0 < n <= depth:
                raise ValueError(f"Cannot take the last {n} blocks of an encoder of depth {depth}; use 1..{depth}.")
            return list(range(depth - n, depth))
        bad = [i for i in n if not -depth <= i < depth]
        if bad or not n:
            raise ValueError(
                f"Block indices {bad or list(n)} are out of range for an encoder of depth {depth} "
                f"(-{depth}..{depth - 1})."
            )
        return [i % depth for i in n]

    def intermediates(
        self,
        x: Tensor,
        indices: Sequence[int],
        *,
        norm: bool = True,
        reshape: bool = False,
        return_registers: bool = False,
        return_pooled: bool = False,
        stop_early: bool = True,
    ) -> tuple[Tensor, list]:
        """Outputs of the encoder blocks ``indices`` (0-based, from ``block_indices``) for images x.

        Returns the last encoder tokens (B, R + h*w, D), un-normed (block ``max(indices)`` with ``stop_early``,
        else the last block), and per index the patches (B, h*w, D), or (B, D, h, w) with ``reshape``, ``enc_norm``-ed
        with ``norm``; with ``return_pooled`` and/or ``return_registers`` each item is a tuple
        ``(patches, pooled (B, D_pred), registers (B, R, D))`` of what was asked. ``pooled`` is the predictor
        pooling of that block's ``enc_norm``-ed tokens (always normed: the predictor only ever saw normed tokens);
        for the last block it is ``model(x)[0]``."""
        b = x.shape[0]
        h, w = self._check_input(x)
        tokens, coords, all_coords = self.prepare_tokens(x)
        n_blocks = max(indices) + 1 if stop_early else None
        tokens, outputs = self.run_encoder(tokens, coords, n_blocks=n_blocks, collect=list(indices))
        result = []
        for i in indices:
            normed = self.enc_norm(outputs[i]) if norm or return_pooled else outputs[i]
            out = normed if norm else outputs[i]
            patches, registers = out[:, self.num_register_tokens :], out[:, : self.num_register_tokens]
            if reshape:
                patches = patches.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
            item = [patches]
            if return_pooled:
                item.append(self.pool(normed, coords, all_coords))
            if return_registers:
                item.append(registers)
            result.append(tuple(item) if len(item) > 1 else patches)
        return tokens, result

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
        *,
        return_registers: bool = False,
    ) -> tuple:
        """DINOv2-style intermediate outputs, with DINOv2's signature (positional order included).

        n: the last ``n`` blocks, or a sequence of 0-based block indices. ``norm`` applies ``enc_norm``.
        ``reshape`` returns patch maps as (B, D, h, w) instead of (B, h*w, D). ``return_class_token``: each item is
        ``(patches, class_token)`` where the class token (CAPI has none) is the predictor pooling of that block's
        normed tokens, (B, D_pred); for the last block it is ``model(x)[0]``. With ``return_registers`` each item
        also holds the registers (B, R, D) last. Only the blocks up to the last one asked for run.
        """
        indices = self.block_indices(n)
        _, result = self.intermediates(
            x,
            indices,
            norm=norm,
            reshape=reshape,
            return_registers=return_registers,
            return_pooled=return_class_token,
        )
        return tuple(result)
