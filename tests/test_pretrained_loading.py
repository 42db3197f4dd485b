"""Loading checkpoints that the tests write themselves in the official layout (``backbone.`` prefix plus
``head.*`` keys, as the released files), without prefix, in bf16, as safetensors and as save_pretrained folders.
Outputs are compared with the model that wrote the file (``torch.equal``)."""

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_files import TINY_CONFIG, tiny_model, write_official_checkpoint, write_safetensors_checkpoint
from safetensors import safe_open

import capi_backbones
from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.pretrained import (
    CapiHubModel,
    CheckpointError,
    checkpoint_filter_fn,
    from_pretrained,
    save_official_checkpoint,
    save_safetensors,
)

IMAGE = torch.randn(1, 3, 28, 42, generator=torch.Generator().manual_seed(1))


def assert_same_outputs(a: CapiModel, b: CapiModel) -> None:
    with torch.no_grad():
        for x, y in zip(a(IMAGE), b(IMAGE), strict=True):
            assert torch.equal(x, y)


def assert_loaded_properly(model: CapiModel, dtype=torch.float32) -> None:
    assert isinstance(model, CapiModel) and isinstance(model, CapiHubModel)
    assert not model.training
    for name, param in model.named_parameters():
        assert type(param) is torch.nn.Parameter, name
        assert param.requires_grad, name
        assert param.dtype == dtype and param.device.type == "cpu", name
    assert not any(t.is_meta for t in model.state_dict().values())


@pytest.mark.parametrize("prefix", ["backbone.", ""])
@pytest.mark.parametrize("with_head", [True, False])
def test_official_layout_loads_and_gives_identical_outputs(tmp_path, caplog, prefix, with_head):
    model = tiny_model()
    path = tmp_path / "official.pth"
    write_official_checkpoint(model, path, prefix=prefix, with_head=with_head)
    with caplog.at_level(logging.INFO, logger="capi_backbones"):
        loaded = capi_backbones.from_pretrained(path)  # architecture inferred from the shapes
    assert loaded.config == TINY_CONFIG
    assert_loaded_properly(loaded)
    assert_same_outputs(model, loaded)
    dropped_logged = "Dropped 4 non-backbone keys: head.* (4)" in caplog.text
    assert dropped_logged == with_head


def test_bf16_file_gives_fp32_model_with_equal_values(tmp_path, caplog):
    model = tiny_model()
    path = tmp_path / "bf16.pth"
    saved = write_official_checkpoint(model, path, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="capi_backbones"):
        loaded = from_pretrained(path)
    assert_loaded_properly(loaded, torch.float32)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, saved["backbone." + key].float()), key
    assert "Converted 40 tensors from torch.bfloat16 to torch.float32" in caplog.text


def test_dtype_argument_is_respected(tmp_path):
    model = tiny_model()
    write_official_checkpoint(model, tmp_path / "a.pth")
    loaded = from_pretrained(tmp_path / "a.pth", dtype=torch.bfloat16)
    assert_loaded_properly(loaded, torch.bfloat16)
    assert torch.equal(loaded.registers, model.registers.bfloat16())
    with pytest.raises(ValueError, match="Unsupported dtype"):
        from_pretrained(tmp_path / "a.pth", dtype=torch.int8)


def test_loading_builds_on_meta_without_random_init(tmp_path, monkeypatch):
    model = tiny_model()
    write_official_checkpoint(model, tmp_path / "a.pth")

    def no_init(self):
        raise AssertionError("init_weights must not run when loading")

    monkeypatch.setattr(CapiModel, "init_weights", no_init)
    assert_same_outputs(model, from_pretrained(tmp_path / "a.pth"))


def test_loaded_parameters_are_writable_and_do_not_touch_the_file(tmp_path):
    model = tiny_model()
    write_official_checkpoint(model, tmp_path / "a.pth")
    loaded = from_pretrained(tmp_path / "a.pth")
    with torch.no_grad():
        loaded.registers.add_(1.0)  # the file is memory-mapped copy-on-write
    assert torch.equal(from_pretrained(tmp_path / "a.pth").registers, model.registers)


def test_safetensors_round_trip_needs_no_arch(tmp_path):
    config = CapiConfig(embed_dim=48, depth=3, num_heads=3, pred_embed_dim=32, pred_depth=1, pred_num_heads=2)
    model = tiny_model(config)
    path = save_safetensors(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["capi_config"]) == config.to_dict()
    loaded = from_pretrained(path)
    assert loaded.config == config
    assert_same_outputs(model, loaded)


