"""Export of the teacher (EMA) backbone: safetensors and the official .pth layout, reloaded by from_pretrained."""

import pytest
import torch
from test_loop import tiny_config

from capi_backbones.cli.main import main
from capi_backbones.pretrained import from_pretrained
from capi_backbones.train import checkpointing
from capi_backbones.train.export import export_teacher, load_teacher
from capi_backbones.train.trainer import Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("export")
    trainer = Trainer(tiny_config(tmp_path, "optim.total_steps=3", "optim.warmup_fraction=0", "optim.momentum=0.5"))
    trainer.run()
    return tmp_path / "run", trainer


def test_load_teacher_is_the_ema_backbone(run):
    run_dir, trainer = run
    teacher = load_teacher(run_dir)
    assert teacher.step == 3 and teacher.checkpoint.name == "checkpoint-00000003.pt"
    assert not teacher.model.training and teacher.model.config.drop_path_rate == 0.0
    state = teacher.model.state_dict()
    for key, value in trainer.teacher.state_dict().items():
        assert torch.equal(state[key], value)
    student = trainer.student.backbone.state_dict()
    assert any(not torch.equal(state[k], student[k]) for k in state)  # the teacher, not the student


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_reloads_with_from_pretrained(run, tmp_path, suffix):
    run_dir, trainer = run
    out = tmp_path / f"teacher{suffix}"
    result = export_teacher(run_dir, out)
    assert result.path == out and result.step == 3 and out.exists()
    assert result.format == ("safetensors" if suffix == ".safetensors" else "official")
    if suffix == ".pth":
        keys = torch.load(out, weights_only=True).keys()
        assert keys and all(k.startswith("backbone.") for k in keys)
    model = from_pretrained(out)
    assert model.config.to_dict() == {**trainer.teacher.config.to_dict(), "drop_path_rate": 0.0}
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        expected = trainer.teacher.eval()(x)
        got = model(x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_export_from_a_checkpoint_file_and_the_cli(run, tmp_path, capsys):
    run_dir, _ = run
    checkpoint = checkpointing.find_resume_checkpoint(run_dir)
    assert main(["export", str(checkpoint), str(tmp_path / "t.safetensors")]) == 0
    assert "step 3" in capsys.readouterr().out
    reloaded = from_pretrained(tmp_path / "t.safetensors")
    for key, value in load_teacher(checkpoint).model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)


def test_export_errors(run, tmp_path, capsys):
    run_dir, _ = run
    with pytest.raises(ValueError, match=r"Use one of \.safetensors, \.pth, \.pt"):
        export_teacher(run_dir, tmp_path / "teacher.bin")
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="No checkpoints"):
        export_teacher(tmp_path, tmp_path / "teacher.pth")
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x.pth")]) == 2
    assert "neither a checkpoint file nor a run directory" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
