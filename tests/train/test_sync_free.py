"""Sync-free training steps (the accelerator path): no host read of a device value between log steps, the same
steps as the CPU path, and the non-finite guard kept on the device. Run here on the CPU, with the host reads
counted by patching the Python entry points that copy a tensor's value to the host."""

import contextlib

import pytest
import torch
from test_loop import clone_state, tiny_config

from capi_backbones.train.step_runner import NonFiniteLossError
from capi_backbones.train.trainer import Trainer

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    calls = []
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _name=name, _original=original, **kwargs):
                calls.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield calls


def test_sync_free_steps_read_nothing_until_the_flush(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "optim.total_steps=4")
    reference = Trainer(config)
    expected = [reference.train_step(batch).loss for batch in reference._data_loader(0, 4)]

    trainer = Trainer(tiny_config(tmp_path, "optim.total_steps=4", run="free"), sync_free=True)
    metrics = []
    for batch in trainer._data_loader(0, 4):
        with count_host_reads(monkeypatch) as calls:
            metrics.append(trainer.train_step(batch))
        assert calls == [], f"step {len(metrics) - 1} read {calls} from the device"
    assert all(m.loss != m.loss for m in metrics)  # NaN until read
    with count_host_reads(monkeypatch) as calls:
        flushed = trainer.flush_metrics()
    assert flushed == metrics and calls.count("cpu") == 1  # one transfer for the four steps
    # the same steps as the CPU path, up to the fused optimizer's rounding
    assert [m.loss for m in metrics] == pytest.approx(expected, rel=1e-4)
    assert all(m.finite for m in metrics) and trainer.nan_streak == 0


def test_sync_free_run_reads_only_at_log_steps(tmp_path, monkeypatch):
    """In ``run``, host reads happen only at log and checkpoint steps (log_every=2 here)."""
    trainer = Trainer(tiny_config(tmp_path, "optim.total_steps=4"), sync_free=True)
    reads_per_step = []
    original = trainer.train_step

    def step(batch):
        with count_host_reads(monkeypatch) as calls:
            out = original(batch)
        reads_per_step.append(len(calls))
        return out

    trainer.train_step = step
    seen = []
    result = trainer.run(callbacks=[lambda m: seen.append((m.step, m.loss))])
    assert reads_per_step == [0, 0, 0, 0]
    assert [s for s, _ in seen] == [0, 1, 2, 3] and all(loss == loss for _, loss in seen)  # read, then reported
    assert result.end_step == 4 and all(m.finite for m in result.history)


def test_sync_free_nan_guard_skips_updates_on_the_device(tmp_path):
    """Non-finite images (finite weights): the losses are NaN, and no weight, teacher or optimizer state moves."""
    trainer = Trainer(tiny_config(tmp_path, "train.nan_limit=3", "optim.total_steps=10"), sync_free=True)
    original = trainer.train_step

    def poisoned(batch):
        batch.images.fill_(float("nan"))
        return original(batch)

    trainer.train_step = poisoned
    before = [clone_state(m) for m in (trainer.student, trainer.teacher, trainer.clustering)]
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        trainer.run()
    assert trainer.step == 4  # found at the log step after the third (log_every=2)
    for module, state in zip((trainer.student, trainer.teacher, trainer.clustering), before, strict=True):
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert all(int(s["step"]) == 0 for s in trainer.optimizer.state.values())  # no AdamW step counted
    assert all(int(s["step"]) == 0 for s in trainer.clustering_optimizer.state.values())
