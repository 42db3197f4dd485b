"""The bf16 fast paths of the layers (RMSNorm without the fp32 round trip, RoPE with fused multiply-adds and
angles shared by q and k): close to the float64 spec reference in bf16, and the fp32 numbers unchanged bit for bit
against the plain formulas (forward and gradients)."""

import functools

import reference_capi as ref
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from capi_backbones.layers import Block, Rope, rotate_half
from capi_backbones.layers.attention import Attention
from capi_backbones.layers.block import RMSNorm
from capi_backbones.layers.rope import apply_rope
from capi_backbones.models import CapiConfig, CapiModel

TINY = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=48, pred_depth=2, pred_num_heads=3)


class OpLog(TorchDispatchMode):
    """The names of the aten ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def plain_attention(attn: Attention, x, coords, context=None, context_coords=None):
    """The attention formula as written before the fast paths: RoPE on (b, h, n, hd) for q and k separately."""
    if context is None:
        context, context_coords = x, coords
    (b, n_q, d), n_k, h, hd = x.shape, context.shape[1], attn.num_heads, attn.head_dim
    q = attn.q_proj(x).reshape(b, n_q, h, hd).transpose(1, 2)
    k = attn.k_proj(context).reshape(b, n_k, h, hd).transpose(1, 2)
    v = attn.v_proj(context).reshape(b, n_k, h, hd).transpose(1, 2)
    q_angle, k_angle = coords[:, None] @ attn.rope.freqs, context_coords[:, None] @ attn.rope.freqs
    q = q * q_angle.cos() + rotate_half(q) * q_angle.sin()
    k = k * k_angle.cos() + rotate_half(k) * k_angle.sin()
    out = F.scaled_dot_product_attention(q, k, v)
    return attn.proj(out.transpose(1, 2).reshape(b, n_q, d))


def perturbed(module: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name or "rope" in name or name == "weight":
                param.mul_(1 + 0.2 * torch.randn_like(param))
    return module


def test_fp32_attention_is_bit_identical_to_the_plain_formula_forward_and_backward():
    torch.manual_seed(0)
    attn = perturbed(Attention(64, 4, context_dim=48))
    x, coords = torch.randn(2, 10, 64), torch.rand(1, 10, 2)
    context, context_coords = torch.randn(2, 7, 48), torch.rand(2, 7, 2)
    self_attn = Attention(64, 4)
    self_attn.load_state_dict(
        {k: v for k, v in attn.state_dict().items() if "k_proj" not in k and "v_proj" not in k}
        | {"k_proj.weight": torch.randn(64, 64), "v_proj.weight": torch.randn(64, 64)}
    )
    for module, args in ((self_attn, (x, coords)), (attn, (x, coords, context, context_coords))):
        with torch.inference_mode():
            assert torch.equal(module(*args), plain_attention(module, *args))
        grads = []
        for fn in (module, functools.partial(plain_attention, module)):
            module.zero_grad()
            fn(*args).square().mean().backward()
            grads.append([p.grad.clone() for p in module.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_fp32_norm_is_torchs():
    norm = perturbed(RMSNorm(64, eps=1e-5))
    x = torch.randn(3, 5, 64)
    assert torch.equal(norm(x), F.rms_norm(x, (64,), norm.weight, 1e-5))


def test_bf16_paths_are_close_to_fp32():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 17, 64)
    rope = perturbed(Rope(64))
    rope.reset_parameters()
    coords = torch.rand(1, 1, 17, 2)
    cos, sin = rope.cos_sin(coords)
    exact = x * cos + rotate_half(x) * sin
    fast = apply_rope(x.bfloat16(), cos.bfloat16(), sin.bfloat16())
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), exact, rtol=0, atol=2**-6 * exact.abs().max().item())
    norm = perturbed(RMSNorm(64, eps=1e-5)).to(torch.bfloat16)
    y = (torch.randn(4, 9, 64) * 3).bfloat16()
    expected = F.rms_norm(y.float(), (64,), norm.weight.float(), 1e-5)  # exact on the same bf16 inputs
    got = norm(y)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=3 * 2**-8, atol=1e-6)  # 3 bf16 roundings (torch: 2)


def test_bf16_model_matches_the_float64_reference_within_bf16_rounding():
    torch.manual_seed(0)
    model = perturbed(CapiModel(TINY, dtype=torch.float64)).eval()
    x = torch.randn(1, 3, 42, 56, dtype=torch.float64)
    expected = ref.official_forward(model.state_dict(), x[0], num_heads=2, pred_num_heads=3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.to(torch.bfloat16)(x.bfloat16())
    for a, b in zip(got, expected, strict=True):
        relative = (a[0].double() - b).norm() / b.norm()
        assert relative < 5e-2, relative  # bf16 has 8 bits of mantissa: 1e-2 to 4e-2 here, as before the fast paths


def test_bf16_block_skips_torchs_upcasting_rms_norm_and_computes_the_angles_once():
    block = Block(64, 2).to(torch.bfloat16).eval()
    x, coords = torch.randn(2, 20, 64, dtype=torch.bfloat16), torch.rand(1, 20, 2, dtype=torch.bfloat16)
    with torch.inference_mode(), OpLog() as log:
        block(x, coords)
    assert "rms_norm" not in log.ops and "_fused_rms_norm" not in log.ops  # fp32 round trip on the CPU
    assert log.ops.count("cos") == 1 and "neg" not in log.ops


def test_bf16_autocast_training_step_runs_the_fast_paths_with_gradients():
    torch.manual_seed(0)
    model = CapiModel(TINY).train()
    x = torch.randn(2, 3, 28, 42)
    losses, grads = [], []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            tokens, coords, all_coords = model.encode(x)
            loss = model.predict(tokens, coords, all_coords[None]).float().square().mean()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) < 2e-2 * abs(losses[0])
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99
