"""Architecture inference from tensor shapes alone (spec section 6), for tiny configs and the three registered
architectures built on the meta device (a meta state dict has shapes but no data)."""

import logging
import math

import pytest
import torch

from capi_backbones.models import ARCHITECTURES, CapiConfig, CapiModel
from capi_backbones.pretrained import CheckpointError, architecture_name, count_parameters, infer_config
from capi_backbones.pretrained.matching import choose_config

TINY_CONFIGS = [
    CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2),
    CapiConfig(embed_dim=96, depth=3, num_heads=6, pred_embed_dim=48, pred_depth=1, pred_num_heads=3),
    CapiConfig(embed_dim=32, depth=1, num_heads=1, pred_embed_dim=64, pred_depth=4, pred_num_heads=4, mlp_ratio=2.0),
    CapiConfig(
        embed_dim=64,
        depth=2,
        num_heads=4,
        pred_embed_dim=32,
        pred_depth=2,
        pred_num_heads=2,
        patch_size=16,
        in_chans=1,
        n_registers=8,
    ),  # fmt: skip
    CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2, n_registers=0),
    # fc1 width 61 for width 56: 61 / 56 * 56 rounds down to 60.999..., the ratio must be nudged up
    CapiConfig(
        embed_dim=56,
        depth=1,
        num_heads=14,
        pred_embed_dim=56,
        pred_depth=1,
        pred_num_heads=14,
        mlp_ratio=math.nextafter(61 / 56, math.inf),
    ),  # fmt: skip
]


def meta_state_dict(config: CapiConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in CapiModel(config, device="meta").state_dict().items()}


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda c: f"D{c.embed_dim}-L{c.depth}-P{c.pred_embed_dim}")
@pytest.mark.parametrize("prefix", ["", "backbone."])
def test_tiny_configs(config, prefix):
    sd = meta_state_dict(config, prefix) | {"head.weight": torch.empty(5, 3, device="meta")}
    assert infer_config(sd) == config
    assert architecture_name(config) is None


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_registered_architectures(name, caplog):
    sd = meta_state_dict(ARCHITECTURES[name], "backbone.")
    assert infer_config(sd) == ARCHITECTURES[name]
    assert architecture_name(infer_config(sd)) == name
    with caplog.at_level(logging.INFO, logger="capi_backbones"):
        choose_config(None, None, sd, "test.pth")
    assert f"registered architecture {name}" in caplog.text


def test_architecture_name_ignores_drop_path():
    config = CapiConfig.from_dict(ARCHITECTURES["capi_vitb14"].to_dict() | {"drop_path_rate": 0.2})
    assert architecture_name(config) == "capi_vitb14"


def test_parameter_counts_split_encoder_and_predictor():
    counts = count_parameters(meta_state_dict(ARCHITECTURES["capi_vitl14"], "backbone."))
    model = CapiModel(ARCHITECTURES["capi_vitl14"], device="meta")
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.predictor == sum(p.numel() for p in model.decoder.parameters()) + model.mask_token.numel()


def test_gap_in_block_indices():
    sd = meta_state_dict(TINY_CONFIGS[1])
    sd = {k: v for k, v in sd.items() if not k.startswith("encoder.blocks.1.")}
    with pytest.raises(CheckpointError, match=r"encoder blocks are not numbered 0..2: missing \[1\]"):
        infer_config(sd)


def test_inconsistent_mlp_ratios():
    sd = meta_state_dict(TINY_CONFIGS[0])
    sd["decoder.blocks.0.residual2.fn.fc1.weight"] = torch.empty(128, 64, device="meta")
    with pytest.raises(CheckpointError, match="MLP ratio"):
        infer_config(sd)


def test_no_decoder():
    sd = {k: v for k, v in meta_state_dict(TINY_CONFIGS[0]).items() if not k.startswith("decoder.")}
    with pytest.raises(CheckpointError, match="found 2 encoder and 0 decoder blocks"):
        infer_config(sd)
