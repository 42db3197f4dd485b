"""Parameter groups: every trainable parameter in exactly one group, with the official multipliers."""

import pytest
import torch
from torch import nn

from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.train.heads import L2NormLinear
from capi_backbones.train.param_groups import apply_schedules, build_param_groups


def _official_multipliers(name: str) -> tuple[float, float]:
    """facebookresearch/capi utils.get_params_groups, rule by rule, with CAPI's defaults (0.2, 0.0, 0.1)."""
    lr, wd = 1.0, 1.0
    if name.endswith(".bias") or "gamma" in name:
        wd = 0.0
    if "norm" in name and "weight" in name:
        wd = 0.1
    if "patch_embed" in name:
        lr *= 0.2
    if "rope" in name:
        lr *= 0.0
    return lr, wd


def _student() -> nn.ModuleDict:
    torch.manual_seed(0)
    config = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2)
    return nn.ModuleDict({"backbone": CapiModel(config), "head": L2NormLinear(64, 128)})


def _by_name(groups: list[dict]) -> dict[str, tuple[float, float]]:
    return {name: (g["lr_mult"], g["wd_mult"]) for g in groups for name in g["names"]}


def test_every_parameter_in_exactly_one_group():
    student = _student()
    groups = build_param_groups(student, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in student.parameters()}
    for g in groups:
        assert len(g["params"]) == len(g["names"])
        assert set(g) >= {"params", "names", "lr_mult", "wd_mult", "weight_decay"}
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_mult"])
    assert len({(g["lr_mult"], g["wd_mult"]) for g in groups}) == len(groups)  # one group per distinct pair


def test_multipliers_match_the_official_rules():
    student = _student()
    got = _by_name(build_param_groups(student, weight_decay=0.1))
    for name, _ in student.named_parameters():
        assert got[name] == pytest.approx(_official_multipliers(name)), name
    # the rules spelt out on the parameters that matter
    assert got["backbone.patch_embed.weight"] == (0.2, 1.0)
    assert got["backbone.patch_embed.bias"] == (0.2, 0.0)
    assert got["backbone.encoder.blocks.0.residual1.fn.rope.freqs"] == (0.0, 1.0)
    assert got["backbone.decoder.blocks.1.residual2.norm.weight"] == (1.0, 0.1)
    assert got["backbone.registers"] == (1.0, 1.0) and got["backbone.mask_token"] == (1.0, 1.0)
    assert got["backbone.encoder.blocks.0.residual2.fn.fc1.weight"] == (1.0, 1.0)
    assert got["head.last_layer.weight_g"] == (1.0, 1.0) and got["head.last_layer.weight_v"] == (1.0, 1.0)


def test_custom_multipliers_and_norms_found_by_type():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))  # names "0.weight", "1.weight": no "norm" in them
    got = _by_name(build_param_groups(model, weight_decay=0.05, norm_wd_mult=0.3))
    assert got == {"0.weight": (1.0, 1.0), "0.bias": (1.0, 0.0), "1.weight": (1.0, 0.3), "1.bias": (1.0, 0.0)}
    got = _by_name(build_param_groups(_student(), weight_decay=0.1, patch_embed_lr_mult=0.5, rope_lr_mult=0.1))
    assert got["backbone.patch_embed.weight"] == (0.5, 1.0)
    assert got["backbone.encoder.blocks.1.residual1.fn.rope.freqs"] == pytest.approx((0.1, 1.0))


def test_frozen_parameters_are_left_out():
    student = _student()
    student.head.requires_grad_(False)
    names = set(_by_name(build_param_groups(student, weight_decay=0.1)))
    assert not any(n.startswith("head.") for n in names)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(student.requires_grad_(False), weight_decay=0.1)


def test_apply_schedules_with_adamw():
    student = _student()
    groups = build_param_groups(student, weight_decay=0.1, lr=1e-3)
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_mult"]) for g in groups)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    apply_schedules(optimizer, lr=0.01, weight_decay=0.2)
    for g in optimizer.param_groups:
        assert g["lr"] == pytest.approx(0.01 * g["lr_mult"]) and g["weight_decay"] == pytest.approx(0.2 * g["wd_mult"])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    after = dict(student.named_parameters())
    assert torch.equal(
        after["backbone.encoder.blocks.0.residual1.fn.rope.freqs"],
        before["backbone.encoder.blocks.0.residual1.fn.rope.freqs"],
    )
    assert not torch.equal(after["backbone.patch_embed.weight"], before["backbone.patch_embed.weight"])
    with pytest.raises(KeyError, match="lr_mult"):
        apply_schedules(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), lr=0.1, weight_decay=0.0)
