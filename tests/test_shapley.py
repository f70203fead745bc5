"""The public Shapley API: estimator quality, the method's identities, and bad input."""
import math

import pytest
import torch
from torch import nn

import oni
from helpers import Wrapped, ZeroesItsInput, devices, small_mlp, walk_inputs

DEVICES = devices()
BACKENDS = ["kernel", "torch"]


def _binary_rows(n, d, seed=0, p=0.5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, d, generator=gen) < p).float()


def _gaussian_rows(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def game10():
    model = small_mlp(10, k=5, seed=3)
    x = _gaussian_rows(6, 10, seed=4)
    x[0, [2, 7]] = 0.0  # dummies with the zero baseline
    return model, x, oni.exact_shapley(model, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampled_within_standard_errors_of_exact(game10, backend):
    model, x, exact = game10
    res = oni.shapley_values(model, x, n_permutations=400, backend=backend, seed=1)
    assert res.values.shape == res.stderr.shape == x.shape
    assert (res.n_permutations == 400).all()
    err = (res.values - exact.values).abs().double()
    sampled = res.stderr > 0
    z = err[sampled] / res.stderr[sampled].double()
    assert z.max() < 5.0, f"max |z| = {z.max():.2f}"
    assert (err[~sampled] < 1e-6).all()  # exact where no sampling error
    # and the standard errors are honest: not wildly larger than the error they describe
    assert z.square().mean().sqrt() > 0.3


@pytest.mark.parametrize("backend", BACKENDS)
def test_standard_errors_are_the_spread_over_seeds(game10, backend):
    """The reported standard error is the standard deviation of the values over seeds: their
    mean squares agree within sampling noise (40 seeds: about +-6% on the ratio at 2
    sigma: the ratio's spread over 60 other blocks of 40 seeds was 0.029). Doubled standard
    errors passed the z check above (mutation audit)."""
    model, x, _ = game10
    runs = [oni.shapley_values(model, x, n_permutations=16, backend=backend, seed=seed)
            for seed in range(40)]
    values = torch.stack([r.values for r in runs]).double()
    stderr_sq = torch.stack([r.stderr for r in runs]).double().square().mean(0)
    spread_sq = values.var(0, correction=1)
    sampled = spread_sq > 0
    ratio = float((stderr_sq[sampled].mean() / spread_sq[sampled].mean()).sqrt())
    assert 0.85 < ratio < 1.18, ratio


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_efficiency_every_row(backend, dtype):
    model = small_mlp(12, k=3, seed=5, dtype=dtype)
    x = _gaussian_rows(9, 12, seed=6).to(dtype)
    res = oni.shapley_values(model, x, n_permutations=6, backend=backend)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(res.values.sum(1), res.fx - res.f_baseline, rtol=0, atol=tol)
    probs = torch.softmax(model(x), 1)
    torch.testing.assert_close(res.fx, probs.gather(1, res.target[:, None])[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dummy_features_exactly_zero(backend):
    model = small_mlp(12, k=4, seed=7)
    x = _binary_rows(8, 12, seed=8, p=0.3)  # zero baseline: every 0 is a dummy
    res = oni.shapley_values(model, x, n_permutations=10, backend=backend)
    dummy = x == 0
    assert dummy.any()
    assert (res.values[dummy] == 0).all() and (res.stderr[dummy] == 0).all()
    bg = torch.stack([x[0], x[0] * 0 + 1])  # background: dummies where x equals both
    res_bg = oni.shapley_values(model, x[:1], bg, n_permutations=10, backend=backend)
    assert (res_bg.values[0, x[0] == 1] == 0).sum() >= 0  # defined
    assert (res_bg.values[0][(x[0] == bg[0]) & (x[0] == bg[1])] == 0).all()


def test_same_seed_same_result_and_chunking_invariance(game10):
    model, x, _ = game10
    a = oni.shapley_values(model, x, n_permutations=20, seed=11)
    b = oni.shapley_values(model, x, n_permutations=20, seed=11)
    c = oni.shapley_values(model, x, n_permutations=20, seed=12)
    assert torch.equal(a.values, b.values) and torch.equal(a.stderr, b.stderr)
    assert not torch.equal(a.values, c.values)
    tiny = oni.shapley_values(model, x, n_permutations=20, seed=11, max_batch_evals=5)
    torch.testing.assert_close(tiny.values, a.values, rtol=0, atol=1e-7)
    # and the standard errors: chunks' statistics merged (their between-chunk spread too)
    torch.testing.assert_close(tiny.stderr, a.stderr, rtol=1e-5, atol=1e-9)
    # a row's walks depend on (seed, row index) only, not on the other rows in the batch
    other = x.clone()
    other[0] = 0.5
    mixed = oni.shapley_values(model, other, n_permutations=20, seed=11)
    torch.testing.assert_close(mixed.values[1:], a.values[1:], rtol=0, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_backend_equals_torch_backend(device):
    model = small_mlp(11, k=6, seed=9).to(device)
    x = _gaussian_rows(7, 11, seed=10).to(device)
    bg = _gaussian_rows(3, 11, seed=12).to(device)
    for baseline in (None, bg):
        k = oni.shapley_values(model, x, baseline, n_permutations=16, backend="kernel")
        t = oni.shapley_values(model, x, baseline, n_permutations=16, backend="torch")
        torch.testing.assert_close(k.values, t.values, rtol=0, atol=1e-6)
        torch.testing.assert_close(k.stderr, t.stderr, rtol=1e-4, atol=1e-7)
        assert torch.equal(k.n_permutations, t.n_permutations)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_backend_on_wide_layers(device):
    """A first layer 1,030 units wide, 2,600 features and ~310 active ones: more columns
    than the walk and accumulation kernels' blocks cover in one pass at the emulation's
    launch limits (tests/cuda_emu), so their grid-stride loops run there (each was broken by
    hand and caught here); the paper's first layer is 1,024 wide."""
    gen = torch.Generator().manual_seed(21)
    model = nn.Sequential(nn.Linear(2600, 1030), nn.ReLU(), nn.Linear(1030, 5)).eval()
    x = (torch.rand(3, 2600, generator=gen) < 0.12).float()
    model, x = model.to(device), x.to(device)
    for net in (model, Wrapped(model).eval()):  # incremental, then masked-input walks
        k = oni.shapley_values(net, x, n_permutations=2, seed=4, backend="kernel")
        t = oni.shapley_values(net, x, n_permutations=2, seed=4, backend="torch")
        torch.testing.assert_close(k.values, t.values, rtol=0, atol=1e-6)
        torch.testing.assert_close(k.values.sum(1), k.fx - k.f_baseline, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generic_path_equals_incremental_path(backend):
    model = small_mlp(10, k=4, seed=13)
    x = _gaussian_rows(5, 10, seed=14)
    bg = _gaussian_rows(2, 10, seed=15)
    for baseline in (None, bg):
        inc = oni.shapley_values(model, x, baseline, n_permutations=12, backend=backend)
        gen = oni.shapley_values(Wrapped(model).eval(), x, baseline, n_permutations=12,
                                 backend=backend)
        fn = oni.shapley_values(lambda z: model(z), x, baseline, n_permutations=12,
                                backend=backend)
        torch.testing.assert_close(inc.values, gen.values, rtol=0, atol=1e-6)
        torch.testing.assert_close(gen.values, fn.values, rtol=0, atol=0)


def test_nested_sequential_takes_incremental_path():
    from oni.shapley import _split_first_linear
    model = small_mlp(6)
    nested = nn.Sequential(nn.Sequential(model[0], model[1]), *model[2:])
    head, tail = _split_first_linear(nested)
    assert head is model[0]
    z = torch.randn(3, 6)
    torch.testing.assert_close(tail(head(z)), nested(z))
    assert _split_first_linear(Wrapped(model)) is None


def test_antithetic_lowers_the_variance():
    model = small_mlp(12, k=5, seed=16, hidden=(32, 16))
    x = _gaussian_rows(24, 12, seed=17)
    exact = oni.exact_shapley(model, x)
    mse = {}
    for anti in (True, False):
        errs = []
        for seed in range(8):
            r = oni.shapley_values(model, x, n_permutations=8, antithetic=anti, seed=seed)
            errs.append((r.values - exact.values).double().square().mean())
        mse[anti] = torch.stack(errs).mean().item()
    assert mse[True] < 0.8 * mse[False], mse  # measured ratio ~0.6 here


def test_antithetic_exact_for_pairwise_games():
    """Forward/reverse pairs are exact for games with interactions of order <= 2."""
    gen = torch.Generator().manual_seed(18)
    d = 8
    a = torch.randn(d, generator=gen)
    b = torch.randn(d, d, generator=gen)

    def quadratic(z):
        out = z @ a + ((z @ b) * z).sum(1)
        return torch.stack([out, -out], 1)

    x = torch.randn(4, d, generator=gen)
    exact = oni.exact_shapley(quadratic, x, target=0, link="identity")
    res = oni.shapley_values(quadratic, x, target=0, link="identity", n_permutations=2)
    torch.testing.assert_close(res.values, exact.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_background_set_against_exact(backend):
    model = small_mlp(8, k=3, seed=19)
    x = _gaussian_rows(4, 8, seed=20)
    bg = _gaussian_rows(5, 8, seed=21)
    bg[:, 0] = x[0, 0]  # feature 0 of row 0 equals every reference: a dummy there
    exact = oni.exact_shapley(model, x, bg)
    # the mean game: its value at the empty coalition is the mean over references
    probs = torch.softmax(model(bg), 1)[:, exact.target].T  # [N, B]
    torch.testing.assert_close(exact.f_baseline, probs.mean(1))
    res = oni.shapley_values(model, x, bg, n_permutations=300, backend=backend, seed=2)
    sampled = res.stderr > 0
    z = (res.values - exact.values).abs()[sampled] / res.stderr[sampled]
    assert z.max() < 5.0
    assert res.values[0, 0] == 0 and exact.values[0, 0].abs() < 1e-7
    torch.testing.assert_close(res.values.sum(1), exact.fx - exact.f_baseline, rtol=0, atol=1e-6)


def test_exact_by_hand_on_a_two_feature_game():
    """v(S) for S in {}, {0}, {1}, {0,1} = 0, 1, 2, 5: phi = (2, 3)."""
    def game(z):
        out = z[:, 0] + 2 * z[:, 1] + 2 * z[:, 0] * z[:, 1]
        return torch.stack([out, out], 1)
    res = oni.exact_shapley(game, torch.ones(1, 2), target=0, link="identity")
    torch.testing.assert_close(res.values, torch.tensor([[2.0, 3.0]]))
    samp = oni.shapley_values(game, torch.ones(1, 2), target=0, link="identity",
                              n_permutations=2)
    torch.testing.assert_close(samp.values, torch.tensor([[2.0, 3.0]]))


def test_targets():
    model = small_mlp(6, k=4, seed=22)
    x = _gaussian_rows(5, 6, seed=23)
    pred = model(x).argmax(1)
    labels = torch.tensor([0, 1, 2, 3, 0])
    assert torch.equal(oni.shapley_values(model, x, n_permutations=2).target, pred)
    assert torch.equal(oni.shapley_values(model, x, target="label", labels=labels,
                                          n_permutations=2).target, labels)
    assert (oni.shapley_values(model, x, target=2, n_permutations=2).target == 2).all()
    res = oni.shapley_values(model, x, target=labels, n_permutations=2)
    probs = torch.softmax(model(x), 1)
    torch.testing.assert_close(res.fx, probs[torch.arange(5), labels])


def test_tol_stops_rows_early():
    model = small_mlp(10, k=4, seed=24)
    x = _gaussian_rows(6, 10, seed=25)
    x[0, 1:] = 0  # one active feature: exact after the first round
    full = oni.shapley_values(model, x, n_permutations=64)
    tol = float(full.stderr.amax(1).median()) * 2
    res = oni.shapley_values(model, x, n_permutations=64, tol=tol)
    assert res.n_permutations.min() < 64
    assert int(res.n_permutations[0]) < 64
    stopped = res.n_permutations < 64
    assert (res.stderr.amax(1)[stopped] <= tol).all()
    assert (res.n_permutations % 2 == 0).all()


def test_tol_waits_for_enough_samples_to_trust_their_spread():
    """With 3 active players, antithetic pairs that put the same player in the middle give
    identical samples: a spread of 0 by chance. tol stopped 92 of these 300 rows after 4 walks
    with stderr 0 and an error 77x tol (the third fuzz pass's invariant probe)."""
    model = small_mlp(3, k=3, seed=4)
    x = _gaussian_rows(1, 3, seed=0).mul(3).repeat(300, 1)
    res = oni.shapley_values(model, x, n_permutations=32, seed=0, tol=1e-6)
    assert (res.n_permutations == 32).all()  # 16 antithetic samples before tol may stop
    # rows whose walk is forced stop at the first check: one active player, or two in pairs
    x[:100, 1:] = 0
    x[100:200, 2] = 0
    res = oni.shapley_values(model, x, n_permutations=64, seed=0, tol=1e-6)
    assert (res.n_permutations[:200] == 8).all() and (res.n_permutations[200:] >= 32).all()


def test_odd_walk_count_is_rounded_up_for_antithetic_pairs():
    model = small_mlp(5, seed=26)
    res = oni.shapley_values(model, _gaussian_rows(2, 5), n_permutations=3)
    assert (res.n_permutations == 4).all()
    res = oni.shapley_values(model, _gaussian_rows(2, 5), n_permutations=3, antithetic=False)
    assert (res.n_permutations == 3).all()


def test_single_walk_pair_reports_nan_stderr_not_zero():
    model = small_mlp(6, seed=27)
    res = oni.shapley_values(model, _gaussian_rows(2, 6), n_permutations=2)
    assert torch.isnan(res.stderr).all()  # one sample: the variance is unknown


def test_build_info():
    info = oni.build_info()
    assert info["cpu"] is True
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_version"], int)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model = small_mlp(9, k=4, seed=28)
    x = _gaussian_rows(5, 9, seed=29)
    cpu = oni.shapley_values(model, x, n_permutations=8)
    gpu = oni.shapley_values(model.cuda(), x.cuda(), n_permutations=8)
    torch.testing.assert_close(gpu.values.cpu(), cpu.values, rtol=0, atol=1e-6)


def test_row_offset_gives_a_shard_the_walks_of_the_whole_batch():
    model = small_mlp(10, k=4, seed=61, dtype=torch.float64)
    x = _gaussian_rows(9, 10, seed=62).double()
    for groups in (None, torch.arange(10) // 3):
        whole = oni.shapley_values(model, x, n_permutations=6, seed=2, groups=groups)
        parts = [oni.shapley_values(model, x[lo:hi], n_permutations=6, seed=2, groups=groups,
                                    row_offset=lo) for lo, hi in ((0, 4), (4, 9))]
        torch.testing.assert_close(torch.cat([p.values for p in parts]), whole.values,
                                   rtol=0, atol=1e-12)
        unshifted = oni.shapley_values(model, x[4:], n_permutations=6, seed=2, groups=groups)
        assert not torch.allclose(unshifted.values, whole.values[4:])  # other walks
    with pytest.raises(ValueError, match="row_offset must be >= 0"):
        oni.shapley_values(model, x, row_offset=-1)
    with pytest.raises(ValueError, match=r"row_offset \+ N must be at most 2\*\*62"):
        oni.shapley_values(model, x, row_offset=2 ** 62)


# ---------------------------------------------------------------------------- feature groups

GROUPS = torch.tensor([7, 7, -1, 3, 3, 3, 10, 5, 5, 12])  # any integer ids, in any order


def _shapley_by_definition(value, players):
    """Shapley values of the game ``value(coalition tuple)`` over ``players`` straight from
    the definition: every coalition of the others, weights |S|! (n - |S| - 1)! / n!."""
    import itertools
    n = len(players)
    phi = torch.zeros(n, dtype=torch.float64)
    for i, player in enumerate(players):
        others = [p for p in players if p != player]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                phi[i] += weight * (value(coalition + (player,)) - value(coalition))
    return phi


def _brute_force_group_values(model, x_row, refs, groups, target):
    """Shapley values of the groups from the definition, probabilities averaged over the
    references."""
    def value(coalition):
        taken = torch.zeros(len(groups), dtype=torch.bool)
        for g in coalition:
            taken |= groups == g
        z = torch.where(taken, x_row, refs)
        return torch.softmax(model(z).double(), 1)[:, target].mean()

    return _shapley_by_definition(value, sorted(set(groups.tolist())))


def test_exact_groups_match_the_definition():
    model = small_mlp(10, k=4, seed=40)
    x = _gaussian_rows(3, 10, seed=41)
    x[0, [0, 1]] = 0.0  # group 7 all at the baseline: a dummy group
    refs = torch.cat([torch.zeros(1, 10), _gaussian_rows(1, 10, seed=42)])
    refs[:, [0, 1]] = 0.0
    with torch.no_grad():
        exact = oni.exact_shapley(model, x, refs, groups=GROUPS)
        for row in range(3):
            truth = _brute_force_group_values(model, x[row], refs, GROUPS,
                                              int(exact.target[row]))
            torch.testing.assert_close(exact.values[row].double(), truth, rtol=0, atol=1e-6)
    assert exact.values.shape == (3, 6) and exact.values[0, 3] == 0  # id 7 is column 3
    assert exact.groups.tolist() == [3, 3, 0, 1, 1, 1, 4, 2, 2, 5]
    torch.testing.assert_close(exact.values.sum(1), exact.fx - exact.f_baseline, rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["incremental", "generic"])
def test_sampled_groups_within_standard_errors_of_exact(backend, path):
    model = small_mlp(10, k=4, seed=43)
    x = _binary_rows(8, 10, seed=44, p=0.6)
    x[0] = 0.0  # nothing active
    x[1, :] = 0.0
    x[1, 3] = 1.0  # one active group: forced walk
    bg = _binary_rows(2, 10, seed=45, p=0.2)
    explained = model if path == "incremental" else Wrapped(model).eval()
    for baseline in (None, bg):
        exact = oni.exact_shapley(model, x, baseline, groups=GROUPS)
        res = oni.shapley_values(explained, x, baseline, groups=GROUPS, n_permutations=400,
                                 seed=3, backend=backend)
        assert res.values.shape == res.stderr.shape == (8, 6)
        assert torch.equal(res.groups, exact.groups)
        torch.testing.assert_close(res.values.sum(1), res.fx - res.f_baseline, rtol=0,
                                   atol=1e-5)  # efficiency per walk
        err = (res.values - exact.values).abs().double()
        sampled = res.stderr > 0
        assert (err[sampled] / res.stderr[sampled].double()).max() < 5.0
        assert (err[~sampled] < 1e-6).all()  # dummies and forced walks: exact
        if baseline is None:
            assert (res.values[0] == 0).all() and (res.stderr[1] == 0).all()


def test_one_feature_groups_are_the_features_bit_for_bit():
    model = small_mlp(10, k=4, seed=46)
    x = _gaussian_rows(6, 10, seed=47)
    x[2, 4:] = 0.0
    relabelled = torch.arange(10) * 3 - 5  # one feature per group, same order
    for backend in BACKENDS:
        plain = oni.shapley_values(model, x, n_permutations=10, seed=5, backend=backend)
        grouped = oni.shapley_values(model, x, n_permutations=10, seed=5, backend=backend,
                                     groups=relabelled)
        assert torch.equal(plain.values, grouped.values)
        assert torch.equal(plain.stderr, grouped.stderr) and plain.groups is None
    assert torch.equal(oni.exact_shapley(model, x).values,
                       oni.exact_shapley(model, x, groups=relabelled).values)


def test_groups_with_tol_kernel_equals_torch_and_chunking():
    model = small_mlp(10, k=4, seed=48)
    x = _gaussian_rows(9, 10, seed=49)
    runs = [oni.shapley_values(model, x, groups=GROUPS, n_permutations=32, seed=6,
                               backend=backend, max_batch_evals=evals)
            for backend, evals in (("kernel", None), ("torch", None), ("kernel", 7))]
    torch.testing.assert_close(runs[0].values, runs[1].values, rtol=0, atol=1e-6)
    torch.testing.assert_close(runs[0].values, runs[2].values, rtol=0, atol=1e-6)
    early = oni.shapley_values(model, x, groups=GROUPS, n_permutations=400, tol=1e9, seed=6)
    assert (early.n_permutations < 400).all() and early.values.shape == (9, 6)


def test_exact_groups_lift_the_feature_limit():
    model = small_mlp(30, k=3, seed=50)
    x = _gaussian_rows(2, 30, seed=51)
    groups = torch.arange(30) // 8  # 4 groups of up to 8 features
    exact = oni.exact_shapley(model, x, groups=groups)
    assert exact.values.shape == (2, 4)
    sampled = oni.shapley_values(model, x, groups=groups, n_permutations=600, seed=7)
    assert ((sampled.values - exact.values).abs() <= 5 * sampled.stderr + 1e-6).all()
    with pytest.raises(ValueError, match="supports d <= 20 players, got G = 30 groups"):
        oni.exact_shapley(model, x, groups=torch.arange(30))


@pytest.mark.parametrize("groups, error, message", [
    (torch.zeros(10), TypeError, "groups must hold integer group ids, got torch.float32"),
    (torch.zeros(10, dtype=torch.bool), TypeError, "integer group ids"),
    ([0] * 10, TypeError, "groups must be None or a dense integer tensor, got list"),
    (torch.zeros(9, dtype=torch.long), ValueError, r"groups must be \[d\] with d = 10"),
    (torch.zeros(1, 10, dtype=torch.long), ValueError, r"got shape \(1, 10\)"),
    (torch.zeros(10, dtype=torch.long, device="meta"), ValueError, "groups must be on x's"),
    (torch.zeros(10, dtype=torch.long).to_sparse(), TypeError, "groups must be None or a dense integer tensor, got a torch.sparse_coo"),
])
def test_bad_groups_get_clear_errors(groups, error, message):
    model, x = small_mlp(10, k=3, seed=52), _gaussian_rows(2, 10, seed=53)
    for call in (oni.shapley_values, oni.exact_shapley):
        with pytest.raises(error, match=message):
            call(model, x, groups=groups)


@pytest.mark.parametrize("mask, error, message", [
    (torch.zeros(8), TypeError, "feature_mask must hold integer group ids"),
    (torch.zeros(9, dtype=torch.long), ValueError,
     r"feature_mask must be \[d\], \[1, d\] or \[N, d\] with N = 5, d = 8, got shape \(9,\)"),
    (torch.zeros(7, 8, dtype=torch.long), ValueError, r"got shape \(7, 8\)"),
    (torch.zeros(0, 8, dtype=torch.long), ValueError, r"got shape \(0, 8\)"),
    (torch.zeros(1, 8, dtype=torch.long, device="meta"), ValueError, "inputs' device"),
    (torch.zeros(1, 8, dtype=torch.long).to_sparse(), TypeError, "dense integer tensor"),
    ((torch.zeros(8, dtype=torch.long),) * 2, ValueError, "one entry"),
])
def test_drop_in_feature_mask_errors_name_it(mask, error, message):
    model, x = small_mlp(8, k=3, seed=56), _gaussian_rows(5, 8, seed=57)
    with pytest.raises(error, match=message):
        oni.ShapleyValueSampling(model).attribute(x, target=0, feature_mask=mask)


def test_exact_groups_call_the_model_on_bounded_batches():
    """2^14 coalitions of 14 groups over d = 3000 features: each model call gets at most
    2^22 input values, not all the coalitions at once."""
    model = small_mlp(3000, k=3, hidden=(4,), seed=58)
    sizes = []

    def counted(z):
        sizes.append(z.numel())
        return model(z)

    x = _gaussian_rows(1, 3000, seed=59)
    exact = oni.exact_shapley(counted, x, groups=torch.arange(3000) % 14)
    assert exact.values.shape == (1, 14) and max(sizes) <= 1 << 22 and len(sizes) > 2
    torch.testing.assert_close(exact.values.sum(1), exact.fx - exact.f_baseline, rtol=0,
                               atol=1e-6)


def test_chunks_of_short_walks_are_capped_in_rows():
    """Rows of one or two active features are cheap in steps, but a chunk holds dense
    [rows, d] statistics: the plan caps its rows too, and the values do not change."""
    from oni.shapley import _plan_chunks
    n_active = torch.tensor([2] * 10 + [40])
    chunks = list(_plan_chunks(torch.arange(11), n_active, 4, 2, 1, budget=10_000, max_rows=3))
    assert [len(rows) for rows, _, _ in chunks] == [3, 3, 3, 2]
    assert torch.equal(torch.cat([rows for rows, _, _ in chunks]), torch.arange(11))
    model = small_mlp(50, k=3, seed=60)
    x = torch.zeros(30, 50)
    x[torch.arange(30), torch.arange(30)] = 1.0
    x[torch.arange(30), torch.arange(30) + 20] = -1.0
    wide = oni.shapley_values(model, x, n_permutations=6, seed=1)
    capped = oni.shapley_values(model, x, n_permutations=6, seed=1, max_batch_evals=4)
    torch.testing.assert_close(wide.values, capped.values, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_groups_match_cpu():
    model = small_mlp(10, k=4, seed=54)
    x = _gaussian_rows(5, 10, seed=55)
    cpu = oni.shapley_values(model, x, groups=GROUPS, n_permutations=8)
    gpu = oni.shapley_values(model.cuda(), x.cuda(), groups=GROUPS.cuda(), n_permutations=8)
    torch.testing.assert_close(gpu.values.cpu(), cpu.values, rtol=0, atol=1e-6)
    exact = oni.exact_shapley(model.cuda(), x.cuda(), groups=GROUPS.cuda())
    torch.testing.assert_close(exact.values.cpu(), oni.exact_shapley(model.cpu(), x,
                                                                     groups=GROUPS).values)


# ------------------------------------------------------------------------- independent tools

def test_agrees_with_captum_on_the_same_game():
    captum = pytest.importorskip("captum.attr")
    model = small_mlp(10, k=4, seed=30)
    x = _gaussian_rows(4, 10, seed=31)
    target = model(x).argmax(1)
    prob = lambda z: torch.softmax(model(z), 1)  # noqa: E731
    torch.manual_seed(0)
    theirs = captum.ShapleyValueSampling(prob).attribute(x, baselines=0.0, target=target,
                                                         n_samples=600)
    exact = oni.exact_shapley(model, x)
    ours = oni.shapley_values(model, x, n_permutations=600)
    scale = exact.values.norm()
    assert (theirs - exact.values).norm() / scale < 0.05  # captum is right about the game
    assert (ours.values - theirs).norm() / scale < 0.05
    # and about feature groups: each feature gets its group's value
    mask = torch.tensor([[0, 0, 1, 2, 2, 2, 3, 4, 4, 4]])
    torch.manual_seed(0)
    theirs = captum.ShapleyValueSampling(prob).attribute(x, baselines=0.0, target=target,
                                                         feature_mask=mask, n_samples=600)
    exact = oni.exact_shapley(model, x, groups=mask[0])
    assert torch.equal(exact.groups, mask[0])
    scale = exact.values.norm()
    assert (theirs - exact.values[:, exact.groups]).norm() / scale < 0.05


def test_drop_in_shapley_value_sampling():
    model = small_mlp(8, k=3, seed=32)
    x = _gaussian_rows(5, 8, seed=33)
    exact = oni.exact_shapley(model, x, target=1, link="identity")
    attr = oni.ShapleyValueSampling(model).attribute(x, target=1, n_samples=400)
    assert attr.shape == x.shape and attr.dtype == x.dtype
    assert (attr - exact.values).norm() / exact.values.norm() < 0.03
    # per-example baselines
    base = _gaussian_rows(5, 8, seed=34)
    attr = oni.ShapleyValueSampling(model).attribute(x, baselines=base, target=1, n_samples=64)
    out = model(x)[:, 1] - model(base)[:, 1]
    torch.testing.assert_close(attr.sum(1), out, rtol=0, atol=1e-5)
    # scalar-output forward, no target
    attr = oni.ShapleyValueSampling(lambda z: model(z)[:, 0]).attribute(x, n_samples=4)
    torch.testing.assert_close(attr.sum(1), model(x)[:, 0] - model(torch.zeros(1, 8))[:, 0],
                               rtol=0, atol=1e-5)
    # feature groups: as captum, every feature of a group gets the group's value
    mask = torch.tensor([[0, 0, 1, 2, 2, 2, 3, 4]])
    grouped = oni.ShapleyValueSampling(model).attribute(x, target=1, feature_mask=mask,
                                                        n_samples=400)
    exact = oni.exact_shapley(model, x, target=1, link="identity", groups=mask[0])
    assert grouped.shape == x.shape and torch.equal(grouped[:, 0], grouped[:, 1])
    assert (grouped - exact.values[:, exact.groups]).norm() / exact.values.norm() < 0.03
    same = oni.ShapleyValueSampling(model).attribute(x, target=1, feature_mask=mask.expand(5, 8),
                                                     n_samples=400)
    assert torch.equal(same, grouped)  # [N, d] of identical rows is one mask
    per_input = mask.repeat(5, 1)
    per_input[2, 0] = 5
    with pytest.raises(NotImplementedError, match="feature_mask .*per-input masks differ"):
        oni.ShapleyValueSampling(model).attribute(x, feature_mask=per_input)
    with pytest.raises(ValueError, match="n_samples must be >= 1, got 0"):  # captum's name
        oni.ShapleyValueSampling(model).attribute(x, target=1, n_samples=0)


@pytest.mark.filterwarnings("ignore:Feature mask is missing some integers")  # captum's, on
def test_drop_in_takes_captums_argument_forms_as_captum_does():  # the ids 0, 5, 9 on purpose
    """On a linear model every permutation gives the exact Shapley values, so captum's sampler
    and oni's must agree to rounding on every argument form, with the same return type and
    shape (the third fuzz pass's parity check found these differences)."""
    captum = pytest.importorskip("captum.attr")
    gen = torch.Generator().manual_seed(40)
    linear = nn.Linear(6, 3).eval()
    x, base = torch.randn(4, 6, generator=gen), torch.randn(1, 6, generator=gen)
    weight = torch.tensor([1.0, -2.0, 0.5])
    scaled = lambda z, w: linear(z) * w  # noqa: E731  (a shared extra argument)
    mask = torch.tensor([0, 5, 5, 9, 0, 9])
    cases = [
        (linear, dict(x=x)),                               # target=None: [N, k, d]
        (lambda z: linear(z)[:, :1], dict(x=x)),           # [N, 1, d]
        (linear, dict(x=x, target=-1)),
        (linear, dict(x=x, target=(2,))),
        (linear, dict(x=x, target=[(0,), (1,), (2,), (0,)])),
        (linear, dict(x=x, target=torch.tensor([2]))),
        (linear, dict(x=(x,), baselines=(base,), target=1)),  # a one-tuple back
        (scaled, dict(x=x, target=1, additional_forward_args=(weight,))),
        (linear, dict(x=x, baselines=base, target=2, feature_mask=mask)),
    ]
    for forward, kwargs in cases:
        inputs = kwargs.pop("x")
        theirs = captum.ShapleyValueSampling(forward).attribute(inputs, n_samples=3, **kwargs)
        ours = oni.ShapleyValueSampling(forward).attribute(inputs, n_samples=3, **kwargs)
        assert type(ours) is type(theirs), kwargs
        for a, b in zip(ours if isinstance(ours, tuple) else (ours,),
                        theirs if isinstance(theirs, tuple) else (theirs,)):
            assert a.shape == b.shape, kwargs
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    per_row = lambda z, s: linear(z) * torch.as_tensor(s)[:, None]  # noqa: E731
    explainer = oni.ShapleyValueSampling(linear)
    with pytest.raises(NotImplementedError, match="a tensor with one row per input"):
        oni.ShapleyValueSampling(scaled).attribute(x, target=0,
                                                   additional_forward_args=torch.ones(4, 1))
    refusals = [
        (dict(feature_mask=mask - 1), ValueError, "feature_mask holds the negative id -1"),
        (dict(perturbations_per_eval=0), ValueError, "perturbations_per_eval must be >= 1"),
        (dict(target=(0, 1)), ValueError, "a tuple indexes the dimensions"),
        (dict(target=-4), ValueError, r"target = -4 .* must be in \[-3, 3\)"),
    ]
    for kwargs, error, message in refusals:
        with pytest.raises(error, match=message):
            explainer.attribute(x, **kwargs)
    # per-example values that are no tensor: the model's output rows tell (captum takes them
    # at perturbations_per_eval=1; the message was about the baseline's output shape)
    with pytest.raises(ValueError, match="forward_func returned 4 rows for 1 input rows: "
                                         "additional_forward_args must not hold per-example"):
        oni.ShapleyValueSampling(per_row).attribute(x, target=0, additional_forward_args=(
            [1.0, 2.0, 3.0, 4.0],))


def _batch_game_values(forward, x, base, extra=()):
    """Shapley values of captum's aggregate game from the definition: the players are the d
    features, a coalition takes its columns from every input and the rest from the
    baseline, and the game's value is forward's one number for that batch."""
    def value(coalition):
        taken = torch.zeros(x.shape[1], dtype=torch.bool)
        taken[list(coalition)] = True
        return float(forward(torch.where(taken, x, base), *extra))

    return _shapley_by_definition(value, list(range(x.shape[1])))


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_drop_in_explains_a_forward_with_one_value_per_batch(backend):
    """captum's aggregate mode (a summed loss, say): it was refused ('must return [N] or
    [N, k] outputs, got ()'). A logsumexp over the batch is no sum of per-input games, so
    only the batch game itself gives these values."""
    model = small_mlp(5, k=3, seed=60)
    x = _gaussian_rows(4, 5, seed=61)
    x[:, 3] = 0.0  # at the zero baseline in every input: a dummy player
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # per input: fine, every call has N rows
    loss = lambda z, w: torch.logsumexp(model(z)[:, 0] * w, 0)  # noqa: E731
    explainer = oni.ShapleyValueSampling(loss)
    with torch.no_grad():
        truth = _batch_game_values(loss, x, torch.zeros(1, 5), (weights,))
        attr = explainer.attribute(x, additional_forward_args=(weights,), n_samples=2000,
                                   backend=backend)
        assert attr.shape == (1, 5) and attr.dtype == x.dtype
        # 0.021 here; over 240 seeds: mean 0.02, sd 0.009 (a per-row game's sum: 1.5)
        assert (attr[0].double() - truth).norm() / truth.norm() < 0.08
        assert attr[0, 3] == 0
        efficiency = loss(x, weights) - loss(torch.zeros_like(x), weights)
        torch.testing.assert_close(attr.sum(), efficiency, rtol=0, atol=1e-5)
        again = explainer.attribute(x, additional_forward_args=(weights,), n_samples=2000,
                                    backend=backend)
        assert torch.equal(again, attr)  # seed 0 unless told
        # a baseline per input, feature groups, float64
        base = _gaussian_rows(4, 5, seed=62)
        per_input = explainer.attribute(x, base, additional_forward_args=(weights,),
                                        n_samples=6, backend=backend)
        torch.testing.assert_close(per_input.sum(), loss(x, weights) - loss(base, weights),
                                   rtol=0, atol=1e-5)
        mask = torch.tensor([0, 0, 1, 2, 2])
        grouped = explainer.attribute(x, additional_forward_args=(weights,),
                                      feature_mask=mask, n_samples=6, backend=backend)
        assert grouped[0, 0] == grouped[0, 1] and grouped[0, 3] == grouped[0, 4]
        torch.testing.assert_close(grouped[0, [0, 2, 3]].sum(), efficiency, rtol=0, atol=1e-5)
        wide = oni.ShapleyValueSampling(lambda z, w: loss(z.float(), w.float()).double())
        assert wide.attribute(x.double(), additional_forward_args=(weights.double(),),
                              n_samples=4, backend=backend).dtype == torch.float64


def test_drop_in_batch_output_forms_as_captum():
    """The output's shape leads the result's, as captum's: a number or a 0-d tensor give
    [1, d], [1] gives [1, d], [1, 1] gives [1, 1, d]; on one input an [1] output is the
    input's own (per-row) output."""
    linear = nn.Linear(5, 2).eval()
    x = _gaussian_rows(3, 5, seed=63)
    total = lambda z: linear(z)[:, 1].sum()  # noqa: E731
    forms = [(total, (1, 5)), (lambda z: float(total(z)), (1, 5)),
             (lambda z: total(z).reshape(1), (1, 5)), (lambda z: total(z).reshape(1, 1),
                                                        (1, 1, 5))]
    with torch.no_grad():
        expected = (x.sum(0) * linear.weight[1]).reshape(1, 5)  # a linear game: exact
        for forward, shape in forms:
            attr = oni.ShapleyValueSampling(forward).attribute(x, n_samples=2)
            assert attr.shape == shape
            torch.testing.assert_close(attr.reshape(1, 5), expected)
        one = oni.ShapleyValueSampling(lambda z: linear(z)[:, 1]).attribute(x[:1], n_samples=2)
        torch.testing.assert_close(one, x[:1] * linear.weight[1])
    captum = pytest.importorskip("captum.attr")
    for forward, _ in forms:
        theirs = captum.ShapleyValueSampling(forward).attribute(x, n_samples=2)
        ours = oni.ShapleyValueSampling(forward).attribute(x, n_samples=2)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-4, atol=1e-5)


def test_drop_in_batch_output_refusals():
    linear = nn.Linear(5, 2).eval()
    x = _gaussian_rows(3, 5, seed=64)
    total = lambda z: linear(z)[:, 1].sum()  # noqa: E731
    # one input: a [1] output is per row (as captum), and a forward that reduces over the
    # many rows oni passes at once is named (it read "model output must be [N, k] = [30, k]")
    with pytest.raises(ValueError, match=r"returned 1 rows for \d+ input rows: oni evaluates "
                                         r"many perturbed inputs in one call.*0-d tensor"):
        oni.ShapleyValueSampling(lambda z: total(z).reshape(1)).attribute(x[:1], n_samples=2)
    one = oni.ShapleyValueSampling(total).attribute(x[:1], n_samples=2)  # 0-d: the batch's
    torch.testing.assert_close(one, (x[:1] * linear.weight[1]).detach())
    # per-example extra arguments that break the first call: named, with the cause chained
    with pytest.raises(NotImplementedError, match="one row per input") as err:
        oni.ShapleyValueSampling(lambda z, w: linear(z) * w).attribute(
            x, target=0, additional_forward_args=(torch.ones(3, 7),))
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(ValueError, match="the model's first layer takes 5 features, x has "
                                         "d = 4"):
        oni.ShapleyValueSampling(linear).attribute(x[:, :4], target=0)
    with pytest.raises(ValueError, match=r"target = 0: forward_func returns one value for the "
                                         r"whole batch \(shape \(\)\)"):
        oni.ShapleyValueSampling(total).attribute(x, target=0)
    calls = []

    def changes_form(z):  # one value for the first call, then one per input
        calls.append(1)
        return total(z) if len(calls) == 1 else linear(z)[:, 1]
    with pytest.raises(ValueError, match=r"returned one value for the batch at first, then "
                                         r"shape \(3,\): it must return one value"):
        oni.ShapleyValueSampling(changes_form).attribute(x, n_samples=2)


def test_to_shap():
    shap = pytest.importorskip("shap")
    model = small_mlp(4, seed=35)
    x = _gaussian_rows(3, 4)
    res = oni.shapley_values(model, x, n_permutations=4)
    exp = res.to_shap(x, feature_names=list("abcd"))
    assert isinstance(exp, shap.Explanation)
    assert exp.values.shape == (3, 4) and exp.feature_names == list("abcd")


# ------------------------------------------------------------------------------ bad input

def _model_and_x():
    return small_mlp(5, k=3, seed=36), _gaussian_rows(4, 5, seed=37)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, x: oni.shapley_values(m, x[0]), ValueError, "x must be 2-D"),
    (lambda m, x: oni.shapley_values(m, x[None]), ValueError, "x must be 2-D"),
    (lambda m, x: oni.shapley_values(m, x.long()), TypeError, "x must be float32 or float64"),
    (lambda m, x: oni.shapley_values(m, x.numpy()), TypeError, "x must be a torch.Tensor"),
    (lambda m, x: oni.shapley_values(m, x[:0]), ValueError, "empty batch"),
    (lambda m, x: oni.shapley_values(m, x.index_fill(0, torch.tensor([1]), math.nan)),
     ValueError,
     "x contains NaN or Inf"),
    (lambda m, x: oni.shapley_values(m, x.index_fill(1, torch.tensor([2]), math.inf)),
     ValueError, "x contains NaN or Inf"),
    (lambda m, x: oni.shapley_values(m, x, torch.zeros(4)), ValueError,
     "baseline must be \\[d\\] or \\[B, d\\] with d = 5"),
    (lambda m, x: oni.shapley_values(m, x, torch.zeros(2, 6)), ValueError,
     "baseline must be \\[d\\] or \\[B, d\\]"),
    (lambda m, x: oni.shapley_values(m, x, torch.zeros(1, 1, 5)), ValueError,
     "baseline must be \\[d\\] or \\[B, d\\]"),
    (lambda m, x: oni.shapley_values(m, x, torch.full((5,), math.nan)), ValueError,
     "baseline contains NaN or Inf"),
    (lambda m, x: oni.shapley_values(m, x, torch.zeros(5, dtype=torch.float64)), TypeError,
     "baseline must have x's dtype"),
    (lambda m, x: oni.shapley_values(m, x, torch.zeros(0, 5)), ValueError,
     "empty background set"),
    (lambda m, x: oni.shapley_values(m, x, n_permutations=0), ValueError,
     "n_permutations must be >= 1"),
    (lambda m, x: oni.shapley_values(m, x, n_permutations=2.5), TypeError,
     "n_permutations must be an int"),
    (lambda m, x: oni.shapley_values(m, x, target="max"), ValueError, "target must be 'pred'"),
    (lambda m, x: oni.shapley_values(m, x, target="label"), ValueError, "needs labels="),
    (lambda m, x: oni.shapley_values(m, x, target=3), ValueError,
     "target\\[0\\] = 3 is not a class index in \\[0, 3\\)"),
    (lambda m, x: oni.shapley_values(m, x, target=-1), ValueError, "is not a class index"),
    (lambda m, x: oni.shapley_values(m, x, target=2 ** 70), ValueError,
     "target\\[0\\] = 1180591620717411303424 is not a class index"),
    (lambda m, x: oni.shapley_values(m, x, math.nan), ValueError,
     "baseline must be a finite number in x's dtype"),
    (lambda m, x: oni.shapley_values(m, x, 10 ** 400), ValueError,
     "baseline must be a finite number"),
    (lambda m, x: oni.shapley_values(m, x, 1e300), ValueError,
     "baseline must be a finite number in x's dtype torch.float32"),
    (lambda m, x: oni.shapley_values(m, x, seed=2 ** 64), ValueError,
     "seed must be in \\[0, 2\\*\\*63\\), got 18446744073709551616"),
    (lambda m, x: oni.shapley_values(m, x, antithetic="no"), TypeError,
     "antithetic must be a bool, got str 'no'"),
    (lambda m, x: oni.shapley_values(m, x[:, :4]), ValueError,
     "the model's first layer takes 5 features, x has d = 4"),
    (lambda m, x: oni.exact_shapley(m, x[:, :4]), ValueError,
     "the model's first layer takes 5 features"),
    (lambda m, x: oni.shapley_values(m[0], x[:, :4], link="identity"), ValueError,
     "the model's first layer takes 5 features, x has d = 4"),  # a bare nn.Linear too
    (lambda m, x: oni.shapley_values(m[0], x.double(), link="identity"), TypeError,
     "the model's weights are torch.float32, x is torch.float64"),
    (lambda m, x: oni.shapley_values(m, x.double()), TypeError,
     "the model's weights are torch.float32, x is torch.float64"),
    (lambda m, x: oni.shapley_values(m, x, target=torch.tensor([0, 1])), ValueError,
     "target must be \\[N\\] = \\[4\\]"),
    (lambda m, x: oni.shapley_values(m, x, target="label", labels=torch.tensor([0, 1, 2, 7])),
     ValueError, "labels\\[3\\] = 7 is not a class index"),
    (lambda m, x: oni.shapley_values(m, x, target=torch.zeros(4)), TypeError,
     "must hold integer class indices"),
    (lambda m, x: oni.shapley_values(m, x, backend="gpu"), ValueError,
     "backend must be one of"),
    (lambda m, x: oni.shapley_values(m, x, tol=-1.0), ValueError, "tol must be"),
    (lambda m, x: oni.shapley_values(m, x, link="logit"), ValueError, "link must be one of"),
    (lambda m, x: oni.shapley_values(lambda z: m(z)[:, 0], x), ValueError,
     "model output at x must be \\[N, k\\]"),
    (lambda m, x: oni.shapley_values(lambda z: m(z)[:1], x), ValueError,
     "must be \\[N, k\\] = \\[4, k\\]"),
    (lambda m, x: oni.shapley_values(lambda z: m(z)[:, :1], x), ValueError,
     "needs k >= 2 class logits \\(use link='identity'"),
    (lambda m, x: oni.shapley_values(lambda z: m(z).tolist(), x), TypeError,
     "must be a tensor"),
    (lambda m, x: oni.shapley_values(lambda z: m(z) * math.nan, x), ValueError,
     "model output at x contains NaN"),
    (lambda m, x: oni.shapley_values("model", x), TypeError, "model must be callable"),
    (lambda m, x: oni.exact_shapley(m, torch.zeros(2, 21)), ValueError, "d <= 20"),
    (lambda m, x: oni.exact_shapley(m, x, torch.zeros(3)), ValueError, "baseline must be"),
    (lambda m, x: oni.exact_shapley(m, x[:0]), ValueError, "empty batch"),
])
def test_bad_input_gets_a_clear_error(call, error, message):
    model, x = _model_and_x()
    with pytest.raises(error, match=message):
        call(model, x)


def _nan_inside(model):
    """finite at x and at the zero baseline, NaN on coalitions with feature 0 off and 1 on"""
    def call(z):
        out = model(z)
        return torch.where((z[:, 0:1] == 0) & (z[:, 1:2] != 0), math.nan, out)
    return call


@pytest.mark.parametrize("run", [
    lambda m, x: oni.shapley_values(m, x, n_permutations=8, backend="kernel"),
    lambda m, x: oni.shapley_values(m, x, n_permutations=8, backend="torch"),
    lambda m, x: oni.shapley_values(m, x, n_permutations=32, tol=1e-3),
    lambda m, x: oni.exact_shapley(m, x),
], ids=["kernel", "torch", "tol", "exact"])
def test_nan_model_output_on_a_coalition_is_a_clear_error(run):
    """Only x and the baseline are checked up front; a NaN on a coalition in between must not
    come back as NaN values without a word."""
    model, _ = _model_and_x()
    x = torch.rand(4, model[0].in_features, generator=torch.Generator().manual_seed(1)) + 0.1
    with pytest.raises(ValueError, match=r"Shapley values of row 0 are not finite: .*coalition"):
        run(_nan_inside(model), x)


def test_training_mode_warns():
    model, x = _model_and_x()
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        oni.shapley_values(model, x, n_permutations=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_kernel_backend_without_cuda_kernels_is_a_clear_error():
    from oni.shapley import _check_backend
    with pytest.raises(RuntimeError, match="without kernels for"):
        _check_backend("kernel", torch.device("meta"))


@pytest.mark.parametrize("hook", ["first_linear", "sequential", "subclass", "instance_forward",
                                  "global_hook", "class_forward"])
def test_first_layer_with_a_hook_or_override_is_not_skipped(hook, monkeypatch):
    """The walk kernel computes the first Linear itself: a hook on it, a hook on the
    Sequential, a Linear subclass with its own forward, or nn.Linear.forward patched on the
    class must send the model down the generic path, which runs the model as it is (here
    made constant: every value is 0)."""
    model, x = _model_and_x()
    if hook == "class_forward":
        linear_forward = torch.nn.Linear.forward
        monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, z: linear_forward(
            self, z * 0 if self.in_features == 5 else z))
    elif hook == "first_linear":
        model[0].register_forward_hook(lambda mod, inp, out: out * 0)
    elif hook == "sequential":
        model.register_forward_pre_hook(lambda mod, inp: (inp[0] * 0,))
    elif hook == "instance_forward":
        first = model[0]
        model[0].forward = lambda z: torch.nn.Linear.forward(first, z * 0)
    elif hook == "global_hook":
        handle = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda mod, inp: (inp[0] * 0,) if isinstance(mod, torch.nn.Linear)
            and mod.in_features == 5 else None)
    elif hook == "subclass":
        class Zeroed(torch.nn.Linear):
            def forward(self, z):
                return super().forward(z * 0)
        zeroed = Zeroed(5, model[0].out_features)
        zeroed.load_state_dict(model[0].state_dict())
        model[0] = zeroed
    # constant up to rounding (the batched rows of a GEMM); the fast path gave up to 0.02
    try:
        values = oni.shapley_values(model, x, n_permutations=8, backend="kernel").values
        assert values.abs().max() < 1e-7
        assert oni.exact_shapley(model, x).values.abs().max() < 1e-7
    finally:
        if hook == "global_hook":
            handle.remove()


def test_shapley_value_sampling_without_target_explains_every_output():
    """captum (0.9): target=None on a [N, k] output gives [N, k, d], one attribution per
    output column ([N, 1, d] for one column; [N, d] for an [N] output)."""
    model, x = _model_and_x()
    explainer = oni.ShapleyValueSampling(model)
    every = explainer.attribute(x, n_samples=4)
    assert every.shape == (x.shape[0], 3, x.shape[1])
    for c in range(3):
        torch.testing.assert_close(every[:, c], explainer.attribute(x, target=c, n_samples=4))
    one = oni.ShapleyValueSampling(lambda z: model(z)[:, 1:2]).attribute(x, n_samples=4)
    torch.testing.assert_close(one, every[:, 1:2])
    flat = oni.ShapleyValueSampling(lambda z: model(z)[:, 1]).attribute(x, n_samples=4)
    torch.testing.assert_close(flat, every[:, 1])
    with pytest.raises(ValueError, match="baselines as a tuple must hold one entry"):
        explainer.attribute(x, baselines=(), target=0)



@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_float64_refuses_the_float32_precision_opt_ins(precision):
    """bf16 on a float64 model and x gave the float32 result: autocast leaves float64 alone."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x = torch.rand(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"precision='{precision}' trades float32 arithmetic "
                                         rf"for speed; x and the model are float64"):
        oni.shapley_values(model, x, n_permutations=2, precision=precision)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plain", [True, False], ids=["linear_path", "masked_path"])
def test_an_outer_autocast_does_not_reach_the_float32_values(backend, plain):
    """Under a caller's torch.autocast(bf16) the kernel's walk origins were bf16 (the op
    then failed: 'expected scalar type Float but found BFloat16') and the endpoints f(x),
    f(r) of both backends were bf16 ones."""
    net = small_mlp(12, k=4, seed=2)
    model = net if plain else Wrapped(net).eval()
    x = _gaussian_rows(5, 12, seed=3)
    plain_values = oni.shapley_values(model, x, n_permutations=6, backend=backend)
    exact = oni.exact_shapley(model, x[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = oni.shapley_values(model, x, n_permutations=6, backend=backend)
        exact_inside = oni.exact_shapley(model, x[:2])
        bf16 = oni.shapley_values(model, x, n_permutations=6, backend=backend,
                                  precision="bf16")
    for field in ("values", "stderr", "fx", "f_baseline", "target"):
        assert torch.equal(getattr(plain_values, field), getattr(inside, field)), field
        assert torch.equal(getattr(exact, field), getattr(exact_inside, field)), field
    # the opt-in still reaches the walks (and only them: the endpoints stay float32)
    assert not torch.equal(bf16.values, plain_values.values)
    assert torch.equal(bf16.fx, plain_values.fx)


def test_the_walk_op_is_not_recast_by_a_callers_autocast():
    """The op computes its walk origins W r + b with an inner matmul, which autocast turned
    bf16 inside a float32 op."""
    x, base, perm, n_active, total = walk_inputs(4, 9, n_refs=2, seed=5)
    gen = torch.Generator().manual_seed(6)
    w, b = torch.randn(7, 9, generator=gen), torch.randn(7, generator=gen)
    outside = oni._ops.permutation_walk_linear(x, base, perm, n_active, w, b, total)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = oni._ops.permutation_walk_linear(x, base, perm, n_active, w, b, total)
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)


_FP32_BACKENDS = oni.shapley._fp32_backends()


@pytest.mark.skipif(not _FP32_BACKENDS, reason="torch before the per-backend fp32_precision")
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_strict_float32_overrides_reduced_precision_matmul_settings(precision):
    """torch.set_float32_matmul_precision('medium') lets oneDNN run float32 matmuls in
    bfloat16 on the CPU and cuBLAS in TF32; cuDNN convolutions are TF32 by default. The
    strict passes switched off only cuBLAS's legacy TF32 flag. The caller's settings come
    back unchanged, and torch's getters still answer (mixing its legacy and per-backend
    APIs makes them raise)."""
    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_mlp(6, k=3, seed=1)

        def forward(self, z):
            seen.append({package: backend.fp32_precision for package, backend in _FP32_BACKENDS})
            return self.net(z)

    saved = [backend.fp32_precision for _, backend in _FP32_BACKENDS]
    saved_matmul = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        before = [backend.fp32_precision for _, backend in _FP32_BACKENDS]
        assert "bf16" in before  # oneDNN's matmul: the mode the strict passes must undo
        x = _gaussian_rows(3, 6, seed=2)
        oni.shapley_values(Recording().eval(), x, n_permutations=4, precision=precision)
        oni.exact_shapley(Recording().eval(), x[:1])
        assert seen and all(set(s.values()) == {"ieee"} for s in seen), seen
        assert [backend.fp32_precision for _, backend in _FP32_BACKENDS] == before
        assert torch.get_float32_matmul_precision() == "medium"
    finally:  # torch's legacy setting first: after it alone, its getters raise
        torch.set_float32_matmul_precision(saved_matmul)
        for (_, backend), value in zip(_FP32_BACKENDS, saved):
            backend.fp32_precision = value


def test_strict_float32_on_a_torch_without_per_backend_settings(monkeypatch):
    """Before torch 2.9 the strict passes set the legacy flags: the float32 matmul
    precision and cuDNN's TF32 flag, restored after."""
    monkeypatch.setattr(oni.shapley, "_fp32_backends", lambda: [])
    seen = []

    def model(z):
        seen.append(torch.get_float32_matmul_precision())
        return small_mlp(4, k=3, seed=1)(z)

    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("high")
        oni.shapley_values(model, _gaussian_rows(2, 4), n_permutations=2)
        assert seen and set(seen) == {"highest"}
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def _equal_results(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
        return
    for name in ("values", "stderr", "n_permutations", "fx", "f_baseline", "target"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("baseline", ["number", "vector", "background"])
@pytest.mark.parametrize("run", [
    lambda m, x, r: oni.shapley_values(m, x, r, n_permutations=6, backend="kernel"),
    lambda m, x, r: oni.shapley_values(m, x, r, n_permutations=6, backend="torch"),
    lambda m, x, r: oni.shapley_values(m, x, r, n_permutations=32, tol=1e-3),
    lambda m, x, r: oni.exact_shapley(m, x, r),
    lambda m, x, r: oni.ShapleyValueSampling(m).attribute(x, r, target=1, n_samples=4),
    lambda m, x, r: oni.ShapleyValueSampling(m).attribute(x, r, n_samples=4),
], ids=["kernel", "torch", "tol", "exact", "captum", "captum_every_target"])
def test_a_model_writing_into_its_input_leaves_x_and_baseline_alone(run, baseline):
    """The endpoints f(x) and f(baseline) ran the model on the caller's tensors (and on the
    references the walks read afterwards): a forward zeroing its input zeroed the caller's
    x. They must stay bitwise the same, the values those of a model that does not write."""
    net = small_mlp(6, k=3, seed=2)
    x = _gaussian_rows(5, 6, seed=3)
    refs = {"number": 0.5, "vector": torch.full((6,), 0.5),
            "background": _gaussian_rows(5, 6, seed=4)}[baseline]  # (captum: one per row)
    x_before = x.clone()
    refs_before = refs.clone() if isinstance(refs, torch.Tensor) else refs
    got = run(ZeroesItsInput(net).eval(), x, refs)
    assert torch.equal(x, x_before)
    if isinstance(refs, torch.Tensor):
        assert torch.equal(refs, refs_before)
    _equal_results(got, run(Wrapped(net).eval(), x, refs))


def test_a_plain_mlp_endpoint_reads_x_without_a_copy(monkeypatch):
    """Only a plain first nn.Linear sees x in an nn.Sequential that takes the walk kernel's
    path: that model cannot write into x, so x is not copied for it."""
    model, x = small_mlp(6, k=3, seed=2), _gaussian_rows(5, 6, seed=3)
    seen = []
    model[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    oni.shapley_values(model, x, n_permutations=2, backend="torch")  # the generic path
    assert seen[0] is not x and torch.equal(seen[0], x)
    from oni.shapley import _Game
    calls = []
    monkeypatch.setattr(_Game, "__call__", lambda self, z, what="": calls.append(z) or
                        self.model(z))
    oni.shapley_values(small_mlp(6, k=3, seed=2), x, n_permutations=2, backend="kernel")
    assert calls[0] is x


def test_a_model_returning_probabilities_is_refused_under_the_softmax_link():
    """A model ending in nn.Softmax had a second softmax applied: fx read 0.36 for a
    class of probability 0.42, silently. link='identity' explains its outputs as they are,
    and log-probabilities are logits up to a constant."""
    net = small_mlp(6, k=4, seed=2)
    x = _gaussian_rows(5, 6, seed=3)
    probs = nn.Sequential(net, nn.Softmax(1)).eval()
    for call in (lambda: oni.shapley_values(probs, x, n_permutations=4),
                 lambda: oni.exact_shapley(probs, x[:4])):
        with pytest.raises(ValueError, match=r"model's outputs at x look like probabilities "
                                             r".*link='identity'"):
            call()
    as_they_are = oni.shapley_values(probs, x, n_permutations=4, link="identity")
    torch.testing.assert_close(as_they_are.fx, torch.softmax(net(x), 1).gather(
        1, as_they_are.target[:, None])[:, 0])
    log_probs = oni.shapley_values(nn.Sequential(net, nn.LogSoftmax(1)).eval(), x,
                                   n_permutations=4)
    torch.testing.assert_close(log_probs.fx, as_they_are.fx)
    # real logits pass the test by chance in a rare row: fewer than 4 rows only warn
    with pytest.warns(UserWarning, match="look like probabilities"):
        oni.shapley_values(probs, x[:3], n_permutations=4)
    with pytest.warns(UserWarning, match="look like probabilities"):
        oni.exact_shapley(probs, x[:1])
