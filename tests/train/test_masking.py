"""Masks and the masking collator: exact counts, contiguity on the torus, aspect ratios, determinism."""

import math
from collections import deque

import pytest
import torch

from capi_backbones.train.masking import (
    MASKING_STRATEGIES,
    MaskedBatch,
    MaskingCollator,
    block_mask,
    inverse_block_mask,
    n_masked_tokens,
    sample_block_shape,
    uniform_mask,
)

GRIDS = [(16, 16), (14, 20), (20, 14), (7, 3), (1, 9), (9, 1), (4, 32), (2, 2)]
RATIOS = [0.0, 0.1, 0.5, 0.65, 0.9, 1.0]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _components(cells: torch.Tensor, wrap: bool) -> int:
    """Number of 4-connected components of the True cells of an (h, w) bool grid."""
    h, w = cells.shape
    todo = {(int(i), int(j)) for i, j in cells.nonzero()}
    n = 0
    while todo:
        n += 1
        queue = deque([todo.pop()])
        while queue:
            i, j = queue.popleft()
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a, b = i + di, j + dj
                if wrap:
                    a, b = a % h, b % w
                if (a, b) in todo:
                    todo.remove((a, b))
                    queue.append((a, b))
    return n


def test_reference_count_16x16():
    assert n_masked_tokens(256, 0.65) == 166
    for name, fn in MASKING_STRATEGIES.items():
        mask = fn(16, 16, 0.65, generator=_gen())
        assert mask.shape == (16, 16) and mask.dtype == torch.bool, name
        assert int(mask.sum()) == 166, name


@pytest.mark.parametrize("strategy", sorted(MASKING_STRATEGIES))
def test_exact_masked_count_many_draws(strategy):
    fn = MASKING_STRATEGIES[strategy]
    g = _gen(1)
    for h, w in GRIDS:
        for ratio in RATIOS:
            expected = int(h * w * ratio)
            for _ in range(5):
                mask = fn(h, w, ratio, generator=g)
                assert mask.shape == (h, w)
                assert int(mask.sum()) == expected, (strategy, h, w, ratio)
    for _ in range(300):  # random grids and ratios
        h, w = (int(v) for v in torch.randint(1, 24, (2,), generator=g))
        ratio = float(torch.rand((), generator=g))
        assert int(fn(h, w, ratio, generator=g).sum()) == int(h * w * ratio), (strategy, h, w, ratio)


def test_visible_block_contiguous_on_torus():
    g = _gen(2)
    wrapped = 0
    for h, w in [(16, 16), (14, 20), (20, 14), (7, 3), (5, 11)]:
        for ratio in (0.3, 0.65, 0.9):
            for _ in range(40):
                visible = ~inverse_block_mask(h, w, ratio, generator=g)
                assert _components(visible, wrap=True) == 1
                wrapped += _components(visible, wrap=False) > 1
    assert wrapped > 0, "the roll should sometimes split the block across the grid's edges"


