"""DINOv2 drop-in: code written for DINOv2's ``DinoVisionTransformer`` runs unchanged on a CAPI model (the common
snippets of DINOv2's linear evaluation, dense heads and notebooks), and gives CAPI's features; plus TorchScript and
torch.fx of the native model. docs/dinov2.md says what differs."""

import re
import warnings
from pathlib import Path

import pytest
import torch

from capi_backbones.models import CapiConfig
from capi_backbones.pretrained import CapiHubModel

CONFIG = CapiConfig(embed_dim=64, depth=4, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CapiHubModel(CONFIG).eval()  # what torch.hub.load(..., "capi_vits14") and from_pretrained return


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 28, 42)  # a 2 x 3 patch grid


@pytest.fixture(scope="module")
def official(model, x):
    with torch.no_grad():
        return model(x)  # (global_repr, registers, feature_map)


def test_attributes(model):
    assert model.num_register_tokens == 16 and model.n_blocks == 4 and model.num_heads == 2
    assert model.num_features == model.embed_dim == 64 and model.patch_size == 14
    assert model.blocks is model.encoder.blocks and len(model.blocks) == 4
    assert model.norm is model.enc_norm


def test_linear_eval_snippet(model, x, official):
    """dinov2/eval/linear.py: the class tokens of the last 4 blocks, plus the average of the last patch tokens."""
    with torch.no_grad():
        x_tokens_list = model.get_intermediate_layers(x, n=4, return_class_token=True)
    intermediate_output = x_tokens_list[-4:]
    output = torch.cat([class_token for _, class_token in intermediate_output], dim=-1)
    output = torch.cat((output, torch.mean(intermediate_output[-1][0], dim=1)), dim=-1)
    assert output.shape == (2, 5 * 64)
    patch_tokens, class_token = intermediate_output[-1]
    assert torch.equal(class_token, official[0])  # the last block's "class token": the official global repr
    assert torch.equal(patch_tokens, official[2].flatten(1, 2))


def test_dense_head_snippet_and_positional_form(model, x, official):
    """DINOv2's depth / segmentation heads: ``get_intermediate_layers(x, n, reshape=True, return_class_token=True,
    norm=True)``, and the positional form ``(x, n, reshape)``."""
    with torch.no_grad():
        full = model.get_intermediate_layers(x, n=[0, 3], reshape=True, return_class_token=True, norm=True)
        positional = model.get_intermediate_layers(x, 4, True)
        positional_all = model.get_intermediate_layers(x, 2, True, True, False)  # n, reshape, class token, norm
    assert len(full) == 2 and all(len(item) == 2 for item in full)
    (first, first_cls), (last, last_cls) = full
    assert first.shape == last.shape == (2, 64, 2, 3) and first_cls.shape == (2, 64)
    assert torch.equal(last, official[2].permute(0, 3, 1, 2)) and torch.equal(last_cls, official[0])
    assert not torch.equal(first_cls, last_cls)  # block 0's tokens pooled by the predictor
    assert len(positional) == 4 and torch.equal(positional[-1], last)
    assert len(positional_all) == 2 and not torch.equal(positional_all[-1][0], last)  # norm=False: pre-norm tokens
    assert torch.equal(positional_all[-1][1], last_cls)  # the class token is always pooled from normed tokens


def test_forward_features_dict(model, x, official):
    with torch.no_grad():
        out = model.forward_features(x, masks=None)
    assert set(out.keys()) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert torch.equal(out["x_norm_clstoken"], official[0])
    assert torch.equal(out["x_norm_regtokens"], official[1])
    assert torch.equal(out["x_norm_patchtokens"], official[2].flatten(1, 2))
    assert out["x_prenorm"].shape == (2, 16 + 6, 64) and out["masks"] is None
    normed = model.norm(out["x_prenorm"])
    assert torch.equal(normed, torch.cat([official[1], official[2].flatten(1, 2)], dim=1))
    assert torch.equal(out.patch_features, official[2]) and torch.equal(out.pooled, official[0])  # the CAPI names
    with pytest.raises(KeyError, match="x_norm_clstoken"):
        model.forward_features(x, pooled=False)["x_norm_clstoken"]
    with pytest.raises(KeyError, match="DINOv2's keys"):
        out["x_norm_cls"]
    with pytest.raises(ValueError, match="no mask token"):
        model.forward_features(x, masks=torch.zeros(2, 6, dtype=torch.bool))


def test_blocks_and_norm_run_by_hand(model, x, official):
    """Notebook-style code that hooks ``model.blocks`` and applies ``model.norm`` sees the encoder's tokens."""
    seen = []
    handle = model.blocks[-1].register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        model(x)
    handle.remove()
    (tokens,) = seen
    assert torch.equal(model.norm(tokens)[:, model.num_register_tokens :], official[2].flatten(1, 2))


def test_torchscript_and_fx_of_the_native_model(model, x, official):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        scripted = torch.jit.script(model)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        for compiled in (scripted, traced):
            assert all(torch.equal(a, b) for a, b in zip(compiled(x), official, strict=True))
    for compiled in (scripted, traced):  # the size check is part of both graphs
        with pytest.raises(Exception, match="Input width 40 is not a positive multiple of the patch size 14"):
            compiled(torch.randn(1, 3, 28, 40))


def test_the_docs_page_runs():
    """docs/dinov2.md's example runs as written."""
    page = Path(__file__).parents[1] / "docs" / "dinov2.md"
    (code,) = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    scope = {}
    exec(compile(code, str(page), "exec"), scope)
    assert scope["features"].shape == (2, 5 * 384) and scope["embedding"].shape == (2, 384)
