"""Every oni op against its pure-PyTorch twin in oni.reference, on every device present."""
import pytest
import torch

from oni import _ops, reference
from helpers import devices, walk_inputs

DEVICES = devices()
CASES = [  # (n, d, n_refs, n_walks, active_counts)
    dict(n=5, d=9, n_refs=1, n_walks=4, active_counts=None),
    dict(n=3, d=7, n_refs=3, n_walks=2, active_counts=None),
    dict(n=4, d=6, n_refs=2, n_walks=6, active_counts=[0, 1, 6, 3]),  # ragged incl. 0 and 1
    dict(n=2, d=1, n_refs=1, n_walks=2, active_counts=[1, 0]),  # d = 1
    dict(n=3, d=5, n_refs=1, n_walks=2, active_counts=[0, 0, 0]),  # nothing to walk
    dict(n=37, d=40, n_refs=1, n_walks=8, active_counts=None),  # not a block multiple
]


def _inputs(case, device, dtype=torch.float32, seed=0):
    return walk_inputs(case["n"], case["d"], case["n_refs"], case["n_walks"], seed=seed,
                       device=device, dtype=dtype, active_counts=case["active_counts"])


def _layer(d, hidden, device, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(hidden, d, generator=gen, dtype=dtype)
    b = torch.randn(hidden, generator=gen, dtype=dtype)
    return w.to(device), b.to(device)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_walk_linear_matches_reference(device, case):
    x, base, perm, n_active, total = _inputs(case, device, torch.float64)
    w, b = _layer(case["d"], 11, device, torch.float64)
    truth = reference.permutation_walk_linear(x, base, perm, n_active, w, b, total)
    got = _ops.permutation_walk_linear(x, base, perm, n_active, w, b, total)
    assert got.shape == truth.shape == (total, 11)
    torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)
    # float32: error vs the float64 truth at most 2x that of the twin in float32 (STYLE.md)
    args32 = [t.float() if t.is_floating_point() else t for t in (x, base, perm, n_active, w, b)]
    err_kernel = _max_err(_ops.permutation_walk_linear(*args32, total), truth)
    err_twin = _max_err(reference.permutation_walk_linear(*args32, total), truth)
    assert err_kernel <= 2 * err_twin + 1e-6
    # no bias
    torch.testing.assert_close(
        _ops.permutation_walk_linear(x, base, perm, n_active, w, None, total),
        reference.permutation_walk_linear(x, base, perm, n_active, w, None, total))
    # the fused ReLU is exactly max(0, .) of the pre-activations
    fused = _ops.permutation_walk_linear(x, base, perm, n_active, w, b, total, True)
    assert torch.equal(fused, got.clamp(min=0))
    torch.testing.assert_close(
        fused, reference.permutation_walk_linear(x, base, perm, n_active, w, b, total, True),
        rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_walk_linear_bfloat16_output(device, case, relu):
    """out_dtype=bfloat16 is the float32 output rounded to bfloat16, bit for bit (NaN
    payloads aside), on the kernel and the twin."""
    x, base, perm, n_active, total = _inputs(case, device)
    w, b = _layer(case["d"], 11, device, torch.float32)
    args = (x, base, perm, n_active, w, b, total, relu)
    for ops in (_ops, reference):
        wide = ops.permutation_walk_linear(*args)
        narrow = ops.permutation_walk_linear(*args, torch.bfloat16)
        assert narrow.dtype == torch.bfloat16 and narrow.shape == wide.shape
        assert torch.equal(narrow.view(torch.int16), wide.to(torch.bfloat16).view(torch.int16))
    # values far apart in magnitude, and a NaN weight column: rounding and NaN both survive
    w2 = w.clone()
    w2[:, 0] = float("nan")
    w2[0] *= 1e30
    wide = _ops.permutation_walk_linear(x, base, perm, n_active, w2, b, total, relu)
    narrow = _ops.permutation_walk_linear(x, base, perm, n_active, w2, b, total, relu,
                                          torch.bfloat16)
    torch.testing.assert_close(narrow, wide.to(torch.bfloat16), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("out_dtype, x_dtype", [(torch.float16, torch.float32),
                                                (torch.bfloat16, torch.float64),
                                                (torch.float64, torch.float32)])
def test_walk_linear_refuses_other_output_dtypes(out_dtype, x_dtype):
    x, base, perm, n_active, w, b, total = _good()
    args = [t.to(x_dtype) if t.is_floating_point() else t for t in (x, base, perm, n_active, w, b)]
    for ops, error in ((_ops, RuntimeError), (reference, ValueError)):
        with pytest.raises(error, match="out_dtype must be x's dtype"):
            ops.permutation_walk_linear(*args, total, False, out_dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_walk_linear_float64_steps_are_unfused(device):
    """Each float64 step is acc + round(w_i * delta_i): two roundings, as the op documents and
    every vectorised clone and the CUDA kernel compute. An FMA (one rounding) differs in the
    last bit on 12% of these steps; gcc made one in the AVX-512 clone until the CPU build
    turned contraction off, so the bits depended on the machine."""
    x, base, perm, n_active, total = walk_inputs(2, 50, 1, 2, seed=4, device=device,
                                                 dtype=torch.float64, active_counts=[50, 40])
    w, b = _layer(50, 257, device, torch.float64)
    out = _ops.permutation_walk_linear(x, base, perm, n_active, w, b, total)
    row = 0
    for n in range(2):
        a = int(n_active[n])
        delta = (x[n] - base[n, 0])[perm[n, :, :a]]  # [P, a]
        for p in range(perm.shape[1]):
            steps = out[row:row + a - 1]
            for k in range(1, a - 1):  # row k adds the walk's feature k
                column = w[:, perm[n, p, k]]
                assert torch.equal(steps[k], steps[k - 1] + column * delta[p, k]), (n, p, k)
            row += a - 1
    assert row == total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_walk_masked_matches_reference(device, case):
    x, base, perm, n_active, total = _inputs(case, device)
    got = _ops.permutation_walk_masked(x, base, perm, n_active, total)
    truth = reference.permutation_walk_masked(x, base, perm, n_active, total)
    assert got.shape == (total, case["d"])
    assert torch.equal(got, truth)  # pure copies: bit for bit


def test_walk_masked_prefixes_are_what_the_layout_says():
    """Spot-check the [n][p][b][k] layout by hand on one tiny case."""
    x = torch.tensor([[1.0, 2.0, 3.0]])
    base = torch.tensor([[[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]])
    perm = torch.tensor([[[2, 0, 1]]])
    out = _ops.permutation_walk_masked(x, base, perm, torch.tensor([3]), 4)
    expected = torch.tensor([[10.0, 20.0, 3.0], [1.0, 20.0, 3.0],  # reference 0, k = 1, 2
                             [40.0, 50.0, 3.0], [1.0, 50.0, 3.0]])  # reference 1
    assert torch.equal(out, expected)


def _accumulate_inputs(case, device, dtype, softmax, seed=0, walks_per_sample=2):
    x, base, perm, n_active, total = _inputs(case, device, dtype, seed)
    k = 5
    gen = torch.Generator().manual_seed(seed + 7)
    n, n_refs = case["n"], case["n_refs"]
    steps = (torch.randn(total, k, generator=gen, dtype=dtype) * 3).to(device)
    start = (torch.randn(n, n_refs, k, generator=gen, dtype=dtype) * 3).to(device)
    end = (torch.randn(n, k, generator=gen, dtype=dtype) * 3).to(device)
    target = torch.randint(0, k, (n,), generator=gen).to(device)
    return (steps, start, end, target, perm, n_active, case["d"], walks_per_sample, softmax)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("walks_per_sample", [1, 2])
def test_accumulate_matches_reference(device, case, softmax, walks_per_sample):
    args = _accumulate_inputs(case, device, torch.float32, softmax,
                              walks_per_sample=walks_per_sample)
    mean, m2 = _ops.shapley_accumulate(*args)
    mean_ref, m2_ref = reference.shapley_accumulate(*args)
    assert mean.dtype == m2.dtype == torch.float64
    torch.testing.assert_close(mean, mean_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m2, m2_ref, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("where", ["step", "start", "end"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_accumulate_non_finite_logits_give_nan_features(device, softmax, where, bad):
    """A non-finite logit makes some contributions inf or NaN, whichever the order of the
    sums gives: the affected features are NaN in mean and m2 on every device and the twin,
    and the rest of the row is what it was."""
    args = list(_accumulate_inputs(CASES[0], device, torch.float64, softmax))
    clean_mean, clean_m2 = _ops.shapley_accumulate(*args)
    steps, start, end, target, perm, n_active = args[:6]
    n0 = int((n_active >= 2).nonzero()[0, 0])  # an input with interior steps
    first_step = int((perm.shape[1] * start.shape[1] * (n_active[:n0] - 1).clamp(min=0)).sum())
    c = int(target[n0])
    bad_logits = {"step": steps, "start": start, "end": end}[where].clone()
    bad_logits[{"step": (first_step, c), "start": (n0, 0, c), "end": (n0, c)}[where]] = bad
    args[{"step": 0, "start": 1, "end": 2}[where]] = bad_logits
    mean, m2 = _ops.shapley_accumulate(*args)
    mean_ref, m2_ref = reference.shapley_accumulate(*args)
    for got, want in ((mean, mean_ref), (m2, m2_ref)):
        assert torch.equal(got.isnan(), want.isnan())
        assert got.isfinite().logical_or(got.isnan()).all()  # no inf: NaN or a number
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, equal_nan=True)
    assert torch.equal(mean.isnan(), m2.isnan())
    if softmax and bad == float("-inf"):  # probability 0: a finite value, no NaN
        assert not mean.isnan().any()
        return
    nan_rows = mean.isnan().any(1).nonzero().flatten().tolist()
    assert nan_rows == [n0]
    fine = ~mean.isnan()
    assert torch.equal(mean[fine], clean_mean[fine]) and torch.equal(m2[fine], clean_m2[fine])


@pytest.mark.parametrize("device", DEVICES)
def test_accumulate_efficiency_and_dummies(device):
    """Each walk telescopes: the feature sums equal v(x) - v(baseline) exactly-ish; features
    not on the walk get exactly 0."""
    case = CASES[2]
    args = _accumulate_inputs(case, device, torch.float64, True)
    steps, start, end, target, perm, n_active = args[:6]
    mean, m2 = _ops.shapley_accumulate(*args)
    v_end = reference.class_value(end, target, True)
    v_start = reference.class_value(start, target[:, None], True).mean(1)
    gap = torch.where(n_active > 0, v_end - v_start, 0.0)
    torch.testing.assert_close(mean.sum(1), gap, rtol=0, atol=1e-12)
    on_walk = torch.zeros_like(mean, dtype=torch.bool)
    for i, a in enumerate(n_active.tolist()):
        on_walk[i, perm[i, 0, :a]] = True
    assert (mean[~on_walk] == 0).all() and (m2[~on_walk] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_ops_deterministic(device):
    case = CASES[5]
    x, base, perm, n_active, total = _inputs(case, device)
    w, b = _layer(case["d"], 33, device, torch.float32)
    a1 = _ops.permutation_walk_linear(x, base, perm, n_active, w, b, total)
    a2 = _ops.permutation_walk_linear(x, base, perm, n_active, w, b, total)
    assert torch.equal(a1, a2)
    args = _accumulate_inputs(case, device, torch.float32, True)
    m1, s1 = _ops.shapley_accumulate(*args)
    m2_, s2 = _ops.shapley_accumulate(*args)
    assert torch.equal(m1, m2_) and torch.equal(s1, s2)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    case = CASES[0]
    x, base, perm, n_active, total = _inputs(case, device, torch.float64)
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=device)
    wide[:, ::2] = x
    x_strided = wide[:, ::2]
    assert not x_strided.is_contiguous()
    shared = base[:1, :1].expand(x.shape[0], 3, -1)  # stride-0 background set
    w, b = _layer(case["d"], 6, device, torch.float64)
    w_t = w.t().contiguous().t()  # column-major weight
    x2, b2, p2, a2, total2 = walk_inputs(5, 9, 3, 4, seed=0, device=device, dtype=torch.float64)
    for args in [(x_strided, base, perm, n_active), (x2, shared, p2, a2)]:
        tot = reference.interior_steps(args[3], args[2].shape[1], args[1].shape[1])
        torch.testing.assert_close(
            _ops.permutation_walk_linear(*args, w_t, b, tot),
            reference.permutation_walk_linear(*(t.contiguous() for t in args), w, b, tot))
        assert torch.equal(_ops.permutation_walk_masked(*args, tot),
                           reference.permutation_walk_masked(*(t.contiguous() for t in args), tot))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    case = CASES[1]
    x, base, perm, n_active, total = _inputs(case, device)
    w, b = _layer(case["d"], 4, device, torch.float32)
    torch.library.opcheck(torch.ops.oni.permutation_walk_linear.default,
                          (x, base, perm, n_active, w, b, total))
    torch.library.opcheck(torch.ops.oni.permutation_walk_linear.default,
                          (x, base, perm, n_active, w, b, total, True, torch.bfloat16))
    torch.library.opcheck(torch.ops.oni.permutation_walk_masked.default,
                          (x, base, perm, n_active, total))
    torch.library.opcheck(torch.ops.oni.shapley_accumulate.default,
                          _accumulate_inputs(case, device, torch.float32, True))


# ------------------------------------------------------------------------------ bad input

def _good():
    x, base, perm, n_active, total = walk_inputs(3, 6, 1, 2, seed=3, density=0.7)
    w, b = _layer(6, 4, "cpu", torch.float32)
    return x, base, perm, n_active, w, b, total


def _one_walk_with(args, index, value):
    """args with their first walk only, holding ``value`` at ``index``."""
    args["perm"] = args["perm"][:, :1].clone()
    args["perm"][index] = value
    args["total_steps"] = reference.interior_steps(args["n_active"], 1, 1)


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(x=a["x"][0]), "x must be 2-D"),
    (lambda a: a.update(x=a["x"].long()), "x must be float32 or float64"),
    (lambda a: a.update(baseline=a["baseline"][:, 0]), "baseline must be 3-D"),
    (lambda a: a.update(baseline=a["baseline"].double()), "baseline must have x's dtype"),
    (lambda a: a.update(baseline=a["baseline"][..., :5]), "baseline must be \\[N, B, d\\]"),
    (lambda a: a.update(perm=a["perm"].int()), "perm must be int64"),
    (lambda a: a.update(perm=a["perm"][:2]), "perm must have N"),
    (lambda a: a.update(n_active=a["n_active"][:2]), "n_active must be \\[N\\]"),
    (lambda a: a.update(n_active=a["n_active"] + 10), "n_active\\[0\\] = .* must lie in"),
    (lambda a: a.update(weight=a["weight"][:, :5]), "weight must be \\[H, d\\]"),
    (lambda a: a.update(bias=a["bias"][:3]), "bias must be \\[H\\]"),
    (lambda a: a.update(total_steps=a["total_steps"] + 1), "total_steps = "),
    (lambda a: a["perm"].__setitem__((0, 0, 0), a["perm"][0, 0, 1].item()),
     "must be distinct feature indices"),
    (lambda a: a["perm"].__setitem__((1, 0, 0), 99), "must be distinct feature indices"),
    (lambda a: _one_walk_with(a, (1, 0, 0), 6), "perm row 1: .* must be distinct feature "
                                                 "indices"),  # = d, with no set to compare
])
def test_walk_linear_bad_input(mutate, message):
    x, base, perm, n_active, w, b, total = _good()
    args = dict(x=x, baseline=base, perm=perm.clone(), n_active=n_active, weight=w, bias=b,
                total_steps=total)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        _ops.permutation_walk_linear(**args)


def test_walk_check_forgets_each_inputs_features():
    """One thread checks consecutive inputs with the same tables: input 0's features must not
    count as input 1's (a walk of input 1 through feature 0 is refused), and input 1 may walk
    input 0's features when they are its own."""
    x = torch.rand(2, 6)
    base = torch.zeros(2, 1, 6)
    n_active = torch.tensor([3, 3])
    good = torch.tensor([[[0, 1, 2], [2, 1, 0]], [[3, 4, 5], [5, 3, 4]]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _ops.permutation_walk_masked(x, base, good, n_active, 8)
        _ops.permutation_walk_masked(x, base, torch.tensor([[[0, 1, 2], [2, 1, 0]],
                                                            [[1, 2, 0], [0, 2, 1]]]), n_active, 8)
        bad = good.clone()
        bad[1, 1] = torch.tensor([3, 4, 0])
        with pytest.raises(RuntimeError, match="perm row 1: .* forming the same set"):
            _ops.permutation_walk_masked(x, base, bad, n_active, 8)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n_features", [2 ** 43, 2 ** 62])
def test_accumulate_n_features_beyond_memory_is_an_error(n_features):
    """n_features sets the outputs' width ([N, n_features] float64, twice): a width no
    memory holds gets the allocator's error before any per-thread table of that length
    is made (which, allocated first, was a process killed for memory)."""
    args = (torch.randn(0, 3), torch.randn(1, 1, 3), torch.randn(1, 3), torch.tensor([0]),
            torch.tensor([[[0]]]), torch.tensor([1]), n_features, 1, True)
    with pytest.raises(RuntimeError, match="allocate|overflow"):
        _ops.shapley_accumulate(*args)


def test_accumulate_bad_input():
    args = list(_accumulate_inputs(CASES[0], "cpu", torch.float32, True))
    bad_target = list(args)
    bad_target[3] = args[3].clone()
    bad_target[3][0] = 5
    with pytest.raises(RuntimeError, match="target\\[0\\] = 5 is not a class index"):
        _ops.shapley_accumulate(*bad_target)
    odd = list(args)
    odd[7] = 3
    with pytest.raises(RuntimeError, match="multiple of walks_per_sample"):
        _ops.shapley_accumulate(*odd)
    short = list(args)
    short[0] = args[0][:-1]
    with pytest.raises(RuntimeError, match="interior steps"):
        _ops.shapley_accumulate(*short)
    wide = list(args)
    wide[1] = args[1][..., :4]
    with pytest.raises(RuntimeError, match="start_logits must be \\[N, B, k\\]"):
        _ops.shapley_accumulate(*wide)


@pytest.mark.parametrize("device", DEVICES + ["meta"])  # meta: the fake kernels
def test_a_step_count_beyond_int64_is_an_error(device):
    """N * P * B * L bounds the step rows counted in int64: 2^61 expanded references used to
    wrap the count to 0, and the walk returned an empty result without a word."""
    refs = 2 ** 61
    x = torch.rand(1, 3, device=device)
    baseline = torch.zeros(1, 1, 3, device=device).expand(1, refs, 3)
    perm = torch.tensor([[[0, 1, 2]]], device=device).expand(1, 4, 3)
    n_active = torch.tensor([3], device=device)
    message = rf"step count may exceed int64: N \* P \* B \* L = 1 \* 4 \* {refs} \* 3"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.oni.permutation_walk_masked(x, baseline, perm, n_active, 0)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.oni.permutation_walk_linear(x, baseline, perm, n_active,
                                              torch.rand(2, 3, device=device), None, 0)
    start = torch.zeros(1, 1, 3, device=device).expand(1, refs, 3)  # numel 3 * 2^61 < 2^63
    with pytest.raises(RuntimeError, match=message):
        torch.ops.oni.shapley_accumulate(torch.zeros(0, 3, device=device), start,
                                         torch.zeros(1, 3, device=device),
                                         torch.tensor([0], device=device), perm, n_active, 3, 1,
                                         True)
