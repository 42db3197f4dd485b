"""The probe heads against direct computations, and the grid trainer (optimizer groups, schedule, resume)."""

import math
import os
import subprocess

import pytest
import torch
from checkpoint_files import flip_a_bit_inside_the_largest_zip_member

from capi_backbones.evals import (
    AttentiveProbe,
    CachedBatches,
    LinearProbe,
    ProbeGrid,
    ProbeTrainingConfig,
    predict_grid,
    probe_lr_schedule,
    train_probe_grid,
)


def official_attention_pooling(probe: AttentiveProbe, tokens: torch.Tensor) -> torch.Tensor:
    """The official AttnPoolClassifier forward, literally: ``kv`` of all tokens, then scaled dot-product attention
    of the learned query, per head."""
    b, n, d = tokens.shape
    h = probe.num_heads
    q = probe.query_token.view(1, h, 1, d // h).expand(b, -1, -1, -1)  # (B, h, 1, d_h)
    k, v = probe.kv(tokens).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, N, d_h)
    pooled = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, h, 1, d_h)
    return probe.linear(pooled.reshape(b, d))


def test_linear_probe_is_x_w_plus_b_with_the_official_init():
    torch.manual_seed(0)
    probe = LinearProbe(256, 1000)
    w, b = probe.linear.weight, probe.linear.bias
    assert torch.equal(b, torch.zeros(1000))
    assert w.std().item() == pytest.approx(0.02, rel=0.05)  # trunc_normal_(std=0.02): cut at +-2, as officially
    x = torch.randn(5, 256)
    torch.testing.assert_close(probe(x), (x.double() @ w.double().T + b.double()).float())


