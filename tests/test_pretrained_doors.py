"""One resolver and one load path behind every door: from_pretrained, create_model, torch.hub (hub.py and
hubconf.py), CapiHubModel, FeatureExtractor and the CLI. A capi_vits14 checkpoint holding one NaN is refused by
each; a weights entry added to the registry shows up in every listing with no other edit."""

import argparse
import ast
import dataclasses
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from checkpoint_files import TINY_CONFIG, tiny_model, write_official_checkpoint
from safetensors.torch import save_file

import capi_backbones.hub as hub
import capi_backbones.pretrained.sources as sources
from capi_backbones.features import FeatureExtractor
from capi_backbones.models import ARCHITECTURES, CapiModel
from capi_backbones.pretrained import (
    CapiHubModel,
    CheckpointError,
    LoadOptions,
    create_model,
    from_pretrained,
    list_models,
    load_checkpoint_into,
    resolve_model_spec,
    resolve_source,
)

REPO_DIR = str(Path(__file__).resolve().parents[1])
NAN = "holds NaN or Inf values"


@pytest.fixture(scope="module")
def nan_vits14(tmp_path_factory):
    """A full-size capi_vits14 state dict (zeros, official layout) with one NaN, as .pth and as a
    save_pretrained-style folder."""
    folder = tmp_path_factory.mktemp("nan")
    shapes = {k: v.shape for k, v in CapiModel(ARCHITECTURES["capi_vits14"], device="meta").state_dict().items()}
    tensors = {k: torch.zeros(s) for k, s in shapes.items()}
    tensors["encoder.blocks.3.residual2.fn.fc1.weight"][5, 7] = float("nan")
    torch.save({"backbone." + k: v for k, v in tensors.items()}, folder / "nan.pth")
    (folder / "saved").mkdir()
    save_file(tensors, str(folder / "saved" / "model.safetensors"))
    return folder


def test_from_pretrained_refuses_nan(nan_vits14):
    with pytest.raises(CheckpointError, match=NAN):
        from_pretrained(nan_vits14 / "nan.pth")
    with pytest.raises(CheckpointError, match=NAN):
        from_pretrained(str(nan_vits14 / "saved"))


def test_torch_hub_local_refuses_nan(nan_vits14):
    with pytest.raises(CheckpointError, match=NAN):
        torch.hub.load(REPO_DIR, "capi_vits14", source="local", weights=str(nan_vits14 / "nan.pth"))


def test_capi_hub_model_refuses_nan(nan_vits14):
    with pytest.raises(CheckpointError, match=NAN):
        CapiHubModel.from_pretrained(nan_vits14 / "saved")


@pytest.mark.parametrize("model", ["capi_vits14", None])
def test_feature_extractor_refuses_nan(nan_vits14, model):
    with pytest.raises(CheckpointError, match=NAN):
        FeatureExtractor(model, weights=nan_vits14 / "nan.pth", device="cpu")


def test_cli_refuses_nan(nan_vits14):
    from capi_backbones.cli.model_options import build_extractor, load_model

    args = argparse.Namespace(
        model="capi_vits14", weights=str(nan_vits14 / "nan.pth"), random_init=False, device="cpu", image_size=None,
        batch_size=1,
    )  # fmt: skip
    for door in (build_extractor, load_model):
        with pytest.raises(CheckpointError, match=NAN):
            door(args)


def test_checked_load_into_an_existing_model(nan_vits14):
    model = CapiModel(ARCHITECTURES["capi_vits14"], device="meta").to_empty(device="cpu")
    with torch.no_grad():  # to_empty leaves whatever the memory held (NaN included): make it comparable
        for tensor in model.state_dict().values():
            tensor.zero_()
    with pytest.raises(CheckpointError, match=NAN):
        load_checkpoint_into(model, nan_vits14 / "nan.pth")
    before = model.registers.clone()
    with pytest.raises(CheckpointError, match=NAN):  # a state dict too; nothing is copied before the checks pass
        load_checkpoint_into(model, torch.load(nan_vits14 / "nan.pth"))
    assert torch.equal(model.registers, before)


