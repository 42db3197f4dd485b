"""Every timm door reads CAPI checkpoints through checked code: ``pretrained_cfg_overlay=dict(file=...)`` (the
package's loader: format told by the bytes, no pickle executed), ``checkpoint_path=`` / ``load_checkpoint`` /
``model.load_state_dict`` (timm's weights-only read, then ``checkpoint_filter_fn``'s checks). A pickle whose
``__reduce__`` writes a marker file runs nothing; NaN/Inf and integer weights are refused; official checkpoints load
through each door."""

import pickle

import pytest
import timm
import torch
from checkpoint_files import tiny_model, write_official_checkpoint, write_safetensors_checkpoint

import capi_backbones.timm  # noqa: F401  (registers the models)
from capi_backbones.pretrained import CheckpointError

TINY_KWARGS = dict(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=64, pred_depth=2, pred_num_heads=2)


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint would do with any code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious_files(tmp_path):
    """A zip (torch.save) and a legacy pickle checkpoint whose unpickling creates tmp_path/marker."""
    marker = tmp_path / "marker"
    state = {f"backbone.{k}": v for k, v in tiny_model().state_dict().items()}
    state["backbone.registers"] = Payload(marker)
    zipped, legacy = tmp_path / "evil.pth", tmp_path / "evil_legacy.pth"
    torch.save(state, zipped)
    legacy.write_bytes(pickle.dumps(state, protocol=2))
    pickle.loads(legacy.read_bytes())  # the payload is real: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    return marker, (zipped, legacy)


def create(**kwargs):
    return timm.create_model("capi_vits14", **TINY_KWARGS, **kwargs).eval()


def test_malicious_pickle_runs_nothing_through_any_door(tmp_path):
    marker, files = malicious_files(tmp_path)
    for path in files:
        with pytest.raises(CheckpointError, match="Python objects other than tensors|could not be read"):
            create(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        # timm reads with weights_only=True (its default since 1.0.26, the declared minimum), which refuses
        with pytest.raises((pickle.UnpicklingError, RuntimeError), match="[Ww]eights.only"):
            create(checkpoint_path=str(path))
        with pytest.raises((pickle.UnpicklingError, RuntimeError), match="[Ww]eights.only"):
            timm.models.load_checkpoint(create(), str(path))
        assert not marker.exists()


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_non_finite_and_integer_weights_are_refused_by_every_door(tmp_path, bad):
    native = tiny_model()
    state = write_official_checkpoint(native, tmp_path / "ok.pth")
    key = "backbone.encoder.blocks.1.residual2.fn.fc1.weight"
    if bad == "int":
        state[key] = state[key].to(torch.int32)
    else:
        state[key][0, 0] = float(bad)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    match = "not floating point" if bad == "int" else "NaN or Inf values in 1 tensors"
    with pytest.raises(CheckpointError, match=match):
        create(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(CheckpointError, match=match):
        create(checkpoint_path=str(path))
    with pytest.raises(CheckpointError, match=match):
        timm.models.load_checkpoint(create(), str(path))
    with pytest.raises(CheckpointError, match=match):
        create().load_state_dict(torch.load(path))
    with pytest.raises(CheckpointError, match=match):
        create(pretrained=True, pretrained_cfg_overlay=dict(state_dict=torch.load(path)))


def test_format_is_told_by_the_bytes_not_the_name(tmp_path):
    native = tiny_model(seed=2)
    safetensors_named_pth = tmp_path / "weights.pth"  # timm's own reader would torch.load it
    write_safetensors_checkpoint(native, safetensors_named_pth)
    model = create(pretrained=True, pretrained_cfg_overlay=dict(file=str(safetensors_named_pth)))
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), native(x)[0])
    text = tmp_path / "page.pth"
    text.write_text("<html>not found</html>")
    with pytest.raises(CheckpointError, match="looks like an HTML page"):
        create(pretrained=True, pretrained_cfg_overlay=dict(file=str(text)))


def test_official_checkpoint_loads_through_every_door(tmp_path, caplog):
    native = tiny_model(seed=4)
    path = tmp_path / "capi.pth"
    write_official_checkpoint(native, path)  # backbone.* keys, the whole predictor, a training head
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        expected = native(x)[0]
    loaded = []
    with caplog.at_level("INFO", logger="capi_backbones.timm"):
        model = create()
        assert not model.load_state_dict(torch.load(path)).missing_keys  # strict, and nothing left out
        loaded.append(model)
        loaded.append(create(checkpoint_path=str(path)))
        model = create()
        timm.models.load_checkpoint(model, str(path))
        loaded.append(model)
        loaded.append(create(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))))
    for model in loaded:
        with torch.no_grad():
            assert torch.equal(model.forward_head(model.forward_features(x), grid_size=(2, 3)), expected)
    dropped = [r.getMessage() for r in caplog.records if "predictor tensors" in r.getMessage()]
    assert dropped and all(m == "Dropped 9 predictor tensors that global_pool='pred' does not use" for m in dropped)


def test_a_timm_state_dict_round_trips_and_a_wrong_one_is_named_briefly(tmp_path):
    model = create(num_classes=3)
    other = create(num_classes=3)
    other.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True))
    big = timm.create_model("capi_vits14", device="meta").state_dict()
    with pytest.raises(CheckpointError, match="does not match the model") as error:
        create(num_classes=3).load_state_dict({k: torch.zeros(v.shape) for k, v in big.items()})
    assert len(str(error.value)) < 2500  # a summary, not every key


def test_partial_loads_with_strict_false_work_as_in_torch():
    """A head alone (fine-tuning code restoring a classifier) and a partial backbone load with strict=False; the
    values are still checked."""
    model = create(num_classes=3)
    head = {"head.weight": torch.ones(3, 64), "head.bias": torch.zeros(3)}
    result = model.load_state_dict(head, strict=False)
    assert torch.equal(model.head.weight, torch.ones(3, 64)) and "model.registers" in result.missing_keys
    registers = torch.full_like(model.model.registers, 0.5)
    result = model.load_state_dict({"backbone.registers": registers}, strict=False)
    assert torch.equal(model.model.registers, registers) and "head.weight" in result.missing_keys
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        model.load_state_dict({"backbone.registers": torch.full_like(registers, float("nan"))}, strict=False)
    with pytest.raises(CheckpointError, match="1 missing"):
        model.load_state_dict({k: v for k, v in model.state_dict().items() if k != "model.registers"})
