"""Warmup then truncated cosine: endpoints, monotonic pieces, truncation, and the official formula."""

import math

import numpy as np
import pytest

from capi_backbones.schedules import warmup_truncated_cosine


def _official(total, warmup, base, final, start=0.0, truncate=0.8) -> np.ndarray:
    """The official WarmupThenCosine table (facebookresearch/capi utils.py), built with numpy."""
    iters = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * truncate * iters / len(iters)))
    return np.concatenate((np.linspace(start, base, warmup), cosine))


def _values(total, warmup, base, final, start=0.0, truncate=0.8) -> list[float]:
    kw = dict(total_steps=total, warmup_steps=warmup, base_value=base, final_value=final)
    return [warmup_truncated_cosine(s, start_warmup_value=start, truncate_cos=truncate, **kw) for s in range(total)]


@pytest.mark.parametrize(
    ("total", "warmup", "base", "final", "start", "truncate"),
    [
        (1000, 100, 1e-3, 0.0, 0.0, 0.8),
        (1000, 100, 0.999, 1.0, 1.0, 0.8),
        (57, 13, 5e-4, 1e-6, 0.0, 1.0),
        (20, 0, 2.0, 1.0, 0.0, 0.5),
    ],
)
def test_matches_the_official_table(total, warmup, base, final, start, truncate):
    ours = np.array(_values(total, warmup, base, final, start, truncate))
    np.testing.assert_allclose(ours, _official(total, warmup, base, final, start, truncate), rtol=1e-13, atol=1e-16)


def test_lr_endpoints_and_pieces():
    total, warmup, base = 1000, 100, 1e-3
    v = _values(total, warmup, base, 0.0)
    assert v[0] == 0.0  # step 0 = start value
    assert v[warmup - 1] == base and v[warmup] == base  # end of warmup = base, then the cosine starts there
    assert all(a < b for a, b in zip(v[:warmup], v[1:warmup], strict=False))  # warmup rises
    assert all(a > b for a, b in zip(v[warmup:], v[warmup + 1 :], strict=False))  # cosine falls
    # truncated at 80% of its course: the last value is base * (1 + cos(0.8 pi (n-1)/n)) / 2, not 0
    n = total - warmup
    assert math.isclose(v[-1], base * 0.5 * (1 + math.cos(math.pi * 0.8 * (n - 1) / n)), rel_tol=1e-12)
    assert v[-1] > 0.09 * base
    assert (
        warmup_truncated_cosine(total, total_steps=total, base_value=base, final_value=0.0, warmup_steps=warmup) == 0.0
    )
    untruncated = _values(total, warmup, base, 0.0, truncate=1.0)
    assert untruncated[-1] < 1e-4 * base


def test_momentum_schedule():
    v = _values(1000, 100, 0.999, 1.0, start=1.0)
    assert v[0] == 1.0 and v[99] == 0.999 and v[100] == 0.999
    assert all(a > b for a, b in zip(v[:100], v[1:100], strict=False))  # warmup falls to 0.999
    assert all(a < b for a, b in zip(v[100:], v[101:], strict=False))  # then rises towards 1
    assert v[-1] < 1.0  # truncated: never reaches 1 inside the run


def test_bad_arguments():
    kw = dict(total_steps=10, base_value=1.0, final_value=0.0, warmup_steps=2)
    with pytest.raises(ValueError, match="step"):
        warmup_truncated_cosine(-1, **kw)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_truncated_cosine(0, **{**kw, "warmup_steps": 11})
    with pytest.raises(ValueError, match="total_steps"):
        warmup_truncated_cosine(0, **{**kw, "total_steps": 0, "warmup_steps": 0})
    with pytest.raises(ValueError, match="truncate_cos"):
        warmup_truncated_cosine(0, truncate_cos=1.5, **kw)
