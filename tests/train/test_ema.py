"""EMA update of the teacher."""

import copy

import pytest
import torch

from capi_backbones.models import CapiConfig, CapiModel
from capi_backbones.train.ema import ema_update_


def _pair(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(4, 3, generator=g), torch.randn(7, generator=g), torch.randn(2, 2, 2, generator=g)]
    student = [torch.randn_like(t) for t in teacher]
    return teacher, student


def test_endpoints():
    teacher, student = _pair()
    before = [t.clone() for t in teacher]
    student_before = [s.clone() for s in student]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before, strict=True))  # m = 1: unchanged
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher, student, strict=True))  # m = 0: the student
    assert all(torch.equal(s, b) for s, b in zip(student, student_before, strict=True))  # student untouched


def test_formula_and_in_place():
    teacher, student = _pair(1)
    before = [t.clone() for t in teacher]
    pointers = [t.data_ptr() for t in teacher]
    ema_update_(teacher, student, 0.9)
    for t, b, s in zip(teacher, before, student, strict=True):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-6)
    assert [t.data_ptr() for t in teacher] == pointers
    # repeated updates converge to a fixed student geometrically: distance shrinks by m each step
    gap = (teacher[0] - student[0]).norm()
    for _ in range(10):
        ema_update_(teacher, student, 0.5)
    assert torch.allclose((teacher[0] - student[0]).norm(), gap * 0.5**10, rtol=1e-4)


def test_on_model_parameters():
    torch.manual_seed(0)
    student = CapiModel(
        CapiConfig(embed_dim=64, depth=1, num_heads=2, pred_embed_dim=64, pred_depth=1, pred_num_heads=2)
    )
    teacher = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update_(list(teacher.parameters()), list(student.parameters()), 0.75)
    for (name, t), s in zip(teacher.named_parameters(), student.parameters(), strict=True):
        assert torch.allclose(t, s - 0.75, atol=1e-6), name  # t = 0.75 (s - 1) + 0.25 s


def test_errors():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="teacher and"):
        ema_update_(teacher, student[:2], 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(teacher, student, 1.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(3)], [torch.zeros(4)], 0.9)
