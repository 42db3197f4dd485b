"""timm integration: registry and pretrained configs (spec section 6), bit-identical numbers to the native model,
timm's forward_intermediates / features_only conventions, the fine-tuning interface (layer decay, weight decay,
grad checkpointing, img_size, heads) and pretrained loading through the strict loader."""

import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import timm.data
import torch
from checkpoint_files import TINY_CONFIG, tiny_model, write_official_checkpoint

import capi_backbones.timm as capi_timm  # registers the models
from capi_backbones.models import ARCHITECTURES, CapiModel
from capi_backbones.pretrained import CheckpointError, DownloadError
from capi_backbones.timm import CapiTimmModel

TINY_KWARGS = dict(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2)
RELEASED = {  # tag -> file name, from the spec's table (note i22k behind in22k)
    "lvd": "capi_vitl14_lvd.pth",
    "p205": "capi_vitl14_p205.pth",
    "in22k": "capi_vitl14_i22k.pth",
    "in1k": "capi_vitl14_in1k.pth",
}


def tiny_timm(native: CapiModel, **kwargs) -> CapiTimmModel:
    model = CapiTimmModel(native.config, **kwargs).eval()
    model.load_state_dict(native.state_dict(), strict=True)  # the native keys, unused predictor blocks dropped
    return model


# ---- registry and configs --------------------------------------------------------------------------------------
def test_models_and_tags_are_registered():
    assert set(timm.list_models("capi*")) == {"capi_vits14", "capi_vitb14", "capi_vitl14"}
    assert set(timm.list_pretrained("capi*")) == {f"capi_vitl14.{tag}" for tag in RELEASED}


@pytest.mark.parametrize("tag", sorted(RELEASED))
def test_pretrained_cfg_of_each_tag(tag):
    model = timm.create_model(f"capi_vitl14.{tag}", pretrained=False, device="meta")
    cfg = model.pretrained_cfg
    assert cfg["url"] == "https://dl.fbaipublicfiles.com/capi/" + RELEASED[tag]
    assert cfg["tag"] == tag and cfg["architecture"] == "capi_vitl14"
    assert cfg["custom_load"] is True and cfg["license"] == "apache-2.0"
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 0
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert model.default_cfg is model.pretrained_cfg
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] == "head"
    assert cfg["fixed_input_size"] is True  # sides must be multiples of 14: tooling uses input_size


