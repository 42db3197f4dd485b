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
    model.encoder.blocks[0].residual2.fn.fc1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
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
