"""Activation checkpointing (CapiModel.set_grad_checkpointing) changes memory, never the loss or the gradients."""

import pytest
import torch

from capi_backbones.models import CapiConfig, CapiModel

CONFIG = CapiConfig(
    embed_dim=32, depth=2, num_heads=2, pred_embed_dim=32, pred_depth=2, pred_num_heads=2, n_registers=4,
    drop_path_rate=0.3,
)  # fmt: skip


def loss_and_grads(mode: str | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = CapiModel(CONFIG).double().train()
    if mode is not None:
        model.set_grad_checkpointing(mode=mode)
    x = torch.randn(3, 3, 42, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    visible = torch.tensor([[0, 2, 5, 7, 9], [1, 3, 4, 8, 11], [0, 1, 2, 3, 4]])
    torch.manual_seed(2)  # the stochastic-depth draws
    context, context_coords, all_coords = model.encode(x, visible)
    predictions = model.predict(context, context_coords, all_coords[torch.tensor([[6, 10], [0, 2], [5, 6]])])
    loss = predictions.square().mean() + context.sin().mean()
    loss.backward()
    after = torch.rand(())  # the global RNG continues as without checkpointing
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return torch.stack([loss.detach(), after]), grads


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_leaves_loss_and_gradients_unchanged(mode):
    ref_loss, ref_grads = loss_and_grads(None)
    loss, grads = loss_and_grads(mode)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-12, atol=1e-14, msg=name)


def test_checkpointing_recomputes_in_backward_only_when_training():
    model = CapiModel(CONFIG).set_grad_checkpointing(mode="selective")
    calls = []
    model.encoder.blocks[0].residual1.norm.register_forward_hook(lambda *_: calls.append(1))  # first op of the block
    x = torch.randn(1, 3, 28, 28)
    model.train()
    model.encode(x)[0].sum().backward()
    assert len(calls) == 2  # forward + recompute (which stops early, once it has what backward needs)
    calls.clear()
    model.eval()
    model.encode(x)[0].sum().backward()
    assert len(calls) == 1
    calls.clear()
    model.train().set_grad_checkpointing(False)
    model.encode(x)[0].sum().backward()
    assert len(calls) == 1


def test_unknown_mode_is_one_clear_error():
    with pytest.raises(ValueError, match="Unknown grad checkpointing mode 'some'.*full.*selective"):
        CapiModel(CONFIG).set_grad_checkpointing(mode="some")
