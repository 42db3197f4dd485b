"""The training step and loop on a tiny config: what changes, what must not, schedules, NaN guard, logs."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from capi_backbones.schedules import warmup_truncated_cosine
from capi_backbones.train.config import load_config
from capi_backbones.train.step_runner import NonFiniteLossError
from capi_backbones.train.trainer import Trainer

TINY = [
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_embed_dim=32", "model.pred_depth=2",
    "model.pred_num_heads=2", "model.n_registers=4", "clustering.n_prototypes=64", "data.image_size=56",
    "data.prediction_ratio=0.3", "optim.batch_size=8", "optim.total_steps=4", "train.log_every=2",
    "train.checkpoint_every=100", "data.num_workers=0", "train.device=cpu", "train.precision=fp32",
]  # fmt: skip


def write_images(folder, names=("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((80 + 4 * i, 72)).save(folder / f"{name}.png")
    return folder


def tiny_config(tmp_path, *extra, run="run"):
    root = tmp_path / "images"
    if not root.exists():
        write_images(root)
    return load_config("tiny", [*TINY, f"data.root={root}", f"train.output_dir={tmp_path / run}", *extra])


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_steps_update_the_student_teacher_and_clustering(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "optim.warmup_fraction=0.25", "model.drop_path_rate=0.2"))
    student0, teacher0, clustering0 = (clone_state(m) for m in (trainer.student, trainer.teacher, trainer.clustering))
    assert all(torch.equal(teacher0[k], student0[f"backbone.{k}"]) for k in teacher0)  # teacher starts as the student
    result = trainer.run()
    assert result.end_step == 4 and len(result.history) == 4
    assert all(m.finite and torch.isfinite(torch.tensor([m.loss, m.clustering_loss])).all() for m in result.history)

    student = trainer.student.state_dict()
    for name, value in student.items():
        if name.endswith("rope.freqs"):
            assert torch.equal(value, student0[name]), f"{name} has lr x0 and must not move"
        else:
            assert not torch.equal(value, student0[name]), f"{name} did not change"
    teacher = trainer.teacher.state_dict()
    moved = [k for k in teacher if not k.endswith("rope.freqs") and not torch.equal(teacher[k], teacher0[k])]
    assert moved, "the EMA teacher never moved"
    assert any(not torch.equal(teacher[k], student[f"backbone.{k}"]) for k in moved)
    for param in trainer.teacher.parameters():
        assert not param.requires_grad and param.grad is None
    assert all(not torch.equal(v, clustering0[k]) for k, v in trainer.clustering.state_dict().items())


def test_one_step_in_the_spec_order(tmp_path):
    """EMA after the student update: teacher = m * teacher_before + (1 - m) * student_after."""
    config = tiny_config(tmp_path, "optim.warmup_fraction=0", "optim.momentum=0.5", "optim.momentum_final=0.5")
    trainer = Trainer(config)
    teacher_before = clone_state(trainer.teacher)
    batch = next(iter(trainer._data_loader(0, 1)))
    metrics = trainer.train_step(batch)
    assert metrics.momentum == 0.5 and trainer.step == 1
    student_after = trainer.student.backbone.state_dict()
    for key, value in trainer.teacher.state_dict().items():
        torch.testing.assert_close(value, 0.5 * teacher_before[key] + 0.5 * student_after[key])


def test_schedules_follow_the_config(tmp_path):
    config = tiny_config(tmp_path, "optim.total_steps=8", "optim.warmup_fraction=0.25")
    trainer = Trainer(config)
    history = trainer.run().history
    oc, cc = config.optim, config.clustering
    for m in history:
        common = dict(total_steps=8, warmup_steps=2, truncate_cos=0.8)
        assert m.lr == warmup_truncated_cosine(m.step, base_value=oc.lr, final_value=oc.final_lr, **common)
        assert m.clustering_lr == warmup_truncated_cosine(m.step, base_value=cc.lr, final_value=0.0, **common)
        expected = warmup_truncated_cosine(
            m.step, base_value=oc.momentum, final_value=1.0, start_warmup_value=1.0, **common
        )
        assert m.momentum == expected
    groups = {(g["lr_mult"], g["wd_mult"]): g for g in trainer.optimizer.param_groups}
    last = history[-1]
    assert groups[(0.2, 1.0)]["lr"] == pytest.approx(0.2 * last.lr)  # patch_embed
    assert groups[(1.0, 0.1)]["weight_decay"] == pytest.approx(0.1 * oc.weight_decay)  # norm weights


def test_nan_guard_skips_updates_then_stops(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "train.nan_limit=3", "optim.total_steps=10"))
    with torch.no_grad():
        trainer.student.backbone.registers.fill_(float("nan"))
    teacher0, clustering0 = clone_state(trainer.teacher), clone_state(trainer.clustering)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        trainer.run()
    assert trainer.step == 3
    assert not trainer.optimizer.state  # AdamW never stepped
    assert all(torch.equal(v, teacher0[k]) for k, v in trainer.teacher.state_dict().items())
    assert all(torch.equal(v, clustering0[k]) for k, v in trainer.clustering.state_dict().items())


def test_metrics_and_curves_are_written(tmp_path):
    config = tiny_config(tmp_path, "optim.total_steps=5")
    Trainer(config).run()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    for key in ("loss", "clustering_loss", "target_entropy", "prototype_entropy", "lr", "momentum", "images_per_s"):
        assert all(isinstance(r[key], float) for r in records), key
    assert all(0 <= r["prototype_entropy"] <= torch.log(torch.tensor(64.0)) + 1e-4 for r in records)
    with Image.open(run / "loss_curves.png") as image:
        assert image.format == "PNG" and image.width > image.height > 100
    assert (run / "config.yaml").exists()


def test_train_does_not_import_features_viz_or_the_cli():
    """Style rule: train imports models, layers and pretrained, never features or viz (the package root exports
    FeatureExtractor lazily), and never the CLI: the CLI imports train, not the reverse."""
    code = (
        "import sys\n"
        "import capi_backbones.train, capi_backbones.train.__main__, capi_backbones.train.launch\n"
        "from capi_backbones.train import trainer, export, data, metrics, checkpointing, step\n"
        "cli = sorted(m for m in sys.modules if m.startswith('capi_backbones.cli'))\n"
        "import capi_backbones.cli.train_commands\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('capi_backbones.features', 'capi_backbones.viz')) "
        "or m.split('.')[0] in ('sklearn', 'matplotlib'))\n"
        "print(cli + bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
