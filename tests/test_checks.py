"""The shared argument checks of oni/_checks.py (their messages are tested where they are
raised; here, the edge cases of the helpers themselves)."""
from __future__ import annotations

import pytest
import torch

from oni._checks import check_finite, check_int, first_bad_row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_names_the_first_bad_index(dtype, bad):
    t = torch.rand(4, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    check_finite(t, "t")
    t[2, 1] = bad
    t[3, 0] = bad
    with pytest.raises(ValueError, match=r"^t contains NaN or Inf \(first at index \[2, 1\]\)$"):
        check_finite(t, "t")


def test_check_finite_passes_empty_and_integer_tensors():
    check_finite(torch.empty(0, 5), "empty")
    check_finite(torch.arange(6).view(2, 3), "ints")
    with pytest.raises(ValueError, match=r"v contains NaN or Inf \(first at index \[0\]\)"):
        check_finite(torch.tensor([float("nan"), 1.0]), "v")


@pytest.mark.parametrize("shape", [(5,), (5, 3), (5, 2, 2)])
def test_first_bad_row(shape):
    bad = torch.zeros(shape, dtype=torch.bool)
    assert first_bad_row(bad) is None
    bad.view(5, -1)[3, -1] = True
    assert first_bad_row(bad) == 3
    bad.view(5, -1)[1, 0] = True
    assert first_bad_row(bad) == 1
    assert first_bad_row(torch.zeros(0, 3, dtype=torch.bool)) is None


def test_check_int():
    assert check_int(3, "n", 1) == 3
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_int(True, "n", 0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int(0, "n", 1)
