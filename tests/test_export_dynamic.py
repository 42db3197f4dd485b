"""Dynamic-resolution export: one artifact (torch.export .pt2, ONNX) runs at any batch and any H, W multiple of 14,
including a 1-patch side, and matches the eager model (fp32 tolerance); torch.compile(dynamic=True) compiles once.

Each artifact is exported once per module (ONNX export is the slow part); the eager model is the reference."""

import pytest
import torch
from checkpoint_files import TINY_CONFIG
from torch._dynamo.testing import CompileCounter

from capi_backbones import export
from capi_backbones.models import CapiModel

SIZES = [(2, 56, 56), (1, 42, 70), (3, 14, 84)]  # square, non-square, a 1-patch height
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model() -> CapiModel:
    torch.manual_seed(0)
    model = CapiModel(TINY_CONFIG).eval()
    with torch.no_grad():  # norm weights off their init, so that a dropped parameter shows in the numbers
        for name, param in model.named_parameters():
            if "norm" in name or "rope" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    return model


def eager(model: CapiModel, images: torch.Tensor, outputs=export.OUTPUTS) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model.forward_features(images)
    return tuple(getattr(out, name) for name in outputs)


@pytest.fixture(scope="module")
def pt2_file(model, tmp_path_factory):
    return export.export_torch(model, tmp_path_factory.mktemp("export") / "tiny.pt2")


@pytest.mark.parametrize("batch,height,width", SIZES)
def test_torch_export_round_trip_runs_at_any_size(model, pt2_file, batch, height, width):
    program = torch.export.load(pt2_file).module()
    images = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        got = program(images)
    expected = eager(model, images)
    assert len(got) == 3 and got[2].shape == (batch, height // 14, width // 14, 64)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE)


@pytest.fixture(scope="module")
def onnx_session(model, tmp_path_factory):
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional test dependency")
    pytest.importorskip("onnxscript", reason="onnxscript (with onnx) is the optional dependency of ONNX export")
    path = export.export_onnx(model, tmp_path_factory.mktemp("export") / "tiny.onnx")
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch,height,width", SIZES)
def test_onnx_runs_at_any_size(model, onnx_session, batch, height, width):
    assert [i.name for i in onnx_session.get_inputs()] == ["images"]
    assert [o.name for o in onnx_session.get_outputs()] == ["pooled", "registers", "patch_features"]
    images = torch.randn(batch, 3, height, width)
    got = onnx_session.run(None, {"images": images.numpy()})
    for a, b in zip(got, eager(model, images), strict=True):
        torch.testing.assert_close(torch.from_numpy(a), b, **TOLERANCE)


def test_dense_only_graph_leaves_the_predictor_out(model, pt2_file):
    program = export.export_program(model, outputs=["patch_features", "registers"])  # any order: canonical order
    to_parameter = program.graph_signature.inputs_to_parameters
    used = {
        to_parameter[n.name]
        for n in program.graph.nodes
        if n.op == "placeholder" and n.users and n.name in to_parameter
    }
    assert "model.registers" in used and not any(
        name.startswith(("model.decoder", "model.mask_token")) for name in used
    )
    full = torch.export.load(pt2_file)  # the full graph uses the predictor: the check above can fail
    full_used = {full.graph_signature.inputs_to_parameters.get(n.name) for n in full.graph.nodes if n.users}
    assert "model.mask_token" in full_used
    images = torch.randn(2, 3, 28, 70)
    with torch.no_grad():
        got = program.module()(images)
    for a, b in zip(got, eager(model, images, ("registers", "patch_features")), strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE)
    assert model.training is False


def test_torch_compile_dynamic_compiles_once_for_every_size(model):
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True)
    with torch.no_grad():
        for batch, height, width in [(2, 56, 42), (3, 70, 28), (2, 98, 140)]:  # sizes >= 2: torch specialises 0 and 1
            images = torch.randn(batch, 3, height, width)
            for a, b in zip(compiled(images), model(images), strict=True):
                torch.testing.assert_close(a, b, **TOLERANCE)
    assert counter.frame_count == 1


def test_bad_arguments_fail_with_one_clear_line(model, tmp_path, monkeypatch, pt2_file):
    with pytest.raises(ValueError, match="among pooled, registers, patch_features"):
        export.check_outputs(["pooled", "cls"])
    with pytest.raises(ValueError, match="distinct"):
        export.check_outputs([])
    with pytest.raises(ValueError, match=r"must end in \.pt2"):
        export.export_torch(model, tmp_path / "model.onnx")
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_torch(model, pt2_file)
    with pytest.raises(TypeError, match="CapiModel"):
        export.export_program(torch.nn.Linear(2, 2))

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export, "export_program", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.export, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        export.export_torch(model, tmp_path / "model.pt2")
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary left behind