def test_vitl14_on_meta_device_has_the_spec_shape():
    model = timm.create_model("capi_vitl14", device="meta")
    assert model.pretrained_cfg["tag"] == "lvd"  # the default weights
    assert next(model.parameters()).device.type == "meta"
    assert model.config == ARCHITECTURES["capi_vitl14"] and model.num_features == 1024 and model.num_classes == 0
    native = CapiModel(ARCHITECTURES["capi_vitl14"], device="meta")
    native_total = sum(p.numel() for p in native.parameters())
    assert round(native_total / 1e6, 1) == 453.7  # spec section 1: 453.7M, encoder 302M
    block = sum(p.numel() for p in native.decoder.blocks[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert len(model.model.decoder.blocks) == 1 and total == native_total - 11 * block  # predictor block 1 only
    encoder = total - block - model.model.mask_token.numel()
    assert encoder // 10**6 == 302


def test_resolve_data_config_gives_capi_preprocessing():
    model = timm.create_model("capi_vits14")
    config = timm.data.resolve_data_config({}, model=model)
    assert config == {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    transform = timm.data.create_transform(**config)
    assert "Resize(size=256, interpolation=bicubic" in repr(transform) and "CenterCrop(size=(224, 224))" in repr(
        transform
    )


def test_reimport_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(capi_timm)
        assert timm.is_model("capi_vits14")


# ---- numbers equal the native model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_vits14_from_timm_equals_native_model():
    torch.manual_seed(0)
    native = CapiModel(ARCHITECTURES["capi_vits14"]).eval()
    model = timm.create_model("capi_vits14").eval()
    model.load_state_dict(native.state_dict(), strict=True)  # the native keys load under model.*, no head
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        pooled, registers, feature_map = native(x)
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 16 + 12, 384)
        assert torch.equal(tokens[:, :16], registers)
        assert torch.equal(tokens[:, 16:].reshape(2, 3, 4, 384), feature_map)
        assert torch.equal(model(x), pooled)  # num_classes=0, global_pool="pred": the official global_repr


@pytest.mark.parametrize("global_pool", ["pred", "avg", "pred_avg"])
def test_reset_classifier_and_forward_head_for_each_pooling(global_pool):
    native = tiny_model()
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        pooled, _, feature_map = native(x)
        expected = {
            "pred": pooled,
            "avg": feature_map.mean(dim=(1, 2)),
            "pred_avg": torch.cat([pooled, feature_map.mean(dim=(1, 2))], dim=-1),
        }[global_pool]
        model = tiny_timm(native, global_pool=global_pool)
        assert model.head_hidden_size == expected.shape[-1]
        tokens = model.forward_features(x)
        assert torch.equal(model.forward_head(tokens, grid_size=(2, 3)), expected)  # Identity head
        model.reset_classifier(7)
        head = model.get_classifier()
        assert head.in_features == expected.shape[-1] and head.out_features == 7 and model.num_classes == 7
        assert torch.equal(model.forward_head(tokens, pre_logits=True, grid_size=(2, 3)), expected)
        torch.testing.assert_close(model(x), head(expected), rtol=0, atol=0)
        if global_pool == "avg":  # built without the predictor: it cannot come back
            with pytest.raises(ValueError, match="needs the predictor, which this model was built without"):
                model.reset_classifier(3, "pred")
        else:
            model.reset_classifier(3, "avg")
            assert model.model.mask_token is None and len(model.model.decoder.blocks) == 0
        assert model(x).shape == (2, 3 if global_pool != "avg" else 7)
        assert model.get_classifier().in_features == model.head_hidden_size


def test_pooling_modes_and_head():
    native = tiny_model()
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        pooled, _, feature_map = native(x)
        model = tiny_timm(native)
        tokens = model.forward_features(x)
        assert torch.equal(model.forward_head(tokens, grid_size=(2, 3)), pooled)
        with pytest.raises(ValueError, match="grid_size"):
            model.forward_head(tokens)  # 6 patches: not a square grid
        square = torch.randn(1, 3, 28, 28)
        assert torch.equal(model.forward_head(model.forward_features(square)), native(square)[0])
        model.reset_classifier(0, "avg")
        assert torch.equal(model(x), feature_map.mean(dim=(1, 2)))
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.get_classifier().in_features == TINY_CONFIG.embed_dim
        assert model.forward_head(tokens, pre_logits=True).shape == (2, 64)
        model.reset_classifier(0, "")
        assert torch.equal(model(x), tokens)
    with pytest.raises(ValueError, match="Unknown global_pool"):
        model.reset_classifier(0, "token")


@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_follow_timm_and_equal_get_intermediate_layers(norm):
    native = tiny_model()
    model = tiny_timm(native)
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[0, -1], norm=norm)
        expected = native.get_intermediate_layers(x, n=[0, 1], reshape=True, norm=norm, return_registers=True)
        assert torch.equal(final, model.forward_features(x))
        for got, (patches, _) in zip(inter, expected, strict=True):
            assert got.shape == (2, 64, 2, 3) and torch.equal(got, patches)
        nlc = model.forward_intermediates(x, indices=1, norm=norm, output_fmt="NLC", intermediates_only=True)
        assert len(nlc) == 1 and torch.equal(nlc[0], expected[1][0].flatten(2).transpose(1, 2))
        pairs = model.forward_intermediates(x, indices=None, return_prefix_tokens=True, intermediates_only=True)
        assert len(pairs) == 2 and pairs[0][1].shape == (2, 16, 64)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[2])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def count_encoder_blocks(native: CapiModel) -> list[int]:
    calls = [0]
    for block in native.encoder.blocks:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # also counts recomputation
    return calls


