"""Typed wrappers over ``torch.ops.oni.*`` and their fake (meta) registrations.

Schemas live in ``csrc/ops.cpp``; the executable spec of every op is in
:mod:`oni.reference`. Layout conventions are documented there.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library so torch.ops.oni is populated)

SHAPLEY_OPS = ("permutation_walk_linear", "permutation_walk_masked", "shapley_accumulate")
NOISE_OPS = ("entropy_and_grad", "ascend_and_project")
TRAIN_OPS = ("adam_step_bf16", "sparse_input_linear", "sparse_input_weight_grad", "relu_bf16_",
             "relu_backward_bf16_")
OP_NAMES = SHAPLEY_OPS + NOISE_OPS + TRAIN_OPS


def permutation_walk_linear(
    x: Tensor,  # [N, d]
    baseline: Tensor,  # [N, B, d]
    perm: Tensor,  # [N, P, L] int64
    n_active: Tensor,  # [N] int64
    weight: Tensor,  # [H, d]
    bias: Optional[Tensor],  # [H]
    total_steps: int,
    relu: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:  # [S, H]
    """First-layer pre-activations of every interior prefix of every walk (``relu``: their
    ReLU, fused), in x's dtype or, with ``out_dtype=torch.bfloat16`` (float32 x), rounded to
    bfloat16."""
    return torch.ops.oni.permutation_walk_linear.default(
        x, baseline, perm, n_active, weight, bias, total_steps, relu, out_dtype)


def permutation_walk_masked(
    x: Tensor, baseline: Tensor, perm: Tensor, n_active: Tensor, total_steps: int
) -> Tensor:  # [S, d]
    """Masked inputs (x on the prefix, baseline elsewhere) of every interior prefix."""
    return torch.ops.oni.permutation_walk_masked.default(x, baseline, perm, n_active, total_steps)


def shapley_accumulate(
    step_logits: Tensor,  # [S, k]
    start_logits: Tensor,  # [N, B, k]
    end_logits: Tensor,  # [N, k]
    target: Tensor,  # [N] int64
    perm: Tensor,  # [N, P, L] int64
    n_active: Tensor,  # [N] int64
    n_features: int,
    walks_per_sample: int,
    softmax: bool,
) -> Tuple[Tensor, Tensor]:  # mean [N, d] f64, m2 [N, d] f64
    """Per-feature mean and sum of squared deviations of the walk samples."""
    return torch.ops.oni.shapley_accumulate.default(
        step_logits, start_logits, end_logits, target, perm, n_active, n_features,
        walks_per_sample, softmax)


def cuda_version() -> int:
    """CUDA version the extension was compiled with (major*1000 + minor*10), 0 if none."""
    return int(torch.ops.oni.cuda_version.default())


def has_kernel(device_type: str, names=OP_NAMES) -> bool:
    """Whether the ops ``names`` (default: all) have kernels compiled for ``device_type``
    ("cpu", "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"oni::{name}", key)
               for name in names)

# ----------------------------------------------------------------------------- fake kernels
# Shapes, dtypes and devices of the outputs for torch.compile and meta tensors, with the
# checks of csrc/checks.h and the same wording. A call that mixes meta and real tensors also
# lands here (the dispatcher prefers the Meta key): the device check refuses it, where a fake
# kernel that checks nothing would return uninitialised real tensors or skip an in-place
# update without a word.

_FLOATS = (torch.float32, torch.float64)


def _require(cond, message: str) -> None:
    torch._check(cond, lambda: message)


