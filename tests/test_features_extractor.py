"""FeatureExtractor: the size policy, equality with the model run on hand-preprocessed tensors, batching by size,
input-type and batch-size independence, precision rules and model resolution."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data

from capi_backbones import create_model
from capi_backbones.constants import IMAGENET_MEAN, IMAGENET_STD
from capi_backbones.features import FeatureExtractor, FeatureOutput, Preprocessor
from capi_backbones.models import CapiConfig, CapiModel

TINY = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=48, pred_depth=2, pred_num_heads=2)
ATOL = 1e-5


def tiny_model(seed: int = 0) -> CapiModel:
    torch.manual_seed(seed)
    return CapiModel(TINY).eval()


def small(image: np.ndarray, factor: int = 4) -> np.ndarray:
    return np.ascontiguousarray(image[::factor, ::factor])


def count_forwards(extractor: FeatureExtractor) -> list[tuple]:
    """Record the input shape of every model call (a hook on the patch embedding, the first layer)."""
    calls = []
    extractor.model.patch_embed.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    return calls


def manual_input(rgb: np.ndarray, size: tuple[int, int], *, pillow: bool = False) -> torch.Tensor:
    """The documented preprocessing written out: bicubic antialias resize of the uint8 image (torch's kernel, or
    PIL's), scaling to [0, 1], ImageNet normalisation. Returns (1, 3, H, W)."""
    if pillow:
        resized = torch.from_numpy(np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.BICUBIC)).copy())
        x = resized.permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    else:
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]  # (1, 3, h, w) uint8
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    x = x.double() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).float()


# ---- size policy --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hw, expected",
    [
        ((400, 600), (224, 336)),
        ((600, 400), (336, 224)),
        ((512, 512), (224, 224)),
        ((300, 451), (224, 336)),
        ((8, 8), (224, 224)),
        ((100, 1000), (224, 2240)),
        ((100, 150), (224, 336)),
        ((28, 35), (224, 280)),
    ],
)
def test_shorter_side_is_image_size_and_sides_are_patch_multiples(hw, expected):
    assert Preprocessor(image_size=224).output_size(*hw) == expected


def test_size_policy_keeps_aspect_within_half_a_patch():
    policy = Preprocessor(image_size=126)
    rng = np.random.default_rng(0)
    for height, width in rng.integers(5, 3000, size=(200, 2)):
        out_h, out_w = policy.output_size(int(height), int(width))
        assert out_h % 14 == 0 and out_w % 14 == 0 and min(out_h, out_w) == 126
        long_in, short_in = max(height, width), min(height, width)
        assert abs(max(out_h, out_w) - long_in * 126 / short_in) <= 7  # rounded to the nearest multiple
        assert (out_h >= out_w) == (height >= width) or out_h == out_w


def test_square_option_and_invalid_image_size():
    assert Preprocessor(image_size=224, keep_aspect=False).output_size(400, 600) == (224, 224)
    with pytest.raises(ValueError, match="multiple of the patch size 14.*Nearest valid: 224 or 238"):
        Preprocessor(image_size=230)


def test_resize_matches_pillow_bicubic():
    for rgb in (data.astronaut(), data.coffee()):
        for image_size in (112, 448):
            x = Preprocessor(image_size=image_size)(torch.from_numpy(rgb).permute(2, 0, 1))
            size = tuple(x.shape[-2:])
            pillow = manual_input(rgb, size, pillow=True)[0]
            levels = ((x - pillow) * torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255).abs()
            assert levels.max() < 2.01 and levels.mean() < 0.02  # PIL's antialiased bicubic, to rounding