def test_forward_intermediates_with_an_early_index_still_runs_the_whole_encoder():
    native = tiny_model()
    model = tiny_timm(native)
    calls = count_encoder_blocks(model.model)
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert calls[0] == 2
        final, (first,) = model.forward_intermediates(x, indices=[0])
        assert calls[0] == 4 and torch.equal(final, tokens)  # not the output of block 0
        expected = native.get_intermediate_layers(x, n=[0], reshape=True, norm=False)[0]
        assert torch.equal(first, expected) and not torch.equal(first, tokens[:, 16:].mT.reshape(2, 64, 2, 3))
        early, _ = model.forward_intermediates(x, indices=[0], stop_early=True)
        assert not torch.equal(early, tokens) and early.shape == tokens.shape
        assert model.forward_intermediates(x, indices=[0], intermediates_only=True)[0].shape == (2, 64, 2, 3)
    assert calls[0] == 4 + 1 + 1  # stop_early and intermediates_only stop after block 0


def test_features_only_and_pruning():
    model = timm.create_model("capi_vits14", features_only=True, out_indices=(-4, -1))
    assert model.feature_info.channels() == [384, 384] and model.feature_info.reduction() == [14, 14]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 42, 28))
    assert [tuple(f.shape) for f in features] == [(1, 384, 3, 2), (1, 384, 3, 2)]
    pruned = tiny_timm(tiny_model())
    assert pruned.prune_intermediate_layers(indices=[-1], prune_norm=True) == [1] and len(pruned.model.encoder) == 2
    assert pruned.prune_intermediate_layers(indices=[0]) == [0] and len(pruned.model.encoder) == 1


# ---- pretrained loading through the strict loader --------------------------------------------------------------
@pytest.mark.parametrize("custom_load", [False, True])
def test_official_file_loads_strictly(tmp_path, custom_load):
    native = tiny_model(seed=1)
    path = tmp_path / "capi.pth"
    write_official_checkpoint(native, path)  # backbone.* keys plus a training head.* that must be dropped
    overlay = dict(file=str(path), custom_load=custom_load)
    model = timm.create_model(
        "capi_vits14", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3, **TINY_KWARGS
    ).eval()
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        assert torch.equal(
            model.forward_head(model.forward_features(x), pre_logits=True, grid_size=(2, 3)), native(x)[0]
        )
        assert model(x).shape == (1, 3)  # the new classifier keeps its init

    state = torch.load(path)
    del state["backbone.registers"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="1 missing") as error:
        timm.create_model("capi_vits14", pretrained=True, pretrained_cfg_overlay=overlay, **TINY_KWARGS)
    assert error.value.missing == ("registers",)


def test_released_url_goes_through_the_capi_downloader_and_strict_loader(tmp_path, monkeypatch):
    small = tmp_path / "small.pth"
    write_official_checkpoint(tiny_model(), small)
    fetched = []

    def fake_download(url, cache_dir=None):
        fetched.append((url, cache_dir))
        return small

    monkeypatch.setattr(capi_timm, "download_url", fake_download)
    with pytest.raises(CheckpointError, match="mismatched"):  # a tiny file is not a ViT-L: refused, not half-loaded
        timm.create_model("capi_vitl14.in22k", pretrained=True, device="meta", cache_dir=tmp_path)
    assert fetched == [("https://dl.fbaipublicfiles.com/capi/capi_vitl14_i22k.pth", tmp_path)]

    def offline(url, cache_dir=None):
        raise DownloadError(f"Cannot download {url}: no network")

    monkeypatch.setattr(capi_timm, "download_url", offline)
    with pytest.raises(DownloadError, match="capi_vitl14_lvd.pth"):
        timm.create_model("capi_vitl14", pretrained=True)


def test_archs_without_weights_refuse_pretrained():
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("capi_vits14", pretrained=True)


