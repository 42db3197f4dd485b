"""Training precision: ``train.precision=auto`` trains in bf16 autocast where the device multiplies bf16 natively
(here: a CPU with AVX512-BF16 or AMX, as on CUDA), fp32 elsewhere; ``fp32`` forces fp32."""

import pytest
import torch
from test_loop import tiny_config

from capi_backbones.runtime import precision
from capi_backbones.train.config import ConfigError
from capi_backbones.train.trainer import Trainer


def matmul_dtypes(trainer: Trainer) -> list[torch.dtype]:
    """The output dtypes of the student's and the teacher's first MLP layers during one step."""
    seen = []
    layers = [m for m in (trainer.student, trainer.teacher) for m in m.modules() if isinstance(m, torch.nn.Linear)]
    hooks = [
        layer.register_forward_hook(lambda m, i, out: seen.append(out.dtype)) for layer in layers[:1] + layers[-1:]
    ]
    batch = next(iter(trainer._data_loader(0, 1)))
    trainer.train_step(batch)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize(
    "unit, asked, expected",
    [("AMX-BF16", "auto", "bf16"), ("AVX512-BF16", "auto", "bf16"), (None, "auto", "fp32"),
     ("AMX-BF16", "fp32", "fp32"), (None, "bf16", "bf16")],
)  # fmt: skip
def test_precision_choice_on_the_cpu(tmp_path, monkeypatch, unit, asked, expected):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: unit)
    trainer = Trainer(tiny_config(tmp_path, f"train.precision={asked}"))
    assert trainer.precision == expected
    dtypes = matmul_dtypes(trainer)
    assert dtypes and set(dtypes) == {torch.bfloat16 if expected == "bf16" else torch.float32}


def test_bf16_step_is_close_to_fp32(tmp_path):
    losses = {}
    for name in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(tmp_path, f"train.precision={name}", run=name))
        metrics = [trainer.train_step(b) for b in trainer._data_loader(0, 2)]
        losses[name] = [m.loss for m in metrics]
        assert all(m.finite for m in metrics)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.precision='fp16'; allowed: auto, bf16, fp32"):
        tiny_config(tmp_path, "train.precision=fp16")
