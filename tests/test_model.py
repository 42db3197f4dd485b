"""The fast model against the explicit spec reference in tests/reference_capi.py (float64, per-channel RoPE,
softmax attention by hand), plus the inference API contracts."""

import math

import pytest
import reference_capi as ref
import torch

from capi_backbones.models import CapiConfig, CapiModel, patch_coordinates

TINY = CapiConfig(embed_dim=64, depth=2, num_heads=2, pred_embed_dim=48, pred_depth=3, pred_num_heads=3)


def perturbed_model(config: CapiConfig = TINY, dtype=torch.float64, seed: int = 0) -> CapiModel:
    """Random model whose norm weights and RoPE frequencies differ from their init, so that a wrong key or an
    ignored parameter shows up in the numbers."""
    torch.manual_seed(seed)
    model = CapiModel(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "rope" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("height,width", [(42, 70), (56, 56), (14, 42), (70, 28)])
def test_forward_matches_reference(height, width):
    model = perturbed_model()
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    pooled, registers, feature_map = model(x)
    h, w = height // 14, width // 14
    assert pooled.shape == (2, 48) and registers.shape == (2, 16, 64) and feature_map.shape == (2, h, w, 64)
    state = model.state_dict()
    for i in range(2):
        ref_pooled, ref_registers, ref_map = ref.official_forward(state, x[i], num_heads=2, pred_num_heads=3)
        torch.testing.assert_close(pooled[i], ref_pooled, rtol=0, atol=1e-10)
        torch.testing.assert_close(registers[i], ref_registers, rtol=0, atol=1e-10)
        torch.testing.assert_close(feature_map[i], ref_map, rtol=0, atol=1e-10)


def test_fp32_model_matches_float64_reference():
    model = perturbed_model(dtype=torch.float32)
    x = torch.randn(1, 3, 28, 42)
    pooled, registers, feature_map = model(x)
    ref_pooled, ref_registers, ref_map = ref.official_forward(model.state_dict(), x[0], 2, 3)
    torch.testing.assert_close(pooled[0].double(), ref_pooled, rtol=0, atol=1e-4)
    torch.testing.assert_close(feature_map[0].double(), ref_map, rtol=0, atol=1e-4)


def test_visible_subset_rescales_registers_and_matches_reference():
    """Training path: only visible patches (plus registers) go through the encoder, and register coordinates are
    rescaled to the extent of the visible patches of each image."""
    model = perturbed_model()
    x = torch.randn(2, 3, 70, 84, dtype=torch.float64)  # grid 5 x 6
    visible = torch.tensor([[7, 8, 13, 14, 20], [0, 5, 11, 24, 29]])  # an inner block; a spread-out set
    tokens, coords, all_coords = model.encode(x, visible)
    assert tokens.shape == (2, 16 + 5, 64)
    state = model.state_dict()
    for i in range(2):
        ref_tokens, ref_coords = ref.encode(state, x[i], num_heads=2, visible=visible[i])
        torch.testing.assert_close(coords[i], ref_coords, rtol=0, atol=1e-12)
        torch.testing.assert_close(tokens[i], ref_tokens, rtol=0, atol=1e-10)
    # image 0 sees rows 1..3 and cols 1..2 only: registers span exactly that box
    reg = coords[0, :16]
    assert reg[:, 0].min() == pytest.approx(0.25) and reg[:, 0].max() == pytest.approx(0.75)
    assert reg[:, 1].min() == pytest.approx(0.2) and reg[:, 1].max() == pytest.approx(0.4)
    # predictor with all blocks at some masked positions, as in training
    predict = torch.tensor([[0, 29], [1, 2]])
    out = model.predict(tokens, coords, all_coords[predict])
    for i in range(2):
        expected = ref.predict(state, tokens[i], coords[i], all_coords[predict[i]], num_heads=3)
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-10)


def test_register_coordinates_follow_the_spec_at_inference():
    model = perturbed_model()
    _, coords, _ = model.prepare_tokens(torch.zeros(1, 3, 28, 28, dtype=torch.float64))
    c = (0.0, 0.25, 0.5, 0.75)
    expected = [(v, 0) for v in c] + [(1, v) for v in c] + [(1 - v, 1) for v in c] + [(0, 1 - v) for v in c]
    assert coords[0, :16].tolist() == [list(map(float, p)) for p in expected]
    assert coords[0, 16:].tolist() == [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]


