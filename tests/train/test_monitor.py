"""The k-NN monitor while training: scores at step 0 and every monitor.every steps in metrics.jsonl, the log line
and the curves; training steps unchanged by it; a bad folder refused before the models are built."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from test_loop import tiny_config

from capi_backbones.cli.main import main
from capi_backbones.train.trainer import Trainer


def write_labelled(root, per_class=4):
    """Two classes that any encoder tells apart (dark and bright noise), as train/ and test/ class folders."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, low in (("dark", 0), ("bright", 160)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(low, low + 90, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_monitor_records_scores_and_leaves_training_unchanged(tmp_path, caplog):
    labelled = write_labelled(tmp_path / "labelled")
    caplog.set_level(logging.INFO)
    watched = Trainer(
        tiny_config(tmp_path, "optim.total_steps=4", f"monitor.data={labelled}", "monitor.every=2",
                    "monitor.student=true", run="watched")
    )  # fmt: skip
    result = watched.run()
    records = [json.loads(line) for line in (tmp_path / "watched" / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in knn] == [0, 2, 4]  # before the first step, then every 2 steps
    assert all(r["knn_top1"] == 1.0 and r["knn_top1_student"] == 1.0 for r in knn)  # dark vs bright
    assert any("k-NN top-1 1.000" in m for m in caplog.messages if m.startswith("step 4/4"))
    with Image.open(tmp_path / "watched" / "loss_curves.png") as image:
        assert image.width == 5 * 480  # loss, teacher k-NN, student k-NN, clustering loss, target entropy

    plain = Trainer(tiny_config(tmp_path, "optim.total_steps=4", run="plain")).run()
    assert [m.loss for m in plain.history] == [m.loss for m in result.history]


def test_monitor_scores_follow_the_labels(tmp_path):
    """Labels that do not follow the pixels (each class half dark, half bright) score at chance, not 1."""
    labelled = write_labelled(tmp_path / "labelled")
    for split in ("train", "test"):
        dark, bright = tmp_path / "labelled" / split / "dark", tmp_path / "labelled" / split / "bright"
        for i in (0, 1):
            (dark / f"{i}.png").rename(bright / f"moved{i}.png")
            (bright / f"{i}.png").rename(dark / f"moved{i}.png")
    trainer = Trainer(tiny_config(tmp_path, f"monitor.data={labelled}", "monitor.k=1"))
    scores = trainer.evaluate_monitor()
    assert scores.teacher <= 0.75 and scores.student is None


def test_monitor_folder_errors_are_one_line(tmp_path, capsys):
    images = tmp_path / "images"
    tiny_config(tmp_path)  # writes the training images
    code = main(["train", "tiny", f"data.root={images}", f"train.output_dir={tmp_path / 'run'}",
                 f"monitor.data={tmp_path / 'missing'}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing" in err[0]
    with pytest.raises(ValueError, match="monitor.representation='cls'; allowed: pooled, avg_patch"):
        tiny_config(tmp_path, "monitor.representation=cls")


def test_monitor_representation_avg_patch(tmp_path):
    labelled = write_labelled(tmp_path / "labelled")
    trainer = Trainer(tiny_config(tmp_path, f"monitor.data={labelled}", "monitor.representation=avg_patch"))
    features = trainer.monitor.features(trainer.teacher, trainer.monitor.test_images, torch.no_grad)
    expected = trainer.teacher.forward_features(trainer.monitor.test_images.float(), pooled=False)
    torch.testing.assert_close(features, expected.patch_features.mean((1, 2)))
