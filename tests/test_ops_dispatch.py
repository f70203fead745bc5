"""How every oni op meets the rest of torch, beyond its kernels: the fake (meta) kernels
check what the real ones check, a call mixing meta and real tensors is refused, none of the
ops is silent under autograd, the in-place ops bump version counters and refuse aliased
arguments. Run on every device with compiled kernels."""
from __future__ import annotations

import math

import pytest
import torch

import oni
from oni import _ops
from tests.helpers import walk_inputs

BF16 = torch.bfloat16
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _ops.has_kernel("cuda")
                     else [])
IN_PLACE = ("adam_step_bf16", "sparse_input_weight_grad", "relu_bf16_", "relu_backward_bf16_")


def _args(op: str, device="cpu") -> tuple:
    """Valid arguments of ``op`` (small, fresh each call)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if op in ("permutation_walk_linear", "permutation_walk_masked", "shapley_accumulate"):
        x, base, perm, n_active, total = walk_inputs(3, 6, n_refs=2, n_walks=4, device=device)
        if op == "permutation_walk_linear":
            return (x, base, perm, n_active, randn(5, 6), randn(5), total, True)
        if op == "permutation_walk_masked":
            return (x, base, perm, n_active, total)
        target = torch.tensor([0, 2, 1], device=device)
        return (randn(total, 4), randn(3, 2, 4), randn(3, 4), target, perm, n_active, 6, 2,
                True)
    if op == "entropy_and_grad":
        return (randn(4, 3),)
    if op == "ascend_and_project":
        return (randn(4, 5) * 0.1, randn(4, 5), randn(4).abs(), randn(4, 5).abs(),
                randn(4).abs(), torch.tensor([True, False, True, True], device=device), True)
    if op == "adam_step_bf16":
        return (randn(8), torch.zeros(8, device=device), torch.zeros(8, device=device),
                torch.empty(8, dtype=BF16, device=device), randn(8, dtype=BF16), 1, 1e-3, 0.9,
                0.999, 1e-8, 0.0, 0.0)
    if op == "sparse_input_linear":
        return (randn(2, 3, 5), randn(2, 5, 4), randn(2, 4))
    if op == "sparse_input_weight_grad":
        return (randn(2, 3, 5), randn(2, 3, 4), torch.empty(2, 5, 4, device=device))
    if op == "relu_bf16_":
        return (randn(4, 6, dtype=BF16),)
    if op == "relu_backward_bf16_":
        return (randn(4, 6, dtype=BF16), randn(4, 6, dtype=BF16),
                torch.empty(4, dtype=BF16, device=device))
    raise AssertionError(op)


def _call(op, args):
    return getattr(torch.ops.oni, op).default(*args)


def _tensor_positions(args):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


def _on_meta(args):
    return tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)


def _replaced(args, i, value):
    return tuple(value if j == i else a for j, a in enumerate(args))


@pytest.mark.parametrize("op", _ops.OP_NAMES)
def test_every_op_is_covered_here(op):
    assert _call(op, _args(op)) is not None or op in IN_PLACE


@pytest.mark.parametrize("op", [o for o in _ops.OP_NAMES
                                if o not in ("entropy_and_grad", "relu_bf16_")])  # one tensor
def test_a_call_mixing_meta_and_real_tensors_is_refused(op):
    """The dispatcher sends such a call to the fake kernel: it must raise, naming the
    argument, not hand back uninitialised CPU tensors or skip an in-place update."""
    args = _args(op)
    names = [a.name for a in getattr(torch.ops.oni, op).default._schema.arguments]
    for i in _tensor_positions(args):
        mixed = _replaced(args, i, args[i].to("meta"))
        # the meta one is named, as the one off the device or as the device's reference
        with pytest.raises(RuntimeError, match=rf"(\b{names[i]} must be on \w+'s device cpu, "
                                               rf"got meta|must be on {names[i]}'s device meta, "
                                               rf"got cpu)"):
            _call(op, mixed)


@pytest.mark.parametrize("op", _ops.OP_NAMES)
def test_fake_kernels_give_the_real_shapes_and_dtypes(op):
    real = _call(op, _args(op))
    fake = _call(op, _on_meta(_args(op)))
    if real is None:
        assert fake is None
        return
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for r, f in zip(real, fake, strict=True):
        assert f.device.type == "meta" and f.shape == r.shape and f.dtype == r.dtype


# A bad argument per op: (position, replacement built from the valid one, message).
_BAD = {
    "permutation_walk_linear": [(0, lambda a: a.double(), "baseline must have x's dtype"),
                                (2, lambda a: a.int(), "perm must be int64"),
                                (4, lambda a: a[:, :-1], "weight must be \\[H, d\\] with d = 6"),
                                (5, lambda a: a[:-1], "bias must be \\[H\\] = \\[5\\]")],
    "permutation_walk_masked": [(1, lambda a: a[:, :, :-1], "baseline must be \\[N, B, d\\]"),
                                (3, lambda a: a[:-1], "n_active must be \\[N\\] = \\[3\\]")],
    "shapley_accumulate": [(0, lambda a: a[:, :-1], "step_logits must be \\[S, k\\] with k = 4"),
                           (3, lambda a: a.int(), "target must be int64"),
                           (6, lambda a: 0, "n_features = 0 must be >= 1")],
    "entropy_and_grad": [(0, lambda a: a.long(), "logits must be float32 or float64"),
                         (0, lambda a: a[0], "logits must be 2-D")],
    "ascend_and_project": [(1, lambda a: a.double(), "direction must have eta's dtype"),
                           (5, lambda a: a.int(), "active must be bool"),
                           (4, lambda a: a[:-1], "radius must be \\[N\\] = \\[4\\], got \\[3\\]")],
    "adam_step_bf16": [(1, lambda a: a.double(),
                        "exp_avg must be (Float|float32), got (Double|torch.float64)"),
                       (4, lambda a: a.float(),
                        "grad_bf16 must be (BFloat16|bfloat16), got (Float|torch.float32)"),
                       (3, lambda a: a[:-1], "param_bf16 must have param's shape"),
                       (5, lambda a: 0, "step must be >= 1")],
    "sparse_input_linear": [(1, lambda a: a[:, :-1], "weight_t must be \\[K, d, H\\]"),
                            (2, lambda a: a.double(), "bias must have x's dtype")],
    "sparse_input_weight_grad": [(2, lambda a: a[:, :-1], "out must be \\[K, d, H\\]"),
                                 (1, lambda a: a.double(), "grad must have x's dtype")],
    "relu_bf16_": [(0, lambda a: a.float(), "x must be (BFloat16|bfloat16)")],
    "relu_backward_bf16_": [(1, lambda a: a[:-1], "output must have grad's shape"),
                            (2, lambda a: a.float(), "bias_grad must be (BFloat16|bfloat16)")],
}


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("op", _ops.OP_NAMES)
def test_bad_arguments_are_named_by_real_and_fake_kernels(op, device):
    args = _args(op, "cpu" if device == "meta" else device)
    for i, make, message in _BAD[op]:
        bad = _replaced(args, i, make(args[i]))
        if i == 0 and op.startswith("permutation_walk"):  # x itself changed: baseline differs
            bad = _replaced(args, 0, args[0])
            bad = _replaced(bad, 1, make(args[1]))
        if device == "meta":
            bad = _on_meta(bad)
        with pytest.raises(RuntimeError, match=message):
            _call(op, bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", [o for o in _ops.OP_NAMES if o not in IN_PLACE])
def test_functional_ops_have_no_silent_gradient(op, device):
    """Outputs of an op called on tensors that require grad carry a grad_fn whose backward
    raises; torch's default for custom ops would warn and leave the gradients None."""
    args = _args(op, device)
    leaf_at = next(i for i in _tensor_positions(args) if args[i].dtype.is_floating_point)
    leaf = args[leaf_at].detach().requires_grad_(True)
    out = _call(op, _replaced(args, leaf_at, leaf))
    first = out[0] if isinstance(out, tuple) else out
    assert first.requires_grad
    with pytest.raises(RuntimeError, match=f"derivative for oni::{op} is not implemented"):
        first.sum().backward()
    with torch.no_grad():
        assert not _call(op, _replaced(args, leaf_at, leaf))[0].requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_ops_refuse_tensors_that_require_grad(op, device):
    args = _args(op, device)
    names = [a.name for a in getattr(torch.ops.oni, op).default._schema.arguments]
    for i in _tensor_positions(args):
        if not args[i].dtype.is_floating_point:
            continue
        for t in (args[i].detach().requires_grad_(True),  # a leaf
                  (args[i].detach().requires_grad_(True) * 1)):  # and a non-leaf
            with pytest.raises(RuntimeError, match=rf"oni::{op}: {names[i]} requires grad, but "
                                                   r"this op writes in place"):
                _call(op, _replaced(args, i, t))
    with torch.no_grad():  # allowed: the caller says no graph is being built
        _call(op, _replaced(args, 0, args[0].detach().requires_grad_(True)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", IN_PLACE)
def test_in_place_ops_bump_the_versions_of_what_they_write(op, device):
    args = _args(op, device)
    schema = getattr(torch.ops.oni, op).default._schema.arguments
    before = [a._version if isinstance(a, torch.Tensor) else None for a in args]
    _call(op, args)
    for i in _tensor_positions(args):
        written = schema[i].alias_info is not None and schema[i].alias_info.is_write
        assert args[i]._version == before[i] + (1 if written else 0), schema[i].name


# Aliased arguments of the in-place ops: (position a, position b) made to share memory.
_ALIASES = {
    "adam_step_bf16": [(1, 2), (0, 1), (3, 4)],
    "sparse_input_weight_grad": [(2, 1), (2, 0)],
    "relu_backward_bf16_": [(0, 1), (2, 0)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", sorted(_ALIASES))
def test_in_place_ops_refuse_aliased_arguments(op, device):
    args = _args(op, device)
    names = [a.name for a in getattr(torch.ops.oni, op).default._schema.arguments]
    for a, b in _ALIASES[op]:
        if args[a].dtype == args[b].dtype and args[a].shape == args[b].shape:
            aliased = _replaced(args, b, args[a])  # the same tensor twice
        else:  # overlapping views of one buffer, as far apart as the shapes allow
            buf = torch.zeros(args[a].numel() + args[b].numel() - 1, dtype=args[b].dtype,
                              device=device)
            view_a = buf[:args[a].numel()].view(args[a].shape)
            if args[a].dtype != args[b].dtype:
                continue
            aliased = _replaced(_replaced(args, a, view_a), b,
                                buf[-args[b].numel():].view(args[b].shape))
        first, second = sorted((a, b), key=lambda i: 0 if i in _written(op) else 1)
        with pytest.raises(RuntimeError, match=rf"{names[first]} and {names[second]} must not "
                                               r"share memory|must not share memory"):
            _call(op, aliased)


def _written(op):
    schema = getattr(torch.ops.oni, op).default._schema.arguments
    return {i for i, a in enumerate(schema) if a.alias_info is not None and a.alias_info.is_write}


@pytest.mark.parametrize("device", DEVICES)
def test_projection_of_a_non_finite_point_is_nan(device):
    """z = eta + step * direction holding a NaN or an infinity has no projection: the row
    comes back NaN (the solver's NaN watch then sees it), on the kernel and on the twin,
    whatever check_values says; finite rows and inactive rows are untouched by it."""
    nan, inf = float("nan"), float("inf")
    f64 = dict(dtype=torch.float64, device=device)
    eta = torch.tensor([[nan, 3.0, 4.0], [inf, 3.0, 4.0], [1.0, 3.0, 4.0], [0.0, -inf, 0.0],
                        [nan, 0.0, 0.0]], **f64)
    direction = torch.zeros_like(eta)
    direction[2, 0] = inf  # finite eta, infinite step direction
    step = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], **f64)
    budget = torch.tensor([[1.0, 10.0, 10.0]], **f64).expand(5, 3).contiguous()
    radius = torch.ones(5, **f64)
    active = torch.tensor([True, True, True, True, False], device=device)
    for check_values in (True, False):
        for impl in (_ops, oni.reference):
            out = impl.ascend_and_project(eta, direction, step, budget, radius, active,
                                          check_values)
            assert out[:4].isnan().all(), impl
            assert out[4].isnan()[0] and (out[4, 1:] == 0).all()  # inactive: eta as it was
    finite = _ops.ascend_and_project(eta[2:3].nan_to_num(), direction[2:3].nan_to_num(posinf=0),
                                     step[2:3], budget[2:3], radius[2:3], active[2:3])
    assert torch.isfinite(finite).all() and finite.norm() <= 1.0 + 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_projection_where_the_squared_norm_overflows(device):
    """float64 points beyond ~1e154 overflow ||z||^2: NaN where the ball binds (no silent 0),
    the box's answer where it does not; float32's largest values project correctly."""
    f64 = dict(dtype=torch.float64, device=device)
    eta = torch.tensor([[1e155, 3e155, 4e155], [1e155, 0.1, 0.1]], **f64)
    zeros, step = torch.zeros_like(eta), torch.zeros(2, **f64)
    budget = torch.tensor([[1.0, 10.0, 10.0], [1.0, 10.0, 10.0]], **f64)
    radius = torch.tensor([1.0, 5.0], **f64)  # row 1: the box alone is inside the ball
    active = torch.ones(2, dtype=torch.bool, device=device)
    for impl in (_ops, oni.reference):
        out = impl.ascend_and_project(eta, zeros, step, budget, radius, active)
        assert out[0].isnan().all(), impl
        torch.testing.assert_close(out[1], torch.tensor([1.0, 0.1, 0.1], **f64))
    big = torch.full((2, 3), torch.finfo(torch.float32).max, device=device)
    z32 = torch.zeros_like(big)
    out = _ops.ascend_and_project(big, z32, z32[:, 0], budget.float(), radius.float(), active)
    twin = oni.reference.ascend_and_project(big, z32, z32[:, 0], budget.float(), radius.float(),
                                            active)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, twin, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("big", [1e3, 1e8, 1e12, 1e150])
def test_projection_next_to_one_large_coordinate_is_exact(device, big):
    """One coordinate far larger than the rest, clipped by the box while the ball binds on
    the others: their mass must not be lost to cancellation against the large one (it was
    computed as total minus clipped: 2% off at 1e8, 50% at 1e12)."""
    f64 = dict(dtype=torch.float64, device=device)
    eta = torch.tensor([[big, 1.0, 1.0]], **f64)
    budget = torch.tensor([[1.0, 10.0, 10.0]], **f64)
    radius = torch.tensor([1.5], **f64)
    out = _ops.ascend_and_project(eta, torch.zeros_like(eta), torch.zeros(1, **f64), budget,
                                  radius, torch.tensor([True], device=device))
    t = math.sqrt((1.5 ** 2 - 1.0) / 2.0)  # clipped at 1, the rest t * 1: 1 + 2 t^2 = 1.5^2
    torch.testing.assert_close(out, torch.tensor([[1.0, t, t]], **f64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_whose_answer_lies_decades_below_one(device, dtype):
    """t = 1 / (1 + lambda) far below 2^-64 (a tiny radius next to unit points, one budget
    tinier still): the CUDA kernel's bisection halved t linearly, stopped at 2^-64 and
    returned 0 (found by the CPU emulation of tests/cuda_emu); it now halves log t."""
    f = dict(dtype=dtype, device=device)
    eta = torch.ones(2, 3, **f)
    budget = torch.tensor([[1.0, 1e-21, 1.0], [1e-30, 1.0, 1.0]], **f)
    radius = torch.tensor([1e-25, 1e-25], **f)
    t0 = 1e-25 / math.sqrt(3.0)  # row 0: nothing clipped
    t1 = math.sqrt((1e-50 - 1e-60) / 2.0)  # row 1: the first feature held at its 1e-30
    expected = torch.tensor([[t0, t0, t0], [1e-30, t1, t1]], **f)
    if dtype == torch.float32:  # 1e-30 ** 2 underflows float32's budget arithmetic: keep row 0
        eta, budget, radius, expected = eta[:1], budget[:1], radius[:1], expected[:1]
    zeros = torch.zeros_like(eta)
    active = torch.ones(len(eta), dtype=torch.bool, device=device)
    tol = dict(rtol=1e-6, atol=0) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    for impl in (_ops, oni.reference):
        out = impl.ascend_and_project(eta, zeros, zeros[:, 0], budget, radius, active)
        torch.testing.assert_close(out, expected, **tol, msg=lambda m: f"{impl.__name__}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_projection_onto_a_zero_radius_is_plus_zero(device):
    """radius 0 leaves only the origin: +0 in every coordinate, also where eta is negative
    (0 * z kept z's sign on CUDA: -0 where the CPU kernel and the twin give +0)."""
    eta = torch.tensor([[-1.0, 2.0, -0.0]], dtype=torch.float64, device=device)
    zeros = torch.zeros_like(eta)
    for impl in (_ops, oni.reference):
        out = impl.ascend_and_project(eta, zeros, zeros[:, 0], torch.ones_like(eta),
                                      torch.zeros(1, dtype=torch.float64, device=device),
                                      torch.ones(1, dtype=torch.bool, device=device))
        assert (out == 0).all() and not out.signbit().any(), (impl.__name__, out)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_of_in_place_ops_are_not_taken_for_aliases(device):
    """torch does not compute the overlap of strided views ("too hard"): one that lies in
    another storage than the written tensor cannot overlap it and must be accepted."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 10, generator=gen).to(device)[:, :, ::2]  # [2, 6, 5], strided
    grad = torch.randn(2, 4, 6, generator=gen).to(device).transpose(1, 2)  # [2, 6, 4]
    out = torch.empty(2, 5, 4, device=device)
    _ops.sparse_input_weight_grad(x, grad, out)
    torch.testing.assert_close(out, torch.bmm(x.transpose(1, 2), grad))
    expanded = torch.randn(1, 6, 5, generator=gen).to(device).expand(2, 6, 5)
    _ops.sparse_input_weight_grad(expanded, grad, out)
    torch.testing.assert_close(out, torch.bmm(expanded.transpose(1, 2), grad))
    in_out = out.view(-1).as_strided((2, 6, 5), (0, 5, 1))  # strided, in out's storage
    with pytest.raises(RuntimeError, match="out and x must not share memory"):
        _ops.sparse_input_weight_grad(in_out, grad, out)


@pytest.mark.parametrize("big", [1e8, 1e60, 1e150])
def test_the_twin_projects_exactly_far_outside_the_ball(big):
    """The spec must be exact where the kernel is: bisection on log(1 + lam) keeps its
    precision when ||z|| / radius is huge (on lam itself it was off by 0.58 radius)."""
    f64 = dict(dtype=torch.float64)
    z = torch.tensor([[big, 1.0, 1.0]], **f64)
    out = oni.reference.project_box_ball(z, torch.tensor([[1.0, 10.0, 10.0]], **f64),
                                         torch.tensor([1.5], **f64))
    t = math.sqrt((1.5 ** 2 - 1.0) / 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, t, t]], **f64), rtol=1e-12, atol=0)

