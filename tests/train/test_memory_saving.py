"""Gradient accumulation and activation checkpointing in the trainer: less memory per pass, the same step."""

import pytest
import torch
from test_loop import tiny_config

from capi_backbones.train.config import ConfigError
from capi_backbones.train.trainer import Trainer


def one_step_gradients(trainer: Trainer, batch) -> tuple[dict[str, torch.Tensor], object]:
    """Run one step in fp64 and return the gradients the optimizers see (student and clustering layer)."""
    for module in (trainer.student, trainer.teacher, trainer.clustering):
        module.double()
    grads = {}

    def capture(prefix, module, step):
        def wrapped(*args, **kwargs):
            grads.update({f"{prefix}.{n}": p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
            return step(*args, **kwargs)

        return wrapped

    trainer.optimizer.step = capture("student", trainer.student, trainer.optimizer.step)
    trainer.clustering_optimizer.step = capture("clustering", trainer.clustering, trainer.clustering_optimizer.step)
    batch.images = batch.images.double()
    metrics = trainer.train_step(batch)
    return grads, metrics


def test_accumulating_two_halves_is_one_step_on_the_whole_batch(tmp_path):
    # the teacher's Sinkhorn-Knopp targets are balanced over the whole batch in both runs; no stochastic depth
    extra = ("model.drop_path_rate=0", "optim.batch_size=8")
    whole = Trainer(tiny_config(tmp_path, *extra, run="whole"))
    halves = Trainer(tiny_config(tmp_path, *extra, "optim.accumulation_steps=2", run="halves"))
    batch = next(iter(whole._data_loader(0, 1)))
    assert batch.images.shape[0] == 8
    reference, reference_metrics = one_step_gradients(whole, batch)
    accumulated, metrics = one_step_gradients(halves, next(iter(halves._data_loader(0, 1))))
    assert reference.keys() == accumulated.keys() and any(k.startswith("clustering.") for k in reference)
    for name, grad in reference.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-9, atol=1e-13, msg=name)
    for key in ("loss", "clustering_loss", "target_entropy", "prototype_entropy"):
        assert getattr(metrics, key) == pytest.approx(getattr(reference_metrics, key), rel=1e-12), key


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_no_number(tmp_path, mode):
    extra = ("optim.total_steps=2", "model.drop_path_rate=0.3")  # stochastic depth: the recompute replays its draws
    plain = Trainer(tiny_config(tmp_path, *extra, run="plain"))
    plain_losses = plain.run().losses  # each Trainer seeds the global RNG: build and run one after the other
    checkpointed = Trainer(tiny_config(tmp_path, *extra, f"train.activation_checkpointing={mode}", run=mode))
    assert checkpointed.student.backbone.grad_checkpointing == mode
    assert plain.student.backbone.grad_checkpointing is None
    assert checkpointed.run().losses == plain_losses
    for a, b in zip(plain.student.parameters(), checkpointed.student.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_settings_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="optim.batch_size=8 is not divisible by optim.accumulation_steps=3"):
        tiny_config(tmp_path, "optim.accumulation_steps=3")
    with pytest.raises(ConfigError, match="optim.accumulation_steps must be >= 1"):
        tiny_config(tmp_path, "optim.accumulation_steps=0")
    with pytest.raises(ConfigError, match="train.activation_checkpointing='some'; allowed: none, full, selective"):
        tiny_config(tmp_path, "train.activation_checkpointing=some")