def test_checked_load_into_checks_keys_dtypes_and_format(tmp_path):
    reference = tiny_model()
    model = CapiModel(TINY_CONFIG)
    path = tmp_path / "weights.bin"  # the name says nothing: the format is told by the bytes
    write_official_checkpoint(reference, path)
    assert load_checkpoint_into(model, path) is model
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    state = reference.state_dict()
    with pytest.raises(CheckpointError, match="1 missing"):
        load_checkpoint_into(model, {k: v for k, v in state.items() if k != "registers"})
    with pytest.raises(CheckpointError, match="1 unexpected"):
        load_checkpoint_into(model, {**state, "encoder.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not floating point"):
        load_checkpoint_into(model, {**state, "registers": state["registers"].to(torch.int32)})
    payload = tmp_path / "payload.safetensors"
    payload.write_bytes(b"<html>not weights</html>")
    with pytest.raises(CheckpointError, match="an HTML page"):
        load_checkpoint_into(model, payload)


@pytest.mark.parametrize(
    ("source", "kind", "arch"),
    [
        ("capi_vitl14", "weights", "capi_vitl14"),
        ("capi_vitl14_p205", "weights", "capi_vitl14"),
        ("capi_vitl14.in1k", "weights", "capi_vitl14"),
        ("capi_vits14", "architecture", "capi_vits14"),
        ("https://host/a/model.pth", "url", None),
        ("hf-hub:owner/repo@v2", "hf-hub", None),
    ],
)
def test_resolve_source_decides_once(source, kind, arch):
    resolved = resolve_source(source)
    assert (resolved.kind, resolved.arch) == (kind, arch)


def test_resolve_source_paths(tmp_path):
    assert resolve_source(tmp_path).kind == "path"
    assert resolve_source(str(tmp_path)).kind == "path"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(tmp_path / "capi_vitl14_lvd")  # a Path is never a registered name
    with pytest.raises(ValueError, match="Unknown model or weights 'capi_vitx'"):
        resolve_source("capi_vitx")


def test_architecture_name_has_nothing_to_load():
    with pytest.raises(ValueError, match="capi_vits14' is an architecture without released weights"):
        from_pretrained("capi_vits14")
    with pytest.raises(ValueError, match="is an architecture, not a set of weights"):
        resolve_model_spec("capi_vits14")


def test_one_options_object():
    options = LoadOptions(arch="capi_vits14", dtype="bf16")
    assert dataclasses.is_dataclass(options) and options.replace(strict=False).arch == "capi_vits14"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.strict = False
    with pytest.raises(ValueError, match="either options=LoadOptions"):
        from_pretrained("x.pth", arch="capi_vits14", options=options)


def test_options_object_reaches_the_load(tmp_path):
    write_official_checkpoint(tiny_model(), tmp_path / "tiny.pth")
    model = from_pretrained(tmp_path / "tiny.pth", options=LoadOptions(dtype=torch.bfloat16))
    assert model.registers.dtype == torch.bfloat16


def test_random_init_spec_matches_create_model():
    torch.manual_seed(0)
    a = resolve_model_spec("capi_vits14", random_init=True).load()
    torch.manual_seed(0)
    b = create_model("capi_vits14")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert resolve_model_spec("capi_vitl14_p205", random_init=True).random_init == "capi_vitl14"


@pytest.fixture
def new_release(monkeypatch, tmp_path):
    """A release added the way a maintainer adds one: a single registry entry (here for ViT-S)."""
    weights = dataclasses.replace(
        sources.WEIGHTS["capi_vitl14_lvd"], name="capi_vits14_lvd", arch="capi_vits14", file_name="capi_vits14_lvd.pth"
    )
    monkeypatch.setitem(sources.WEIGHTS, weights.name, weights)
    downloads = []

    def fake_download(url, *, file_name=None, **kwargs):
        downloads.append((url, file_name))
        write_official_checkpoint(tiny_model(), tmp_path / "tiny.pth")
        return tmp_path / "tiny.pth"

    monkeypatch.setattr(sources, "download_url", fake_download)
    return weights, downloads


def hubconf_entries() -> list[str]:
    """What ``torch.hub.list`` shows for this repo (it only takes GitHub repos; same rule, local hubconf.py)."""
    spec = importlib.util.spec_from_file_location("hubconf", Path(REPO_DIR) / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")]


def test_new_registry_entry_appears_everywhere(new_release, capsys):
    weights, downloads = new_release
    assert "capi_vits14_lvd" in hub.entry_point_names() and "capi_vits14_lvd" in dir(hub)
    assert "capi_vits14_lvd" in hubconf_entries()  # what torch.hub.list shows
    assert "capi_vits14_lvd" in list_models() and "capi_vits14" in list_models(pretrained=True)
    assert resolve_source("capi_vits14").weights == weights  # the architecture name now means its weights
    from capi_backbones.cli.model_commands import run_list

    run_list(argparse.Namespace(json=True))
    listed = json.loads(capsys.readouterr().out)
    assert "capi_vits14_lvd" in [w["name"] for w in listed["weights"]]
    # the new entry point loads the new release, pretrained by default (the tiny stand-in through arch overrides)
    model = torch.hub.load(REPO_DIR, "capi_vits14_lvd", source="local", trust_repo=True, **TINY_CONFIG.to_dict())
    assert downloads == [(weights.url, "capi_vits14_lvd.pth")] and model.pretrained_weights == weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # released weights now: no random-weights warning
        hub.entry_point("capi_vits14")(**TINY_CONFIG.to_dict())
    assert len(downloads) == 2


def test_entry_points_are_the_registry():
    names = set(hub.entry_point_names())
    assert names == set(ARCHITECTURES) | set(sources.WEIGHTS)
    assert hub.entry_points()["capi_vitl14_in22k"] is hub.capi_vitl14_in22k  # stable objects


def test_hub_arch_keyword_is_a_clear_error(tmp_path):
    write_official_checkpoint(tiny_model(), tmp_path / "tiny.pth")
    for call in (
        lambda: hub.capi_vits14(arch="capi_vitb14"),
        lambda: hub.capi_vits14(weights=str(tmp_path / "tiny.pth"), arch="capi_vitb14"),
        lambda: hub.capi_vitl14_p205(arch="capi_vitb14"),
    ):
        with pytest.raises(ValueError, match="arch= is not an option of torch.hub entry points"):
            call()


def test_hub_random_weights_warn_once_with_the_fix():
    with pytest.warns(UserWarning, match=r'RANDOM weights.*torch.hub.load\(\.\.\., weights="/path/to/') as record:
        torch.hub.load(REPO_DIR, "capi_vits14", source="local", trust_repo=True, **TINY_CONFIG.to_dict())
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hub.capi_vits14(pretrained=False, **TINY_CONFIG.to_dict())  # random weights asked for: no warning


def _imports(path: Path) -> set[str]:
    """Modules of capi_backbones.pretrained that ``path`` imports, at any depth of the file (function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capi_backbones.pretrained."):
            found.add(node.module.rsplit(".", 1)[1])
    return found


def test_pretrained_modules_import_without_cycles():
    import capi_backbones.pretrained

    folder = Path(capi_backbones.pretrained.__file__).parent  # the package under test (CI: the installed wheel)
    graph = {p.stem: _imports(p) for p in folder.glob("*.py") if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join([*path, module])}"
        state[module] = "open"
        for dep in graph.get(module, ()):
            visit(dep, [*path, module])
        state[module] = "done"

    for module in graph:
        visit(module, [])
    assert "local" in graph["hub_model"] and "local" in graph["loader"]


PUBLIC_API = {
    "WEIGHTS", "CapiHubModel", "CheckpointError", "CheckpointInfo", "DownloadError", "LoadOptions", "ModelSpec",
    "ParameterCounts", "PretrainedWeights", "ResolvedSource", "StateDictDiff", "checkpoint_filter_fn",
    "compare_state_dict", "create_model", "from_pretrained", "get_weights", "infer_config", "inspect_checkpoint",
    "list_models", "load_checkpoint_into", "model_config", "read_checkpoint", "resolve_model_spec", "resolve_source",
    "save_official_checkpoint", "save_safetensors",
}  # fmt: skip


def test_public_api_is_curated():
    """A name joining or leaving the API is a decision: this list changes with it."""
    import capi_backbones.pretrained as pretrained

    assert set(pretrained.__all__) == PUBLIC_API
    assert all(hasattr(pretrained, name) for name in PUBLIC_API)
    internals = ["release_pages", "sniff_format", "download_url", "load_local", "fetch_checkpoint", "loading_interface"]
    for name in internals:  # plumbing: out of the API, importable for compatibility
        assert name not in pretrained.__all__ and hasattr(pretrained, name)
