"""timm's generic model contract, as timm's own test-suite (tests/test_models.py) checks its ViTs, at the input
sizes it picks (``_get_input_size``): forward, backward with a gradient for every parameter, the pretrained config,
forward_features / forward_head / forward_intermediates / features_only, TorchScript, torch.fx forward and backward,
pretrained loading with in_chans=1 and num_classes 0 and 5; plus plain DDP fine-tuning on 2 gloo ranks."""

import math
import os
import socket
import warnings

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from checkpoint_files import tiny_model, write_official_checkpoint
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import capi_backbones.timm  # noqa: F401  (registers the models)
from capi_backbones.models import ARCHITECTURES, CapiModel
from capi_backbones.timm import GLOBAL_POOL_TYPES

TINY_KWARGS = dict(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2)
TARGET_FWD_SIZE, TARGET_BWD_SIZE, TARGET_JIT_SIZE, TARGET_FFEAT_SIZE, TARGET_FX_SIZE = 384, 128, 128, 96, 128


def timm_input_size(model, target: int) -> tuple[int, ...]:
    """timm's tests/test_models.py ``_get_input_size``: the config's size if fixed, else capped at ``target``
    (or ``min_input_size`` when declared)."""
    cfg = model.pretrained_cfg
    input_size = cfg["input_size"]
    if cfg.get("fixed_input_size"):
        return input_size
    if cfg.get("min_input_size"):
        return cfg["min_input_size"] if max(input_size) > target else input_size
    return tuple(min(x, target) for x in input_size)


@pytest.fixture(scope="module", params=[False, True], ids=["fixed", "dynamic_img_pad"])
def pad(request):
    return request.param


def create(pad: bool, **kwargs):
    return timm.create_model("capi_vits14", dynamic_img_pad=pad, **kwargs)


def test_size_rule_is_declared(pad):
    model = create(pad)
    assert model.pretrained_cfg["fixed_input_size"] is (not pad)
    assert timm_input_size(model, TARGET_BWD_SIZE) == ((3, 224, 224) if not pad else (3, 128, 128))
    x = torch.randn(1, 3, 128, 100)
    if pad:
        with torch.no_grad():  # padded to 140 x 112: the grid of the next multiple of 14
            assert model.forward_features(x).shape == (1, 16 + 10 * 8, 384)
    else:
        with pytest.raises(ValueError, match="Input height 128 is not a positive multiple of the patch size 14"):
            model(x)


def test_padding_changes_nothing_at_multiples_of_14():
    torch.manual_seed(0)
    native = CapiModel(ARCHITECTURES["capi_vits14"]).eval()
    model = create(True).eval()
    model.load_state_dict(native.state_dict())
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        assert torch.equal(model(x), native(x)[0])
        padded = torch.nn.functional.pad(torch.randn(1, 3, 50, 60), (0, 10, 0, 6))
        assert torch.equal(model(padded[..., :50, :60]), native(padded)[0])  # zero padding to 56 x 70


def test_forward(pad):
    model = create(pad).eval()
    x = torch.randn(1, *timm_input_size(model, TARGET_FWD_SIZE))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 384) and not out.isnan().any()


@pytest.mark.slow
def test_backward_gives_every_parameter_a_gradient(pad):
    """timm's ``test_model_backward`` (num_classes=42, batch 2, train mode)."""
    model = create(pad, num_classes=42).train()
    x = torch.randn(2, *timm_input_size(model, TARGET_BWD_SIZE))
    out = model(x)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert out.shape[-1] == 42 and not out.isnan().any()


@pytest.mark.parametrize("global_pool", GLOBAL_POOL_TYPES)
def test_every_pooling_leaves_no_parameter_without_gradient(global_pool):
    model = timm.create_model("capi_vits14", num_classes=3, global_pool=global_pool, **TINY_KWARGS).train()
    model(torch.randn(2, 3, 28, 42)).mean().backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    predictor = [n for n, _ in model.named_parameters() if "decoder" in n or "mask_token" in n]
    assert bool(predictor) is (global_pool in ("pred", "pred_avg"))


