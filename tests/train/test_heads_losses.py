"""The student head (L2NormLinear) and the CAPI loss."""

import pytest
import torch
import torch.nn.functional as F

from capi_backbones.train.heads import L2NormLinear
from capi_backbones.train.losses import capi_loss


def test_l2normlinear_init():
    torch.manual_seed(0)
    head = L2NormLinear(64, 2048)
    assert set(head.state_dict()) == {"last_layer.weight_g", "last_layer.weight_v"}  # official keys
    g, v = head.last_layer.weight_g.detach(), head.last_layer.weight_v.detach()
    assert g.shape == (2048, 1) and torch.equal(g, torch.ones(2048, 1))
    assert v.shape == (2048, 64)
    assert abs(float(v.std()) - 0.02) < 0.001 and float(v.abs().max()) < 0.02 * 6
    # weight norm: every effective prototype has norm g = 1
    assert torch.allclose(head.last_layer.weight.detach().norm(dim=1), torch.ones(2048), atol=1e-5)
    assert L2NormLinear(8, 16, device="meta").last_layer.weight_v.is_meta


def test_l2normlinear_forward_formula_and_scale_invariance():
    torch.manual_seed(1)
    head = L2NormLinear(32, 100)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(4, 7, 32)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    expected = (x / x.norm(dim=-1, keepdim=True)) @ (v * g / v.norm(dim=1, keepdim=True)).T
    out = head(x)
    assert out.shape == (4, 7, 100)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(head(x * 123.0), out, atol=1e-6)  # scale invariant in the input
    with torch.no_grad():
        v.mul_(5.0)
    assert torch.allclose(head(x), out, atol=1e-6)  # and in the direction parameter


def test_l2normlinear_gradients():
    torch.manual_seed(2)
    head = L2NormLinear(16, 32)
    x = torch.randn(5, 16, requires_grad=True)
    head(x).square().sum().backward()
    assert head.last_layer.weight_g.grad.abs().sum() > 0 and head.last_layer.weight_v.grad.abs().sum() > 0
    assert x.grad is not None


def test_capi_loss_formula():
    torch.manual_seed(3)
    logits = torch.randn(3, 5, 40)
    targets = torch.softmax(torch.randn(3, 5, 40) * 3, dim=-1)
    expected = -(targets * torch.log_softmax(logits / 0.12, dim=-1)).sum(-1).mean()
    loss = capi_loss(logits, targets, 0.12)
    assert loss.shape == () and loss.dtype == torch.float32
    assert torch.allclose(loss, expected, rtol=1e-6)
    # with one-hot targets it is the usual cross-entropy
    labels = torch.randint(0, 40, (15,))
    onehot = F.one_hot(labels, 40).float()
    assert torch.allclose(
        capi_loss(logits.reshape(15, 40), onehot, 0.5), F.cross_entropy(logits.reshape(15, 40) / 0.5, labels)
    )
    # bf16 logits are upcast: the loss is still fp32
    assert capi_loss(logits.bfloat16(), targets, 0.12).dtype == torch.float32


def test_capi_loss_gradient_reaches_only_the_student():
    torch.manual_seed(4)
    logits = torch.randn(6, 20, requires_grad=True)
    teacher_logits = torch.randn(6, 20, requires_grad=True)
    targets = torch.softmax(teacher_logits, dim=-1)
    capi_loss(logits, targets, 0.1).backward()
    assert teacher_logits.grad is None
    # d loss / d s = (softmax(s / T) - t) / (T * n_tokens) for targets that sum to 1
    expected = (torch.softmax(logits.detach() / 0.1, dim=-1) - targets.detach()) / (0.1 * 6)
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_capi_loss_errors():
    with pytest.raises(ValueError, match="same shape"):
        capi_loss(torch.zeros(4, 8), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="temperature"):
        capi_loss(torch.zeros(4, 8), torch.zeros(4, 8), 0.0)
    with pytest.raises(ValueError, match="at least one token"):
        capi_loss(torch.zeros(0, 8), torch.zeros(0, 8))
