"""Typed wrappers over ``torch.ops.oni.*`` and their fake (meta) registrations.

Schemas live in ``csrc/ops.cpp``; the executable spec of every op is in
:mod:`oni.reference`. Layout conventions are documented there.
"""
from __future__ import annotations

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
) -> Tensor:  # [S, H]
    """First-layer pre-activations of every interior prefix of every walk (``relu``: their
    ReLU, fused)."""
    return torch.ops.oni.permutation_walk_linear.default(
        x, baseline, perm, n_active, weight, bias, total_steps, relu)


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


@torch.library.register_fake("oni::permutation_walk_linear")
def _(x, baseline, perm, n_active, weight, bias, total_steps, relu=False):
    torch._check(x.dim() == 2 and baseline.dim() == 3 and perm.dim() == 3)
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[1])
    return x.new_empty((total_steps, weight.shape[0]))


@torch.library.register_fake("oni::permutation_walk_masked")
def _(x, baseline, perm, n_active, total_steps):
    torch._check(x.dim() == 2 and baseline.dim() == 3 and perm.dim() == 3)
    return x.new_empty((total_steps, x.shape[1]))


@torch.library.register_fake("oni::shapley_accumulate")
def _(step_logits, start_logits, end_logits, target, perm, n_active, n_features,
      walks_per_sample, softmax):
    torch._check(end_logits.dim() == 2 and start_logits.dim() == 3)
    n = end_logits.shape[0]
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
    torch._check(logits.dim() == 2)
    return logits.new_empty((logits.shape[0],)), torch.empty_like(logits)


@torch.library.register_fake("oni::ascend_and_project")
def _(eta, direction, step, budget, radius, active, check_values=True):
    torch._check(eta.dim() == 2 and direction.shape == eta.shape and budget.shape == eta.shape)
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
    torch._check(exp_avg.shape == param.shape and exp_avg_sq.shape == param.shape)
    torch._check(param_bf16.shape == param.shape and grad_bf16.shape == param.shape)


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
    torch._check(x.dim() == 3 and weight_t.dim() == 3 and weight_t.shape[1] == x.shape[2])
    return x.new_empty((x.shape[0], x.shape[1], weight_t.shape[2]))


@torch.library.register_fake("oni::sparse_input_weight_grad")
def _(x, grad, out):
    torch._check(x.dim() == 3 and grad.dim() == 3 and grad.shape[1] == x.shape[1])
    torch._check(out.shape == (x.shape[0], x.shape[2], grad.shape[2]))


def relu_bf16_(x: Tensor) -> None:
    """``x = relu(x)`` in place on a contiguous bfloat16 tensor (NaN kept)."""
    torch.ops.oni.relu_bf16_.default(x)


def relu_backward_bf16_(grad: Tensor, output: Tensor, bias_grad: Tensor) -> None:
    """The ReLU's backward in place (``grad`` zeroed where ``output <= 0``) and
    ``bias_grad = grad.sum(-1)`` of the result (float32 sum, one rounding); all bfloat16."""
    torch.ops.oni.relu_backward_bf16_.default(grad, output, bias_grad)


@torch.library.register_fake("oni::relu_bf16_")
def _(x):
    torch._check(x.dtype == torch.bfloat16)


@torch.library.register_fake("oni::relu_backward_bf16_")
def _(grad, output, bias_grad):
    torch._check(grad.dim() >= 1 and output.shape == grad.shape)
    torch._check(bias_grad.shape == grad.shape[:-1])
