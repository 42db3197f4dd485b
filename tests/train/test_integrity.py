"""What a crash, a full disk or a hostile file does to a training run: a clear line, never a lost run."""

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from checkpoint_files import flip_a_bit_inside_the_largest_zip_member
from test_loop import tiny_config

from capi_backbones.atomic_files import WriteError
from capi_backbones.cli.main import main
from capi_backbones.features import FeatureExtractor
from capi_backbones.pretrained import from_pretrained, save_official_checkpoint
from capi_backbones.pretrained.files import IMAGE_SIZE_METADATA_KEY
from capi_backbones.train import checkpointing
from capi_backbones.train.config import ConfigError, load_config, save_config
from capi_backbones.train.export import export_teacher
from capi_backbones.train.metrics import MetricsWriter, read_metrics
from capi_backbones.train.trainer import Trainer


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    Trainer(tiny_config(tmp_path, "optim.total_steps=2", "train.log_every=1")).run()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as file:
        file.write('{"step": 3, "loss": 5.1, "clust')  # a kill or a full disk mid-append
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(metrics)] == [1, 2]
    assert str(metrics) in caplog.text and "cut short" in caplog.text
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    stale = tmp_path / "run" / "checkpoints" / f".checkpoint-00000003.pt.{dead_pid}.0123abcd.tmp"  # kill -9 mid-save
    stale.write_bytes(b"half a checkpoint")
    Trainer(tiny_config(tmp_path, "optim.total_steps=3", "train.log_every=1")).run()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    assert not stale.exists()


def test_a_bad_metrics_line_before_the_last_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path} line 2 is not a metrics record"):
        MetricsWriter(path).truncate_after(5)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    Trainer(tiny_config(tmp_path, "optim.total_steps=2", "train.checkpoint_every=1")).run()
    newest = checkpointing.checkpoint_path(tmp_path / "run", 2)
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy or a disk that gave up half way
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny_config(tmp_path, "optim.total_steps=2", "train.checkpoint_every=1"))
    assert trainer.step == 1 and trainer.resumed_from == checkpointing.checkpoint_path(tmp_path / "run", 1)
    assert f"Skipping unreadable checkpoint {newest}" in caplog.text
    trainer.run()  # re-does step 2 and replaces the broken file
    assert checkpointing.load_checkpoint(newest)["step"] == 2
    for _, path in checkpointing.list_checkpoints(tmp_path / "run"):
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="Could not read training checkpoint"):
        Trainer(tiny_config(tmp_path, "optim.total_steps=2"))


def test_a_newest_checkpoint_with_a_changed_byte_falls_back_to_the_previous_one(tmp_path, caplog):
    """torch.load reads it without complaint: the resume would go on from a wrong weight or optimizer state."""
    Trainer(tiny_config(tmp_path, "optim.total_steps=2", "train.checkpoint_every=1")).run()
    newest = checkpointing.checkpoint_path(tmp_path / "run", 2)
    member = flip_a_bit_inside_the_largest_zip_member(newest)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(tiny_config(tmp_path, "optim.total_steps=2", "train.checkpoint_every=1"))
    assert trainer.step == 1 and trainer.resumed_from == checkpointing.checkpoint_path(tmp_path / "run", 1)
    assert f"Skipping unreadable checkpoint {newest}" in caplog.text
    assert f"its member {member!r} does not match its CRC-32" in caplog.text