def test_unrolled_block_is_a_truncated_rectangle():
    g = _gen(3)
    for h, w in [(16, 16), (14, 20), (9, 4)]:
        for _ in range(50):
            visible = ~inverse_block_mask(h, w, 0.65, generator=g, roll=False)
            n = int(visible.sum())
            assert _components(visible, wrap=False) == 1
            rows, cols = visible.nonzero().unbind(1)
            top, left = int(rows.min()), int(cols.min())
            width = int(cols.max()) - left + 1
            # the first n cells, row-major, of a rectangle `width` columns wide starting at (top, left)
            expected = torch.zeros(h, w, dtype=torch.bool)
            for k in range(n):
                expected[top + k // width, left + k % width] = True
            assert torch.equal(visible, expected)


def test_masked_block_is_contiguous():
    g = _gen(4)
    for _ in range(100):
        masked = block_mask(14, 20, 0.4, generator=g)
        assert int(masked.sum()) == int(14 * 20 * 0.4)
        assert _components(masked, wrap=True) == 1


def test_aspect_ratio_log_uniform_in_range():
    g = _gen(5)
    n = 256 - 166  # the visible block of CAPI's default at 224 px
    shapes = [sample_block_shape(16, 16, n, generator=g) for _ in range(2000)]
    log_aspects = torch.tensor([math.log(s.aspect) for s in shapes])
    assert log_aspects.min() >= math.log(0.5) - 1e-9 and log_aspects.max() <= math.log(2.0) + 1e-9
    assert log_aspects.min() < math.log(0.55) and log_aspects.max() > math.log(1.8)  # the whole range is used
    assert abs(float(log_aspects.mean())) < 0.05  # symmetric in log space
    # log-uniform: its variance is (2 log 2)^2 / 12
    assert abs(float(log_aspects.var()) - (2 * math.log(2)) ** 2 / 12) < 0.02
    for s in shapes:
        assert s.height * s.width >= n and s.height <= 16 and s.width <= 16
        assert s.height == math.ceil(math.sqrt(n * s.aspect)) and s.width == math.ceil(math.sqrt(n / s.aspect))


def test_aspect_ratio_clipped_to_fit_non_square_grid():
    g = _gen(6)
    for h, w, n in [(4, 32, 60), (32, 4, 60), (3, 50, 149), (16, 16, 256), (1, 9, 5)]:
        for _ in range(200):
            s = sample_block_shape(h, w, n, generator=g)
            assert 1 <= s.height <= h and 1 <= s.width <= w and s.height * s.width >= n, (h, w, n, s)
    # where [0.5, 2] fits, the drawn ratio stays in it
    for _ in range(200):
        s = sample_block_shape(14, 20, 90, generator=g)
        assert 0.5 - 1e-9 <= s.aspect <= 2 + 1e-9


def test_rolled_inverse_block_is_translation_invariant_on_average():
    g = _gen(7)
    freq = torch.stack([inverse_block_mask(8, 8, 0.65, generator=g) for _ in range(3000)]).float().mean(0)
    assert freq.min() > 0.6 and freq.max() < 0.7  # every position masked ~ 41/64 of the time


def test_determinism_and_no_global_rng():
    state = torch.get_rng_state()
    for name, fn in MASKING_STRATEGIES.items():
        a = [fn(14, 20, 0.65, generator=_gen(11)) for _ in range(3)]
        b = [fn(14, 20, 0.65, generator=_gen(11)) for _ in range(3)]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name
        g = _gen(11)
        draws = [fn(14, 20, 0.65, generator=g) for _ in range(5)]
        assert any(not torch.equal(draws[0], d) for d in draws[1:]), name
    assert torch.equal(state, torch.get_rng_state())


def test_bad_arguments():
    with pytest.raises(ValueError, match="mask_ratio"):
        uniform_mask(4, 4, 1.5, generator=_gen())
    with pytest.raises(ValueError, match="Grid size"):
        inverse_block_mask(0, 4, 0.5, generator=_gen())
    with pytest.raises(ValueError, match="min_aspect"):
        block_mask(4, 4, 0.5, generator=_gen(), min_aspect=2.0, max_aspect=0.5)


# ----------------------------------------------------------------------------------------- collator


def _images(n: int, size=(3, 64, 48)) -> list[torch.Tensor]:
    return [torch.randn(*size, generator=_gen(100 + i)) for i in range(n)]


@pytest.mark.parametrize("strategy", sorted(MASKING_STRATEGIES))
def test_collator_shapes_and_index_sets(strategy):
    collate = MaskingCollator((16, 12), strategy=strategy, prediction_ratio=0.1)
    n_tokens = 16 * 12
    n_masked = int(n_tokens * 0.65)
    assert (collate.n_masked, collate.n_visible, collate.n_predict) == (n_masked, n_tokens - n_masked, n_masked // 10)
    images = _images(6)
    out = collate([(img, 3) for img in images], _gen(4))  # (image, label) tuples are accepted
    assert isinstance(out, MaskedBatch)
    assert torch.equal(out.images, torch.stack(images))
    assert out.visible_indices.shape == (6, collate.n_visible) and out.visible_indices.dtype == torch.long
    assert out.predict_indices.shape == (6, collate.n_predict) and out.predict_indices.dtype == torch.long
    for b in range(6):
        visible, predict, mask = out.visible_indices[b], out.predict_indices[b], out.masks[b].flatten()
        assert torch.all(visible[1:] > visible[:-1]) and torch.all(predict[1:] > predict[:-1])  # ascending
        assert torch.equal(visible, (~mask).nonzero().flatten())
        assert mask[predict].all()  # predicted positions are masked ...
        assert not set(predict.tolist()) & set(visible.tolist())  # ... hence never visible


def test_collator_predicts_a_uniform_subset_of_the_masked():
    collate = MaskingCollator((4, 4), mask_ratio=0.5, prediction_ratio=0.25, strategy="uniform")
    counts = torch.zeros(16)
    masked_counts = torch.zeros(16)
    g = _gen(8)
    for _ in range(400):
        masks, _, predict = collate.sample_indices(4, g)
        masked_counts += masks.flatten(1).sum(0)
        counts += torch.bincount(predict.flatten(), minlength=16)
    ratio = counts / masked_counts  # P(predicted | masked) should be n_predict / n_masked = 2 / 8
    assert torch.allclose(ratio, torch.full((16,), 0.25), atol=0.05)


def test_collator_explicit_generator():
    batch = _images(2)
    collate = MaskingCollator((16, 12))
    x, y = collate(batch, _gen(9)), collate(batch, _gen(9))
    assert torch.equal(x.masks, y.masks) and torch.equal(x.predict_indices, y.predict_indices)
    assert not torch.equal(x.masks, collate(batch, _gen(10)).masks)


def test_collator_errors():
    with pytest.raises(ValueError, match="Unknown masking strategy"):
        MaskingCollator((16, 16), strategy="random")
    with pytest.raises(ValueError, match="n_predict=0"):
        MaskingCollator((4, 4), prediction_ratio=0.05)
    with pytest.raises(ValueError, match="masks all"):
        MaskingCollator((4, 4), mask_ratio=1.0)
    collate = MaskingCollator((16, 16))
    with pytest.raises(ValueError, match="square patches"):
        collate([torch.zeros(3, 224, 210)], _gen(0))
    with pytest.raises(TypeError, match="image tensor"):
        collate(["not an image"], _gen(0))
    with pytest.raises(ValueError, match="empty"):
        collate([], _gen(0))