def test_plain_safetensors_without_metadata_is_inferred(tmp_path):
    model = tiny_model()
    write_safetensors_checkpoint(model, tmp_path / "plain.safetensors")
    loaded = from_pretrained(tmp_path / "plain.safetensors")
    assert loaded.config == TINY_CONFIG
    assert_same_outputs(model, loaded)


def test_save_official_checkpoint_layout(tmp_path):
    model = tiny_model()
    save_official_checkpoint(model, tmp_path / "o.pth")
    raw = torch.load(tmp_path / "o.pth", weights_only=True)
    assert sorted(raw) == sorted("backbone." + k for k in model.state_dict())
    assert_same_outputs(model, from_pretrained(tmp_path / "o.pth"))


def test_save_pretrained_folder_round_trip(tmp_path):
    model = capi_backbones.create_model("capi_vits14", **TINY_CONFIG.to_dict())
    model.eval()
    model.save_pretrained(tmp_path / "repo")
    assert {p.name for p in (tmp_path / "repo").iterdir()} >= {"model.safetensors", "config.json"}
    assert json.loads((tmp_path / "repo" / "config.json").read_text()) == {"model_type": "capi"} | TINY_CONFIG.to_dict()
    hub_loaded = CapiHubModel.from_pretrained(tmp_path / "repo", map_location="cpu")  # the mixin's keyword works
    for loaded in (hub_loaded, from_pretrained(tmp_path / "repo")):
        assert_loaded_properly(loaded)
        assert_same_outputs(model, loaded)


def test_saved_folder_is_recognisable_by_hub_tooling(tmp_path):
    """config.json names its model_type; the model card carries the Hub metadata and links the package to its
    own repository, the official CAPI code to facebookresearch/capi."""
    import yaml

    capi_backbones.create_model("capi_vits14", **TINY_CONFIG.to_dict()).save_pretrained(tmp_path / "repo")
    assert json.loads((tmp_path / "repo" / "config.json").read_text())["model_type"] == "capi"
    card = (tmp_path / "repo" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front)
    assert metadata["library_name"] == "capi-backbones" and metadata["pipeline_tag"] == "image-feature-extraction"
    assert {"capi", "vision"} <= set(metadata["tags"])
    assert "[capi-backbones](https://github.com/capi-backbones/capi-backbones)" in body
    assert (
        "(https://github.com/facebookresearch/capi)" in body
        and "[capi-backbones](https://github.com/facebookresearch" not in body
    )
    config_file = tmp_path / "repo" / "config.json"
    config_file.write_text(json.dumps({"model_type": "vit"} | TINY_CONFIG.to_dict()))
    with pytest.raises(CheckpointError, match="model_type is 'vit', not 'capi'"):
        from_pretrained(tmp_path / "repo")
    config_file.write_text(json.dumps(TINY_CONFIG.to_dict()))  # folders written before model_type still load
    assert from_pretrained(tmp_path / "repo").config == TINY_CONFIG


def test_save_pretrained_loading_is_strict(tmp_path):
    """The mixin's default is strict=False; ours reports a config.json that does not match the weights."""
    model = capi_backbones.create_model("capi_vits14", **TINY_CONFIG.to_dict())
    model.save_pretrained(tmp_path / "repo")
    config_file = tmp_path / "repo" / "config.json"
    config_file.write_text(json.dumps(TINY_CONFIG.to_dict() | {"depth": 3}))
    with pytest.raises(CheckpointError, match="disagrees with the config stored in"):
        CapiHubModel.from_pretrained(tmp_path / "repo")
    write_safetensors_checkpoint(model, tmp_path / "repo" / "model.safetensors")  # no config in the metadata
    with pytest.raises(CheckpointError, match="9 missing") as info:
        CapiHubModel.from_pretrained(tmp_path / "repo")
    assert "encoder.blocks.2.residual1.fn.q_proj.weight" in info.value.missing
    config_file.write_text(json.dumps(TINY_CONFIG.to_dict() | {"depth_typo": 3}))
    with pytest.raises(CheckpointError, match="depth_typo"):
        from_pretrained(tmp_path / "repo")


def test_strict_false_only_tolerates_unexpected_keys(tmp_path, caplog):
    model = tiny_model()
    sd = {"backbone." + k: v for k, v in model.state_dict().items()}
    torch.save(sd | {"backbone.encoder.blocks.9.extra": torch.zeros(2)}, tmp_path / "extra.pth")
    with caplog.at_level(logging.WARNING, logger="capi_backbones"):
        loaded = from_pretrained(tmp_path / "extra.pth", arch=TINY_CONFIG, strict=False)
    assert "encoder.blocks.9.extra" in caplog.text
    assert_same_outputs(model, loaded)
    del sd["backbone.registers"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="registers"):
        from_pretrained(tmp_path / "missing.pth", arch=TINY_CONFIG, strict=False)