def test_attentive_probe_equals_attention_written_by_hand():
    torch.manual_seed(0)
    d, heads, n, c = 128, 2, 7, 5
    probe = AttentiveProbe(d, c)
    assert probe.num_heads == heads and torch.equal(probe.kv.bias, torch.zeros(2 * d))
    for p in probe.parameters():  # non-trivial values everywhere, biases included
        p.data.normal_(0, 0.3)
    tokens = torch.randn(3, n, d)
    expected = torch.empty(3, c, dtype=torch.float64)
    q_all = probe.query_token.double()
    wk, wv = probe.kv.weight.double()[:d], probe.kv.weight.double()[d:]
    bk, bv = probe.kv.bias.double()[:d], probe.kv.bias.double()[d:]
    for b in range(3):
        pooled = []
        for h in range(heads):
            sl = slice(h * 64, (h + 1) * 64)
            keys = tokens[b].double() @ wk[sl].T + bk[sl]  # (n, 64)
            values = tokens[b].double() @ wv[sl].T + bv[sl]
            logits = keys @ q_all[sl] / math.sqrt(64)  # (n,)
            weights = logits.exp() / logits.exp().sum()
            pooled.append(weights @ values)
        expected[b] = torch.cat(pooled) @ probe.linear.weight.double().T + probe.linear.bias.double()
    torch.testing.assert_close(probe(tokens).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(official_attention_pooling(probe, tokens).double(), expected, rtol=1e-5, atol=1e-5)


def test_attentive_probe_gradients_equal_the_official_computation():
    torch.manual_seed(0)
    probe = AttentiveProbe(128, 4)
    for p in probe.parameters():
        p.data.normal_(0, 0.3)
    tokens, target = torch.randn(6, 9, 128), torch.tensor([0, 1, 2, 3, 0, 1])
    grads = []
    for forward in (probe.forward, lambda x: official_attention_pooling(probe, x)):
        probe.zero_grad()
        torch.nn.functional.cross_entropy(forward(tokens), target).backward()
        grads.append({name: p.grad.clone() for name, p in probe.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_attentive_probe_refuses_a_width_that_is_not_a_multiple_of_the_head_size():
    with pytest.raises(ValueError, match="not a multiple of the head size 64.*head_dim=48"):
        AttentiveProbe(96, 3)
    assert AttentiveProbe(96, 3, head_dim=32).num_heads == 3


def test_schedule_is_linear_warmup_then_cosine_to_zero():
    s = probe_lr_schedule(12, 4)
    torch.testing.assert_close(s[:4], torch.tensor([0, 1 / 3, 2 / 3, 1], dtype=torch.float64))
    expected = [(math.cos(math.pi * i / 7) + 1) / 2 for i in range(8)]
    torch.testing.assert_close(s[4:], torch.tensor(expected, dtype=torch.float64))


def test_grid_holds_one_probe_per_setting_and_scales_lr_by_batch():
    grid = ProbeGrid({"a": ("linear", 8), "t": ("attentive", 64)}, 3, learning_rates=(1e-3, 1e-2), weight_decays=(0.5,))
    assert grid.keys == [("a", 1e-3, 0.5), ("a", 1e-2, 0.5), ("t", 1e-3, 0.5), ("t", 1e-2, 0.5)]
    groups = grid.param_groups(batch_size=512)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for probe, (_, lr, wd) in zip(grid.probes, grid.keys, strict=True):
        for name, param in probe.named_parameters():
            assert by_param[id(param)]["base_lr"] == pytest.approx(lr * 2)
            assert by_param[id(param)]["weight_decay"] == (0.0 if name.endswith("bias") else wd)
    inputs = {"a": torch.randn(4, 8), "t": torch.randn(4, 5, 64)}
    out = grid(inputs)
    assert out.shape == (4, 3, 4)
    torch.testing.assert_close(out[..., 1], grid.probes[1](inputs["a"]))
    torch.testing.assert_close(out[..., 3], grid.probes[3](inputs["t"]))


def toy_problem(n=96, d=8, c=3):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(c, d, generator=g) * 3
    labels = torch.arange(n) % c
    return {"x": centres[labels] + torch.randn(n, d, generator=g)}, labels


def test_grid_learns_and_an_interrupted_run_resumes_exactly(tmp_path):
    features, labels = toy_problem()
    config = ProbeTrainingConfig(iterations=30, warmup_iterations=3, batch_size=16, learning_rates=(1e-3, 1e-1),
                                 weight_decays=(1e-3,), checkpoint_every=10)  # fmt: skip

    def fresh():
        torch.manual_seed(0)
        return ProbeGrid({"x": ("linear", 8)}, 3, learning_rates=config.learning_rates, weight_decays=(1e-3,))

    straight = train_probe_grid(fresh(), CachedBatches(features, labels, 16), config, progress=False)
    logits = predict_grid(straight, features)
    accuracy = (logits.argmax(1) == labels[:, None]).float().mean(0)  # per probe
    assert accuracy[1] > 0.9, accuracy  # lr 0.1 learns the blobs

    ckpt = tmp_path / "grid.pt"
    partial = fresh()
    calls = []

    def batches_then_stop(i):
        if i == 20:
            raise KeyboardInterrupt
        calls.append(i)
        return CachedBatches(features, labels, 16)(i)

    with pytest.raises(KeyboardInterrupt):
        train_probe_grid(partial, batches_then_stop, config, checkpoint=ckpt, progress=False)
    resumed = train_probe_grid(fresh(), CachedBatches(features, labels, 16), config, checkpoint=ckpt, progress=False)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a finished checkpoint trains nothing; other settings are refused
    again = train_probe_grid(fresh(), lambda i: pytest.fail("trained again"), config, checkpoint=ckpt, progress=False)
    assert torch.equal(again.probes[0].linear.weight, straight.probes[0].linear.weight)
    other = ProbeTrainingConfig(**{**config.__dict__, "iterations": 40})
    with pytest.raises(ValueError, match="other settings"):
        train_probe_grid(fresh(), CachedBatches(features, labels, 16), other, checkpoint=ckpt, progress=False)


def test_cached_batches_are_a_function_of_the_iteration():
    features, labels = toy_problem(n=50)
    a, b = CachedBatches(features, labels, 16, seed=1), CachedBatches(features, labels, 16, seed=1)
    assert torch.equal(a(7)[1], b(7)[1]) and torch.equal(a(0)[1], b(0)[1])
    epoch = torch.cat([a(i)[0]["x"] for i in range(3)])  # 3 full batches of 16 per epoch, no repeats
    assert len({tuple(row.tolist()) for row in epoch}) == 48


def test_defaults_are_the_official_global_batch_and_its_lr_scaling():
    config = ProbeTrainingConfig()
    assert config.batch_size == 8 * 128 and config.is_official  # the official launcher: 8 processes of 128
    grid = ProbeGrid({"a": ("linear", 8)}, 3, learning_rates=(1e-3,), weight_decays=(5e-4,))
    (group,) = [g for g in grid.param_groups(config.batch_size) if g["weight_decay"] == 5e-4]
    assert group["base_lr"] == pytest.approx(1e-3 * (128 * 8) / 256.0)  # lr * (batch_size * world_size) / 256
    assert ProbeTrainingConfig(batch_size=128).is_official is False


def test_optimizer_betas_are_the_official_0_9_and_0_95(monkeypatch):
    seen = {}
    real = torch.optim.AdamW

    def spy(params, **kwargs):
        seen.update(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    features, labels = toy_problem(n=16)
    config = ProbeTrainingConfig(iterations=1, warmup_iterations=0, batch_size=8, learning_rates=(1e-3,),
                                 weight_decays=(1e-3,))  # fmt: skip
    grid = ProbeGrid({"x": ("linear", 8)}, 3, learning_rates=(1e-3,), weight_decays=(1e-3,))
    train_probe_grid(grid, CachedBatches(features, labels, 8), config, progress=False)
    assert seen["betas"] == (0.9, 0.95)


def test_micro_batches_take_the_same_steps_as_the_whole_batch():
    features, labels = toy_problem(n=96)
    tokens = {"x": features["x"], "t": torch.randn(96, 5, 64, generator=torch.Generator().manual_seed(3))}
    grids = []
    for micro in (None, 7):
        config = ProbeTrainingConfig(iterations=6, warmup_iterations=1, batch_size=32, learning_rates=(1e-2,),
                                     weight_decays=(1e-3,), micro_batch_size=micro)  # fmt: skip
        torch.manual_seed(0)
        grid = ProbeGrid({"x": ("linear", 8), "t": ("attentive", 64)}, 3, learning_rates=(1e-2,),
                         weight_decays=(1e-3,))  # fmt: skip
        grids.append(train_probe_grid(grid, CachedBatches(tokens, labels, 32), config, progress=False))
    for (name, a), b in zip(grids[0].state_dict().items(), grids[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


ONE_SETTING_CONFIG = ProbeTrainingConfig(iterations=5, warmup_iterations=1, batch_size=16, learning_rates=(1e-2,),
                                         weight_decays=(1e-3,))  # fmt: skip


def one_linear_probe() -> ProbeGrid:
    """A seeded grid of one linear probe (one lr, one wd) on 8-dim features, 3 classes: ONE_SETTING_CONFIG's."""
    torch.manual_seed(0)
    return ProbeGrid({"x": ("linear", 8)}, 3, learning_rates=(1e-2,), weight_decays=(1e-3,))


def test_a_checkpoint_of_other_training_data_is_not_resumed(tmp_path):
    features, labels = toy_problem()
    config = ONE_SETTING_CONFIG

    ckpt = tmp_path / "linear.pt"
    train_probe_grid(one_linear_probe(), CachedBatches(features, labels, 16), config, checkpoint=ckpt, trained_on="a",
                     progress=False)  # fmt: skip
    calls = []

    def counting(i):
        calls.append(i)
        return CachedBatches(features, labels, 16)(i)

    train_probe_grid(one_linear_probe(), counting, config, checkpoint=ckpt, trained_on="a", progress=False)
    assert calls == []  # same data: the finished grid is reused
    train_probe_grid(one_linear_probe(), counting, config, checkpoint=ckpt, trained_on="b", progress=False)
    assert calls == [0, 1, 2, 3, 4]  # other data: trained again from scratch
    assert torch.load(ckpt, weights_only=True)["trained_on"] == "b"


def test_a_probe_checkpoint_with_a_changed_byte_is_refused_in_one_line(tmp_path):
    features, labels = toy_problem()
    config = ONE_SETTING_CONFIG

    ckpt = tmp_path / "linear.pt"
    batches = CachedBatches(features, labels, 16)
    train_probe_grid(one_linear_probe(), batches, config, checkpoint=ckpt, trained_on="a", progress=False)
    member = flip_a_bit_inside_the_largest_zip_member(ckpt)
    damaged = f"Probe checkpoint '{ckpt}' is damaged: its member '{member}' does not match its CRC-32"
    with pytest.raises(ValueError, match=damaged):
        train_probe_grid(one_linear_probe(), batches, config, checkpoint=ckpt, trained_on="a", progress=False)


def test_a_full_disk_while_saving_probes_is_a_write_error_and_leaves_nothing(tmp_path):
    from capi_backbones.atomic_files import WriteError

    full = tmp_path / "full"
    full.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        features, labels = toy_problem(n=32, d=512)
        config = ProbeTrainingConfig(iterations=1, warmup_iterations=0, batch_size=16, learning_rates=(1e-3, 1e-2),
                                     weight_decays=(1e-3,))  # fmt: skip
        grid = ProbeGrid({"x": ("linear", 512)}, 3, learning_rates=(1e-3, 1e-2), weight_decays=(1e-3,))
        with pytest.raises(WriteError, match="No space left on device"):  # not torch's RuntimeError
            train_probe_grid(grid, CachedBatches(features, labels, 16), config, checkpoint=full / "linear.pt",
                             progress=False)  # fmt: skip
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_bfloat16_probes_train_under_autocast_and_are_not_called_official():
    features, labels = toy_problem(n=64, d=64)
    grids = {}
    for dtype in ("float32", "bfloat16"):
        config = ProbeTrainingConfig(iterations=20, warmup_iterations=2, batch_size=32, learning_rates=(1e-1,),
                                     weight_decays=(1e-3,), dtype=dtype)  # fmt: skip
        torch.manual_seed(0)
        grid = ProbeGrid({"x": ("linear", 64)}, 3, learning_rates=(1e-1,), weight_decays=(1e-3,))
        grids[dtype] = train_probe_grid(grid, CachedBatches(features, labels, 32), config, progress=False)
    a, b = (grids[d].probes[0].linear.weight for d in ("float32", "bfloat16"))
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05)  # bf16 matmuls: close, not identical
    assert b.dtype == torch.float32  # the parameters and the optimizer stay in float32
    assert not ProbeTrainingConfig(dtype="bfloat16").is_official
    with pytest.raises(ValueError, match="probe dtype"):
        ProbeTrainingConfig(dtype="float16")


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_probe_dtype_is_bfloat16_only_where_the_device_has_native_bf16(monkeypatch, native, expected):
    from capi_backbones.evals import probe_grid

    asked = []
    monkeypatch.setattr(probe_grid, "native_bf16", lambda device: asked.append(str(device)) or native)
    assert probe_grid.resolve_probe_dtype("auto", "cpu") == expected
    assert asked == ["cpu"]
    for dtype in ("float32", "bfloat16"):  # explicit choices hold on any device
        assert probe_grid.resolve_probe_dtype(dtype, "cpu") == dtype
    with pytest.raises(ValueError, match="'auto', 'float32' or 'bfloat16', got 'float16'"):
        probe_grid.resolve_probe_dtype("float16", "cpu")
