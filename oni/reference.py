"""Pure-PyTorch twins of every oni op: the executable specification.

Every kernel in ``csrc/`` is tested against the function of the same name here, and the
``backend="torch"`` path of the public API runs these functions (batched, on the model's
device), so they are written to be fast as well as plain.

Shapley layout (shared by all Shapley ops)
------------------------------------------
* ``x [N, d]``: N inputs; ``baseline [N, B, d]``: B references per input (a single baseline
  is B = 1; a background set is the same B references for every input, possibly an
  expanded view).
* ``perm [N, P, L]`` int64: P permutation walks per input. The first ``n_active[n]`` entries
  of each walk are a permutation of input n's active features (those where x differs from a
  reference); entries past that are padding and never read.
* A walk over ``a`` active features visits ``a + 1`` coalitions (prefixes); the empty and the
  full prefix are the same for every walk (the baseline and x), so only the ``a - 1``
  *interior* prefixes are materialised. Step rows are ordered ``[n][p][b][k]`` with
  ``k = 1 .. a_n - 1`` (prefix size), ``S = sum_n P * B * max(a_n - 1, 0)`` rows in all.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def interior_steps(n_active: Tensor, n_walks: int, n_refs: int) -> int:
    """Number of interior step rows S for the given active counts."""
    return int((n_active - 1).clamp(min=0).sum().item()) * n_walks * n_refs


def _interior_mask(n_active: Tensor, length: int) -> Tensor:
    """[N, length] bool: step position k (0-based, prefix size k + 1) is interior."""
    pos = torch.arange(length, device=n_active.device)
    return pos[None, :] < (n_active - 1)[:, None]


def _check_total(total_steps: int, n_active: Tensor, n_walks: int, n_refs: int, name: str):
    expected = interior_steps(n_active, n_walks, n_refs)
    if total_steps != expected:
        raise ValueError(f"{name}: total_steps = {total_steps} but the walks have "
                         f"{expected} interior steps")


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
    """First-layer pre-activations ``W z + bias`` of every interior prefix ``z`` (with
    ``relu``, ``max(0, W z + bias)``: the activation that follows, fused), in x's dtype or
    ``out_dtype`` (bfloat16 for float32 x: the float32 values rounded).

    Incremental first layer: a walk starts at ``W r + bias`` and each step adds the permuted
    column ``W[:, i] * (x_i - r_i)``, so all prefixes are one cumulative sum.
    """
    n, _ = x.shape
    n_refs, (n_walks, length) = baseline.shape[1], perm.shape[1:]
    hidden = weight.shape[0]
    _check_total(total_steps, n_active, n_walks, n_refs, "permutation_walk_linear")
    dtype = x.dtype if out_dtype is None else out_dtype
    if not (dtype == x.dtype or (dtype == torch.bfloat16 and x.dtype == torch.float32)):
        raise ValueError(f"out_dtype must be x's dtype {x.dtype} or, for float32 x, "
                         f"torch.bfloat16; got {dtype}")
    steps = max(length - 1, 0)
    if total_steps == 0:
        return x.new_empty((0, hidden), dtype=dtype)
    interior = _interior_mask(n_active, steps)  # [N, steps]
    idx = torch.where(interior[:, None, :], perm[:, :, :steps], 0)  # [N, P, steps]
    x_on_walk = x.gather(1, idx.reshape(n, -1)).reshape(n, n_walks, 1, steps)
    r_on_walk = baseline[:, None].expand(n, n_walks, n_refs, -1).gather(
        3, idx[:, :, None, :].expand(n, n_walks, n_refs, steps))  # [N, P, B, steps]
    delta = x_on_walk - r_on_walk
    columns = weight.t()[idx]  # [N, P, steps, H]
    origin = baseline @ weight.t()  # [N, B, H]
    if bias is not None:
        origin = origin + bias
    prefix = origin[:, None, :, None, :] + torch.cumsum(
        columns[:, :, None] * delta[..., None], dim=3)  # [N, P, B, steps, H]
    keep = interior[:, None, None, :].expand(n, n_walks, n_refs, steps)
    out = prefix[keep]
    return (out.relu_() if relu else out).to(dtype)


def permutation_walk_masked(
    x: Tensor,  # [N, d]
    baseline: Tensor,  # [N, B, d]
    perm: Tensor,  # [N, P, L] int64
    n_active: Tensor,  # [N] int64
    total_steps: int,
) -> Tensor:  # [S, d]
    """Masked inputs of every interior prefix: x on the prefix, the reference elsewhere."""
    n, d = x.shape
    n_refs, (n_walks, length) = baseline.shape[1], perm.shape[1:]
    _check_total(total_steps, n_active, n_walks, n_refs, "permutation_walk_masked")
    steps = max(length - 1, 0)
    if total_steps == 0:
        return x.new_empty((0, d))
    pos = torch.arange(length, device=x.device)
    on_walk = pos[None, :] < n_active[:, None]  # [N, L]
    # position of each feature on each walk; `length` (never reached) for the rest
    rank = torch.full((n, n_walks, d), length, dtype=torch.long, device=x.device)
    src = torch.where(on_walk[:, None, :], pos, length).expand(n, n_walks, length)
    rank.scatter_reduce_(2, torch.where(on_walk[:, None, :], perm, 0), src, reduce="amin")
    prefix_size = torch.arange(1, steps + 1, device=x.device)
    taken = rank[:, :, None, None, :] < prefix_size[:, None]  # [N, P, 1, steps, d]
    z = torch.where(taken, x[:, None, None, None, :], baseline[:, None, :, None, :])
    keep = _interior_mask(n_active, steps)[:, None, None, :].expand(n, n_walks, n_refs, steps)
    return z[keep]


def class_value(logits: Tensor, target: Tensor, softmax: bool) -> Tensor:
    """Explained-class value in float64: softmax probability of class ``target`` or the raw
    output. ``logits [..., k]``, ``target`` broadcastable to ``logits[..., 0]``."""
    values = logits.double()
    if softmax:
        values = torch.softmax(values, dim=-1)
    shape = torch.broadcast_shapes(logits.shape[:-1], target.shape)
    index = target.expand(shape).unsqueeze(-1)
    return values.expand(*shape, logits.shape[-1]).gather(-1, index).squeeze(-1)


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
) -> Tuple[Tensor, Tensor]:  # mean [N, n_features] f64, m2 [N, n_features] f64
    """Marginal contributions along every walk, accumulated per feature.

    The game value of a coalition is the explained-class value averaged over the B
    references. Each walk's marginal contributions are differences of consecutive prefix
    values (they telescope to ``v(N) - v(empty)``: efficiency holds per walk). A *sample* is
    the mean of ``walks_per_sample`` consecutive walks (2 = an antithetic pair); returns the
    mean over samples and the sum of squared deviations from it (``m2``; the variance of a
    sample is ``m2 / (n_samples - 1)``). Features never on a walk get exactly 0; a feature
    with a non-finite contribution (NaN or infinite logits) gets NaN in both.
    """
    n, k = end_logits.shape
    n_refs = start_logits.shape[1]
    n_walks, length = perm.shape[1:]
    if n_walks % walks_per_sample:
        raise ValueError(f"P = {n_walks} walks is not a multiple of walks_per_sample = "
                         f"{walks_per_sample}")
    _check_total(step_logits.shape[0], n_active, n_walks, n_refs, "shapley_accumulate")
    if n_walks == 0:  # no samples: nothing accumulated, as the kernels do
        zeros = end_logits.new_zeros((n, n_features), dtype=torch.float64)
        return zeros, zeros.clone()
    steps = max(length - 1, 0)
    per_input = n_walks * n_refs * (n_active - 1).clamp(min=0)
    owner = torch.repeat_interleave(torch.arange(n, device=perm.device), per_input)
    step_values = class_value(step_logits, target[owner], softmax)  # [S]
    grid = step_values.new_zeros((n, n_walks, n_refs, steps))
    interior = _interior_mask(n_active, steps)
    grid[interior[:, None, None, :].expand_as(grid)] = step_values
    mid = grid.mean(dim=2)  # [N, P, steps] averaged over references
    start = class_value(start_logits, target[:, None], softmax).mean(dim=1)  # [N]
    end = class_value(end_logits, target, softmax)  # [N]
    pos = torch.arange(length, device=perm.device)
    # value after taking the walk's j-th feature: interior value, then x itself (v(N))
    mid_padded = torch.cat([mid, mid.new_zeros((n, n_walks, 1))], dim=2)[:, :, :length]
    after = torch.where(pos < (n_active - 1)[:, None, None], mid_padded, end[:, None, None])
    before = torch.cat([start[:, None, None].expand(n, n_walks, 1), after[:, :, :-1]], dim=2)
    on_walk = pos[None, None, :] < n_active[:, None, None]
    contribution = torch.where(on_walk, after - before, 0.0)
    dense = contribution.new_zeros((n, n_walks, n_features))
    dense.scatter_add_(2, torch.where(on_walk, perm, 0), contribution)
    samples = dense.reshape(n, n_walks // walks_per_sample, walks_per_sample, n_features).mean(2)
    mean = samples.mean(dim=1)
    m2 = (samples - mean[:, None]).square().sum(dim=1)
    # a non-finite contribution gives inf or NaN by the order of the sums: NaN, as the kernels
    no_answer = ~(mean.isfinite() & m2.isfinite())
    return mean.masked_fill(no_answer, math.nan), m2.masked_fill(no_answer, math.nan)


# ------------------------------------------------------------------------------ noise solver

def _check_floats(t, name: str) -> None:
    """The fused noise ops take float32 or float64 tensors (their kernels' contract)."""
    if not isinstance(t, Tensor) or t.dtype not in (torch.float32, torch.float64):
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a float32 or float64 tensor, got {got}")


def entropy_and_grad(logits: Tensor) -> Tuple[Tensor, Tensor]:  # H [N], dH/dlogits [N, k]
    """Shannon entropy (nats) of ``softmax(logits)`` per row and its gradient at the logits.

    ``H = -sum_j p_j log p_j`` and ``dH/dz_j = -p_j (log p_j + H)``; computed in float64
    with log-sum-exp, ``p log p = 0`` where ``p = 0``; returned in the logits' dtype. A row
    whose softmax is undefined (a NaN logit, a +inf one, or all -inf, as in
    ``torch.softmax``) gets NaN entropy and gradient, never a made-up 0.

    ``logits``: ``[N, k >= 1]`` float32 or float64, as the kernel takes them (an int64 one was
    cast silently, its entropy truncated back to int).
    """
    _check_floats(logits, "logits")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be 2-D [N, k] with k >= 1, got shape "
                         f"{tuple(logits.shape)}")
    z = logits.double()
    log_p = torch.log_softmax(z, dim=1)
    p = log_p.exp()
    p_log_p = torch.where(p == 0, 0.0, p * log_p)  # p = NaN stays NaN
    entropy = -p_log_p.sum(dim=1)
    grad = torch.where(p == 0, 0.0, -p * (log_p + entropy[:, None]))
    return entropy.to(logits.dtype), grad.to(logits.dtype)