def test_default_cfg_contract_non_std():
    """timm's ``test_model_default_cfgs_non_std``: feature width, pooled width after reset_classifier(0), the
    classifier and first conv named in the config exist."""
    model = create(False).eval()
    cfg = model.default_cfg
    x = torch.randn(1, *timm_input_size(model, TARGET_FWD_SIZE))
    with torch.no_grad():
        assert model.forward_features(x).shape[-1] == model.num_features
        model.reset_classifier(0)
        out = model(x)
        assert out.ndim == 2 and out.shape[-1] == model.num_features
        model.reset_classifier(0, "")
        assert model(x).ndim == 3
    with_head = create(False, num_classes=5)
    assert cfg["classifier"] + ".weight" in with_head.state_dict()
    assert cfg["first_conv"] + ".weight" in with_head.state_dict()
    assert isinstance(with_head.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)


def test_forward_head_and_features_compose():
    model = timm.create_model("capi_vits14", num_classes=5, **TINY_KWARGS).eval()
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert torch.equal(model.forward_head(tokens), model(x))
        assert model.forward_head(tokens, pre_logits=True).shape == (2, model.head_hidden_size)


def test_forward_intermediates(pad):
    """timm's ``test_model_forward_intermediates``."""
    model = create(pad).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    channels, reductions = info.channels(), info.reduction()
    assert len(channels) >= 3
    size = timm_input_size(model, TARGET_FFEAT_SIZE)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(torch.randn(1, *size))
    assert len(intermediates) == len(channels) and not final.isnan().any()
    for c, r, o in zip(channels, reductions, intermediates, strict=True):
        assert o.shape[1] == c and o.shape[0] == 1
        assert o.shape[2] <= math.ceil(size[1] / r) + 1 and o.shape[3] <= math.ceil(size[2] / r) + 1


def test_features_only(pad):
    """timm's ``test_model_forward_intermediates_features`` (feature_cls='getter')."""
    model = create(pad, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    size = timm_input_size(model, TARGET_FFEAT_SIZE)
    with torch.no_grad():
        outputs = model(torch.randn(1, *size))
    assert len(outputs) == len(channels) == 3
    for c, r, o in zip(channels, reductions, outputs, strict=True):
        assert o.shape[1] == c and o.shape[2] <= math.ceil(size[1] / r) + 1 and not o.isnan().any()
    assert not [n for n, _ in model.named_parameters() if "decoder" in n or "mask_token" in n]  # no pooling kept


@pytest.mark.slow
def test_torchscript(pad):
    with timm.layers.set_layer_config(scriptable=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in torch 2.14
        model = create(pad).eval()
        scripted = torch.jit.script(model)
    x = torch.randn(1, *timm_input_size(model, TARGET_JIT_SIZE))
    with torch.no_grad():
        out = scripted(x)
        assert out.shape[0] == 1 and not out.isnan().any()
        assert torch.equal(out, model(x))
    if not pad:
        with pytest.raises(Exception, match="not a positive multiple of the patch size 14"):
            scripted(torch.randn(1, 3, 100, 112))


def fx_model(model, train: bool = False):
    """timm's ``_create_fx_model``: torchvision's feature extraction with timm's leaf modules and functions."""
    tracer_kwargs = dict(
        leaf_modules=timm.models._features_fx.get_notrace_modules(),
        autowrap_functions=timm.models._features_fx.get_notrace_functions(),
        param_shapes_constant=True,
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model,
        train_return_nodes=[train_nodes[-1]],
        eval_return_nodes=[eval_nodes[-1]],
        tracer_kwargs=tracer_kwargs,
    )


def test_fx_forward(pad):
    model = create(pad).eval()
    x = torch.randn(1, *timm_input_size(model, TARGET_FX_SIZE))
    with torch.no_grad():
        expected = model(x)
        traced = fx_model(model)
        (got,) = traced(x).values()
        assert torch.equal(got, expected)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), expected)
    if not pad:  # the input check is in the graph: it runs on each call's sizes
        with pytest.raises(ValueError, match="not a positive multiple of the patch size 14"):
            traced(torch.randn(1, 3, 100, 112))


