"""The shared argument checks of oni/_checks.py (their messages are tested where they are
raised; here, the edge cases of the helpers themselves)."""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

from oni._checks import (check_finite, check_int, check_number, first_bad_row,
                         first_non_finite_row, mixed_dtypes, warning_context,
                         warning_labels)


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
def test_first_non_finite_row(dtype):
    """The detection check_logits, training's first-step check and the batched predictions
    share: in the tensor's own dtype (check_logits passes float32)."""
    t = torch.zeros(5, 3, dtype=dtype)
    assert first_non_finite_row(t) is None and first_non_finite_row(t[:0]) is None
    t[3, 2] = float("inf")
    assert first_non_finite_row(t) == 3
    t[1, 0] = float("nan")
    assert first_non_finite_row(t.requires_grad_()) == 1
    assert first_non_finite_row(torch.full((2, 2, 2), -float("inf"), dtype=dtype)) == 0
    wide = torch.tensor([[1.0], [1e39]], dtype=torch.float64)  # finite, not in float32
    assert first_non_finite_row(wide) is None and first_non_finite_row(wide.float()) == 1


def test_mixed_dtypes():
    """The one mixed-dtype rule of training's model check and save/load_model's."""
    f32, f64, f16 = torch.ones(2), torch.ones(2, dtype=torch.float64), torch.ones(1).half()
    assert mixed_dtypes([]) == [] and mixed_dtypes([f32, f32.clone()]) == []
    assert mixed_dtypes([f64, f32]) == ["torch.float32", "torch.float64"]
    assert mixed_dtypes(iter([f16, f64, f32])) == ["torch.float16", "torch.float32",
                                                   "torch.float64"]
    # integer tensors (BatchNorm's num_batches_tracked) do not count
    assert mixed_dtypes([f64, torch.tensor(3), torch.ones(2, dtype=torch.bool)]) == []


def test_check_int():
    assert check_int(3, "n", 1) == 3
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check_int(True, "n", 0)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        check_int(0, "n", 1)
    assert check_int(np.int64(7), "n", 1, 7) == 7 and type(check_int(np.int64(7), "n", 1)) is int
    with pytest.raises(ValueError, match="n must be <= 7, got 8"):
        check_int(8, "n", 1, 7)


def test_check_number():
    """The one range check of every module's number arguments (each had its own, with its
    own type error and bound wording)."""
    assert check_number(1, "x", 0.0, 1.0) == 1.0 and type(check_number(1, "x")) is float
    assert check_number(np.float32(0.5), "x", 0.0, 1.0) == 0.5
    assert check_number(-1e300, "x") == -1e300
    for value in (True, "0.5", None, torch.tensor(0.5), 1j):
        with pytest.raises(TypeError, match="^x must be a number, got "):
            check_number(value, "x")
    cases = [
        ((1.5, 0.0, 1.0), {}, r"x must be a finite number in \[0.0, 1.0\], got 1.5"),
        ((0.0, 0.0, 1.0), {"low_open": True}, r"in \(0.0, 1.0\], got 0.0"),
        ((1.0, 0.0, 1.0), {"high_open": True}, r"in \[0.0, 1.0\), got 1.0"),
        # an infinite bound is left out, not shown as allowed
        ((-1.0, 0.0), {}, r"x must be a finite number >= 0.0, got -1.0"),
        ((0.0, 0.0), {"low_open": True}, r"x must be a finite number > 0.0, got 0.0"),
        ((2.0, -float("inf"), 1.0), {}, r"x must be a finite number <= 1.0, got 2.0"),
        ((float("inf"), 0.0), {}, r">= 0.0, got inf"),
        ((float("nan"),), {}, r"^x must be a finite number, got nan$"),
        ((10 ** 400, 0.0), {}, r">= 0.0, got inf"),  # float() of it overflows
        ((-10 ** 400, 0.0), {}, r">= 0.0, got -inf"),
        # the bound in full: 3.403e+37 would seem to admit 3.40285e+37
        ((3.40285e37, 0.0, 3.4028234663852877e+37), {"why": " (fits float32)"},
         r"in \[0.0, 3.4028234663852877e\+37\] \(fits float32\), got 3.40285e\+37"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            check_number(*args[:1], "x", *args[1:], **kwargs)


def test_warning_context_names_the_source_and_leaves_the_warnings_alone():
    """It swapped warnings.showwarning inside catch_warnings: a record's message became a
    str, the once-per-location registry was reset at each block, and two threads' blocks
    left one thread's display installed. The labels are per thread; warnings are untouched."""
    shown = warnings.showwarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with warning_context("stage a"), warning_context("shadow 2 of 4"):
            assert warning_labels() == ["stage a", "shadow 2 of 4"]
            warnings.warn("3 of 9 rows fall short")
        assert warning_labels() == []
    assert isinstance(caught[0].message, UserWarning)
    assert str(caught[0].message) == "3 of 9 rows fall short"
    assert warnings.showwarning is shown
    seen = {}

    def worker():
        with warning_context("other thread"):
            seen["labels"] = warning_labels()

    with warning_context("main"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert warning_labels() == ["main"]
    assert seen["labels"] == ["other thread"]
    with pytest.raises(RuntimeError), warning_context("failing"):
        raise RuntimeError
    assert warning_labels() == []
