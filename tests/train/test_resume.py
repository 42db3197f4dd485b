"""Checkpoints: bit-exact resume, stop signals, atomic writes, keep-last-K, compatibility checks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_loop import tiny_config

from capi_backbones.train import checkpointing
from capi_backbones.train.config import save_config
from capi_backbones.train.trainer import Trainer


def assert_states_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def optimizer_tensors(optimizer):
    return {f"{i}.{k}": v for i, state in optimizer.state_dict()["state"].items() for k, v in state.items()}


@pytest.mark.slow
def test_interrupted_run_resumes_bit_for_bit(tmp_path):
    # stochastic depth on: the torch RNG state must be restored too
    extra = ("optim.total_steps=6", "model.drop_path_rate=0.3", "optim.warmup_fraction=0.5")
    full = Trainer(tiny_config(tmp_path, *extra, run="full"))
    uninterrupted = full.run().losses

    first = Trainer(tiny_config(tmp_path, *extra, run="split")).run(max_steps=3)
    assert first.end_step == 3 and first.last_checkpoint.name == "checkpoint-00000003.pt"
    resumed = Trainer(tiny_config(tmp_path, *extra, run="split"))
    assert resumed.step == 3 and resumed.resumed_from == first.last_checkpoint
    second = resumed.run()
    assert second.start_step == 3 and second.end_step == 6

    assert torch.equal(torch.tensor(uninterrupted), torch.tensor(first.losses + second.losses))
    assert_states_equal(full.student.state_dict(), resumed.student.state_dict(), "student")
    assert_states_equal(full.teacher.state_dict(), resumed.teacher.state_dict(), "teacher")
    assert_states_equal(full.clustering.state_dict(), resumed.clustering.state_dict(), "clustering")
    assert_states_equal(optimizer_tensors(full.optimizer), optimizer_tensors(resumed.optimizer), "optimizer")
    # the metrics file holds each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_sigusr1_checkpoints_at_the_end_of_the_step(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "optim.total_steps=50"))

    def send_signal(metrics):
        if metrics.step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.getsignal(signal.SIGUSR1)
    result = trainer.run(callbacks=[send_signal])
    assert signal.getsignal(signal.SIGUSR1) == previous  # handler restored
    assert result.stopped_by_signal and result.end_step == 2 == trainer.step
    # the signal arrived during the callbacks of step 1 (the 2nd step): its checkpoint is written after it
    assert result.last_checkpoint == checkpointing.checkpoint_path(tmp_path / "run", 2)
    state = checkpointing.load_checkpoint(tmp_path / "run")
    assert state["step"] == 2
    assert Trainer(tiny_config(tmp_path, "optim.total_steps=50")).step == 2


@pytest.mark.slow
def test_sigterm_to_a_training_process(tmp_path):
    config = tiny_config(tmp_path, "optim.total_steps=100000", "train.log_every=1")
    save_config(config, tmp_path / "config.yaml")
    process = subprocess.Popen(
        [sys.executable, "-m", "capi_backbones.train", str(tmp_path / "config.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "Received signal" in output and "resume" in output
    found = checkpointing.list_checkpoints(tmp_path / "run")
    assert len(found) == 1
    step, path = found[0]
    state = checkpointing.load_checkpoint(path)
    assert state["step"] == step >= 1
    assert set(state) >= {"student", "teacher", "clustering", "optimizer", "clustering_optimizer", "rng"}


def test_checkpoint_writes_are_atomic_and_pruned(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        checkpointing.save_checkpoint({"format": checkpointing.CHECKPOINT_FORMAT, "step": step},
                                      checkpointing.checkpoint_path(run, step), keep_last=2)  # fmt: skip
    assert [s for s, _ in checkpointing.list_checkpoints(run)] == [3, 4]

    def broken_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.save_checkpoint({"step": 5}, checkpointing.checkpoint_path(run, 5), keep_last=2)
    monkeypatch.undo()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint-00000003.pt", "checkpoint-00000004.pt"]  # no partial file left
    assert checkpointing.load_checkpoint(run)["step"] == 4


def test_trainer_keeps_the_last_k_checkpoints(tmp_path):
    Trainer(tiny_config(tmp_path, "optim.total_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=2")).run()
    assert [s for s, _ in checkpointing.list_checkpoints(tmp_path / "run")] == [2, 3]


def test_bad_checkpoints_and_incompatible_resumes(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Could not read training checkpoint"):
        checkpointing.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"backbone.registers": torch.zeros(1)}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="not a capi-backbones training checkpoint"):
        checkpointing.load_checkpoint(tmp_path / "weights.pth")
    with pytest.raises(checkpointing.CheckpointNotFoundError, match="No checkpoints"):
        checkpointing.find_resume_checkpoint(tmp_path)

    Trainer(tiny_config(tmp_path, "optim.total_steps=1")).run()
    with pytest.raises(ValueError, match="model.embed_dim: checkpoint 32 vs config 64"):
        Trainer(tiny_config(tmp_path, "model.embed_dim=64", "model.pred_embed_dim=64"))
    with pytest.raises(FileExistsError, match="train.resume=false"):
        Trainer(tiny_config(tmp_path, "train.resume=false"))
