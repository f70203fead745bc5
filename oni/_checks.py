"""Argument checks shared by the public modules: one place for the messages users see."""
from __future__ import annotations

import contextlib
import math
import numbers
import reprlib
import threading
from typing import Iterable, List, Optional

import numpy as np
import torch
from torch import Tensor


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds indices: an integer type (bool, float and complex do not)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_int(value, name: str, minimum: int, maximum: float = math.inf) -> int:
    """``value`` as an int, or a TypeError (not an int; bools are refused) / ValueError
    (below ``minimum`` or above ``maximum``) naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_number(value, name: str, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False, why: str = "") -> float:
    """``value`` as a float, or a TypeError (not a real number; bools are refused) /
    ValueError (NaN, infinite, or outside the bounds; ``why`` follows the bounds) naming
    the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int past float64's range
        value = math.inf if value > 0 else -math.inf
    outside = (value <= low if low_open else value < low) or \
        (value >= high if high_open else value > high)
    if not math.isfinite(value) or outside:
        raise ValueError(f"{name} must be a finite number"
                         f"{bounds_text(low, high, low_open, high_open)}{why}, got {value}")
    return value


def bounds_text(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """`` in [low, high]`` (or ``>= low``, ``<= high``) with each bound to the last bit, as
    check_number's messages and the config's help show them."""
    # an infinite bound is left out: "in [0.0, inf]" reads as if inf were allowed
    if math.isfinite(low) and math.isfinite(high):
        return (f" in {'(' if low_open else '['}{_show(low)}, {_show(high)}"
                f"{')' if high_open else ']'}")
    if math.isfinite(low):
        return f" {'>' if low_open else '>='} {_show(low)}"
    if math.isfinite(high):
        return f" {'<' if high_open else '<='} {_show(high)}"
    return ""


def _show(bound: float) -> str:
    return repr(float(bound))  # to the last bit: a rounded bound can admit what it refuses


# values in messages: a YAML alias can make a small file a huge structure (shared, so cheap
# to hold, but not to print in full)
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 2, 4, 4, 80


def short_repr(value) -> str:
    """``repr(value)`` cut to a line: at most 2 levels, 4 items each, 80 characters a
    string."""
    return _SHORT.repr(value)


# the largest row count, feature count, class count or layer width oni takes: one torch can
# read as an int64 (from 2**63 it failed with "Overflow when unpacking long long" and a C++
# stack); a tensor too large for memory, or for int64 bytes, is the allocator's error
MAX_SIZE = 2 ** 62

MAX_SEED = 2 ** 63  # seeds are signed 64-bit integers in torch's generators and our hashes

# Adam's first step moves a parameter by lr / (1 - beta1) = 10 lr, and weight decay adds
# weight_decay * param to the gradient: torch converts both scalars to the float32 parameters'
# dtype and fails mid-training with an overflow error when they do not fit.
MAX_ADAM_LR = float(torch.finfo(torch.float32).max) * (1 - 0.9)
MAX_ADAM_WEIGHT_DECAY = float(torch.finfo(torch.float32).max)
ADAM_FITS = " (Adam's update must fit float32)"  # what the two bounds above are for


def check_seed(seed, name: str = "seed") -> int:
    """A seed in [0, 2**63): larger ones would wrap (2**64 seeds like 0) or overflow."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return int(seed)


def check_row_offset(row_offset, n_rows: int) -> int:
    """The global index of a shard's first row (an int >= 0 whose rows stay below 2**62,
    so the hashes' row keys cannot overflow)."""
    row_offset = check_int(row_offset, "row_offset", 0)
    if row_offset + n_rows > 1 << 62:
        raise ValueError(f"row_offset + N must be at most 2**62, got {row_offset} + {n_rows}")
    return row_offset


def all_finite(t: Tensor) -> bool:
    """No NaN or Inf in the floating tensor ``t`` (True when empty). min and max carry any
    NaN and are infinite where an element is: one reduction pass, 25x faster on the CPU than
    ``isfinite(t).all()``, which writes a bool tensor first."""
    return not t.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def check_finite(t: Tensor, name: str) -> None:
    """A ValueError naming ``name`` and the index of the first NaN or Inf, if ``t`` holds any
    (one reduction pass when it holds none: :func:`all_finite`)."""
    if t.dtype.is_floating_point and not all_finite(t):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name} contains NaN or Inf (first at index {bad})")


def check_not_meta(value, name: str) -> None:
    """A ValueError naming ``name`` when ``value`` (a tensor, or a module's parameters and
    buffers) is on the meta device, where torch's own errors name no argument."""
    tensors = (value,) if isinstance(value, Tensor) else (*value.parameters(), *value.buffers())
    if any(t.is_meta for t in tensors):
        raise ValueError(f"{name} is on the meta device: meta tensors hold no values")


