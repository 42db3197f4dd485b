"""runtime.precision: native bf16 detected at run time, what "auto" chooses on each kind of device, the warnings and
errors, and the precision the FeatureExtractor runs and records."""

import json
import logging
import platform
from pathlib import Path

import pytest
import torch

from capi_backbones.features import FeatureExtractor
from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.runtime import precision as P

TINY = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=48, pred_depth=2, pred_num_heads=2)


@pytest.fixture(autouse=True)
def fresh_log():
    P._logged.clear()
    P.cpu_bf16_support.cache_clear()
    yield
    P._logged.clear()
    P.cpu_bf16_support.cache_clear()


def cpu(monkeypatch, unit):
    """Pretend the CPU's native bf16 unit is ``unit`` (None: emulated)."""
    monkeypatch.setattr(P, "cpu_bf16_support", lambda: unit)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or platform.machine() != "x86_64", reason="Linux x86 only")
def test_detection_agrees_with_the_kernel_flags():
    text = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    unit = P.cpu_bf16_support()
    assert (unit is not None) == bool({"amx_bf16", "avx512_bf16"} & flags)
    assert (unit == "AMX-BF16") == ("amx_bf16" in flags)
    assert P.native_bf16("cpu") == (unit is not None)


def test_a_unit_counts_only_when_every_source_says_so(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(P, "_CPUINFO", cpuinfo)
    monkeypatch.setattr(P._cpuinfo_flags, "__defaults__", (cpuinfo,))
    monkeypatch.setattr(P, "_torch_cpu_check", lambda name: name == "_is_avx512_bf16_supported")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert P.cpu_bf16_support() == "AVX512-BF16"
    P.cpu_bf16_support.cache_clear()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f\n")  # the kernel disagrees: not native
    assert P.cpu_bf16_support() is None
    P.cpu_bf16_support.cache_clear()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: amx_bf16 amx_tile\n")  # torch says no AMX tiles: not native
    assert P.cpu_bf16_support() is None
    P.cpu_bf16_support.cache_clear()
    monkeypatch.setattr(P, "_torch_cpu_check", lambda name: None)  # an older torch: the flags decide
    assert P.cpu_bf16_support() == "AMX-BF16"
    P.cpu_bf16_support.cache_clear()
    cpuinfo.unlink()  # neither source: never assumed
    assert P.cpu_bf16_support() is None


def test_auto_chooses_bf16_where_native_and_says_so_once(monkeypatch, caplog):
    cpu(monkeypatch, "AMX-BF16")
    with caplog.at_level(logging.INFO, logger=P.__name__):
        assert P.resolve_precision("auto", "cpu") == "bf16"
        assert P.resolve_precision("auto", torch.device("cpu")) == "bf16"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "AMX-BF16" in record.message
    assert "precision='fp32'" in record.message and "--precision fp32" in record.message
    assert P.autocast_dtype("bf16") is torch.bfloat16 and P.autocast_dtype("fp32") is None


def test_auto_is_fp32_without_native_bf16(monkeypatch, caplog):
    cpu(monkeypatch, None)
    with caplog.at_level(logging.INFO, logger=P.__name__):
        assert P.resolve_precision("auto", "cpu") == "fp32"
    assert "no native bf16" in caplog.text


def test_cuda_follows_the_device_capability(monkeypatch):
    monkeypatch.setattr(P, "cuda_bf16_support", lambda device: True)
    assert P.resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(P, "cuda_bf16_support", lambda device: False)  # pre-Ampere: bf16 is emulated
    assert P.resolve_precision("auto", "cuda:0") == "fp32"
    assert P.resolve_precision("fp16", "cuda") == "fp16"


def test_bf16_is_allowed_on_any_cpu_with_a_warning_where_emulated(monkeypatch, caplog):
    cpu(monkeypatch, None)
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.resolve_precision("bf16", "cpu") == "bf16"
    assert "emulated" in caplog.text
    caplog.clear()
    cpu(monkeypatch, "AVX512-BF16")
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.resolve_precision("bf16", "cpu") == "bf16"
        assert P.resolve_precision("fp32", "cpu") == "fp32"
    assert not caplog.records


def test_bad_values_are_one_clear_line(monkeypatch):
    with pytest.raises(ValueError, match=r"^precision must be one of auto, fp32, bf16, fp16; got 'fp8'\.$"):
        P.resolve_precision("fp8", "cpu")
    monkeypatch.setattr(P, "_cpu_has", lambda flag, check: False)
    with pytest.raises(ValueError, match="'fp16' needs CUDA or a CPU with AMX-FP16") as error:
        P.resolve_precision("fp16", "cpu")
    assert "\n" not in str(error.value)
    monkeypatch.setattr(P, "_cpu_has", lambda flag, check: flag == "amx_fp16")
    assert P.resolve_precision("fp16", "cpu") == "fp16"


@pytest.mark.parametrize(("unit", "expected"), [("AMX-BF16", "bf16"), (None, "fp32")])
def test_extractor_runs_and_records_the_chosen_precision(monkeypatch, tmp_path, unit, expected):
    cpu(monkeypatch, unit)
    torch.manual_seed(0)
    model = CapiModel(TINY).eval()
    extractor = FeatureExtractor(model, image_size=28, device="cpu")
    assert extractor.autocast_dtype == P.autocast_dtype(expected)
    seen = []
    extractor.model.encoder.blocks[0].residual2.fn.fc1.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    image = torch.rand(3, 40, 40)
    from torchvision.transforms.functional import to_pil_image

    path = tmp_path / "a.png"
    to_pil_image(image).save(path)
    extractor.extract_to_disk(path, tmp_path / "out", progress=False)
    assert seen == [torch.bfloat16 if expected == "bf16" else torch.float32]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["settings"]["precision"] == expected
    other = "fp32" if expected == "bf16" else "bf16"  # resuming with another precision would mix features
    with pytest.raises(ValueError, match=f"precision: '{expected}' vs '{other}'"):
        FeatureExtractor(model, image_size=28, device="cpu", precision=other).extract_to_disk(
            path, tmp_path / "out", progress=False
        )


def _photos(tmp_path, n=3) -> list[Path]:
    """Real photos (skimage), square-cropped, as files."""
    from PIL import Image
    from skimage import data

    paths = []
    for name in ("astronaut", "chelsea", "coffee")[:n]:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        side = min(image.size)
        paths.append(tmp_path / f"{name}.png")
        image.crop((0, 0, side, side)).resize((56, 56)).save(paths[-1])
    return paths


def test_bf16_runs_a_bf16_copy_and_leaves_the_given_model_as_it_is(monkeypatch, tmp_path):
    """bf16 runs bf16 weights (autocast over fp32 weights converts every weight at every forward pass). A model the
    caller passes is not converted, moved or put in eval mode: the extractor runs a copy; fp32 runs the model
    itself. The copy's features stay within bf16's usual 1e-2 relative difference to fp32 on photos."""
    cpu(monkeypatch, "AVX512-BF16")
    torch.manual_seed(0)
    model = CapiModel(TINY).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = FeatureExtractor(model, image_size=56, device="cpu", precision="fp32")
    assert fp32.model is model and fp32.autocast_dtype is None
    model.train()
    bf16 = FeatureExtractor(model, image_size=56, device="cpu", precision="bf16")
    assert bf16.model is not model and type(bf16.model) is type(model)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16} and not bf16.model.training
    assert all(not p.requires_grad for p in bf16.model.parameters())
    assert model.training and {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for name, tensor in bf16.model.state_dict().items():  # the copy holds the caller's weights, rounded to bf16
        assert torch.equal(tensor, before[name].to(torch.bfloat16)), name
    photos = _photos(tmp_path)
    reference, low = fp32(photos), bf16(photos)
    for field in ("patch_features", "pooled", "registers"):
        a, b = getattr(low, field), getattr(reference, field)
        assert a.dtype == torch.float32
        assert 0 < float((a - b).norm() / b.norm()) < 3e-2, field


def test_bf16_weights_load_directly_in_bf16_and_match_the_copy_of_a_given_model(monkeypatch, tmp_path):
    """A checkpoint loaded by the extractor in bf16 gives the same weights (so the same fingerprint, features and
    index settings) as the bf16 copy of that checkpoint loaded in fp32 by the caller: an extraction can resume
    across the two doors."""
    from capi_backbones.features.extractor import weights_fingerprint
    from capi_backbones.pretrained import from_pretrained, save_safetensors

    cpu(monkeypatch, "AVX512-BF16")
    torch.manual_seed(0)
    save_safetensors(CapiModel(TINY), tmp_path / "w.safetensors")
    loaded = FeatureExtractor(weights=tmp_path / "w.safetensors", image_size=56, device="cpu", precision="bf16")
    copied = FeatureExtractor(
        from_pretrained(tmp_path / "w.safetensors"), image_size=56, device="cpu", precision="bf16"
    )
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert weights_fingerprint(loaded.model) == weights_fingerprint(copied.model)
    photos = _photos(tmp_path)
    assert torch.equal(loaded(photos).patch_features, copied(photos).patch_features)
    settings = loaded._settings(pooled=True)
    assert settings["weights_dtype"] == "bfloat16" and settings["precision"] == "bf16"
    assert "weights_dtype" not in FeatureExtractor(
        weights=tmp_path / "w.safetensors", image_size=56, device="cpu", precision="fp32"
    )._settings(pooled=True)  # fp32 indexes read as before


def test_an_index_of_the_older_bf16_autocast_path_is_not_resumed_with_bf16_weights(monkeypatch, tmp_path):
    """Earlier versions ran bf16 as autocast over fp32 weights and recorded precision 'bf16' with the fp32
    fingerprint and no weights dtype. bf16 weights give other numbers, so such an index must not be extended."""
    from capi_backbones.features.extractor import weights_fingerprint

    cpu(monkeypatch, "AVX512-BF16")
    torch.manual_seed(0)
    model = CapiModel(TINY)
    first, second = _photos(tmp_path, 2)
    FeatureExtractor(model, image_size=56, device="cpu", precision="bf16").extract_to_disk(
        first, tmp_path / "out", progress=False
    )
    index_path = tmp_path / "out" / "index.json"
    index = json.loads(index_path.read_text())
    assert index["settings"]["weights_dtype"] == "bfloat16"
    del index["settings"]["weights_dtype"]  # what the autocast path wrote
    index["settings"]["weights_fingerprint"] = weights_fingerprint(model)
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weights_dtype: None vs 'bfloat16'"):
        FeatureExtractor(model, image_size=56, device="cpu", precision="bf16").extract_to_disk(
            [first, second], tmp_path / "out", progress=False
        )