def test_pooled_equals_official_all_blocks_forward_bit_for_bit():
    """The official forward runs every predictor block and keeps block 1; ours stops after block 1."""
    model = perturbed_model(dtype=torch.float32)
    x = torch.randn(3, 3, 42, 56)
    pooled, _, _ = model(x)
    tokens, coords, all_coords = model.encode(x)
    queries = model.mask_token[None].expand(3, all_coords.shape[0], -1)
    outputs = []
    for block in model.decoder.blocks:  # all blocks, as the official code does
        queries = block(queries, all_coords[None], context=tokens, context_coords=coords)
        outputs.append(queries)
    official = model.dec_norm(outputs[0]).mean(dim=1)
    assert torch.equal(pooled, official)


def count_block_calls(model: CapiModel) -> dict[str, int]:
    calls = {"encoder": 0, "decoder": 0}
    for part in calls:
        for block in getattr(model, part).blocks:
            block.register_forward_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))
    return calls


def test_forward_features_runs_only_the_needed_predictor_blocks():
    model = perturbed_model(dtype=torch.float32)
    calls = count_block_calls(model)
    x = torch.randn(1, 3, 28, 28)
    out = model.forward_features(x, pooled=False)
    assert out.pooled is None and calls == {"encoder": 2, "decoder": 0}
    with_pool = model.forward_features(x)
    assert calls == {"encoder": 4, "decoder": 1}
    assert torch.equal(out.patch_features, with_pool.patch_features)
    assert torch.equal(out.registers, with_pool.registers)


def test_batch_elements_are_independent():
    model = perturbed_model(dtype=torch.float32)
    x = torch.randn(4, 3, 28, 42)
    batched = model(x)
    single = model(x[2:3])
    for a, b in zip(batched, single, strict=True):
        torch.testing.assert_close(a[2:3], b, rtol=1e-5, atol=1e-5)


def test_intermediate_layers():
    model = perturbed_model(dtype=torch.float32)
    x = torch.randn(2, 3, 28, 42)
    (last,) = model.get_intermediate_layers(x)
    assert torch.equal(last, model.forward_features(x, pooled=False).patch_features.reshape(2, 6, 64))
    first, second = model.get_intermediate_layers(x, n=2, reshape=True)
    assert first.shape == second.shape == (2, 64, 2, 3)
    assert torch.equal(second.permute(0, 2, 3, 1).reshape(2, 6, 64), last)
    (raw, regs), = model.get_intermediate_layers(x, n=[0], norm=False, return_registers=True)
    assert raw.shape == (2, 6, 64) and regs.shape == (2, 16, 64)
    assert not torch.allclose(raw, first.permute(0, 2, 3, 1).reshape(2, 6, 64))  # un-normed differs
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[5])


@pytest.mark.parametrize("height,width,message", [(225, 224, "224 or 238"), (224, 10, "14"), (0, 14, "14")])
def test_bad_sizes_name_the_nearest_valid_ones(height, width, message):
    model = perturbed_model(dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 3, height, width))


def test_bad_input_shapes_and_dtypes():
    model = perturbed_model(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="RGB"):
        model(torch.zeros(1, 4, 28, 28))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


def test_rope_init_follows_the_spec_formula():
    model = CapiModel(TINY)
    freqs = model.encoder.blocks[0].residual1.fn.rope.freqs  # head_dim 32
    f = [7 * (7 / 7e-4) ** (-k / 7) for k in range(8)]  # linspace(0, -1, 8): 7 down to 7e-4
    f2 = f + f
    expected = torch.zeros(2, 32)
    expected[0, :16] = torch.tensor(f2)
    expected[1, 16:] = torch.tensor(f2)
    torch.testing.assert_close(freqs.detach(), expected * 2 * math.pi, rtol=1e-6, atol=0)


def test_patch_coordinates_are_row_major():
    coords = patch_coordinates(3, 2)
    assert coords.tolist() == [[0, 0], [0, 1], [0.5, 0], [0.5, 1], [1, 0], [1, 1]]
    assert patch_coordinates(1, 1).tolist() == [[0.0, 0.0]]


def test_meta_build_allocates_nothing_and_train_mode_drop_path_is_random():
    meta = CapiModel(CapiConfig(), device="meta")
    assert all(p.is_meta for p in meta.parameters())
    model = CapiModel(CapiConfig(**{**TINY.to_dict(), "drop_path_rate": 0.5}))
    x = torch.randn(4, 3, 28, 28)
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    model.train()
    torch.manual_seed(0)
    first = model(x)[2]
    torch.manual_seed(1)
    assert not torch.equal(first, model(x)[2])