def project_box_ball(z: Tensor, budget: Tensor, radius: Tensor, iters: int = 200) -> Tensor:
    """Euclidean projection of each row of ``z`` onto ``{|e_i| <= budget_i} ∩ {||e|| <= radius}``.

    KKT: ``e = clip(z / (1 + lam), -budget, budget)`` with ``lam >= 0`` the smallest keeping
    ``||e|| <= radius``; ``lam`` by bisection per row (float64), as the design states, on
    ``log(1 + lam)``: relative precision in ``1 + lam`` whatever its size (on ``lam`` itself,
    ``||z|| / radius`` of 1e60 left an error of order 1 after 200 halvings).

    A row with no answer comes back NaN: one holding a NaN or an infinity, and one where the
    ball binds and ``||z||^2`` overflows float64 (``|z|`` beyond about 1e154).

    ``iters``: the bisection's halvings. The result is float64 whatever ``z``'s dtype
    (:func:`ascend_and_project` casts it back).
    """
    z, u, rho = z.double(), budget.double(), radius.double()
    box = torch.maximum(torch.minimum(z, u), -u)
    inside = box.norm(dim=1) <= rho
    lo = torch.zeros_like(rho)
    # at 1 + lam = ||z|| / rho the scaled point z / (1 + lam) already lies on the ball
    hi = torch.where(rho > 0, torch.log((z.norm(dim=1) / rho).clamp(min=1)), 0.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        e = torch.maximum(torch.minimum(z / torch.exp(mid)[:, None], u), -u)
        too_long = e.norm(dim=1) > rho
        lo = torch.where(too_long, mid, lo)
        hi = torch.where(too_long, hi, mid)
    e = torch.maximum(torch.minimum(z / torch.exp(hi)[:, None], u), -u)
    e = torch.where((rho > 0)[:, None], e, 0.0)
    projected = torch.where(inside[:, None], box, e)
    overflow = ~inside & (rho > 0) & ~torch.isfinite(z.square().sum(1))
    answered = torch.isfinite(z).all(1) & ~overflow
    return torch.where(answered[:, None], projected, math.nan)


def ascend_and_project(
    eta: Tensor,  # [N, d]
    direction: Tensor,  # [N, d]
    step: Tensor,  # [N]
    budget: Tensor,  # [N, d]
    radius: Tensor,  # [N]
    active: Tensor,  # [N] bool
    check_values: bool = True,
) -> Tensor:  # [N, d]
    """One projected ascent step ``eta + step * direction`` onto the box ∩ ball, on the rows
    where ``active``; the other rows are returned unchanged. An active row whose point
    ``z = eta + step * direction`` has no projection (:func:`project_box_ball`: a NaN or an
    infinity, or ``|z|`` beyond about 1e154, which no float32 input reaches) comes back all
    NaN. ``check_values=False`` skips the checks of budget and radius (the caller validated
    them; on CUDA each is a sync). Shapes and dtypes are checked as the kernel checks them
    (eta float32 or float64 ``[N, d]``, ``direction`` and ``budget`` ``[N, d]``, ``step`` and
    ``radius`` ``[N]``, in eta's dtype; ``active`` ``[N]`` bool)."""
    _check_floats(eta, "eta")
    if eta.dim() != 2:
        raise ValueError(f"eta must be 2-D [N, d], got shape {tuple(eta.shape)}")
    n, d = eta.shape
    for name, t, shape in (("direction", direction, (n, d)), ("budget", budget, (n, d)),
                           ("step", step, (n,)), ("radius", radius, (n,))):
        if tuple(t.shape) != shape or t.dtype != eta.dtype:
            raise ValueError(f"{name} must be {eta.dtype} of shape {list(shape)} (eta's), got "
                             f"{t.dtype} {list(t.shape)}")
    if tuple(active.shape) != (n,) or active.dtype != torch.bool:
        raise ValueError(f"active must be bool of shape [{n}], got {active.dtype} "
                         f"{list(active.shape)}")
    if check_values and ((radius < 0).any() or radius.isnan().any()):
        raise ValueError("radius must be >= 0")
    if check_values and ((budget < 0).any() or not torch.isfinite(budget).all()):
        raise ValueError("budget must be finite and >= 0")
    z = eta.double() + step.double()[:, None] * direction.double()
    projected = project_box_ball(z, budget, radius).to(eta.dtype)
    return torch.where(active[:, None], projected, eta)


def adam_step_bf16(
    param: Tensor,  # [...] float32, updated in place
    exp_avg: Tensor,  # [...] float32, updated in place
    exp_avg_sq: Tensor,  # [...] float32, updated in place
    param_bf16: Tensor,  # [...] bfloat16, overwritten
    grad_bf16: Tensor,  # [...] bfloat16
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    flush_below: float,
) -> None:
    """One mixed-precision Adam step, in place (shadow training, ``precision="bf16"``).

    ``torch.optim.Adam``'s update of the float32 ``param`` and moments (L2 ``weight_decay``
    added to the gradient; bias corrections ``1 - beta**step`` in float64; ``eps`` added
    after the bias-corrected square root) from the float32 cast of ``grad_bf16``. Then the
    moments below ``flush_below`` (``|exp_avg|``, ``exp_avg_sq``) are set to 0, which keeps
    them out of float32's subnormal range (slow on x86), and ``param_bf16`` gets the new
    ``param`` rounded to bfloat16. ``step`` counts this step (>= 1).
    """
    grad = grad_bf16.float()
    if weight_decay != 0:
        grad = grad + weight_decay * param
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps
    param.sub_(step_size * exp_avg / denom)
    exp_avg.masked_fill_(exp_avg.abs() < flush_below, 0.0)
    exp_avg_sq.masked_fill_(exp_avg_sq < flush_below, 0.0)
    param_bf16.copy_(param)


def sparse_input_linear(x: Tensor, weight_t: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``bias + x @ weight_t`` for K models at once (shadow training's first layer on
    mostly-zero inputs): ``x [K, B, d]``, ``weight_t [K, d, H]`` (the layer's weight
    transposed), ``bias [K, H]`` or None -> ``[K, B, H]``. The kernels sum only the non-zeros
    of ``x``; this twin multiplies densely (equal but for the order of the sums, and for
    ``0 * inf``, which the kernels skip)."""
    if bias is None:
        return torch.bmm(x, weight_t)
    return torch.baddbmm(bias.unsqueeze(1), x, weight_t)


def sparse_input_weight_grad(x: Tensor, grad: Tensor, out: Tensor) -> None:
    """The weight gradient of :func:`sparse_input_linear` in ``weight_t``'s layout,
    ``out = x^T @ grad`` in place: ``x [K, B, d]``, ``grad [K, B, H]``, ``out [K, d, H]``."""
    torch.bmm(x.transpose(1, 2), grad, out=out)


def relu_bf16_(x: Tensor) -> None:
    """``x = max(x, 0)`` in place (bfloat16 activations of shadow training,
    ``precision="bf16"``); -0 and NaN stay, as in ``torch.relu``."""
    x.copy_(torch.relu(x))


def relu_backward_bf16_(grad: Tensor, output: Tensor, bias_grad: Tensor) -> None:
    """The ReLU's backward fused with the bias gradient of the layer before it, in place:
    ``grad`` (gradient of the ReLU's output ``output``) becomes 0 where ``output <= 0``
    (``threshold_backward``'s test: a NaN output passes its gradient), then ``bias_grad`` gets the
    sum of the result over the last dimension, accumulated in float32 and rounded to
    bfloat16 once. ``grad``, ``output`` ``[..., B]``, ``bias_grad`` ``[...]``; the kernels
    add in another order (float32 rounding of the sum, before the bfloat16 one)."""
    grad.copy_(torch.ops.aten.threshold_backward(grad, output, 0))
    bias_grad.copy_(grad.sum(-1, dtype=torch.float32))
