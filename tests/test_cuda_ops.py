"""The CUDA kernels (csrc/cuda/*.cu) against their twins in oni.reference.

Runs on a machine with a CUDA device and an oni build with CUDA kernels, or with
ONI_CUDA_EMULATION=1 on CPU tensors, whose kernels are then the CUDA ones run under the CPU
emulation of tests/cuda_emu (the tests that compare the CUDA kernels with the CPU kernels are
skipped there: both sides would be the same code); elsewhere every test is skipped with the
reason. Tolerance rule (STYLE.md): on float32 inputs, the kernel's error against the float64
reference is at most 2x that of the plain-PyTorch twin run in float32, plus a tiny floor;
masked inputs are pure copies and must match bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch

import oni
from oni import _ops, reference
from oni.shapley import _walk_permutations
from helpers import CUDA_EMULATION, Wrapped, only_real_cpu_kernels, small_mlp


def _skip_reason():
    if CUDA_EMULATION:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not _ops.has_kernel("cuda", _ops.SHAPLEY_OPS):
        return (f"oni was built without CUDA kernels (oni.build_info(): {oni.build_info()}); "
                "rebuild on a machine with nvcc (see scripts/gpu_check.sh)")
    return None


SKIP = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]
DEVICE = "cpu" if CUDA_EMULATION else "cuda"
OPS = ("permutation_walk_linear", "permutation_walk_masked", "shapley_accumulate")


def _sync():
    if not CUDA_EMULATION:
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- inputs

def walk_case(n, d, n_refs=1, n_walks=4, *, counts=None, density=0.5, seed=0,
              antithetic=False, pad=0, device=DEVICE, dtype=torch.float64):
    """Valid walk inputs: x [n, d], baseline [n, B, d], perm [n, P, L], n_active [n], S.

    Each row's active features are random (``counts`` per row, or each with probability
    ``density``); perm holds random permutations of them (antithetic pairs optional),
    followed by ``pad`` junk columns (-1) that the ops must never read.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    base = torch.randn(n, n_refs, d, generator=gen, dtype=torch.float64)
    if counts is not None:
        active = torch.zeros(n, d, dtype=torch.bool)
        for row, a in enumerate(counts):
            active[row, torch.randperm(d, generator=gen)[:a]] = True
    else:
        active = torch.rand(n, d, generator=gen) < density
    n_active = active.sum(1)
    active_index = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices
    length = int(n_active.max()) if n > 0 else 0
    n_samples = n_walks // 2 if antithetic else n_walks
    perm = _walk_permutations(seed, torch.arange(n), 0, n_samples, active_index[:, :length],
                              n_active, antithetic)
    pad = min(pad, d - length)
    if pad > 0:
        perm = torch.cat([perm, perm.new_full((n, n_walks, pad), -1)], dim=2)
    total = reference.interior_steps(n_active, n_walks, n_refs)
    return (x.to(device, dtype), base.to(device, dtype), perm.to(device), n_active.to(device),
            total)


def linear_layer(d, hidden, seed=1, device=DEVICE, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden, d, generator=gen, dtype=torch.float64) / max(1, d) ** 0.5
    b = torch.randn(hidden, generator=gen, dtype=torch.float64)
    return w.to(device, dtype), b.to(device, dtype)