# ---- numerics -----------------------------------------------------------------------------------------------------
def test_extractor_equals_model_on_hand_preprocessed_tensor():
    model = tiny_model()
    rgb = small(data.chelsea())  # (75, 113, 3)
    extractor = FeatureExtractor(model, image_size=42, precision="fp32")
    out = extractor(Image.fromarray(rgb))
    assert isinstance(out, FeatureOutput)
    size = (42, 70)  # shorter side 42; longer side 113 * 42 / 75 = 63.3 -> nearest multiple of 14 is 70
    assert out.image_size == size and out.grid_size == (3, 5)
    with torch.inference_mode():
        expected = model.forward_features(manual_input(rgb, size))
    torch.testing.assert_close(out.patch_features, expected.patch_features, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(out.pooled, expected.pooled, rtol=1e-4, atol=ATOL)
    torch.testing.assert_close(out.registers, expected.registers, rtol=1e-4, atol=ATOL)
    assert (
        out.patch_features.shape == (1, 3, 5, 64) and out.pooled.shape == (1, 48) and out.registers.shape == (1, 16, 64)
    )
    torch.testing.assert_close(extractor.preprocess(rgb), manual_input(rgb, size)[0], rtol=0, atol=1e-5)
    with torch.inference_mode():  # PIL's resize instead of torch's: the same features up to rounding
        via_pillow = model.forward_features(manual_input(rgb, size, pillow=True))
    torch.testing.assert_close(out.pooled, via_pillow.pooled, rtol=0, atol=0.01)


def test_all_input_types_give_the_same_features(tmp_path):
    rgb = small(data.chelsea())  # (75, 113, 3)
    path = tmp_path / "chelsea.png"
    Image.fromarray(rgb).save(path)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    inputs = [rgb, Image.fromarray(rgb), path, str(path), tensor, tensor[None]]
    extractor = FeatureExtractor(tiny_model(), image_size=28)
    reference = extractor(rgb)
    for image in inputs:
        torch.testing.assert_close(extractor(image).patch_features, reference.patch_features, rtol=0, atol=ATOL)
    floats = extractor(tensor.float() / 255)  # resized as floats, not uint8: equal up to rounding
    torch.testing.assert_close(floats.patch_features, reference.patch_features, rtol=0, atol=0.04)
    batched = extractor([rgb, Image.fromarray(rgb), path, tensor])  # mixed types in one call
    assert len(batched) == 4
    torch.testing.assert_close(batched.pooled, reference.pooled.expand(4, -1), rtol=1e-4, atol=ATOL)


def test_mixed_sizes_are_batched_by_size_in_input_order_and_match_single_runs():
    images = [
        small(data.astronaut()),
        small(data.coffee()),
        small(data.camera()),
        small(data.chelsea()),
        small(data.rocket()),
        small(data.page(), 2),
    ]  # square, landscape, square, landscape, ..., wide
    extractor = FeatureExtractor(tiny_model(), image_size=28, batch_size=2)
    calls = count_forwards(extractor)
    outputs = extractor.extract(images)
    sizes = [o.image_size for o in outputs]
    assert sizes == [(28, 28), (28, 42), (28, 28), (28, 42), (28, 42), (28, 56)]
    assert sorted(c[0] for c in calls) == [1, 1, 2, 2]  # two full batches by size, then the leftovers
    assert len(calls) == 4 and all(len({c[2:]}) == 1 for c in calls)
    for image, output in zip(images, outputs, strict=True):
        alone = extractor(image)
        for name in ("patch_features", "pooled", "registers"):
            torch.testing.assert_close(getattr(output, name), getattr(alone, name), rtol=1e-4, atol=ATOL)


def test_one_batch_of_mixed_sizes_is_refused_with_advice():
    extractor = FeatureExtractor(tiny_model(), image_size=28)
    with pytest.raises(
        ValueError, match=r"different processed sizes \(28x28 and 28x42.*extract\(images\).*keep_aspect"
    ):
        extractor([small(data.astronaut()), small(data.coffee())])
    square = FeatureExtractor(tiny_model(), image_size=28, keep_aspect=False)
    assert square([small(data.astronaut()), small(data.coffee())]).patch_features.shape == (2, 2, 2, 64)


def test_batch_size_does_not_change_results():
    images = [small(data.astronaut(), s) for s in (4, 5, 6, 7, 8)]
    one = FeatureExtractor(tiny_model(), image_size=28, batch_size=1)(images)
    three = FeatureExtractor(tiny_model(), image_size=28, batch_size=3)(images)
    for name in ("patch_features", "pooled", "registers"):
        torch.testing.assert_close(getattr(one, name), getattr(three, name), rtol=1e-4, atol=ATOL)


def test_patch_features_only_runs_no_predictor():
    extractor = FeatureExtractor(tiny_model(), image_size=28)
    ran = []
    extractor.model.decoder.blocks[0].register_forward_hook(lambda *args: ran.append(1))
    patches = extractor.patch_features([small(data.astronaut())] * 2)
    assert patches.shape == (2, 2, 2, 64) and not ran
    assert extractor([small(data.astronaut())], pooled=False).pooled is None and not ran
    full = extractor([small(data.astronaut())] * 2)
    assert ran and torch.allclose(full.patch_features, patches, atol=ATOL)


def test_worker_processes_give_the_same_results():
    images = [small(data.astronaut()), small(data.coffee()), small(data.camera())]
    serial = FeatureExtractor(tiny_model(), image_size=28).extract(images)
    parallel = FeatureExtractor(tiny_model(), image_size=28, num_workers=1).extract(images)
    for a, b in zip(serial, parallel, strict=True):
        torch.testing.assert_close(a.patch_features, b.patch_features, rtol=0, atol=ATOL)


def test_unreadable_image_raises_in_memory_naming_it(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    extractor = FeatureExtractor(tiny_model(), image_size=28)
    with pytest.raises(OSError, match="broken.png"):
        extractor([small(data.astronaut()), tmp_path / "broken.png"])


# ---- settings -----------------------------------------------------------------------------------------------------
def test_cpu_runs_fp32_when_asked_and_refuses_unknown_precision():  # the rules: tests/test_precision.py
    extractor = FeatureExtractor(tiny_model(), device="cpu", precision="fp32")
    assert extractor.autocast_dtype is None and extractor.device.type == "cpu"
    assert extractor(small(data.astronaut())).patch_features.dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be"):
        FeatureExtractor(tiny_model(), precision="fp8")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        FeatureExtractor(tiny_model(), batch_size=0)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        FeatureExtractor(tiny_model(), image_size=100)
    with pytest.raises(ValueError, match="image_size 99999998 is larger than 7168"):
        FeatureExtractor(tiny_model(), image_size=99999998)  # a multiple of 14: refused before any allocation
    with pytest.raises(TypeError, match="model must be"):
        FeatureExtractor(42)
    with pytest.raises(ValueError, match="device=gpu is not a device"):
        FeatureExtractor(tiny_model(), device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            FeatureExtractor(tiny_model(), device="cuda")


def test_bare_architecture_name_needs_weights():
    with pytest.raises(ValueError, match="architecture, not a set of weights.*weights=PATH.*create_model"):
        FeatureExtractor("capi_vits14")
    with pytest.raises(ValueError, match="either a CapiModel or weights"):
        FeatureExtractor(tiny_model(), weights="x.pth")


def test_architecture_name_with_local_weights(tmp_path):
    model = tiny_model(seed=3)
    path = tmp_path / "tiny.pth"
    torch.save({f"backbone.{k}": v for k, v in model.state_dict().items()}, path)  # the official layout
    extractor = FeatureExtractor(weights=path)
    image = small(data.astronaut())
    reference = FeatureExtractor(model, image_size=28)(image)
    torch.testing.assert_close(FeatureExtractor(weights=path, image_size=28)(image).pooled, reference.pooled)
    assert extractor.model_description == str(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        FeatureExtractor(weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError):  # CheckpointError: a tiny checkpoint is not capi_vits14
        FeatureExtractor("capi_vits14", weights=path)
    assert FeatureExtractor(create_model("capi_vits14")).model.embed_dim == 384  # random init, on purpose


def test_many_sizes_run_early_to_bound_memory(monkeypatch):
    from capi_backbones.features import extractor as extractor_module

    monkeypatch.setattr(extractor_module, "MAX_PENDING_BATCHES", 1)  # at most batch_size images wait
    square, wide, tall = small(data.astronaut()), small(data.coffee()), small(data.coffee()).transpose(1, 0, 2)
    images = [square, wide, square, tall, square]
    extractor = FeatureExtractor(tiny_model(), image_size=28, batch_size=3)
    calls = count_forwards(extractor)
    outputs = extractor.extract(images)
    assert [c[0] for c in calls] == [2, 1, 1, 1]  # without the bound: [3, 1, 1]
    for image, output in zip(images, outputs, strict=True):
        torch.testing.assert_close(output.pooled, extractor(image).pooled, rtol=1e-4, atol=ATOL)


def test_timm_created_model_gives_the_native_features():
    import timm
    from skimage import data

    import capi_backbones.timm  # noqa: F401  (registers the models with timm)
    from capi_backbones import FeatureExtractor, create_model

    torch.manual_seed(0)
    native = create_model("capi_vits14", depth=2, pred_depth=1).eval()
    timm_model = timm.create_model("capi_vits14", pretrained=False, depth=2, pred_depth=1).eval()
    timm_model.load_state_dict(native.state_dict())
    image = data.astronaut()[::4, ::4]
    expected = FeatureExtractor(native, image_size=56)(image)
    got = FeatureExtractor(timm_model, image_size=56)(image)
    assert torch.equal(got.patch_features, expected.patch_features)
    assert torch.equal(got.pooled, expected.pooled)