def check_finite_weights(model, name: str, why: str) -> None:
    """A ValueError naming ``name``, the first parameter or buffer holding NaN or Inf, and
    ``why`` it matters, if ``model`` has one."""
    for kind, tensors in (("parameter", model.named_parameters()),
                          ("buffer", model.named_buffers())):
        for key, t in tensors:
            check_not_meta(t, f"{name}'s {kind} {key!r}")
            try:
                check_finite(t.detach(), f"{name}'s {kind} {key!r}")
            except ValueError as err:
                raise ValueError(f"{err}: {why}") from None


class NonFiniteLogits(ValueError):
    """A model returned NaN or Inf logits (a ValueError: the model is the argument at fault;
    where the rows are a computation's own, callers re-raise it as a FloatingPointError)."""


def check_logits(out, n_rows: int, name: str, row_offset: int = 0) -> Tensor:
    """``out`` if it is what a classifier returns for ``n_rows`` rows of ``name``: a real
    floating ``[n_rows, k >= 1]`` tensor, finite in float32 (oni's working precision); else a
    TypeError/ValueError naming the row. A NaN row's argmax is class 0 and its softmax NaN:
    unchecked, a broken model scored as accurate, and probabilities came back NaN."""
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != n_rows:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model must map {name} [n, d] to logits [n, k], got {got}")
    if not out.dtype.is_floating_point:
        raise TypeError(f"the model must return real floating logits, got {out.dtype}")
    if out.shape[1] == 0:
        raise ValueError(f"the model returned logits with k = 0 columns for {name}: a "
                         f"classifier has at least one class")
    row = first_non_finite_row(out.float())
    if row is not None:
        raise NonFiniteLogits(f"the model's logits at row {row + row_offset} of {name} are "
                              f"NaN or beyond float32's range: a model must return finite "
                              f"logits")
    return out


def non_finite_parameter(model) -> Optional[str]:
    """The name of the model's first parameter holding NaN or Inf, None if none does."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p.detach()).all()):
            return name
    return None


def first_bad_row(bad: Tensor) -> Optional[int]:
    """The first row of the mask ``bad`` (``[N]`` or ``[N, ...]``) that holds a True, None
    when none does: the row an error message names."""
    rows = bad.flatten(1).any(1) if bad.dim() > 1 else bad
    if not bool(rows.any()):
        return None
    return int(rows.nonzero()[0, 0])


def mixed_dtypes(tensors: Iterable[Tensor]) -> List[str]:
    """The floating dtypes of ``tensors``, sorted, when there are several (a model's layers
    in two precisions fail in torch as "mat1 and mat2 must have the same dtype"), else [].
    Integer tensors do not count: BatchNorm's num_batches_tracked is a model's own."""
    dtypes = sorted({str(t.dtype) for t in tensors if t.dtype.is_floating_point})
    return dtypes if len(dtypes) > 1 else []


def first_non_finite_row(t: Tensor) -> Optional[int]:
    """The first row of the floating tensor ``t`` (``[N, ...]``) holding a NaN or Inf, None
    when none does, in ``t``'s own dtype (check_logits passes float32); one reduction pass
    in the usual all-finite case, a mask only to name the row."""
    t = t.detach()
    if all_finite(t):
        return None
    return first_bad_row(~torch.isfinite(t))


def check_class_indices(labels: Tensor, name: str, n_classes: Optional[int],
                        why: str = "") -> None:
    """A ValueError naming the first entry of the integer tensor ``labels`` that is not a
    class index in [0, n_classes) (or, with n_classes None, that is negative); ``why`` is
    appended to the message."""
    bad = labels < 0 if n_classes is None else (labels < 0) | (labels >= n_classes)
    row = first_bad_row(bad)
    if row is not None:
        where = "(>= 0)" if n_classes is None else f"in [0, {n_classes})"
        raise ValueError(f"{name}[{row}] = {int(labels[row])} is not a class index {where}"
                         f"{why}")


def tensor_to_numpy(t: Tensor) -> np.ndarray:
    """``t``'s values on the CPU as a numpy array; bfloat16 and float16, which numpy lacks
    (or sklearn refuses), as float32, which holds them exactly."""
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


# where the warnings being issued come from, per thread (see warning_context)
_warning_sources = threading.local()


@contextlib.contextmanager
def warning_context(label: str):
    """Names where the warnings issued inside the block come from (a stage, a shadow model:
    the counts of one defense's warning differ from model to model, so each would read
    alike). A display that asks (:func:`warning_labels`; `oni`'s command line shows them
    before each message) gets the labels; nothing of the warnings module is touched, so the
    library's users, their filters and their records see every warning as issued."""
    labels = _warning_sources.__dict__.setdefault("labels", [])
    labels.append(label)
    try:
        yield
    finally:
        labels.pop()


def warning_labels() -> List[str]:
    """The labels of the :func:`warning_context` blocks this thread is in, outermost first."""
    return list(getattr(_warning_sources, "labels", ()))