@pytest.mark.slow
@pytest.mark.parametrize("global_pool", ["pred", "avg"])
def test_fx_backward(global_pool):
    model = create(True, num_classes=42, global_pool=global_pool).train()
    traced = fx_model(model, train=True).train()
    x = torch.randn(2, *timm_input_size(model, TARGET_BWD_SIZE))
    (out,) = traced(x).values()
    out.mean().backward()
    assert out.shape == (2, 42)
    assert not [n for n, p in traced.named_parameters() if p.grad is None]
    assert len(list(traced.parameters())) == len(list(model.parameters()))


# ---- pretrained loading: in_chans and num_classes ----------------------------------------------------------------
@pytest.fixture
def official_file(tmp_path):
    native = tiny_model(seed=3)
    path = tmp_path / "capi_tiny.pth"
    write_official_checkpoint(native, path)
    return native, path


@pytest.mark.parametrize("num_classes", [0, 5])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_pretrained_with_in_chans_and_num_classes(official_file, in_chans, num_classes):
    """timm's ``test_model_load_pretrained``: in_chans=1 adapts the first conv (as timm's adapt_input_conv does:
    summed over the RGB channels), any num_classes gets a new head."""
    native, path = official_file
    model = timm.create_model(
        "capi_vits14",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        in_chans=in_chans,
        num_classes=num_classes,
        **TINY_KWARGS,
    ).eval()
    weight = native.patch_embed.weight
    expected = weight.sum(dim=1, keepdim=True) if in_chans == 1 else weight
    torch.testing.assert_close(model.model.patch_embed.weight, expected, rtol=0, atol=1e-6)
    x = torch.randn(2, in_chans, 28, 28)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, num_classes or 64)
        if in_chans == 3:
            assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True), native(x)[0])
        else:  # a grey image repeated to RGB gives the RGB model's features (up to the conv's summation order)
            torch.testing.assert_close(model.forward_features(x), native.encode(x.expand(-1, 3, -1, -1))[0])


def test_pretrained_state_dict_overlay_goes_through_timm_and_the_filter(official_file):
    """A state dict given to timm (pretrained_cfg_overlay=dict(state_dict=...)) takes timm's generic path:
    checkpoint_filter_fn maps and checks it, timm adapts in_chans (first_conv) and drops the classifier."""
    native, path = official_file
    state = torch.load(path)
    model = timm.create_model(
        "capi_vits14",
        pretrained=True,
        pretrained_cfg_overlay=dict(state_dict=state),
        in_chans=1,
        num_classes=5,
        **TINY_KWARGS,
    ).eval()
    torch.testing.assert_close(
        model.model.patch_embed.weight, native.patch_embed.weight.sum(dim=1, keepdim=True), rtol=0, atol=1e-6
    )
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 5)


def test_features_only_pretrained(official_file):
    native, path = official_file
    model = timm.create_model(
        "capi_vits14",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
        features_only=True,
        out_indices=2,
        **TINY_KWARGS,
    ).eval()
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        (features,) = model(x)[-1:]
        expected = native.get_intermediate_layers(x, n=1, reshape=True, norm=False)[0]
    assert torch.equal(features, expected)


# ---- DDP fine-tuning ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for global_pool in GLOBAL_POOL_TYPES[:3]:
            torch.manual_seed(0)  # the same init on every rank (DDP also broadcasts rank 0's)
            model = timm.create_model("capi_vits14", num_classes=4, global_pool=global_pool, **TINY_KWARGS)
            ddp = torch.nn.parallel.DistributedDataParallel(model)  # no find_unused_parameters
            optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
            generator = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
            losses = []
            for _ in range(3):
                x = torch.randn(4, 3, 28, 28, generator=generator)
                y = torch.randint(0, 4, (4,), generator=generator)
                loss = torch.nn.functional.cross_entropy(ddp(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            results[(rank, global_pool)] = (losses, flat)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_fine_tuning_on_two_gloo_ranks():
    """Plain DistributedDataParallel, as timm's train.py wraps models: 3 steps for each pooling, no unused
    parameters (step 2 used to fail), and the ranks hold the same weights afterwards."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for global_pool in GLOBAL_POOL_TYPES[:3]:
        (losses0, weights0), (losses1, weights1) = results[(0, global_pool)], results[(1, global_pool)]
        assert len(losses0) == len(losses1) == 3 and losses0 != losses1  # different batches per rank
        assert torch.equal(weights0, weights1)  # gradients were averaged over the ranks at every step