def _same_device(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None:
            _require(t.device == ref.device,
                     f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _same_dtype(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None:
            _require(t.dtype == ref.dtype,
                     f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")


def _dtype_in(t: Tensor, name: str, dtypes) -> None:
    want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
    _require(t.dtype in dtypes, f"{name} must be {want}, got {t.dtype}")


def _step_count_fits(perm: Tensor, n_refs) -> None:
    factors = (perm.shape[0], perm.shape[1], n_refs, perm.shape[2])
    _require(0 in factors or math.prod(factors) < 2 ** 63,
             f"the walks' step count may exceed int64: N * P * B * L = "
             f"{' * '.join(str(f) for f in factors)} (inputs, walks, references, walk length)")


def _fake_walk(x, baseline, perm, n_active):
    _require(x.dim() == 2, f"x must be 2-D [N, d], got {x.dim()}-D")
    _dtype_in(x, "x", _FLOATS)
    _same_device("x", x, baseline=baseline, perm=perm, n_active=n_active)
    _require(baseline.dim() == 3 and baseline.shape[0] == x.shape[0]
             and baseline.shape[2] == x.shape[1],
             f"baseline must be [N, B, d] = [{x.shape[0]}, B, {x.shape[1]}], got "
             f"{tuple(baseline.shape)}")
    _same_dtype("x", x, baseline=baseline)
    _require(perm.dim() == 3 and perm.shape[0] == x.shape[0],
             f"perm must be [N, P, L] with N = {x.shape[0]}, got {tuple(perm.shape)}")
    _dtype_in(perm, "perm", (torch.int64,))
    _require(n_active.dim() == 1 and n_active.shape[0] == x.shape[0],
             f"n_active must be [N] = [{x.shape[0]}], got {tuple(n_active.shape)}")
    _dtype_in(n_active, "n_active", (torch.int64,))
    _step_count_fits(perm, baseline.shape[1])


def _walk_out_dtype(x: Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    dtype = x.dtype if out_dtype is None else out_dtype
    _require(dtype == x.dtype or (dtype == torch.bfloat16 and x.dtype == torch.float32),
             f"out_dtype must be x's dtype {x.dtype} or, for float32 x, torch.bfloat16; got "
             f"{dtype}")
    return dtype


@torch.library.register_fake("oni::permutation_walk_linear")
def _(x, baseline, perm, n_active, weight, bias, total_steps, relu=False, out_dtype=None):
    _fake_walk(x, baseline, perm, n_active)
    _same_device("x", x, weight=weight, bias=bias)
    _require(weight.dim() == 2 and weight.shape[1] == x.shape[1],
             f"weight must be [H, d] with d = {x.shape[1]}, got {tuple(weight.shape)}")
    _same_dtype("x", x, weight=weight)
    _require(bias is None or tuple(bias.shape) == (weight.shape[0],),
             f"bias must be [H] = [{weight.shape[0]}], got "
             f"{None if bias is None else tuple(bias.shape)}")
    _require(total_steps >= 0, f"total_steps must be >= 0, got {total_steps}")
    return x.new_empty((total_steps, weight.shape[0]), dtype=_walk_out_dtype(x, out_dtype))


@torch.library.register_fake("oni::permutation_walk_masked")
def _(x, baseline, perm, n_active, total_steps):
    _fake_walk(x, baseline, perm, n_active)
    _require(total_steps >= 0, f"total_steps must be >= 0, got {total_steps}")
    return x.new_empty((total_steps, x.shape[1]))


@torch.library.register_fake("oni::shapley_accumulate")
def _(step_logits, start_logits, end_logits, target, perm, n_active, n_features,
      walks_per_sample, softmax):
    _require(end_logits.dim() == 2, f"end_logits must be 2-D [N, k], got {end_logits.dim()}-D")
    _dtype_in(end_logits, "end_logits", _FLOATS)
    _same_device("end_logits", end_logits, step_logits=step_logits, start_logits=start_logits,
                 target=target, perm=perm, n_active=n_active)
    n, k = end_logits.shape
    _require(step_logits.dim() == 2 and step_logits.shape[1] == k,
             f"step_logits must be [S, k] with k = {k}, got {tuple(step_logits.shape)}")
    _require(start_logits.dim() == 3 and start_logits.shape[0] == n
             and start_logits.shape[2] == k,
             f"start_logits must be [N, B, k] = [{n}, B, {k}], got {tuple(start_logits.shape)}")
    _same_dtype("end_logits", end_logits, step_logits=step_logits, start_logits=start_logits)
    _require(tuple(target.shape) == (n,), f"target must be [N] = [{n}], got "
                                          f"{tuple(target.shape)}")
    _dtype_in(target, "target", (torch.int64,))
    _require(perm.dim() == 3 and perm.shape[0] == n,
             f"perm must be [N, P, L] with N = {n}, got {tuple(perm.shape)}")
    _dtype_in(perm, "perm", (torch.int64,))
    _require(tuple(n_active.shape) == (n,) and n_active.dtype == torch.int64,
             f"n_active must be int64 [N] = [{n}], got {n_active.dtype} {tuple(n_active.shape)}")
    _require(n_features >= 1 and n_features >= perm.shape[2],
             f"n_features = {n_features} must be >= 1 and >= the walk length L = "
             f"{perm.shape[2]}")
    _require(walks_per_sample >= 1, f"walks_per_sample must be >= 1, got {walks_per_sample}")
    _step_count_fits(perm, start_logits.shape[1])
    mean = end_logits.new_empty((n, n_features), dtype=torch.float64)
    return mean, torch.empty_like(mean)


def entropy_and_grad(logits: Tensor) -> Tuple[Tensor, Tensor]:  # H [N], grad [N, k]
    """Entropy of softmax(logits) per row and its gradient at the logits, fused."""
    return torch.ops.oni.entropy_and_grad.default(logits)


def ascend_and_project(
    eta: Tensor,  # [N, d]
    direction: Tensor,  # [N, d]
    step: Tensor,  # [N]
    budget: Tensor,  # [N, d]
    radius: Tensor,  # [N]
    active: Tensor,  # [N] bool
    check_values: bool = True,
) -> Tensor:  # [N, d]
    """eta + step * direction projected exactly onto the box ∩ ball, on active rows.
    ``check_values=False`` skips the scan of budget and radius on CUDA (a host sync per
    call), for callers that validated them once; the CPU kernel scans anyway."""
    return torch.ops.oni.ascend_and_project.default(eta, direction, step, budget, radius, active,
                                                    check_values)


@torch.library.register_fake("oni::entropy_and_grad")
def _(logits):
    _require(logits.dim() == 2, f"logits must be 2-D [N, k], got {logits.dim()}-D")
    _dtype_in(logits, "logits", _FLOATS)
    _require(logits.shape[1] >= 1, "logits must have at least one class (k >= 1), got k = 0")
    return logits.new_empty((logits.shape[0],)), torch.empty_like(logits)


@torch.library.register_fake("oni::ascend_and_project")
def _(eta, direction, step, budget, radius, active, check_values=True):
    _require(eta.dim() == 2, f"eta must be 2-D [N, d], got {eta.dim()}-D")
    _dtype_in(eta, "eta", _FLOATS)
    _same_device("eta", eta, direction=direction, step=step, budget=budget, radius=radius,
                 active=active)
    n, d = eta.shape
    for name, t, shape, dims in (("direction", direction, (n, d), "[N, d]"),
                                 ("budget", budget, (n, d), "[N, d]"),
                                 ("step", step, (n,), "[N]"), ("radius", radius, (n,), "[N]")):
        _require(tuple(t.shape) == shape, f"{name} must be {dims} = {list(shape)}, got "
                                          f"{list(t.shape)}")
    _same_dtype("eta", eta, direction=direction, budget=budget, step=step, radius=radius)
    _require(tuple(active.shape) == (n,), f"active must be [N] = [{n}], got "
                                          f"{tuple(active.shape)}")
    _dtype_in(active, "active", (torch.bool,))
    return torch.empty_like(eta)


def adam_step_bf16(
    param: Tensor,  # [...] float32, updated in place
    exp_avg: Tensor,  # [...] float32, updated in place
    exp_avg_sq: Tensor,  # [...] float32, updated in place
    param_bf16: Tensor,  # [...] bfloat16, overwritten with bfloat16(param)
    grad_bf16: Tensor,  # [...] bfloat16
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    flush_below: float,
) -> None:
    """One ``torch.optim.Adam`` step of the float32 ``param`` from a bfloat16 gradient, with
    moments below ``flush_below`` zeroed and the bfloat16 copy rewritten, in one pass."""
    torch.ops.oni.adam_step_bf16.default(param, exp_avg, exp_avg_sq, param_bf16, grad_bf16,
                                         step, lr, beta1, beta2, eps, weight_decay, flush_below)


@torch.library.register_fake("oni::adam_step_bf16")
def _(param, exp_avg, exp_avg_sq, param_bf16, grad_bf16, step, lr, beta1, beta2, eps,
      weight_decay, flush_below):
    _dtype_in(param, "param", (torch.float32,))
    _same_device("param", param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, param_bf16=param_bf16,
                 grad_bf16=grad_bf16)
    for name, t, dtype in (("exp_avg", exp_avg, torch.float32),
                           ("exp_avg_sq", exp_avg_sq, torch.float32),
                           ("param_bf16", param_bf16, torch.bfloat16),
                           ("grad_bf16", grad_bf16, torch.bfloat16)):
        _dtype_in(t, name, (dtype,))
        _require(t.shape == param.shape, f"{name} must have param's shape "
                                         f"{tuple(param.shape)}, got {tuple(t.shape)}")
    _require(step >= 1, f"step must be >= 1 (the count including this step), got {step}")


def sparse_input_linear(
    x: Tensor,  # [K, B, d], mostly zeros
    weight_t: Tensor,  # [K, d, H]
    bias: Optional[Tensor],  # [K, H]
) -> Tensor:  # [K, B, H]
    """``bias + x @ weight_t`` for K models, from the non-zeros of ``x`` only."""
    return torch.ops.oni.sparse_input_linear.default(x, weight_t, bias)


def sparse_input_weight_grad(x: Tensor, grad: Tensor, out: Tensor) -> None:
    """``out = x^T @ grad`` for K models (x [K, B, d], grad [K, B, H], out [K, d, H]
    contiguous, written in place), from the non-zeros of x."""
    torch.ops.oni.sparse_input_weight_grad.default(x, grad, out)


@torch.library.register_fake("oni::sparse_input_linear")
def _(x, weight_t, bias):
    _require(x.dim() == 3, f"x must be 3-D [K, B, d], got {x.dim()}-D")
    _dtype_in(x, "x", _FLOATS)
    _same_device("x", x, weight_t=weight_t, bias=bias)
    k, _, d = x.shape
    _require(weight_t.dim() == 3 and weight_t.shape[0] == k and weight_t.shape[1] == d,
             f"weight_t must be [K, d, H] = [{k}, {d}, H], got {tuple(weight_t.shape)}")
    _same_dtype("x", x, weight_t=weight_t)
    if bias is not None:
        _require(tuple(bias.shape) == (k, weight_t.shape[2]),
                 f"bias must be [K, H] = [{k}, {weight_t.shape[2]}], got {tuple(bias.shape)}")
        _same_dtype("x", x, bias=bias)
    return x.new_empty((x.shape[0], x.shape[1], weight_t.shape[2]))


@torch.library.register_fake("oni::sparse_input_weight_grad")
def _(x, grad, out):
    _require(x.dim() == 3, f"x must be 3-D [K, B, d], got {x.dim()}-D")
    _dtype_in(x, "x", _FLOATS)
    _same_device("x", x, grad=grad, out=out)
    _require(grad.dim() == 3 and grad.shape[:2] == x.shape[:2],
             f"grad must be [K, B, H] = [{x.shape[0]}, {x.shape[1]}, H], got "
             f"{tuple(grad.shape)}")
    want = (x.shape[0], x.shape[2], grad.shape[2])
    _require(tuple(out.shape) == want, f"out must be [K, d, H] = {list(want)}, got "
                                       f"{tuple(out.shape)}")
    _same_dtype("x", x, grad=grad, out=out)


def relu_bf16_(x: Tensor) -> None:
    """``x = relu(x)`` in place on a contiguous bfloat16 tensor (-0 and NaN kept)."""
    torch.ops.oni.relu_bf16_.default(x)


def relu_backward_bf16_(grad: Tensor, output: Tensor, bias_grad: Tensor) -> None:
    """The ReLU's backward in place (``grad`` zeroed where ``output <= 0``) and
    ``bias_grad = grad.sum(-1)`` of the result (float32 sum, one rounding); all bfloat16."""
    torch.ops.oni.relu_backward_bf16_.default(grad, output, bias_grad)


@torch.library.register_fake("oni::relu_bf16_")
def _(x):
    _dtype_in(x, "x", (torch.bfloat16,))


@torch.library.register_fake("oni::relu_backward_bf16_")
def _(grad, output, bias_grad):
    _require(grad.dim() >= 1, "grad must be at least 1-D [..., B], got 0-D")
    _same_device("grad", grad, output=output, bias_grad=bias_grad)
    for name, t in (("grad", grad), ("output", output), ("bias_grad", bias_grad)):
        _dtype_in(t, name, (torch.bfloat16,))
    _require(output.shape == grad.shape, f"output must have grad's shape {tuple(grad.shape)}, "
                                         f"got {tuple(output.shape)}")
    _require(bias_grad.shape == grad.shape[:-1],
             f"bias_grad must be grad's shape without its last dim {tuple(grad.shape[:-1])}, "
             f"got {tuple(bias_grad.shape)}")