@pytest.mark.parametrize("target", ["checkpoint", "config.yaml"])
def test_a_full_disk_is_one_line_naming_the_path_and_exit_3(tmp_path, monkeypatch, capsys, target):
    config = tiny_config(tmp_path, "optim.total_steps=1")
    save_config(config, tmp_path / "run.yaml")
    real_fsync = os.fsync

    def fsync(fd):
        if target in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["train", str(tmp_path / "run.yaml")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("capi-backbones train: error: Cannot write ")
    assert target in err[0] and "No space left on device" in err[0]
    run = tmp_path / "run"
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []  # nothing half-written under a final or temporary name
    if target == "checkpoint":
        assert checkpointing.list_checkpoints(run) == []


def test_yaml_with_python_tags_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "evil.yaml"
    path.write_text('optim: !!python/object/apply:os.system ["echo owned"]\n')
    with pytest.raises(ConfigError, match=r"evil.yaml: unsupported YAML at line 1: .*no !!python tags"):
        load_config(path)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported YAML" in err[0] and "owned" not in err[0]
    path.write_text("optim: {lr: [1,\n")
    assert main(["train", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_train_logs_its_first_line_before_the_heavy_imports(tmp_path, monkeypatch, caplog):
    """The first line comes before torch and the trainer are imported (they take seconds on a busy machine)."""
    events = []

    class Recorder:
        def find_spec(self, name, path=None, target=None):
            if name == "capi_backbones.train.launch":
                events.append("import")
            return None

    caplog.set_level(logging.INFO)
    monkeypatch.delitem(sys.modules, "capi_backbones.train.launch", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Recorder(), *sys.meta_path])
    handler = logging.Handler()
    handler.emit = lambda record: events.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        assert main(["train", "tiny", f"train.output_dir={tmp_path}", f"data.root={tmp_path / 'none'}"]) == 2
    finally:
        logging.getLogger().removeHandler(handler)
    assert events[0].startswith("Starting: loading PyTorch") and events[1] == "import"


def test_progress_bar_shows_steps_rate_loss_and_eta(tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    Trainer(tiny_config(tmp_path, "optim.total_steps=2")).run()
    shown = terminal.getvalue().replace("\r", "\n").splitlines()[-1]
    assert "2/2" in shown and "img/s" in shown and "loss " in shown and "<00:00" in shown  # elapsed<remaining
    terminal.truncate(0)
    Trainer(tiny_config(tmp_path, "optim.total_steps=3", "train.progress_bar=false")).run()
    assert "img/s" not in terminal.getvalue()


def test_export_records_the_training_image_size(tmp_path):
    Trainer(tiny_config(tmp_path, "optim.total_steps=1")).run()
    result = export_teacher(tmp_path / "run", tmp_path / "teacher.safetensors")
    assert result.image_size == 56
    from safetensors import safe_open

    with safe_open(str(tmp_path / "teacher.safetensors"), framework="pt") as file:
        assert file.metadata()[IMAGE_SIZE_METADATA_KEY] == "56"
    loaded = from_pretrained(tmp_path / "teacher.safetensors")
    assert loaded.default_image_size == 56
    assert FeatureExtractor(loaded).image_size == 56  # extraction defaults to the training size
    assert FeatureExtractor(loaded, image_size=112).image_size == 112
    loaded.save_pretrained(tmp_path / "again")  # the size survives a save_pretrained round trip
    assert from_pretrained(tmp_path / "again").default_image_size == 56
    save_official_checkpoint(loaded, tmp_path / "official.pth")  # no room for it: the released default, 224
    assert from_pretrained(tmp_path / "official.pth").default_image_size == 224


def test_write_error_is_an_oserror_with_the_path(tmp_path):
    error = WriteError(tmp_path / "a.pt", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)))
    assert isinstance(error, OSError) and error.path == tmp_path / "a.pt" and "quota" in str(error).lower()


def test_export_to_a_full_disk_is_exit_3(tmp_path, monkeypatch, capsys):
    Trainer(tiny_config(tmp_path, "optim.total_steps=1")).run()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out" / "t.safetensors")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"Cannot write {tmp_path / 'out' / 't.safetensors'}: No space left" in err[0]
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_train_dependencies_name_the_extra(tmp_path, monkeypatch, capsys):
    from capi_backbones.train.data import TrainTransform

    monkeypatch.setitem(sys.modules, "torchvision.transforms", None)  # as if torchvision were not installed
    with pytest.raises(ImportError, match=r"Training needs torchvision .* pip install 'capi-backbones\[train\]'"):
        TrainTransform(56)
    monkeypatch.setitem(sys.modules, "yaml", None)
    assert main(["train", "tiny", "--print-config"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PyYAML" in err[-1] and "pip install 'capi-backbones[train]'" in err[-1]
    monkeypatch.setitem(sys.modules, "omegaconf", None)
    assert main(["train", "tiny", "--print-config"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "OmegaConf" in err[-1] and "pip install 'capi-backbones[train]'" in err[-1]


@pytest.mark.parametrize("where", ["write", "close"])
def test_a_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys, where):
    """ENOSPC while torch.save writes the next checkpoint (in a write, or when the file object is closed, as torch
    2.14 reports it): one line, exit 3 (not 1: non-finite steps), the previous checkpoint intact, no temporary."""
    config = tiny_config(tmp_path, "optim.total_steps=1")
    save_config(config, tmp_path / "run.yaml")
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    first = checkpointing.checkpoint_path(tmp_path / "run", 1)
    saved = first.read_bytes()

    real_open = Path.open

    class FullDisk:
        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if where == "write" and self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()
            if where == "close":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def open_(self, mode="r", *args, **kwargs):
        file = real_open(self, mode, *args, **kwargs)
        return FullDisk(file) if "checkpoint-" in self.name and "w" in mode else file

    monkeypatch.setattr(Path, "open", open_)
    capsys.readouterr()
    assert main(["train", str(tmp_path / "run.yaml"), "optim.total_steps=2"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "checkpoint-00000002" in err[0]
    assert first.read_bytes() == saved
    assert [p for _, p in checkpointing.list_checkpoints(tmp_path / "run")] == [first]
    assert [p.name for p in (tmp_path / "run").rglob("*.tmp")] == []


def test_a_data_root_without_a_readable_image_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.jpg", "b.png", "c.webp"):
        (broken / name).write_bytes(b"not an image")
    code = main(["train", "tiny", f"data.root={broken}", f"train.output_dir={tmp_path / 'run'}", "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "None of the 3 image files" in err[0] and str(broken) in err[0] and "data.root" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, capsys):
    config = tiny_config(tmp_path)
    code = main(["train", "tiny", f"data.root={config.data.root}", "train.device=cuda",
                 f"train.output_dir={tmp_path / 'run'}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.device=cuda" in err[0] and "CUDA is not available" in err[0]


def test_overrides_after_the_options(tmp_path, capsys):
    """`train tiny --max-steps 1 data.root=photos`: overrides before, between or after the options."""
    config = tiny_config(tmp_path, "optim.total_steps=3")
    save_config(config, tmp_path / "run.yaml")
    assert main(["train", str(tmp_path / "run.yaml"), "--max-steps", "1", "train.log_every=1", "optim.lr=0.002"]) == 0
    assert checkpointing.list_checkpoints(tmp_path / "run")[-1][0] == 1
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.002 and saved["train"]["log_every"] == 1
    assert main(["train", "--print-config", "tiny", "optim.lr=0.25", "--max-steps", "2", "data.hflip=false"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.25 and printed["data"]["hflip"] is False
    from capi_backbones.train.launch import main as module_main  # python -m capi_backbones.train (torchrun's)

    assert module_main(["tiny", "--print-config", "optim.lr=0.125"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["lr"] == 0.125
    with pytest.raises(SystemExit) as stopped:  # not an override: still refused, as argparse does
        main(["train", "tiny", "--max-steps", "1", "stray"])
    assert stopped.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err


def test_resumed_with_other_settings_keeps_both_configs(tmp_path, caplog):
    config = tiny_config(tmp_path, "optim.total_steps=2")
    save_config(config, tmp_path / "run.yaml")
    assert main(["train", str(tmp_path / "run.yaml"), "--max-steps", "1"]) == 0
    run = tmp_path / "run"
    first = (run / "config.yaml").read_text()
    caplog.set_level(logging.WARNING)
    assert main(["train", str(tmp_path / "run.yaml"), "optim.total_steps=3", "optim.lr=0.002"]) == 0
    assert (run / "config-until-step-00000001.yaml").read_text() == first  # what checkpoint 1 was made with
    now = yaml.safe_load((run / "config.yaml").read_text())
    assert now["optim"]["total_steps"] == 3 and now["optim"]["lr"] == 0.002
    assert any("optim.total_steps, optim.lr" in m and "config-until-step-00000001.yaml" in m for m in caplog.messages)
    assert main(["train", str(tmp_path / "run.yaml"), "optim.total_steps=3", "optim.lr=0.002"]) == 0  # same again
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config-until-step-00000001.yaml", "config.yaml"]
