"""Light imports, checked through ``sys.modules`` in one fresh process: the package, its ``models`` and ``train``
packages import none of timm, torchvision, huggingface_hub or scikit-learn, and the CLI's ``--help``, ``--version``
and ``list`` do not even import torch."""

import json
import os
import subprocess
import sys

import pytest

from capi_backbones.cli.model_commands import parameter_counts
from capi_backbones.models import ARCHITECTURES, CapiConfig, CapiModel
from capi_backbones.pretrained import count_parameters

HEAVY = ("timm", "torchvision", "huggingface_hub", "sklearn")

PROBE = f"""
import contextlib, io, json, sys
HEAVY = {HEAVY!r}
report = {{}}
from capi_backbones.cli.main import main
for argv in (["--help"], ["--version"], ["list"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    report[" ".join(argv)] = [code, sorted(m for m in ("torch", "numpy", *HEAVY) if m in sys.modules)]
for name in ("capi_backbones", "capi_backbones.models", "capi_backbones.train"):
    __import__(name)
    report[name] = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps(report))
"""


def test_imports_stay_light():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    for command in ("--help", "--version", "list"):
        assert report[command] == [0, []], f"capi-backbones {command}: exit code, heavy modules: {report[command]}"
    for name in ("capi_backbones", "capi_backbones.models", "capi_backbones.train"):
        assert report[name] == [], f"import {name} (after the ones above) imported {report[name]}"


ODD = CapiConfig(  # widths, depths, heads, patch, channels, registers and MLP ratio all unlike the registered ones
    embed_dim=64, depth=2, num_heads=2, pred_embed_dim=32, pred_depth=3, pred_num_heads=4, mlp_ratio=3.0,
    patch_size=16, in_chans=1, n_registers=8,
)  # fmt: skip


@pytest.mark.parametrize("config", [*ARCHITECTURES.values(), ODD], ids=[*ARCHITECTURES, "odd"])
def test_list_counts_parameters_without_torch_like_the_model(config):
    counts = count_parameters(CapiModel(config, device="meta").state_dict())
    assert parameter_counts(config) == (counts.encoder, counts.predictor)