def test_checkpoint_filter_fn_is_pure():
    model = tiny_model()
    sd = {"backbone." + k: v for k, v in model.state_dict().items()} | {"head.w": torch.zeros(1)}
    before = dict(sd)
    out = checkpoint_filter_fn(sd, TINY_CONFIG)
    assert sd == before and out is not sd
    assert set(out) == set(model.state_dict())
    assert all(out[k] is sd["backbone." + k] for k in out)
    # without prefix: non-backbone roots dropped, unknown keys under backbone modules kept (reported later)
    flat = {k: v for k, v in model.state_dict().items()} | {"head.w": torch.zeros(1), "encoder.extra": torch.zeros(1)}
    assert set(checkpoint_filter_fn(flat, model)) == set(model.state_dict()) | {"encoder.extra"}


def test_create_model(tmp_path):
    model = capi_backbones.create_model("capi_vits14", **(TINY_CONFIG.to_dict() | {"drop_path_rate": 0.1}))
    assert isinstance(model, CapiModel) and model.training and model.config.drop_path_rate == 0.1
    meta = capi_backbones.create_model("capi_vitl14", device="meta")
    assert meta.registers.is_meta
    with pytest.raises(ValueError, match="Unknown model 'capi_vitx'. Available: capi_vitb14"):
        capi_backbones.create_model("capi_vitx")
    with pytest.raises(ValueError, match="Unknown CapiConfig fields"):
        capi_backbones.create_model("capi_vits14", embed_dimm=3)
    with pytest.raises(ValueError, match="No pretrained weights were released for 'capi_vits14'.*pretrained=False"):
        capi_backbones.create_model("capi_vits14", pretrained=True)


def test_list_models():
    assert capi_backbones.list_models() == [
        "capi_vitb14", "capi_vitl14", "capi_vitl14_in1k", "capi_vitl14_in22k", "capi_vitl14_lvd", "capi_vitl14_p205",
        "capi_vits14",
    ]  # fmt: skip
    assert "capi_vits14" not in capi_backbones.list_models(pretrained=True)
    assert capi_backbones.list_models("*p205") == ["capi_vitl14_p205"]


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    model = tiny_model()

    def broken_save(obj, file, *args, **kwargs):  # torch.save is given an open file (a full disk raises OSError)
        file.write(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_official_checkpoint(model, tmp_path / "o.pth")
    assert list(tmp_path.iterdir()) == []


def test_push_to_hub_uploads_safetensors_and_config(monkeypatch):
    """push_to_hub through huggingface_hub.HfApi; the Hub API is replaced so nothing leaves the machine."""
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            uploaded["config"] = json.loads((Path(folder_path) / "config.json").read_text())
            uploaded["card"] = (Path(folder_path) / "README.md").read_text()
            return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = capi_backbones.create_model("capi_vits14", **TINY_CONFIG.to_dict())
    assert model.push_to_hub("someone/capi-tiny").endswith("/commit/0")
    assert {"config.json", "model.safetensors"} <= set(uploaded["files"])
    assert uploaded["config"] == {"model_type": "capi"} | TINY_CONFIG.to_dict()
    assert "hf-hub:someone/capi-tiny" in uploaded["card"]


def test_models_and_layers_do_not_import_pretrained():
    """Imports point one way: constants -> layers -> models -> pretrained."""
    root = Path(capi_backbones.__file__).parent
    for package in ("models", "layers"):
        for source in (root / package).glob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.ImportFrom | ast.Import):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    assert not any(n.startswith(("capi_backbones.pretrained", "capi_backbones.hub")) for n in names), (
                        f"{source} imports {names}"
                    )


IMPORT_PROBE = """
import sys, types
package = types.ModuleType("capi_backbones")  # only this subpackage: the root __init__ is not under test here
package.__path__ = [sys.argv[1]]
sys.modules["capi_backbones"] = package
import capi_backbones.pretrained, capi_backbones.hub
heavy = ("huggingface_hub", "timm", "sklearn", "torchvision")
print(sorted({m.split(".")[0] for m in sys.modules if m.startswith(heavy)}))
"""


def test_pretrained_imports_no_hub_timm_or_sklearn():
    """save_pretrained / push_to_hub / Hub loading keep huggingface_hub out until they are used."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, str(Path(capi_backbones.__file__).parent)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
