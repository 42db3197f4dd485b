"""Stochastic depth under autocast: the bf16 branch is added into the fp32 residual stream (first GPU run found
``index_add_(): self (Float) and source (BFloat16) must have the same scalar type`` in training)."""

import torch
from torch import nn

from capi_backbones.layers.residual import Residual


def test_stochastic_depth_branch_in_bf16_autocast_adds_into_fp32_stream():
    torch.manual_seed(0)
    residual = Residual(nn.LayerNorm(8), nn.Linear(8, 8), drop_prob=0.5).train()
    x = torch.randn(4, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # tiny sizes: CPU bf16 speed does not matter here
        out = residual(x)
    assert out.dtype == torch.float32
    changed = (out != x).flatten(1).any(dim=1)
    assert int(changed.sum()) == 2  # max(int(4 * 0.5), 1) samples went through the branch