def logits_case(n, n_refs, total, k, seed=2, device=DEVICE, dtype=torch.float64):
    """Model outputs for shapley_accumulate: steps [S, k], start [n, B, k], end [n, k], target."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(total, k, generator=gen, dtype=torch.float64) * 3
    start = torch.randn(n, n_refs, k, generator=gen, dtype=torch.float64) * 3
    end = torch.randn(n, k, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, k, (n,), generator=gen)
    return (steps.to(device, dtype), start.to(device, dtype), end.to(device, dtype),
            target.to(device))


CASES = {  # name: walk_case arguments
    "ragged": dict(n=6, d=9, n_refs=1, n_walks=4, counts=[0, 1, 2, 9, 5, 3], pad=0),
    "three_refs": dict(n=5, d=12, n_refs=3, n_walks=2, density=0.6, pad=2),
    # more references than the endpoint kernel's lane groups at k >= 33 (4 of 32 lanes), so
    # the class's lane (c % 32, rarely 0) hands its value over in several rounds
    "nine_refs": dict(n=4, d=10, n_refs=9, n_walks=2, density=0.6),
    "d1": dict(n=3, d=1, n_refs=2, n_walks=2, counts=[1, 0, 1]),
    "no_active": dict(n=4, d=5, n_refs=1, n_walks=2, counts=[0, 0, 0, 0]),
    "one_active": dict(n=3, d=8, n_refs=2, n_walks=2, counts=[1, 1, 1], pad=3),
    "n_not_block_multiple": dict(n=1029, d=24, n_refs=1, n_walks=2, density=0.3),
    "many_walks": dict(n=7, d=40, n_refs=2, n_walks=34, density=0.5, antithetic=True),
    "large_d": dict(n=3, d=6170, n_refs=1, n_walks=2, density=0.1),  # a ~ 617
    "large_d_dense": dict(n=2, d=6170, n_refs=1, n_walks=2, density=0.5),  # a ~ 3085
}
HIDDEN = {"large_d": 4100}  # H past 4096, not a multiple of the block size; 37 elsewhere


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _scale(t):
    return max(1.0, t.double().abs().max().item()) if t.numel() else 1.0


def _f32(args):
    return [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]


def _within_twin(kernel_out, twin_out, truth, floor):
    """The STYLE.md tolerance rule on one output."""
    err_kernel, err_twin = _max_err(kernel_out, truth), _max_err(twin_out, truth)
    bound = 2 * err_twin + floor * _scale(truth)
    assert err_kernel <= bound, f"kernel error {err_kernel:.3g} > 2 x twin {err_twin:.3g} + floor"


# ----------------------------------------------------------------------------- vs the twins

@pytest.mark.parametrize("name", CASES)
def test_walk_linear_matches_twin(name):
    x, base, perm, n_active, total = walk_case(**CASES[name])
    w, b = linear_layer(x.shape[1], HIDDEN.get(name, 37))
    for bias in (b, None):
        args = (x, base, perm, n_active, w, bias, total)
        truth = reference.permutation_walk_linear(*args)
        got = _ops.permutation_walk_linear(*args)
        assert got.shape == truth.shape == (total, w.shape[0]) and got.dtype == torch.float64
        torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12 * _scale(truth))
        args32 = _f32(args)
        got32 = _ops.permutation_walk_linear(*args32)
        assert got32.dtype == torch.float32
        _within_twin(got32, reference.permutation_walk_linear(*args32), truth, 1e-6)
        # fused ReLU: exactly max(0, .) of the same pre-activations, in both dtypes
        assert torch.equal(_ops.permutation_walk_linear(*args, True), got.clamp(min=0))
        assert torch.equal(_ops.permutation_walk_linear(*args32, True), got32.clamp(min=0))
        # bfloat16 output: the float32 one rounded, bit for bit, with and without the ReLU
        for relu in (False, True):
            wide = _ops.permutation_walk_linear(*args32, relu)
            narrow = _ops.permutation_walk_linear(*args32, relu, torch.bfloat16)
            assert narrow.dtype == torch.bfloat16
            assert torch.equal(narrow.view(torch.int16),
                               wide.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_walk_masked_matches_twin_bitwise(name, dtype):
    x, base, perm, n_active, total = walk_case(**CASES[name], dtype=dtype)
    got = _ops.permutation_walk_masked(x, base, perm, n_active, total)
    truth = reference.permutation_walk_masked(x, base, perm, n_active, total)
    assert got.shape == (total, x.shape[1]) and got.dtype == dtype
    assert torch.equal(got, truth)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("k", [1, 3, 100, 1000])
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("walks_per_sample", [1, 2])
def test_accumulate_matches_twin(name, k, softmax, walks_per_sample):
    case = CASES[name]
    _, _, perm, n_active, total = walk_case(**case)
    steps, start, end, target = logits_case(case["n"], case["n_refs"], total, k)
    args = (steps, start, end, target, perm, n_active, case["d"], walks_per_sample, softmax)
    truth = reference.shapley_accumulate(*args)
    got = _ops.shapley_accumulate(*args)
    for g, t in zip(got, truth):
        assert g.shape == (case["n"], case["d"]) and g.dtype == torch.float64
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-12 * _scale(t))
    args32 = _f32(args)
    for g, tw, t in zip(_ops.shapley_accumulate(*args32), reference.shapley_accumulate(*args32),
                        truth):
        _within_twin(g, tw, t, 1e-12)


def test_accumulate_efficiency_and_dummies():
    """Every walk telescopes to v(x) - v(baseline); features off the walks get exactly 0."""
    case = CASES["many_walks"]
    _, _, perm, n_active, total = walk_case(**case)
    steps, start, end, target = logits_case(case["n"], case["n_refs"], total, 10)
    mean, m2 = _ops.shapley_accumulate(steps, start, end, target, perm, n_active, case["d"], 2,
                                       True)
    v_end = reference.class_value(end, target, True)
    v_start = reference.class_value(start, target[:, None], True).mean(1)
    gap = torch.where(n_active > 0, v_end - v_start, 0.0)
    torch.testing.assert_close(mean.sum(1), gap, rtol=0, atol=1e-12)
    on_walk = torch.zeros_like(mean, dtype=torch.bool)
    for row, a in enumerate(n_active.tolist()):
        on_walk[row, perm[row, 0, :a]] = True
    assert (mean[~on_walk] == 0).all() and (m2[~on_walk] == 0).all()


@only_real_cpu_kernels
@pytest.mark.parametrize("name", ["ragged", "three_refs", "many_walks", "large_d"])
def test_cuda_equals_cpu_kernels(name):
    case = CASES[name]
    x, base, perm, n_active, total = walk_case(**case)
    w, b = linear_layer(case["d"], 37)
    cpu = lambda args: [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]  # noqa: E731
    lin = (x, base, perm, n_active, w, b, total)
    torch.testing.assert_close(_ops.permutation_walk_linear(*lin).cpu(),
                               _ops.permutation_walk_linear(*cpu(lin)), rtol=1e-12, atol=1e-12)
    masked = (x, base, perm, n_active, total)
    assert torch.equal(_ops.permutation_walk_masked(*masked).cpu(),
                       _ops.permutation_walk_masked(*cpu(masked)))
    steps, start, end, target = logits_case(case["n"], case["n_refs"], total, 7)
    acc = (steps, start, end, target, perm, n_active, case["d"], 2, True)
    for g, c in zip(_ops.shapley_accumulate(*acc), _ops.shapley_accumulate(*cpu(acc))):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-12, atol=1e-15)


def test_empty_inputs_match_cpu():
    """N = 0, P = 0 and d = 0 shapes, same answers as the CPU kernels."""
    for n, d, n_walks in [(0, 4, 2), (3, 4, 0), (2, 0, 2)]:
        x = torch.randn(n, d, device=DEVICE)
        base = torch.randn(n, 2, d, device=DEVICE)
        perm = torch.zeros(n, n_walks, 0, dtype=torch.long, device=DEVICE)
        n_active = torch.zeros(n, dtype=torch.long, device=DEVICE)
        w, b = torch.randn(5, d, device=DEVICE), torch.randn(5, device=DEVICE)
        assert _ops.permutation_walk_linear(x, base, perm, n_active, w, b, 0).shape == (0, 5)
        assert _ops.permutation_walk_masked(x, base, perm, n_active, 0).shape == (0, d)
        if n_walks == 0 or d == 0:
            continue
        steps = torch.randn(0, 3, device=DEVICE)
        args = (steps, torch.randn(n, 2, 3, device=DEVICE), torch.randn(n, 3, device=DEVICE),
                torch.zeros(n, dtype=torch.long, device=DEVICE), perm, n_active, d, 1, True)
        for g, c in zip(_ops.shapley_accumulate(*args),
                        _ops.shapley_accumulate(*(a.cpu() if isinstance(a, torch.Tensor) else a
                                                  for a in args))):
            assert g.shape == (n, d) and torch.equal(g.cpu(), c)


def test_wide_feature_space_validation():
    """n_features past the shared-memory bitmask size (393,216 bits) takes the global
    scratch path of the walk validation."""
    d = 400_003
    x, base, perm, n_active, total = walk_case(n=3, d=d, n_refs=2, n_walks=4,
                                               counts=[5, 0, 3])
    masked = _ops.permutation_walk_masked(x, base, perm, n_active, total)
    assert torch.equal(masked, reference.permutation_walk_masked(x, base, perm, n_active, total))
    steps, start, end, target = logits_case(3, 2, total, 4)
    args = (steps, start, end, target, perm, n_active, d, 2, True)
    for g, t in zip(_ops.shapley_accumulate(*args), reference.shapley_accumulate(*args)):
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-14)
    bad = perm.clone()
    bad[2, 1, 0] = bad[2, 1, 1]
    with pytest.raises(RuntimeError, match="perm row 2"):
        _ops.permutation_walk_masked(x, base, bad, n_active, total)


@pytest.mark.parametrize("d, a", [(8, 2), (400_003, 1)], ids=["shared mask", "scratch mask"])
def test_walk_validation_with_more_walks_than_blocks(d, a):
    """The validation's blocks take walk after walk (4,096 blocks with the bitmask in shared
    memory, 1,024 with it in global scratch), clearing the bits each walk set: 1,100 inputs
    of 4 walks through the same features pass (a bit left set would read as a duplicate in
    the block's next walk), and a walk past the first round of blocks with another set is
    refused."""
    n, n_walks = 1100, 4
    x = torch.ones(1, d, device=DEVICE, dtype=torch.float64).expand(n, d)  # [n, d], no copy
    base = torch.zeros(1, 1, d, device=DEVICE, dtype=torch.float64).expand(n, 1, d)
    walks = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]]) if a == 2 else torch.zeros(4, 1)
    perm = walks.long().expand(n, n_walks, a).contiguous().to(DEVICE)
    n_active = torch.full((n,), a, device=DEVICE)
    total = reference.interior_steps(n_active.cpu(), n_walks, 1)
    got = _ops.permutation_walk_masked(x, base, perm, n_active, total)
    assert torch.equal(got.cpu(), reference.permutation_walk_masked(
        x.cpu(), base.cpu(), perm.cpu(), n_active.cpu(), total))
    bad = perm.clone()
    bad[1050, 3, a - 1] = 5  # walk 4,203 of 4,400: not the set {0, .., a - 1} of walk 0
    with pytest.raises(RuntimeError, match="perm row 1050: .* forming the same set"):
        _ops.permutation_walk_masked(x, base, bad, n_active, total)


# ----------------------------------------------------------------------------- layouts

def _column_major(t):
    return t.t().contiguous().t()


def _every_other(t, dim):
    """Same values, stride 2 along ``dim``."""
    wide = torch.stack([t, torch.full_like(t, -7)], dim=dim + 1)
    return wide.select(dim + 1, 0)


@pytest.mark.parametrize("name", ["many_walks", "wide_walks"])
def test_non_contiguous_inputs(name):
    """Every input's strides are read, not assumed. "wide_walks" has walks longer than the
    kernels' tiles (a ~ 750), so the strided reads also cross tile boundaries. A baseline
    read with its rows' stride in place of its features' (and start logits with their
    references' in place of their classes') passed the suite (CUDA mutation audit)."""
    case = {**CASES["many_walks"], "n_walks": 4} if name == "wide_walks" else CASES[name]
    if name == "wide_walks":
        case.update(n=3, d=1500)
    x, base, perm, n_active, total = walk_case(**case)
    n, d, n_refs = case["n"], case["d"], case["n_refs"]
    w, b = linear_layer(d, 50)
    shared = base[:1].expand(n, -1, -1)  # one background set for every row, stride 0
    layouts = {
        "x column-major": dict(x=_column_major(x)),
        "x strided": dict(x=_every_other(x, 1)),
        "baseline expanded": dict(baseline=shared),
        "baseline [B, N, d] storage": dict(baseline=base.transpose(0, 1).contiguous()
                                           .transpose(0, 1)),
        "baseline strided features": dict(baseline=_every_other(base, 2)),
        "perm strided walks": dict(perm=_every_other(perm, 1)),
        "perm column-major": dict(perm=perm.transpose(1, 2).contiguous().transpose(1, 2)),
        "n_active strided": dict(n_active=_every_other(n_active, 0)),
        "weight column-major, bias strided": dict(weight=_column_major(w),
                                                  bias=_every_other(b, 0)),
    }
    plain = dict(x=x, baseline=base, perm=perm, n_active=n_active, weight=w, bias=b)
    for label, change in layouts.items():
        args = {**plain, **change}
        assert any(not t.is_contiguous() for t in change.values()), label
        dense = {key: t.contiguous() for key, t in args.items()}
        got = _ops.permutation_walk_linear(**args, total_steps=total)
        truth = reference.permutation_walk_linear(**dense, total_steps=total)
        torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12, msg=label)
        walk = {key: args[key] for key in ("x", "baseline", "perm", "n_active")}
        got = _ops.permutation_walk_masked(**walk, total_steps=total)
        assert torch.equal(got, reference.permutation_walk_masked(
            **{key: t.contiguous() for key, t in walk.items()}, total_steps=total)), label

    steps, start, end, target = logits_case(n, n_refs, total, 9)
    plain = dict(step_logits=steps, start_logits=start, end_logits=end, target=target,
                 perm=perm, n_active=n_active)
    layouts = {
        "steps column-major": dict(step_logits=_column_major(steps)),
        "start expanded": dict(start_logits=start[:1].expand(n, -1, -1)),
        "start strided classes": dict(start_logits=_every_other(start, 2)),
        "end strided": dict(end_logits=_every_other(end, 1)),
        "target strided": dict(target=_every_other(target, 0)),
        "perm strided walks": dict(perm=_every_other(perm, 1)),
        "n_active strided": dict(n_active=_every_other(n_active, 0)),
    }
    for label, change in layouts.items():
        args = {**plain, **change}
        dense = {key: t.contiguous() for key, t in args.items()}
        got = _ops.shapley_accumulate(**args, n_features=d, walks_per_sample=2, softmax=True)
        truth = reference.shapley_accumulate(**dense, n_features=d, walks_per_sample=2,
                                             softmax=True)
        for g, t in zip(got, truth):
            torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-14, msg=label)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic(dtype):
    for name in ("many_walks", "large_d", "n_not_block_multiple"):
        case = CASES[name]
        x, base, perm, n_active, total = walk_case(**case, dtype=dtype)
        w, b = linear_layer(case["d"], 300, dtype=dtype)
        first = _ops.permutation_walk_linear(x, base, perm, n_active, w, b, total)
        assert torch.equal(first, _ops.permutation_walk_linear(x, base, perm, n_active, w, b,
                                                               total))
        first = _ops.permutation_walk_masked(x, base, perm, n_active, total)
        assert torch.equal(first, _ops.permutation_walk_masked(x, base, perm, n_active, total))
        steps, start, end, target = logits_case(case["n"], case["n_refs"], total, 100,
                                                dtype=dtype)
        args = (steps, start, end, target, perm, n_active, case["d"], 2, True)
        (m1, s1), (m2, s2) = _ops.shapley_accumulate(*args), _ops.shapley_accumulate(*args)
        assert torch.equal(m1, m2) and torch.equal(s1, s2)


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    case = CASES["ragged"]
    x, base, perm, n_active, total = walk_case(**case, dtype=torch.float32)
    if op == "permutation_walk_linear":
        w, b = linear_layer(case["d"], 6, dtype=torch.float32)
        args = (x, base, perm, n_active, w, b, total)
    elif op == "permutation_walk_masked":
        args = (x, base, perm, n_active, total)
    else:
        steps, start, end, target = logits_case(case["n"], case["n_refs"], total, 4,
                                                dtype=torch.float32)
        args = (steps, start, end, target, perm, n_active, case["d"], 2, True)
    torch.library.opcheck(getattr(torch.ops.oni, op).default, args)
    if op == "permutation_walk_linear":  # and the bfloat16 output
        torch.library.opcheck(getattr(torch.ops.oni, op).default,
                              (*args, True, torch.bfloat16))


# ----------------------------------------------------------------------------- bad input

def _one_walk_past_the_end(a):
    a["perm"] = a["perm"][:, :1].clone()
    a["perm"][1, 0, 0] = 6  # d = 6
    a["total_steps"] = reference.interior_steps(a["n_active"].cpu(), 1, 1)
    a["step_logits"] = a["step_logits"][:a["total_steps"]]


def _bad_cases():
    """(label, op, mutate(args dict) -> None, message regex). Valid args come from _good()."""
    def setitem(key, index, value):
        return lambda a: a[key].__setitem__(index, value(a) if callable(value) else value)

    return [
        ("n_active too large", "walk", setitem("n_active", 0, 99), r"n_active\[0\] = 99 must lie"),
        ("n_active negative", "walk", setitem("n_active", 1, -1), r"n_active\[1\] = -1 must lie"),
        ("duplicate index", "walk", setitem("perm", (0, 0, 0), lambda a: a["perm"][0, 0, 1].item()),
         "perm row 0: .* distinct"),
        ("index out of range", "walk", setitem("perm", (1, 1, 0), 10 ** 6), "perm row 1: "),
        ("negative index", "walk", setitem("perm", (2, 0, 1), -3), "perm row 2: "),
        ("index = n_features", "walk", setitem("perm", (1, 1, 0), 6), "perm row 1: "),
        # one walk: only the range check stands between n_features and the accumulator's
        # next row (with two walks the set comparison refuses it too; CUDA mutation audit)
        ("index = n_features, one walk", "walk", _one_walk_past_the_end, "perm row 1: "),
        ("walk with another set", "walk",
         setitem("perm", (1, 1, 0), lambda a: int(a["inactive"][1])), "perm row 1: "),
        ("total_steps off by one", "walk", lambda a: a.update(total_steps=a["total_steps"] + 1),
         "total_steps = "),
        ("target out of range", "acc", setitem("target", 0, 5),
         r"target\[0\] = 5 is not a class index"),
        ("step rows short", "acc", lambda a: a.update(step_logits=a["step_logits"][:-1]),
         "interior steps"),
    ]


def _good():
    x, base, perm, n_active, total = walk_case(n=3, d=6, n_refs=1, n_walks=2, counts=[3, 4, 2],
                                               seed=3)
    inactive = []
    for row in range(3):
        on = set(perm[row, 0, :int(n_active[row])].tolist())
        inactive.append(next(i for i in range(6) if i not in on))
    w, b = linear_layer(6, 4)
    steps, start, end, target = logits_case(3, 1, total, 5)
    return dict(x=x, baseline=base, perm=perm.clone(), n_active=n_active.clone(), weight=w,
                bias=b, total_steps=total, step_logits=steps, start_logits=start,
                end_logits=end, target=target.clone(), inactive=inactive)


def _run(kind, a):
    walk = (a["x"], a["baseline"], a["perm"], a["n_active"])
    if kind == "linear":
        return _ops.permutation_walk_linear(*walk, a["weight"], a["bias"], a["total_steps"])
    if kind == "masked":
        return _ops.permutation_walk_masked(*walk, a["total_steps"])
    return _ops.shapley_accumulate(a["step_logits"], a["start_logits"], a["end_logits"],
                                   a["target"], a["perm"], a["n_active"], 6, 1, True)


@pytest.mark.parametrize("label, kind, mutate, message", _bad_cases(),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_input_same_error_as_cpu(label, kind, mutate, message):
    """Value errors are caught before any kernel reads with them, with the CPU's message; the
    CUDA context stays healthy afterwards."""
    kinds = ["linear", "masked", "acc"] if kind == "walk" else [kind]
    for op_kind in kinds:
        if op_kind == "acc" and label.startswith("total_steps"):
            continue
        a = _good()
        mutate(a)
        with pytest.raises(RuntimeError, match=message) as cuda_err:
            _run(op_kind, a)
        on_cpu = {key: v.cpu() if isinstance(v, torch.Tensor) else v for key, v in a.items()}
        with pytest.raises(RuntimeError) as cpu_err:
            _run(op_kind, on_cpu)
        assert str(cuda_err.value).splitlines()[0] == str(cpu_err.value).splitlines()[0]
    good = _good()
    _run("linear", good)
    _run("acc", good)
    _sync()


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("path", ["incremental", "masked"])
@pytest.mark.parametrize("background", [False, True])
def test_shapley_values_kernel_equals_torch_and_cpu(dtype, path, background):
    d, k, n = 30, 7, 13
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=gen).to(dtype)
    x[torch.rand(n, d, generator=gen) < 0.3] = 0.0  # dummies against the zero baseline
    x[0] = 0.0  # a row with nothing to explain
    x[1, 1:] = 0.0  # a row with one active feature
    baseline = torch.randn(3, d, generator=gen).to(dtype) if background else None
    model = small_mlp(d, k=k, hidden=(64, 32), dtype=dtype)
    if path == "masked":
        model = Wrapped(model).eval()
    model_gpu = copy.deepcopy(model).to(DEVICE)
    x_gpu = x.to(DEVICE)
    base_gpu = baseline.to(DEVICE) if background else None
    kw = dict(n_permutations=24, seed=3)
    kern = oni.shapley_values(model_gpu, x_gpu, base_gpu, backend="kernel", **kw)
    twin = oni.shapley_values(model_gpu, x_gpu, base_gpu, backend="torch", **kw)
    chunked = oni.shapley_values(model_gpu, x_gpu, base_gpu, backend="kernel",
                                 max_batch_evals=50, **kw)
    cpu = oni.shapley_values(model, x, baseline, backend="auto", **kw)
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    assert kern.values.device.type == DEVICE and kern.values.dtype == dtype
    torch.testing.assert_close(kern.values, twin.values, rtol=0, atol=atol)
    torch.testing.assert_close(kern.stderr, twin.stderr, rtol=1e-6 if dtype == torch.float64
                               else 1e-4, atol=atol, equal_nan=True)
    # Chunks are merged in oni.shapley._merge, whose count ratios are float32 today: allow
    # float32-level differences in float64 too.
    torch.testing.assert_close(chunked.values, kern.values, rtol=0, atol=max(atol, 1e-7))
    for field in ("n_permutations", "target"):
        assert torch.equal(getattr(kern, field), getattr(twin, field))
    torch.testing.assert_close(kern.values.sum(1), kern.fx - kern.f_baseline, rtol=0,
                               atol=10 * atol)
    # CPU vs CUDA: same walks (hashed from seed and row), model arithmetic differs in rounding;
    # compare rows whose explained class agrees (a near-tie in the logits may flip it).
    same = kern.target.cpu() == cpu.target
    assert same.float().mean() > 0.8
    torch.testing.assert_close(kern.values.cpu()[same], cpu.values[same], rtol=0,
                               atol=1e-10 if dtype == torch.float64 else 1e-5)


# ----------------------------------------------------------------------------- noise ops

NOISE_SKIP = None
if SKIP is None and not CUDA_EMULATION and not _ops.has_kernel("cuda", _ops.NOISE_OPS):
    NOISE_SKIP = f"the noise ops have no CUDA kernels in this build ({oni.build_info()})"
noise_only = pytest.mark.skipif(NOISE_SKIP is not None, reason=NOISE_SKIP or "")


def _poison_cache(nbytes=64 << 20):
    """Fill freed caching-allocator memory with NaN, so an op output that is left unwritten
    shows as NaN instead of a lucky zero."""
    torch.empty(nbytes // 4, device=DEVICE).fill_(float("nan"))
    _sync()


NOISE_SHAPES = [(1, 1), (3, 2), (257, 100), (1001, 7), (64, 6170), (5, 20_000)]


@noise_only
@pytest.mark.parametrize("n,k", NOISE_SHAPES)
def test_entropy_and_grad_matches_twin(n, k):
    gen = torch.Generator().manual_seed(n * 31 + k)
    logits = torch.randn(n, k, generator=gen, dtype=torch.float64) * 4
    logits[0, 0] = 60.0  # one near-one-hot row: p log p at p ~ 0
    truth_h, truth_g = reference.entropy_and_grad(logits)
    for dtype in (torch.float64, torch.float32):
        z = logits.to(DEVICE, dtype)
        _poison_cache()
        h, g = _ops.entropy_and_grad(z)
        assert h.dtype == g.dtype == dtype and not h.isnan().any() and not g.isnan().any()
        if dtype == torch.float64:
            torch.testing.assert_close(h.cpu(), truth_h, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g.cpu(), truth_g, rtol=1e-12, atol=1e-12)
        else:
            twin_h, twin_g = reference.entropy_and_grad(logits.float())
            _within_twin(h.cpu(), twin_h, truth_h, 1e-6)
            _within_twin(g.cpu(), twin_g, truth_g, 1e-6)
        # non-contiguous logits: same answer
        wide = torch.stack([z, z], dim=-1)[..., 0]
        assert wide.numel() <= 1 or not wide.is_contiguous()
        h2, g2 = _ops.entropy_and_grad(wide)
        assert torch.equal(h2, h) and torch.equal(g2, g)


def _projection_case(n, d, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    eta = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.1
    direction = torch.randn(n, d, generator=gen, dtype=torch.float64)
    step = torch.rand(n, generator=gen, dtype=torch.float64)
    budget = torch.rand(n, d, generator=gen, dtype=torch.float64) * 0.3
    budget[:, ::5] = 0.0  # frozen features
    radius = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    radius[::7] = float("inf")  # the box alone
    radius[3::11] = 0.0  # a zero ball
    active = torch.rand(n, generator=gen) < 0.8
    return [t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE)
            for t in (eta, direction, step, budget, radius, active)]


@noise_only
@pytest.mark.parametrize("n,d", [(1, 1), (2, 3), (129, 600), (1001, 17), (33, 6170)])
def test_ascend_and_project_matches_cpu_and_twin(n, d):
    args = _projection_case(n, d, seed=n + d)
    cpu_args = [t.cpu() for t in args]
    _poison_cache()
    got = _ops.ascend_and_project(*args)
    assert not got.isnan().any()
    # float64: the CPU kernel's exact breakpoint projection and the twin's bisection
    torch.testing.assert_close(got.cpu(), _ops.ascend_and_project(*cpu_args),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.cpu(), reference.ascend_and_project(*cpu_args),
                               rtol=1e-9, atol=1e-11)
    eta, direction, step, budget, radius, active = args
    assert torch.equal(got[~active], eta[~active])  # inactive rows untouched
    assert (got[active].abs() <= budget[active]).all()
    assert (got[active].norm(dim=1) <= radius[active] * (1 + 1e-12) + 1e-15).all()
    # float32 vs float64 truth: within 2x the twin's error
    args32 = [t.float() if t.is_floating_point() else t for t in args]
    got32 = _ops.ascend_and_project(*args32)
    twin32 = reference.ascend_and_project(*[t.cpu() for t in args32])
    _within_twin(got32.cpu(), twin32, got.cpu(), 1e-6)
    # deterministic, and non-contiguous inputs give the same answer
    assert torch.equal(_ops.ascend_and_project(*args), got)
    strided = [torch.stack([t, t], dim=-1)[..., 0] if t.dim() == 2 else t for t in args]
    assert strided[0].numel() <= 1 or not strided[0].is_contiguous()
    assert torch.equal(_ops.ascend_and_project(*strided), got)


@noise_only
def test_ascend_and_project_rejects_bad_values():
    eta, direction, step, budget, radius, active = _projection_case(4, 5, seed=3)
    bad_budget = budget.clone()
    bad_budget[2, 3] = -1.0
    with pytest.raises(RuntimeError, match=r"budget\[2, 3\]"):
        _ops.ascend_and_project(eta, direction, step, bad_budget, radius, active)
    bad_radius = radius.clone()
    bad_radius[1] = float("nan")
    with pytest.raises(RuntimeError, match=r"radius\[1\]"):
        _ops.ascend_and_project(eta, direction, step, budget, bad_radius, active)
    empty = [t[:0] for t in (eta, direction, step, budget, radius, active)]
    assert _ops.ascend_and_project(*empty).shape == (0, 5)
    assert _ops.entropy_and_grad(torch.randn(0, 3, device=DEVICE))[1].shape == (0, 3)


@noise_only
def test_ascend_and_project_check_values_false():
    """check_values=False skips only the value scan (its readback): the same projection bit
    for bit on valid values, and with bad ones the op returns (no error, no crash; the
    caller vouched for the values)."""
    args = _projection_case(129, 600, seed=8)
    _poison_cache()
    got = _ops.ascend_and_project(*args, check_values=False)
    assert torch.equal(got, _ops.ascend_and_project(*args))
    eta, direction, step, budget, radius, active = args
    bad_budget, bad_radius = budget.clone(), radius.clone()
    bad_budget[2, 3], bad_radius[1] = -1.0, float("nan")
    out = _ops.ascend_and_project(eta, direction, step, bad_budget, bad_radius, active,
                                  check_values=False)
    _sync()
    assert out.shape == eta.shape
    torch.library.opcheck(torch.ops.oni.ascend_and_project.default,
                          tuple(_projection_case(9, 7, seed=5, dtype=torch.float32)),
                          {"check_values": False})


@noise_only
@pytest.mark.parametrize("op", ["entropy_and_grad", "ascend_and_project"])
def test_noise_opcheck(op):
    if op == "entropy_and_grad":
        args = (torch.randn(9, 5, device=DEVICE),)
    else:
        args = tuple(_projection_case(9, 7, seed=5, dtype=torch.float32))
    torch.library.opcheck(getattr(torch.ops.oni, op).default, args)


@noise_only
@only_real_cpu_kernels
def test_optimal_noise_cuda_matches_cpu_kernel():
    """The whole solver on CUDA (kernel backend) agrees with the CPU kernel backend."""
    model = small_mlp(12, k=5, seed=4)
    x = (torch.rand(40, 12, generator=torch.Generator().manual_seed(4)) < 0.4).float()
    phi = oni.shapley_values(model, x, n_permutations=16, seed=0).values
    kwargs = dict(tau_fraction=0.6, eps=0.5, beta=0.5, seed=0, backend="kernel")
    with _no_warning_check():
        cpu = oni.optimal_noise(model, x, phi, **kwargs)
        gpu = oni.optimal_noise(copy.deepcopy(model).to(DEVICE), x.to(DEVICE), phi.to(DEVICE),
                                **kwargs)
    # the GPU's float32 model arithmetic differs in the last bits, and a non-concave H can
    # send an iterate to another local solution: agreement on most rows, not bit equality
    assert (gpu.feasible.cpu() == cpu.feasible).double().mean() >= 0.95
    close = (gpu.norm.cpu() - cpu.norm).abs() <= 1e-3 * cpu.norm + 1e-5
    assert close.double().mean() >= 0.9
    assert (gpu.eta.abs() <= gpu.budget + 1e-6).all()
    assert (gpu.norm <= gpu.radius * (1 + 1e-5) + 1e-6).all()


@noise_only
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_optimal_noise_cuda_search_precision_keeps_float32_verdict(precision):
    """TF32/bf16 search passes on CUDA, float32 polish and verdict: the flags and entropies
    are strict float32 ones (TF32 off), and the solutions agree with the float32 run."""
    if precision == "tf32" and CUDA_EMULATION:
        pytest.skip("TF32 is a mode of CUDA devices; the emulation runs on CPU tensors")
    model = small_mlp(16, k=5, seed=1, scale=4.0).to(DEVICE)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    phi = oni.shapley_values(model, x, n_permutations=16, seed=0).values
    kwargs = dict(tau_fraction=0.5, eps=0.6, beta=0.5, seed=0, backend="kernel")
    with _no_warning_check():
        strict = oni.optimal_noise(model, x, phi, **kwargs)
        fast = oni.optimal_noise(model, x, phi, **kwargs, precision=precision)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            log_p = torch.log_softmax(model(x + fast.eta).double(), dim=1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    h = -(log_p.exp() * log_p).sum(1)
    torch.testing.assert_close(fast.entropy.double(), h, rtol=0, atol=1e-5)
    assert (h[fast.feasible] >= fast.tau - 1e-5).all()
    assert (h[~fast.feasible] < fast.tau + 1e-5).all()
    assert (fast.eta.abs() <= fast.budget * (1 + 1e-6)).all()
    assert (fast.norm <= fast.radius * (1 + 1e-5) + 1e-6).all()
    assert (fast.feasible == strict.feasible).double().mean() >= 0.9
    both = fast.feasible & strict.feasible & (strict.norm > 0)
    assert both.sum() >= 16
    assert 0.97 <= (fast.norm[both] / strict.norm[both]).median() <= 1.03


@contextlib.contextmanager
def _no_warning_check():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flagged infeasible")
        yield
