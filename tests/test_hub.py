"""torch.hub entry points through ``torch.hub.load(repo_dir, name, source="local")``."""

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
from checkpoint_files import TINY_CONFIG, tiny_model, write_official_checkpoint

import capi_backbones.hub as hub
from capi_backbones.models import ARCHITECTURES, CapiModel

REPO_DIR = str(Path(__file__).resolve().parents[1])
ENTRY_POINTS = ["capi_vitl14", "capi_vitl14_lvd", "capi_vitl14_p205", "capi_vitl14_in22k", "capi_vitl14_in1k",
                "capi_vits14", "capi_vitb14"]  # fmt: skip


def load_hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO_DIR) / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hubconf_lists_entry_points_and_dependencies():
    hubconf = load_hubconf()
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entries) == sorted(ENTRY_POINTS)  # what torch.hub.list shows
    assert all(getattr(hubconf, name) is getattr(hub, name) for name in ENTRY_POINTS)
    assert hubconf.dependencies[:2] == ["torch", "safetensors"]
    assert not {"timm", "huggingface_hub", "sklearn"} & set(hubconf.dependencies)  # optional for the entry points
    assert "def " not in (Path(REPO_DIR) / "hubconf.py").read_text()  # hubconf only imports


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_points_are_keyword_only_with_one_line_docstrings(name):
    entry = getattr(hub, name)
    kinds = {p.kind for p in inspect.signature(entry).parameters.values()}
    assert kinds <= {inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD}
    assert entry.__doc__ and "\n" not in entry.__doc__.strip()


def test_vits14_real_forward():
    torch.manual_seed(0)
    model = torch.hub.load(REPO_DIR, "capi_vits14", source="local", pretrained=False)
    assert isinstance(model, CapiModel) and model.config == ARCHITECTURES["capi_vits14"]
    with torch.no_grad():
        pooled, registers, feature_map = model.eval()(torch.randn(1, 3, 28, 42))
    assert pooled.shape == (1, 384) and registers.shape == (1, 16, 384) and feature_map.shape == (1, 2, 3, 384)


@pytest.mark.parametrize("name", ["capi_vitl14", "capi_vitb14"])
def test_large_architectures_on_meta(name):
    model = torch.hub.load(REPO_DIR, name, source="local", pretrained=False, device="meta")
    assert model.config == ARCHITECTURES[name] and model.registers.is_meta


def test_tiny_override_and_local_weights(tmp_path):
    model = torch.hub.load(REPO_DIR, "capi_vits14", source="local", pretrained=False, **TINY_CONFIG.to_dict())
    assert model.config == TINY_CONFIG
    reference = tiny_model()
    write_official_checkpoint(reference, tmp_path / "mine.pth")
    loaded = hub.capi_vits14(pretrained=True, weights=str(tmp_path / "mine.pth"), **TINY_CONFIG.to_dict())
    assert torch.equal(loaded.registers, reference.registers)


@pytest.mark.parametrize("name", ["capi_vits14", "capi_vitb14"])
def test_no_released_weights_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"No pretrained weights were released for {name}.*pretrained=False.*weights="):
        torch.hub.load(REPO_DIR, name, source="local", pretrained=True)
    with pytest.raises(ValueError, match="No pretrained weights were released"):
        getattr(hub, name)(pretrained=True, weights="lvd")


def test_weights_enum():
    assert [w.value for w in hub.Weights] == ["lvd", "p205", "in22k", "in1k"]
    assert inspect.signature(hub.capi_vitl14).parameters["weights"].default is hub.Weights.LVD


@pytest.fixture
def mine(tmp_path):
    reference = tiny_model()
    write_official_checkpoint(reference, tmp_path / "mine.pth")
    return reference, str(tmp_path / "mine.pth")


@pytest.mark.parametrize("pretrained", [None, True])
def test_weights_path_is_loaded_through_torch_hub(mine, pretrained):
    """torch.hub.load(..., "capi_vits14", weights=PATH) used to ignore PATH and return random weights."""
    reference, path = mine
    kwargs = {} if pretrained is None else {"pretrained": pretrained}
    model = torch.hub.load(REPO_DIR, "capi_vits14", source="local", weights=path, **kwargs, **TINY_CONFIG.to_dict())
    assert torch.equal(model.registers, reference.registers) and not model.training
    for entry in (hub.capi_vitb14, hub.capi_vitl14):  # every entry point with a weights argument
        assert torch.equal(entry(weights=path, **TINY_CONFIG.to_dict()).registers, reference.registers)


@pytest.mark.parametrize("name", ["capi_vits14", "capi_vitb14", "capi_vitl14"])
def test_pretrained_false_with_a_weights_path_is_an_error(mine, name):
    with pytest.raises(ValueError, match="pretrained=False contradicts weights="):
        getattr(hub, name)(pretrained=False, weights=mine[1])


@pytest.mark.parametrize("name", ["capi_vitl14_lvd", "capi_vitl14_p205", "capi_vitl14_in22k", "capi_vitl14_in1k"])
def test_release_entry_points_refuse_a_weights_argument(mine, name):
    with pytest.raises(ValueError, match='loads the .* release; for another checkpoint use .*weights="/path/to'):
        getattr(hub, name)(weights=mine[1])


def test_without_weights_small_entry_points_stay_random():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        a = hub.capi_vits14(**TINY_CONFIG.to_dict())
    assert a.training and not torch.equal(a.registers, tiny_model(seed=1).registers)


@pytest.mark.parametrize("name", ["capi_vits14", "capi_vitb14"])
def test_a_release_tag_without_weights_is_an_error_not_random(name):
    with pytest.raises(ValueError, match=f"No pretrained weights were released for {name}"):
        getattr(hub, name)(weights="lvd")