# ---- fine-tuning interface -------------------------------------------------------------------------------------
def test_layer_decay_gives_one_group_per_block():
    from timm.optim import create_optimizer_v2

    model = timm.create_model("capi_vits14", num_classes=4, **{**TINY_KWARGS, "depth": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns "all parameters were assigned to one layer" without a matcher
        optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in model.named_parameters()}
    scale_of = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert len(scale_of) == len(names)  # every parameter is in a group
    assert len(set(scale_of.values())) == 3 + 2  # stem, 3 blocks, predictor + head
    assert scale_of["model.patch_embed.weight"] == scale_of["model.registers"] == pytest.approx(0.75**4)
    for i in range(3):
        assert scale_of[f"model.encoder.blocks.{i}.residual2.fn.fc1.weight"] == pytest.approx(0.75 ** (3 - i))
    assert scale_of["model.decoder.blocks.0.residual1.fn.q_proj.weight"] == scale_of["head.weight"] == 1.0
    assert scale_of["model.mask_token"] == 1.0


def test_no_weight_decay_follows_the_training_recipe():
    from capi_backbones.train.param_groups import build_param_groups

    model = timm.create_model("capi_vits14", **TINY_KWARGS)
    groups = build_param_groups(model.model, weight_decay=0.1)
    recipe = {f"model.{name}" for g in groups if g["wd_mult"] == 0 for name in g["names"]}
    assert model.no_weight_decay() == recipe == {"model.patch_embed.bias"}


def test_grad_checkpointing_recomputes_blocks_and_keeps_the_gradients():
    def loss_and_grads(model):
        model.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = timm.create_model("capi_vits14", num_classes=3, **TINY_KWARGS).train()
    calls = count_encoder_blocks(model.model)
    x = torch.randn(2, 3, 28, 28)
    loss, grads = loss_and_grads(model)
    assert calls[0] == 2
    model.set_grad_checkpointing()
    checkpointed_loss, checkpointed_grads = loss_and_grads(model)
    assert calls[0] == 2 + 4  # forward, then each block again in the backward
    assert torch.equal(loss, checkpointed_loss) and grads.keys() == checkpointed_grads.keys()
    assert all(torch.equal(grads[n], checkpointed_grads[n]) for n in grads)
    with torch.no_grad():
        model(x)
    assert calls[0] == 6 + 2  # no recomputation without grad
    model.set_grad_checkpointing(False)
    loss_and_grads(model)
    assert calls[0] == 8 + 2
    with pytest.raises(ValueError, match="Unknown grad checkpointing mode"):
        model.model.set_grad_checkpointing(mode="everything")


def test_img_size_sets_the_data_config_only():
    model = timm.create_model("capi_vits14", img_size=112, **TINY_KWARGS).eval()
    assert model.img_size == (112, 112)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 112, 112)
    wide = timm.create_model("capi_vits14", img_size=(98, 140), **TINY_KWARGS)
    assert timm.data.resolve_data_config({}, model=wide)["input_size"] == (3, 98, 140)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 56, 84)).shape == (1, 64)  # any multiple of 14 still runs
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        timm.create_model("capi_vits14", img_size=100)


def test_wrapped_model_keeps_the_native_contract():
    native = tiny_model()
    model = tiny_timm(native)
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        out = model.model.forward_features(x, pooled=False)  # what FeatureExtractor and other CapiModel code call
        assert out.pooled is None and torch.equal(out.patch_features, native.forward_features(x).patch_features)
        assert all(torch.equal(a, b) for a, b in zip(model.model(x), native(x), strict=True))


def test_the_timm_door_imports_no_training_code():
    """Layering: the timm models (and their no_weight_decay, which reads the recipe's rules in models.param_rules)
    import nothing from capi_backbones.train."""
    code = (
        "import sys, timm, capi_backbones.timm\n"
        "m = timm.create_model('capi_vits14', embed_dim=64, depth=1, num_heads=2, pred_embed_dim=64, pred_depth=1,"
        " pred_num_heads=2)\n"
        "assert m.no_weight_decay() == {'model.patch_embed.bias'}\n"
        "print(sorted(n for n in sys.modules if n.startswith('capi_backbones.train')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
