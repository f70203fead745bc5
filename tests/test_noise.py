"""The noise solver (docs/DESIGN.md, "The method" items 2-4 and 6): the fused ops against their
twins, the exact box ∩ ball projection, the budget (eq. 7), the radius (eq. 8), the solver's
quality against an independent SLSQP reference, bad input, and the uniform-noise baseline.

The noise ops have CPU kernels only so far: the op tests are parametrised over the devices
present and skip CUDA, with the reason, until ``oni._ops.has_kernel("cuda", NOISE_OPS)``.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import oni
from oni import _ops, reference
from helpers import Wrapped, ZeroesItsInput, only_real_cpu_kernels, small_mlp

# helpers.devices() lists CUDA only when *every* op (noise ops included) has a CUDA kernel;
# list the devices present and skip per test where the noise ops lack kernels.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64]


def _need_noise_kernels(device: str) -> None:
    if not _ops.has_kernel(torch.device(device).type, _ops.NOISE_OPS):
        pytest.skip(f"the noise ops {_ops.NOISE_OPS} have no {device} kernels yet "
                    f"(oni._ops.has_kernel({device!r}, NOISE_OPS) is False; "
                    f"oni.build_info()['cuda_ops'] = {oni.build_info()['cuda_ops']})")


def _max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _entropy(model, z: torch.Tensor) -> torch.Tensor:
    """H(softmax(model(z))) per row in float64, independently of oni."""
    with torch.no_grad():
        log_p = torch.log_softmax(model(z).double(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


# ============================================================================ 1. ops vs twins

def _logit_cases():
    gen = torch.Generator().manual_seed(0)
    extreme = torch.tensor([
        [1e4, -1e4, 0.0, 0.0],          # one-hot: H = 0
        [1e4, 1e4 - 1, -1e4, 0.0],      # two classes mix across a 1e4 spread
        [0.0, -1e30, 1.0, -1e30],       # masked classes
        [-1e30, 0.0, -1e30, -1e30],     # only one class left: H = 0
        [-1e4, 1e4, 1e4, 1e4],          # three-way tie at the top
        [5.0, 5.0, 5.0, 5.0],           # uniform: H = log 4
    ])
    return {
        "random": torch.randn(7, 5, generator=gen) * 3,
        "extreme": extreme,
        "k=1": torch.randn(4, 1, generator=gen),
        "k=2": torch.cat([torch.randn(5, 2, generator=gen) * 4,
                          torch.tensor([[1e4, -1e4], [0.0, -1e30], [3.0, 3.0]])]),
        "empty": torch.zeros(0, 3),
    }


LOGITS = _logit_cases()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LOGITS))
def test_entropy_and_grad_matches_reference(device, dtype, case):
    _need_noise_kernels(device)
    logits = LOGITS[case].to(device=device, dtype=dtype)
    h, g = _ops.entropy_and_grad(logits)
    h_ref, g_ref = reference.entropy_and_grad(logits)
    assert h.shape == (logits.shape[0],) and g.shape == logits.shape
    assert h.dtype == g.dtype == dtype and h.device == logits.device
    tol = dict(rtol=1e-10, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, h_ref, **tol)
    torch.testing.assert_close(g, g_ref, **tol)
    assert torch.isfinite(h).all() and torch.isfinite(g).all()
    if dtype == torch.float32:  # STYLE.md: error vs float64 <= 2x the twin's, plus a floor
        h64, g64 = reference.entropy_and_grad(logits.double())
        assert _max_err(h, h64) <= 2 * _max_err(h_ref, h64) + 1e-7
        assert _max_err(g, g64) <= 2 * _max_err(g_ref, g64) + 1e-7
    if logits.shape[1] == 1:  # one class: no uncertainty
        assert (h == 0).all() and (g == 0).all()


def test_entropy_known_values():
    h, g = _ops.entropy_and_grad(torch.tensor(
        [[1e4, -1e4, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, -1e30]], dtype=torch.float64))
    torch.testing.assert_close(h, torch.tensor([0.0, math.log(3), math.log(2)],
                                               dtype=torch.float64), rtol=0, atol=1e-15)
    # at a uniform (sub)distribution the entropy is stationary: the gradient is 0
    torch.testing.assert_close(g, torch.zeros(3, 3, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1e4, -1e4, 1e17, 1e30, -1e30])
def test_entropy_is_shift_invariant_at_huge_offsets(dtype, offset):
    """softmax(z + c) = softmax(z): rows whose logits share a huge offset (e.g. every class
    masked with -1e30) must still give the right entropy: equal logits give log k."""
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    shifted = (logits + offset).to(dtype)
    h_ref, g_ref = reference.entropy_and_grad(shifted)
    h, g = _ops.entropy_and_grad(shifted)
    assert h[0].item() == pytest.approx(math.log(3), abs=1e-6), (
        f"entropy of three equal logits {offset:g}: kernel {h[0].item()}, twin "
        f"{h_ref[0].item()}, truth log 3 = {math.log(3)}")
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_entropy_grad_equals_autograd(k):
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(9, k, generator=gen, dtype=torch.float64) * 2
    z = logits.clone().requires_grad_(True)
    entropy = -(torch.softmax(z, 1) * torch.log_softmax(z, 1)).sum(1)
    (auto,) = torch.autograd.grad(entropy.sum(), z)
    h, g = _ops.entropy_and_grad(logits)
    torch.testing.assert_close(h, entropy.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, auto, rtol=1e-10, atol=1e-14)


def _project_case(n, d, device, dtype, seed=0):
    """Rows covering: box binds, ball binds, both, rho = 0, rho = inf, u_i = 0, inactive."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    eta = torch.randn(n, d, **f64)
    direction = torch.randn(n, d, **f64)
    step = torch.rand(n, **f64) * 3 - 0.5  # some negative steps
    budget = torch.rand(n, d, **f64) * 1.5
    budget[torch.rand(n, d, generator=gen) < 0.15] = 0.0
    z = eta + step[:, None] * direction
    box_norm = torch.maximum(torch.minimum(z, budget), -budget).norm(dim=1)
    radius = box_norm * torch.rand(n, **f64) * 1.6  # below and above the box's reach
    radius[::7] = 0.0
    radius[3::11] = math.inf
    active = torch.rand(n, generator=gen) < 0.8
    out = (eta, direction, step, budget, radius)
    return tuple(t.to(device=device, dtype=dtype) for t in out) + (active.to(device),)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d", [(60, 7), (5, 1), (9, 40), (0, 3)])
def test_ascend_and_project_matches_reference(device, dtype, n, d):
    _need_noise_kernels(device)
    args = _project_case(n, d, device, dtype, seed=n + d)
    got = _ops.ascend_and_project(*args)
    truth = reference.ascend_and_project(*args)
    assert got.shape == truth.shape == (n, d) and got.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, truth, **tol)
    if dtype == torch.float32:  # STYLE.md: error vs float64 <= 2x the twin's, plus a floor
        exact = reference.ascend_and_project(
            *(a.double() if a.is_floating_point() else a for a in args))
        assert _max_err(got, exact) <= 2 * _max_err(truth, exact) + 1e-7
    active = args[-1]
    assert torch.equal(got[~active], args[0][~active])  # inactive rows: bit for bit


@pytest.mark.parametrize("device", DEVICES)
def test_noise_ops_deterministic_and_non_contiguous(device):
    _need_noise_kernels(device)
    eta, direction, step, budget, radius, active = _project_case(30, 8, device, torch.float64)
    once = _ops.ascend_and_project(eta, direction, step, budget, radius, active)
    assert torch.equal(once, _ops.ascend_and_project(eta, direction, step, budget, radius, active))
    # transposed storage
    t = lambda a: a.t().contiguous().t()  # noqa: E731
    assert not t(eta).is_contiguous()
    assert torch.equal(once, _ops.ascend_and_project(t(eta), t(direction), step, t(budget),
                                                     radius, active))
    logits = torch.randn(6, 4, dtype=torch.float64, device=device)
    h, g = _ops.entropy_and_grad(logits)
    h2, g2 = _ops.entropy_and_grad(t(logits))
    assert torch.equal(h, h2) and torch.equal(g, g2)


@pytest.mark.parametrize("device", DEVICES)
def test_noise_opcheck(device):
    _need_noise_kernels(device)
    logits = LOGITS["random"].to(device)
    torch.library.opcheck(torch.ops.oni.entropy_and_grad.default, (logits,))
    torch.library.opcheck(torch.ops.oni.ascend_and_project.default,
                          _project_case(12, 5, device, torch.float32))


# ============================================================================ 2. projection

def _project(z, u, rho, device="cpu"):
    """P(z) onto {|e_i| <= u_i} ∩ {||e|| <= rho}, with the op (a zero start, step 1)."""
    n = z.shape[0]
    dev = dict(device=device, dtype=z.dtype)
    return _ops.ascend_and_project(torch.zeros_like(z).to(device), z.to(device),
                                   torch.ones(n, **dev), u.to(device), rho.to(**dev),
                                   torch.ones(n, dtype=torch.bool, device=device)).cpu()


def _project_numpy(z: np.ndarray, u: np.ndarray, rho: float) -> np.ndarray:
    """Independent float64 projection by brute force: with t = 1/(1+lambda) in [0, 1],
    ||clip(t z, -u, u)|| grows with t; bisect t (to convergence, <= 2000 halvings) for the
    largest t whose point lies in the ball."""
    box = np.clip(z, -u, u)
    if np.linalg.norm(box) <= rho:
        return box
    lo, hi = 0.0, 1.0
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if np.linalg.norm(np.clip(mid * z, -u, u)) > rho:
            hi = mid
        else:
            lo = mid
    return np.clip(lo * z, -u, u)


def _projection_rows(n=300, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    z = torch.randn(n, d, **f64) * torch.rand(n, 1, **f64) * 4
    u = torch.rand(n, d, **f64)
    u[torch.rand(n, d, generator=gen) < 0.1] = 0.0
    box_norm = torch.maximum(torch.minimum(z, u), -u).norm(dim=1)
    rho = box_norm * torch.rand(n, **f64) * 1.5
    rho[::10] = 0.0
    rho[5::13] = math.inf
    return z, u, rho


@pytest.mark.parametrize("device", DEVICES)
def test_projection_equals_brute_force(device):
    _need_noise_kernels(device)
    z, u, rho = _projection_rows()
    got = _project(z, u, rho, device)
    truth = np.stack([_project_numpy(z[i].numpy(), u[i].numpy(), rho[i].item())
                      for i in range(len(z))])
    np.testing.assert_allclose(got.numpy(), truth, rtol=0, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_projection_with_tied_and_unreachable_breakpoints(device):
    """Rows whose breakpoints u_i / |z_i| tie (the CPU kernel sorts only those <= 1, ties by
    index) or all lie beyond 1, against the brute force."""
    _need_noise_kernels(device)
    gen = torch.Generator().manual_seed(11)
    f64 = dict(generator=gen, dtype=torch.float64)
    z = torch.randn(12, 40, **f64).sign() * torch.randint(1, 4, (12, 40), generator=gen)
    u = 0.5 * z.abs()  # every breakpoint 0.5, three distinct |z| levels
    u[4:8] = 2.0 * z[4:8].abs()  # every breakpoint 2: none reachable, the ball alone
    u[8:, ::3] = 0.0  # zero budgets (breakpoint 0) next to tied ones
    box_norm = torch.maximum(torch.minimum(z, u), -u).norm(dim=1)
    rho = box_norm * torch.linspace(0.05, 0.95, 12, dtype=torch.float64)
    got = _project(z, u, rho, device)
    truth = np.stack([_project_numpy(z[i].numpy(), u[i].numpy(), rho[i].item())
                      for i in range(len(z))])
    np.testing.assert_allclose(got.numpy(), truth, rtol=0, atol=1e-9)
    assert (got.norm(dim=1) <= rho * (1 + 1e-12)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_projection_feasible_idempotent_non_expansive(device):
    _need_noise_kernels(device)
    z, u, rho = _projection_rows(seed=1)
    p = _project(z, u, rho, device)
    assert (p.abs() <= u + 1e-12).all()
    assert (p.norm(dim=1) <= rho + 1e-12).all()
    torch.testing.assert_close(_project(p, u, rho, device), p, rtol=0, atol=1e-12)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        other = z + torch.randn(z.shape, generator=gen, dtype=z.dtype) * 2
        q = _project(other, u, rho, device)
        assert ((p - q).norm(dim=1) <= (z - other).norm(dim=1) + 1e-12).all()


@pytest.mark.parametrize("device", DEVICES)
def test_float32_projection_box_exact_ball_within_one_rounding(device):
    """The documented constraint bounds in float32 (README, NoiseResult.norm): the float64
    projection rounded to float32 keeps |e| <= u exactly, and ||e|| <= rho within one
    rounding of e (2**-24 relative per coordinate); rows in the ball come back unchanged."""
    _need_noise_kernels(device)
    gen = torch.Generator().manual_seed(5)
    n, d = 1000, 50
    z = torch.randn(n, d, generator=gen) * 3
    u = torch.rand(n, d, generator=gen)
    rho = torch.rand(n, generator=gen) * 2
    for project in (lambda: _project(z, u, rho, device),
                    lambda: reference.ascend_and_project(torch.zeros_like(z), z, torch.ones(n), u,
                                                         rho, torch.ones(n, dtype=torch.bool))):
        e = project()
        assert e.dtype == torch.float32
        assert (e.abs() <= u).all()
        norm = e.double().norm(dim=1)
        assert (norm <= rho.double() * (1 + 2 ** -24)).all()
        on_ball = norm > rho.double() * (1 - 1e-6)
        assert on_ball.sum() > n // 4  # the case at hand: many rows bind the ball
        box = torch.clamp(z, -u, u)
        inside = box.double().norm(dim=1) <= rho.double()
        assert torch.equal(e[inside], box[inside])


@pytest.mark.parametrize("device", DEVICES)
def test_projection_kkt(device):
    """P(z) = clip(z / (1 + lam), -u, u) with lam >= 0, and lam > 0 only on the sphere."""
    _need_noise_kernels(device)
    z, u, rho = _projection_rows(seed=3)
    p = _project(z, u, rho, device)
    for i in range(len(z)):
        zi, ui, pi, r = z[i], u[i], p[i], rho[i].item()
        if r == 0:
            assert (pi == 0).all()
            continue
        free = pi.abs() < ui - 1e-12  # coordinates strictly inside the box
        clipped = ~free
        # the clipped coordinates sit on the box face on z's side
        assert torch.allclose(pi[clipped], ui[clipped] * zi[clipped].sign(), rtol=0, atol=1e-12)
        zf = zi[free]
        if (zf != 0).any():
            t = (pi[free] @ zf / (zf @ zf)).item()  # t = 1 / (1 + lam)
        else:  # nothing free to read t from: lam = 0 must work
            t = 1.0
        assert t <= 1 + 1e-12, f"row {i}: lam = {1 / t - 1} < 0"
        torch.testing.assert_close(pi, torch.maximum(torch.minimum(t * zi, ui), -ui),
                                   rtol=0, atol=1e-11)
        if t < 1 - 1e-9:  # lam > 0: the ball binds
            assert pi.norm().item() == pytest.approx(r, rel=1e-12, abs=1e-12), f"row {i}"


@pytest.mark.parametrize("device", DEVICES)
def test_projection_with_clustered_breakpoints(device):
    """Breakpoints u_i / |z_i| packed within 2e-7 of each other around the answer: the
    kernel must find the answer's own segment (a CUDA bracket of 24 halvings instead of 64
    landed within 1e-7 of it, and the suite passed; CUDA mutation audit)."""
    _need_noise_kernels(device)
    d = 1000
    spread = torch.linspace(-1e-7, 1e-7, d, dtype=torch.float64)
    z = torch.ones(2, d, dtype=torch.float64)
    z[1, ::2] = -1.0
    u = 0.5 * (1 + spread).expand(2, d)
    u = u[:, torch.randperm(d, generator=torch.Generator().manual_seed(6))]
    # the box's norm less a little: the ball binds half way through the cluster
    rho = torch.maximum(torch.minimum(z, u), -u).norm(dim=1) * (1 - 2e-8)
    got = _project(z, u, rho, device)
    truth = np.stack([_project_numpy(z[i].numpy(), u[i].numpy(), rho[i].item())
                      for i in range(2)])
    np.testing.assert_allclose(got.numpy(), truth, rtol=1e-14, atol=0)
    clipped = (got.abs() == u).sum(1)
    assert ((clipped > d // 10) & (clipped < d - d // 10)).all()  # inside the cluster


@pytest.mark.parametrize("device", DEVICES)
def test_projection_of_an_infinite_point_is_nan_also_inside_the_ball(device):
    """An infinite coordinate has no projection even where the box alone would clip it
    (radius inf): the row comes back NaN, as documented (a kernel testing isnan only gave
    +-u; CUDA mutation audit)."""
    _need_noise_kernels(device)
    z = torch.ones(3, 4, dtype=torch.float64) * 0.1
    z[0, 1], z[1, 2] = math.inf, -math.inf
    u = torch.ones(3, 4, dtype=torch.float64)
    for radius in (math.inf, 10.0):
        got = _project(z, u, torch.full((3,), radius, dtype=torch.float64), device)
        assert got[:2].isnan().all() and torch.equal(got[2], z[2])


def test_projection_special_cases():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(8, 5, generator=gen, dtype=torch.float64) * 3
    u = torch.rand(8, 5, generator=gen, dtype=torch.float64)
    u[:, 2] = 0.0
    # rho = 0: the origin
    assert (_project(z, u, torch.zeros(8, dtype=torch.float64)) == 0).all()
    # rho = inf: the box clip, exactly
    box = torch.maximum(torch.minimum(z, u), -u)
    assert torch.equal(_project(z, u, torch.full((8,), math.inf, dtype=torch.float64)), box)
    # u = 0 features stay exactly 0 whatever the radius
    for r in (0.1, 1.0, math.inf):
        assert (_project(z, u, torch.full((8,), r, dtype=torch.float64))[:, 2] == 0).all()
    # inside already: unchanged
    inside = box * 0.5
    assert torch.equal(_project(inside, u, torch.full((8,), 1e3, dtype=torch.float64)), inside)
    # inactive rows unchanged, even outside the box ∩ ball
    eta = z.clone()
    active = torch.tensor([True, False] * 4)
    out = _ops.ascend_and_project(eta, torch.ones_like(z), torch.ones(8, dtype=torch.float64), u,
                                  torch.full((8,), 0.5, dtype=torch.float64), active)
    assert torch.equal(out[~active], eta[~active])
    assert (out[active].norm(dim=1) <= 0.5 + 1e-12).all()


# ============================================================================ 3. budget (eq. 7)

def test_noise_budget_by_hand():
    phi = torch.tensor([[2.0, 1.0, 0.0, -1.0], [4.0, 4.0, 2.0, -8.0]], dtype=torch.float64)
    u = oni.noise_budget(phi, eps=0.5, beta=0.5)
    # u_i = eps (1 - beta phi_i / max_j phi_j)
    expected = torch.tensor([[0.25, 0.375, 0.5, 0.625], [0.25, 0.25, 0.375, 1.0]],
                            dtype=torch.float64)
    torch.testing.assert_close(u, expected, rtol=0, atol=1e-15)
    assert u.dtype == torch.float64
    assert oni.noise_budget(phi.float(), eps=0.5, beta=0.5).dtype == torch.float32
    # beta = 0: the uniform budget
    assert (oni.noise_budget(phi, eps=0.3, beta=0.0) == 0.3).all()
    # eps = 0: no noise
    assert (oni.noise_budget(phi, eps=0.0, beta=0.5) == 0).all()


def test_noise_budget_clipped_at_zero():
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    u = oni.noise_budget(phi, eps=0.7, beta=1.0)
    assert (u >= 0).all()
    # beta = 1: the most important feature of each row gets no noise
    top = phi.argmax(dim=1)
    assert (u.gather(1, top[:, None]) == 0).all()
    torch.testing.assert_close(u, (0.7 * (1 - phi / phi.amax(1, keepdim=True))).clamp(min=0))


def test_noise_budget_degenerate_rows_get_eps():
    phi = torch.tensor([[-1.0, -2.0, -3.0], [0.0, 0.0, 0.0], [0.0, -1.0, -0.5],
                        [1.0, -1.0, 0.0]], dtype=torch.float64)
    u = oni.noise_budget(phi, eps=0.4, beta=0.8)
    assert (u[:3] == 0.4).all()  # max <= 0: no scale, the uniform budget
    torch.testing.assert_close(u[3], torch.tensor([0.4 * 0.2, 0.4 * 1.8, 0.4],
                                                  dtype=torch.float64))
    ua = oni.noise_budget(phi, eps=0.4, beta=0.8, importance="abs")
    assert (ua[1] == 0.4).all()  # all-zero row


def test_noise_budget_abs_variant():
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(40, 9, generator=gen, dtype=torch.float64)
    eps, beta = 0.6, 0.7
    u = oni.noise_budget(phi, eps, beta, importance="abs")
    assert (u >= eps * (1 - beta) - 1e-15).all() and (u <= eps + 1e-15).all()
    ratio = phi.abs() / phi.abs().amax(1, keepdim=True)
    torch.testing.assert_close(u, eps * (1 - beta * ratio))
    # the largest |phi| (here often negative) gets the least noise
    top = phi.abs().argmax(1)
    torch.testing.assert_close(u.gather(1, top[:, None])[:, 0],
                               torch.full((40,), eps * (1 - beta), dtype=torch.float64))


def test_noise_budget_rejects_an_overflowing_ratio():
    # float32: a huge negative value over a tiny positive max overflows phi_i / max_j phi_j
    phi = torch.tensor([[0.1, 0.2, -0.1], [1e-38, -1e38, 0.0]], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"phi row 1: .* overflows torch.float32"):
        oni.noise_budget(phi, eps=0.1, beta=0.5)
    # the same values in float64 do not overflow, nor with importance='abs' (ratio <= 1)
    assert torch.isfinite(oni.noise_budget(phi.double(), eps=0.1, beta=0.5)).all()
    assert torch.isfinite(oni.noise_budget(phi, eps=0.1, beta=0.5, importance="abs")).all()


def test_noise_budget_accepts_shapley_result():
    model = small_mlp(6, k=3, seed=2)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    res = oni.exact_shapley(model, x)
    assert torch.equal(oni.noise_budget(res, 0.5, 0.5), oni.noise_budget(res.values, 0.5, 0.5))


# ============================================================================ 4. radius (eq. 8)

def test_radius_matches_finite_differences():
    d, h = 7, 1e-5
    model = small_mlp(d, k=4, seed=5, scale=2.0).double()
    x = torch.randn(6, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rho = oni.robustness_radius(model, x)
    assert rho.shape == (6,) and rho.dtype == torch.float64
    with torch.no_grad():
        for i in range(len(x)):
            top = torch.softmax(model(x[i:i + 1]), 1)[0].topk(2).indices  # fixed at x

            def gap(z):
                p = torch.softmax(model(z[None]), 1)[0]
                return (p[top[0]] - p[top[1]]).item()

            grad = torch.tensor([(gap(x[i] + h * e) - gap(x[i] - h * e)) / (2 * h)
                                 for e in torch.eye(d, dtype=torch.float64)])
            expected = gap(x[i]) / grad.norm().item()
            assert rho[i].item() == pytest.approx(expected, rel=1e-6), f"row {i}"


def test_radius_edge_cases():
    w = torch.randn(4, generator=torch.Generator().manual_seed(7))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(8))

    def tie(z):  # two equal top logits everywhere: f_gap = 0
        a = z @ w
        return torch.stack([a, a, a - 1], dim=1)

    assert (oni.robustness_radius(tie, x) == 0).all()

    def flat(z):  # output with a gap but zero input gradient
        return z.sum(1, keepdim=True) * 0 + torch.tensor([[2.0, 0.0, 0.0]])

    assert torch.isinf(oni.robustness_radius(flat, x)).all()


def test_radius_refuses_a_model_with_nan_outputs():
    """A NaN logit makes the gap NaN; the radius would be 0 without a word."""
    def broken(z):
        out = torch.stack([z.sum(1), -z.sum(1), z[:, 0]], dim=1)
        return torch.where(torch.arange(len(z))[:, None] == 1, math.nan, out)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))
    with pytest.raises(ValueError, match=r"model output contains NaN or Inf \(first at index "
                                         r"\[1, 0\]\)"):
        oni.robustness_radius(broken, x)


def test_radius_of_a_constant_model_is_inf():
    """A model whose output does not depend on its input at all (no autograd graph) has
    zero input gradient too: rho = +inf, not an autograd error."""
    def constant(z):
        return torch.tensor([[2.0, 0.0, 0.0]]).expand(len(z), 3)

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))
    with pytest.warns(UserWarning, match="no autograd graph back to its input"):
        assert torch.isinf(oni.robustness_radius(constant, x)).all()


def test_radius_and_solver_refuse_inference_mode():
    """Under inference_mode no model has an input gradient: every radius would be +inf and
    the solver could not climb. Said at once, instead."""
    model, x, phi = _bad_setup()
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="robustness_radius needs autograd .* "
                                               "torch.inference_mode"):
            oni.robustness_radius(model, x)
        with pytest.raises(RuntimeError, match="optimal_noise needs autograd"):
            oni.optimal_noise(model, x, phi, **_OK)


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_a_model_writing_into_its_input_leaves_x_alone(backend):
    """optimal_noise computing phi itself ran shapley_values' f(x) on the caller's x: a
    forward zeroing its input zeroed the caller's x. It must stay bitwise the same, and the
    noise and radii be those of a model that does not write."""
    net = small_mlp(6, k=3, seed=2)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    x_before = x.clone()
    writer, reader = ZeroesItsInput(net).eval(), Wrapped(net).eval()
    radius = oni.robustness_radius(writer, x)
    assert torch.equal(x, x_before)
    assert torch.equal(radius, oni.robustness_radius(reader, x))
    kwargs = dict(tau_fraction=0.5, eps=0.5, beta=0.5, max_iter=5, backend=backend,
                  shapley_kwargs={"n_permutations": 4})
    got = oni.optimal_noise(writer, x, **kwargs)
    assert torch.equal(x, x_before)
    want = oni.optimal_noise(reader, x, **kwargs)
    for name in ("eta", "entropy", "feasible", "budget", "radius"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_solver_on_a_model_that_detaches_its_output_warns_and_flags():
    """No input gradient (the output detached inside the model): no autograd error from deep
    inside; a warning, and the rows that do not meet tau at x flagged infeasible (their
    random starts are all the solver has)."""
    model, x, phi = _bad_setup()
    with pytest.warns(UserWarning, match="no autograd graph back to its input"):
        result = oni.optimal_noise(lambda z: model(z).detach(), x, phi, **_OK, max_iter=5)
    assert not result.feasible.all()
    assert torch.equal(result.feasible, result.entropy >= result.tau)


# ============================================================================ 5. solver quality

def _slsqp_reference(model, x, u, rho, tau, starts=6, seed=0, extra_start=None):
    """Independent float64 reference for one row: scipy SLSQP minimising ||eta||^2 subject to
    H(f(x + eta)) >= tau (analytic gradient by autograd), ||eta||^2 <= rho^2 (when finite)
    and -u <= eta <= u, from eta = 0, ``starts - 1`` random points of the box (and
    ``extra_start``); the smallest feasible result, or None when no start found one."""
    d = len(x)
    xt = torch.as_tensor(x, dtype=torch.float64)
    memo = {}

    def h_and_grad(e):
        key = e.tobytes()
        if key not in memo:
            memo.clear()
            z = (xt + torch.as_tensor(e)).requires_grad_(True)
            log_p = torch.log_softmax(model(z[None]).double(), 1)[0]
            h = -(log_p.exp() * log_p).sum()
            (g,) = torch.autograd.grad(h, z)
            memo[key] = (h.item(), g.numpy())
        return memo[key]

    cons = [{"type": "ineq", "fun": lambda e: h_and_grad(e)[0] - tau,
             "jac": lambda e: h_and_grad(e)[1]}]
    if math.isfinite(rho):
        cons.append({"type": "ineq", "fun": lambda e: rho ** 2 - e @ e, "jac": lambda e: -2 * e})
    rng = np.random.default_rng(seed)
    inits = [np.zeros(d)] + [rng.uniform(-u, u) * (0.5 if s % 2 else 1.0)
                             for s in range(1, starts)]
    if extra_start is not None:
        inits.append(np.asarray(extra_start, dtype=np.float64))
    best = None
    if extra_start is not None:
        # a start that already meets every constraint is itself a feasible point: SLSQP
        # can wander off a feasible start and fail, and that must not count as "none"
        e = np.clip(np.asarray(extra_start, dtype=np.float64), -u, u)
        if h_and_grad(e)[0] >= tau - 1e-9 and (
                not math.isfinite(rho) or np.linalg.norm(e) <= rho * (1 + 1e-9)):
            best = e
    for e0 in inits:
        if math.isfinite(rho) and np.linalg.norm(e0) > rho:
            e0 = e0 * rho / np.linalg.norm(e0)
        res = minimize(lambda e: e @ e, e0, jac=lambda e: 2 * e, bounds=list(zip(-u, u)),
                       constraints=cons, method="SLSQP", options={"maxiter": 300, "ftol": 1e-12})
        e = np.clip(res.x, -u, u)
        ok = h_and_grad(e)[0] >= tau - 1e-9 and (
            not math.isfinite(rho) or np.linalg.norm(e) <= rho * (1 + 1e-9))
        if ok and (best is None or np.linalg.norm(e) < np.linalg.norm(best)):
            best = e
    return best


def _mlp_problem(d, seed, scale, n=16, x_seed=2):
    """A float64 MLP, n Gaussian rows and their Shapley values: exact for d <= 10, else 64
    sampled walks (exact enumeration of 2^d coalitions gets slow; the solver only needs
    some phi to build its budget)."""
    model = small_mlp(d, k=5, seed=seed, scale=scale).double()
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(x_seed), dtype=torch.float64)
    if d <= 10:
        return model, x, oni.exact_shapley(model, x).values
    return model, x, oni.shapley_values(model, x, n_permutations=64, seed=0).values


def _check_against_reference(model, x, res, starts=6, max_ratio=1.05, row_ratio=None):
    """Constraints, feasibility and norms of ``res`` against the SLSQP reference, row by row
    (fails at the first bad row). The reference also starts from our solution, so where ours
    is feasible it is at least a local polish of it: the ratio can only get stricter."""
    tau = res.tau
    h = _entropy(model, x + res.eta)
    assert (res.eta.abs() <= res.budget + 1e-6).all(), "box violated"
    assert (res.norm <= res.radius + 1e-6).all(), "ball violated"
    torch.testing.assert_close(res.entropy, h, rtol=0, atol=1e-9)
    torch.testing.assert_close(res.norm, res.eta.norm(dim=1))
    assert (h[res.feasible] >= tau - 1e-6).all(), "a row flagged feasible misses tau"
    assert (h[~res.feasible] < tau).all(), "a row that meets tau is flagged infeasible"
    worst = 0.0
    for i in range(len(x)):
        ours = bool(res.feasible[i])
        ref = _slsqp_reference(model, x[i].numpy(), res.budget[i].numpy(), res.radius[i].item(),
                               tau, starts=starts,
                               extra_start=res.eta[i].numpy() if ours else None)
        found = "found" if ref is not None else "did not find"
        assert ours == (ref is not None), (
            f"row {i}: feasible flag {ours}, SLSQP reference {found} a feasible point "
            f"(our H {res.entropy[i]:.6f}, tau {tau:.6f}, rho {res.radius[i]:.4g})")
        if ours:
            ref_norm = float(np.linalg.norm(ref))
            ratio = res.norm[i].item() / ref_norm if ref_norm > 0 else (
                1.0 if res.norm[i] == 0 else math.inf)
            bound = (row_ratio or {}).get(i, max_ratio)
            worst = max(worst, ratio if bound == max_ratio else 0.0)
            assert ratio <= bound, (f"row {i}: ||eta|| = {res.norm[i]:.6f} vs SLSQP "
                                    f"{ref_norm:.6f} (ratio {ratio:.4f})")
    return worst


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
@pytest.mark.parametrize("d, seed, scale, eps, tau_fraction", [
    (10, 1, 2.0, 0.5, 0.5),   # 11/16 feasible, worst ratio ~1.046
    (16, 1, 2.0, 0.6, 0.4),   # all feasible, worst ~1.0005 (sampled phi)
    (8, 3, 2.0, 0.5, 0.45),   # all feasible, worst ~1.0000
])
def test_optimal_noise_against_slsqp(d, seed, scale, eps, tau_fraction):
    model, x, phi = _mlp_problem(d, seed, scale)
    res = oni.optimal_noise(model, x, phi, tau_fraction=tau_fraction, eps=eps, beta=0.5)
    assert res.eta.shape == x.shape and res.eta.dtype == torch.float64
    torch.testing.assert_close(res.budget, oni.noise_budget(phi, eps, 0.5))
    torch.testing.assert_close(res.radius, oni.robustness_radius(model, x))
    assert res.tau == pytest.approx(tau_fraction * math.log(5))
    _check_against_reference(model, x, res)


# Hard cases: H(f(x + eta)) is not concave, and the solver is local and multi-start.
# (a) tau > log 2: the level set needs three or more classes to mix, and an ascent on H
#     stalls on a two-class ridge (H = log 2). small_mlp(12, k=5, seed=1, scale=3.0),
#     eps=1.0, tau_fraction=0.6 (tau = 0.966), the first 8 rows. Row 3's first pass
#     stops at H = 0.693155 = log 2; the rescue's spread ascents from random points cross the
#     ridge (of 512 random points, 15% of them do, against 0.4% of ascents on H).
# (b) below log 2 an ascent can stop at a local maximum of H inside the box:
#     small_mlp(12, seed=1, scale=2.0), phi from 64 sampled walks, eps=0.5, tau_fraction=0.4
#     (tau = 0.644). Row 13 stays infeasible after the first pass; of 512 random points, 5.5%
#     of ascents on H and none on the spread objective reach tau, while both of the rescue's
#     signed-corner starts (u * sign(grad H at x), full and half size) do.
# Measured 2026-12-03 (defaults: 16 norm-reduction rounds and 32 polish iterations, 4
# starts, 16 rescue starts), against the 4-start SLSQP reference: every flag agrees, worst
# norm ratio (a) 1.0497 (row 5: no random start reaches tau there, and both zero starts
# end in a basin 5% above SLSQP's), (b) 1.0139. Before the polish and the mixed rescue
# starts (da4f602) these failed: (a) 6/8 flags, (b) 15/16, norm ratios up to 1.23. The
# margin on (a) is thin: the test pins the solver's quality on it, with the seeds fixed.
@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
@pytest.mark.parametrize("d, seed, scale, eps, tau_fraction, n", [
    (12, 1, 3.0, 1.0, 0.6, 8),    # (a) tau = 0.966 > log 2
    (12, 1, 2.0, 0.5, 0.4, 16),   # (b) tau = 0.644 < log 2, a local maximum (row 13)
])
def test_optimal_noise_hard_cases(d, seed, scale, eps, tau_fraction, n):
    model, x, phi = _mlp_problem(d, seed=seed, scale=scale, n=n)
    res = oni.optimal_noise(model, x, phi, tau_fraction=tau_fraction, eps=eps, beta=0.5)
    # Case (a)'s rows 6 and 7 have several basins, and which one the 4 starts reach depends
    # on the seed's random starts. Measured over solver seeds 0-7 (2026-12-06): row 6 ends
    # 1.32-1.38x above SLSQP in 7 of 8 seeds, row 7 1.43x in 2 and infeasible in 1; the
    # earlier, batch-dependent start draws did the same (row 6 above 1.05 in 6 of 8 seeds:
    # their seed 0 happened to be a good one). Those rows are held to the measured band.
    # Row 3 too (2026-12-07): the reference's own path there is chaotic in the last bits of
    # its arithmetic. With scipy 1.17.1 and numpy 2.4.6 on 2 BLAS threads its SLSQP ends in a
    # basin of norm 1.523, and ours (seed 0: 1.668) is 1.095x that; with OMP_NUM_THREADS=1
    # it ends at ours (1.000x), and so it did in the environments that measured 1.0497
    # above. Over solver seeds 0-7 (2026-12-07), row 3 is feasible in 3 (1.07-1.10x of
    # 1.523) and left on the log 2 ridge, infeasible, in 5; row 1 is feasible in 6, at 2.44
    # (the 4-start reference finds no feasible point there, a 16-start one finds 2.83).
    # Case (b) keeps its flags and stays within 1.01x in all 8 seeds.
    row_ratio = {3: 1.10, 6: 1.45, 7: 1.45} if scale == 3.0 else None
    _check_against_reference(model, x, res, starts=4, row_ratio=row_ratio)


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_rescue_starts_find_the_feasible_rows_the_first_pass_missed():
    """Hard case (b): the first pass misses feasible rows; 64 rescue starts find a feasible
    point on every row where the SLSQP reference finds one."""
    model, x, phi = _mlp_problem(12, seed=1, scale=2.0, n=16)
    kwargs = dict(tau_fraction=0.4, eps=0.5, beta=0.5)
    first = oni.optimal_noise(model, x, phi, **kwargs, rescue_starts=0)
    res = oni.optimal_noise(model, x, phi, **kwargs, rescue_starts=64)
    assert res.feasible.sum() > first.feasible.sum()
    assert (res.feasible | ~first.feasible).all()  # never loses a feasible row
    assert (res.eta.abs() <= res.budget + 1e-9).all()
    assert (res.norm <= res.radius * (1 + 1e-9)).all()
    for i in range(len(x)):
        ref = _slsqp_reference(model, x[i].numpy(), res.budget[i].numpy(),
                               res.radius[i].item(), res.tau, starts=4,
                               extra_start=res.eta[i].numpy() if res.feasible[i] else None)
        assert bool(res.feasible[i]) == (ref is not None), f"row {i}"
    with pytest.raises(ValueError, match="rescue_starts"):
        oni.optimal_noise(model, x, phi, **kwargs, rescue_starts=-1)
    for name in ("starts", "rescue_starts"):  # one row's starts must fit one batch
        with pytest.raises(ValueError, match=rf"^{name} must be <= 4096 .*got 4097"):
            oni.optimal_noise(model, x, phi, **{**kwargs, name: 4097})


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_polish_only_shortens_and_keeps_feasibility():
    """The polish keeps the shortest feasible iterate, so with it every row is at most as
    long as without it (same starts, same rescue rows), the flags do not change, and on
    hard case (a) it shortens some rows by more than 1% (measured: up to 4%)."""
    model, x, phi = _mlp_problem(12, seed=1, scale=3.0, n=8)
    kwargs = dict(tau_fraction=0.6, eps=1.0, beta=0.5)
    plain = oni.optimal_noise(model, x, phi, **kwargs, polish_iter=0)
    res = oni.optimal_noise(model, x, phi, **kwargs)
    assert torch.equal(plain.feasible, res.feasible)
    assert (res.norm <= plain.norm * (1 + 1e-12)).all()
    assert (res.norm[res.feasible] < 0.99 * plain.norm[res.feasible]).any()
    h = _entropy(model, x + res.eta)
    assert (h[res.feasible] >= res.tau - 1e-9).all()
    assert (res.eta.abs() <= res.budget).all() and (res.norm <= res.radius).all()
    # the polish iterations are counted
    assert (res.iterations[res.feasible] > plain.iterations[res.feasible]).all()


@pytest.fixture(scope="module")
def problem10():
    return _mlp_problem(10, seed=1, scale=2.0)


def test_rows_meeting_tau_get_zero_noise_and_no_iterations(problem10):
    model, x, phi = problem10
    h0 = _entropy(model, x)
    tau = float(h0.median())
    with pytest.warns(UserWarning, match="flagged infeasible"):
        res = oni.optimal_noise(model, x, phi, tau=tau, eps=0.5, beta=0.5)
    met = h0 >= tau
    assert met.sum() >= 8
    assert (res.eta[met] == 0).all() and (res.norm[met] == 0).all()
    assert res.feasible[met].all()
    assert res.entropy[met].tolist() == pytest.approx(h0[met].tolist(), abs=1e-12)
    assert (res.iterations[~met] > 0).all()
    assert res.iterations[met].tolist() == [0] * int(met.sum()), (
        "rows that already meet tau should report 0 solver iterations")


def test_infeasible_rows_warn_and_stay_in_the_box_and_ball(problem10):
    model, x, phi = problem10
    with pytest.warns(UserWarning, match=r"16 of 16 rows .* flagged infeasible"):
        res = oni.optimal_noise(model, x, phi, tau_fraction=0.9, eps=0.05, beta=0.5)
    assert not res.feasible.any()
    assert (res.eta.abs() <= res.budget).all()
    assert (res.norm <= res.radius).all()
    h = _entropy(model, x + res.eta)
    torch.testing.assert_close(res.entropy, h, rtol=0, atol=1e-12)  # the point it returns
    assert (h < res.tau).all()
    assert (h >= _entropy(model, x) - 1e-12).all()  # no worse than eta = 0, a start
    # the highest entropy over the starts: more starts can only find more
    with pytest.warns(UserWarning, match="flagged infeasible"):
        one = oni.optimal_noise(model, x, phi, tau_fraction=0.9, eps=0.05, beta=0.5, starts=1)
    assert (one.entropy <= res.entropy + 1e-9).all()


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_tau_and_tau_fraction_agree_and_seed_reproduces(problem10):
    model, x, phi = problem10
    a = oni.optimal_noise(model, x, phi, tau_fraction=0.5, eps=0.5, beta=0.5, seed=3)
    b = oni.optimal_noise(model, x, phi, tau=0.5 * math.log(5), eps=0.5, beta=0.5, seed=3)
    c = oni.optimal_noise(model, x, phi, tau_fraction=0.5, eps=0.5, beta=0.5, seed=3)
    assert a.tau == b.tau
    assert torch.equal(a.eta, b.eta) and torch.equal(a.eta, c.eta)
    assert torch.equal(a.feasible, c.feasible) and torch.equal(a.iterations, c.iterations)
    # phi given as a ShapleyResult: the same
    res = oni.exact_shapley(model, x)
    d = oni.optimal_noise(model, x, res, tau_fraction=0.5, eps=0.5, beta=0.5, seed=3)
    assert torch.equal(a.eta, d.eta)


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_kernel_and_torch_backends_agree(problem10):
    model, x, phi = problem10
    k = oni.optimal_noise(model, x, phi, tau_fraction=0.5, eps=0.5, beta=0.5, backend="kernel")
    t = oni.optimal_noise(model, x, phi, tau_fraction=0.5, eps=0.5, beta=0.5, backend="torch")
    assert torch.equal(k.feasible, t.feasible)
    # the same algorithm; ulp-level differences can move a 16-step bisection by one step
    torch.testing.assert_close(k.norm, t.norm, rtol=1e-3, atol=1e-9)


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_float32_model_and_inputs():
    model = small_mlp(10, k=5, seed=1, scale=2.0)
    x = torch.randn(16, 10, generator=torch.Generator().manual_seed(2))
    res = oni.optimal_noise(model, x, oni.exact_shapley(model, x), tau_fraction=0.5, eps=0.5,
                            beta=0.5)
    assert res.eta.dtype == res.budget.dtype == res.radius.dtype == torch.float32
    assert (res.eta.abs() <= res.budget).all() and (res.norm <= res.radius * (1 + 1e-6)).all()
    h = _entropy(model, x + res.eta)
    assert (h[res.feasible] >= res.tau - 1e-5).all()
    assert res.feasible.sum() >= 8


class _LiesUnderAutocast(torch.nn.Module):
    """A model whose logits shrink by ``factor`` (a flatter softmax, a higher entropy) while
    autocast is on: a search in bf16 sees tau reached where float32 does not."""

    def __init__(self, net, factor):
        super().__init__()
        self.net, self.factor = net, factor

    def forward(self, z):
        out = self.net(z)
        return out.float() * self.factor if torch.is_autocast_enabled("cpu") else out


def _check_strict_verdict(model, x, res, atol):
    """Every flag and entropy of ``res`` is the float32 one: recomputed here in float64."""
    h = _entropy(model, x + res.eta)
    torch.testing.assert_close(res.entropy.double(), h, rtol=0, atol=atol)
    assert (h[res.feasible] >= res.tau - atol).all(), "a row flagged feasible misses tau"
    assert (h[~res.feasible] < res.tau + atol).all(), "a row that meets tau is flagged infeasible"
    assert (res.eta.abs() <= res.budget * (1 + 1e-6)).all(), "box violated"
    assert (res.norm <= res.radius * (1 + 1e-6)).all(), "ball violated"


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_bf16_search_keeps_the_float32_verdict_and_solutions():
    """precision="bf16" searches in bfloat16 (autocast) but polishes and judges in float32:
    the flags and entropies are float32 ones, and the solutions match the float32 run's
    (measured: 32 of 32 flags, 21 feasible; norm ratio median 1.0003, a few rows reach
    another local solution, 0.71-1.04)."""
    model = small_mlp(16, k=5, seed=1, scale=4.0)  # no row meets tau at x
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    phi = oni.shapley_values(model, x, n_permutations=32, seed=0).values
    kwargs = dict(tau_fraction=0.5, eps=0.6, beta=0.5)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 stays strict and restores it
    try:
        strict = oni.optimal_noise(model, x, phi, **kwargs)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    fast = oni.optimal_noise(model, x, phi, **kwargs, precision="bf16")
    _check_strict_verdict(model, x, strict, 1e-5)
    _check_strict_verdict(model, x, fast, 1e-5)
    assert strict.feasible.sum() >= 16 and (strict.norm[strict.feasible] > 0).all()
    assert (fast.feasible == strict.feasible).double().mean() >= 0.9
    both = fast.feasible & strict.feasible & (strict.norm > 0)
    ratio = fast.norm[both] / strict.norm[both]
    assert 0.97 <= ratio.median() <= 1.03, ratio


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_search_arithmetic_never_decides_feasibility():
    """A search whose arithmetic lies (logits shrunk 25% under autocast, so it stops short
    of the true level set): the float32 polish walks the rows back over the level set, and
    no row is flagged feasible unless float32 says so. Without the strict verdict most
    flags would be wrong (checked below on the search's own numbers)."""
    net = small_mlp(16, k=5, seed=1, scale=4.0)
    model = _LiesUnderAutocast(net, 0.75).eval()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    phi = oni.shapley_values(net, x, n_permutations=32, seed=0).values
    kwargs = dict(tau_fraction=0.5, eps=0.6, beta=0.5)
    strict = oni.optimal_noise(net, x, phi, **kwargs)
    res = oni.optimal_noise(model, x, phi, **kwargs, precision="bf16")
    _check_strict_verdict(net, x, res, 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lied = _entropy(model, x + strict.eta)
    assert (lied[strict.feasible] > strict.tau + 0.02).all()  # the lie is large
    assert res.feasible.sum() >= 0.8 * strict.feasible.sum()


# ============================================================================ 6. bad input

_D, _N = 6, 4


def _bad_setup():
    model = small_mlp(_D, k=3, seed=0)
    x = torch.randn(_N, _D, generator=torch.Generator().manual_seed(1))
    phi = torch.randn(_N, _D, generator=torch.Generator().manual_seed(2))
    return model, x, phi


def _with(x, index, value):
    out = x.clone()
    out[index] = value
    return out


_OK = dict(tau_fraction=0.5, eps=0.5, beta=0.5)


@pytest.mark.parametrize("make, error, message", [
    (lambda m, x, p: dict(phi=p, **{**_OK, "eps": -0.1}), ValueError, r"eps must be .*got -0\.1"),
    (lambda m, x, p: dict(phi=p, **{**_OK, "eps": math.nan}), ValueError, "eps must be"),
    (lambda m, x, p: dict(phi=p, **{**_OK, "beta": 1.5}), ValueError,
     r"beta must be .*\[0\.0, 1\.0\].*1\.5"),
    (lambda m, x, p: dict(phi=p, **{**_OK, "beta": -0.5}), ValueError, "beta must be"),
    (lambda m, x, p: dict(phi=p, tau=-0.1, eps=0.5, beta=0.5), ValueError, r"tau must be .*-0\.1"),
    (lambda m, x, p: dict(phi=p, tau=1.2, eps=0.5, beta=0.5), ValueError,
     r"tau must be .*1\.098.*1\.2"),  # > log 3
    (lambda m, x, p: dict(phi=p, **{**_OK, "tau_fraction": 1.5}), ValueError,
     "tau_fraction must be"),
    (lambda m, x, p: dict(phi=p, tau=0.5, tau_fraction=0.5, eps=0.5, beta=0.5), ValueError,
     "exactly one of tau"),
    (lambda m, x, p: dict(phi=p, eps=0.5, beta=0.5), ValueError, "exactly one of tau"),
    (lambda m, x, p: dict(phi=p[:, :-1], **_OK), ValueError, r"phi must be \[N, d\] = \[4, 6\]"),
    (lambda m, x, p: dict(phi=p[:-1], **_OK), ValueError, r"phi must be \[N, d\]"),
    (lambda m, x, p: dict(x=_with(x, (1, 2), math.nan), phi=p, **_OK), ValueError,
     r"x contains NaN or Inf \(first at index \[1, 2\]\)"),
    (lambda m, x, p: dict(x=_with(x, (0, 0), math.inf), phi=p, **_OK), ValueError,
     "x contains NaN or Inf"),
    (lambda m, x, p: dict(phi=_with(p, (2, 3), math.inf), **_OK), ValueError,
     r"phi contains NaN or Inf \(first at index \[2, 3\]\)"),
    (lambda m, x, p: dict(phi=_with(p, (0, 1), math.nan), **_OK), ValueError,
     "phi contains NaN or Inf"),
    (lambda m, x, p: dict(x=x[:0], phi=p[:0], **_OK), ValueError, "empty batch"),
    (lambda m, x, p: dict(x=x.long(), phi=p, **_OK), TypeError, "x must be float32 or float64"),
    (lambda m, x, p: dict(x=x[0], phi=p, **_OK), ValueError, "x must be 2-D"),
    (lambda m, x, p: dict(phi=torch.empty(_N, _D, device="meta"), **_OK), ValueError,
     "phi must be on x's device cpu, got meta"),
    (lambda m, x, p: dict(phi=p, importance="relative", **_OK), ValueError,
     r"importance must be one of \('signed', 'abs'\)"),
    (lambda m, x, p: dict(phi=p, backend="cuda", **_OK), ValueError, "backend must be one of"),
    (lambda m, x, p: dict(phi=p, precision="fp16", **_OK), ValueError,
     r"precision must be one of \('float32', 'tf32', 'bf16'\)"),
    (lambda m, x, p: dict(phi=p, precision="tf32", **_OK), ValueError,
     r"precision='tf32' needs x on a CUDA device"),
    # float64 arithmetic, which bf16 autocast leaves as it is: the opt-in did nothing
    (lambda m, x, p: dict(x=x.double(), phi=p.double(), precision="bf16", **_OK), ValueError,
     r"precision='bf16' trades float32 arithmetic for speed; x and the model are float64"),
    (lambda m, x, p: dict(phi=p, max_iter=0, **_OK), ValueError, "max_iter must be >= 1"),
    (lambda m, x, p: dict(phi=p, starts=0, **_OK), ValueError, "starts must be >= 1"),
    (lambda m, x, p: dict(phi=p, refine_iter=-1, **_OK), ValueError, "refine_iter must be >= 0"),
    (lambda m, x, p: dict(phi=p, polish_iter=-1, **_OK), ValueError, "polish_iter must be >= 0"),
    (lambda m, x, p: dict(phi=p, polish_iter=2.5, **_OK), TypeError, "polish_iter must be"),
    (lambda m, x, p: dict(phi=p, **{**_OK, "eps": "0.5"}), TypeError, "eps must be a number"),
    (lambda m, x, p: dict(phi=p, **{**_OK, "eps": 1e300}), ValueError,
     "eps = 1e\\+300 overflows phi's dtype torch.float32 in the budget"),
    (lambda m, x, p: dict(phi=p.long(), **_OK), TypeError, "phi must be a float tensor"),
    (lambda m, x, p: dict(phi=p.bool(), **_OK), TypeError, "phi must be a float tensor"),
    (lambda m, x, p: dict(phi=p, seed=2 ** 63, **_OK), ValueError,
     "seed must be in \\[0, 2\\*\\*63\\)"),
    (lambda m, x, p: dict(x=x[:, :-1], phi=p[:, :-1], **_OK), ValueError,
     "the model's first layer takes 6 features, x has d = 5"),
    # per-group Shapley values: the budget needs one per feature
    (lambda m, x, p: dict(phi=oni.shapley_values(m, x, n_permutations=2,
                                                 groups=torch.arange(_D) // 2), **_OK),
     ValueError, "phi holds 3 values per row, one per group"),
    (lambda m, x, p: dict(phi=None, shapley_kwargs={"groups": torch.arange(_D) // 2}, **_OK),
     ValueError, "shapley_kwargs: 'groups' gives one value per group"),
    (lambda m, x, p: dict(phi=None, shapley_kwargs=[("n_permutations", 4)], **_OK),
     TypeError, "shapley_kwargs must be a dict of oni.shapley_values arguments, got list"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_optimal_noise_bad_input(make, error, message):
    model, x, phi = _bad_setup()
    kwargs = dict(x=x)
    kwargs.update(make(model, x, phi))
    x_arg, phi_arg = kwargs.pop("x"), kwargs.pop("phi")
    with pytest.raises(error, match=message):
        oni.optimal_noise(model, x_arg, phi_arg, **kwargs)


def test_optimal_noise_refuses_nan_model_output_at_x():
    """The logits at x set the infeasible end of every line search and the radius: a NaN
    there is named, row and class, before any work."""
    model, x, phi = _bad_setup()

    def nan_at_row_2(z):
        out = model(z)
        return torch.where(torch.arange(len(z))[:, None] == 2, math.nan, out)

    with pytest.raises(ValueError, match=r"^model output at x contains NaN or Inf \(first at "
                                         r"index \[2, 0\]\)$"):
        oni.optimal_noise(nan_at_row_2, x, phi, **_OK)


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_bf16_on_a_cpu_without_native_bfloat16_warns(monkeypatch):
    """bf16 search passes are an opt-in for speed: where the CPU lacks AMX and AVX512-BF16
    they are slower than float32, and the solver says so (still solving)."""
    from oni import noise
    model, x, phi = _bad_setup()
    monkeypatch.setattr(noise, "_native_bf16_cpu", lambda: False)
    with pytest.warns(UserWarning, match="without native bfloat16 products"):
        oni.optimal_noise(model, x, phi, **_OK, max_iter=3, precision="bf16")
    monkeypatch.setattr(noise, "_native_bf16_cpu", lambda: True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*native bfloat16")
        oni.optimal_noise(model, x, phi, **_OK, max_iter=3, precision="bf16")
        oni.optimal_noise(model, x, phi, **_OK, max_iter=3)  # float32: never


def test_budget_radius_uniform_bad_input():
    model, x, phi = _bad_setup()
    with pytest.raises(ValueError, match="eps must be"):
        oni.noise_budget(phi, eps=-1.0, beta=0.5)
    with pytest.raises(ValueError, match="beta must be"):
        oni.noise_budget(phi, eps=1.0, beta=2.0)
    with pytest.raises(ValueError, match="importance must be one of"):
        oni.noise_budget(phi, 0.5, 0.5, importance="both")
    with pytest.raises(ValueError, match=r"phi must be a tensor \[N, d\]"):
        oni.noise_budget(phi[0], 0.5, 0.5)
    with pytest.raises(TypeError, match="phi must be a float tensor"):
        oni.noise_budget(phi.long(), 0.5, 0.5)
    with pytest.raises(ValueError, match="phi contains NaN or Inf"):
        oni.noise_budget(_with(phi, (0, 0), math.nan), 0.5, 0.5)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        oni.robustness_radius(model, _with(x, (0, 0), math.inf))
    with pytest.raises(ValueError, match="empty batch"):
        oni.robustness_radius(model, x[:0])
    with pytest.raises(ValueError, match="k = 1 column"):
        oni.robustness_radius(lambda z: z[:, :1], x)
    with pytest.raises(ValueError, match=r"kind must be one of \('uniform', 'gaussian'\)"):
        oni.uniform_noise(x, 0.5, kind="laplace")
    with pytest.raises(ValueError, match=r"eps must be .*got -0\.5"):
        oni.uniform_noise(x, -0.5)
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        oni.uniform_noise(x.long(), 0.5)
    for kind in ("uniform", "gaussian"):
        with pytest.raises(ValueError, match="eps = 1e\\+300 overflows x's dtype torch.float32"):
            oni.uniform_noise(x, 1e300, kind=kind)
    assert torch.isfinite(oni.uniform_noise(x.double(), 1e300)).all()
    with pytest.raises(ValueError, match="seed must be in"):
        oni.uniform_noise(x, 0.5, seed=2 ** 64)
    with pytest.raises(ValueError, match="the model's first layer takes 6 features"):
        oni.robustness_radius(model, x[:, :2])


def _project_args():
    eta, direction, step, budget, radius, active = _project_case(4, 5, "cpu", torch.float64)
    return dict(eta=eta, direction=direction, step=step, budget=budget, radius=radius,
                active=active)


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(eta=a["eta"][0]), "eta must be 2-D"),
    (lambda a: a.update(eta=a["eta"].long()), "eta must be float32 or float64"),
    (lambda a: a.update(direction=a["direction"][:, :4]), r"direction must be \[N, d\] = \[4, 5\]"),
    (lambda a: a.update(direction=a["direction"].float()), "direction must have eta's dtype"),
    (lambda a: a.update(budget=a["budget"][:3]), r"budget must be \[N, d\]"),
    (lambda a: a.update(budget=a["budget"].float()), "budget must have eta's dtype"),
    (lambda a: a.update(step=a["step"][:, None]), r"step must be \[N\] = \[4\]"),
    (lambda a: a.update(step=a["step"].float()), "step must have eta's dtype"),
    (lambda a: a.update(radius=a["radius"][:2]), r"radius must be \[N\] = \[4\]"),
    (lambda a: a.update(radius=a["radius"].float()), "radius must have eta's dtype"),
    (lambda a: a.update(active=a["active"][:3]), r"active must be \[N\] = \[4\]"),
    (lambda a: a.update(active=a["active"].long()), "active must be bool"),
    (lambda a: a.update(active=a["active"].float()), "active must be bool"),
    (lambda a: a["budget"].__setitem__((1, 2), -1.0),
     r"budget\[1, 2\] = -1 must be finite and >= 0"),
    (lambda a: a["budget"].__setitem__((0, 0), math.nan), r"budget\[0, 0\] = nan must be finite"),
    (lambda a: a["budget"].__setitem__((0, 0), math.inf), r"budget\[0, 0\] = inf must be finite"),
    (lambda a: a["radius"].__setitem__(2, -0.5), r"radius\[2\] = -0.5 must be >= 0"),
    (lambda a: a["radius"].__setitem__(0, math.nan), r"radius\[0\] = nan must be >= 0"),
    # the scans' last elements (a scan stopping one short passed; CUDA mutation audit)
    (lambda a: a["budget"].__setitem__((3, 4), -1.0),
     r"budget\[3, 4\] = -1 must be finite and >= 0"),
    (lambda a: a["radius"].__setitem__(3, -0.5), r"radius\[3\] = -0.5 must be >= 0"),
])
def test_ascend_and_project_bad_input(mutate, message):
    args = _project_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        _ops.ascend_and_project(**args)


@pytest.mark.parametrize("mutate", [
    lambda a: a["budget"].__setitem__((1, 2), -1.0),
    lambda a: a["radius"].__setitem__(2, -0.5),
    lambda a: a["radius"].__setitem__(0, math.nan),
])
def test_reference_projection_rejects_bad_values_too(mutate):
    args = _project_args()
    mutate(args)
    with pytest.raises(ValueError, match="must be"):
        reference.ascend_and_project(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_ascend_and_project_check_values_false_same_answer(device):
    """check_values=False only skips the value scan: bit for bit the same projection, in
    the kernel and in the twin."""
    _need_noise_kernels(device)
    args = _project_case(40, 9, device, torch.float32, seed=11)
    assert torch.equal(_ops.ascend_and_project(*args, check_values=False),
                       _ops.ascend_and_project(*args))
    assert torch.equal(reference.ascend_and_project(*args, check_values=False),
                       reference.ascend_and_project(*args))
    torch.library.opcheck(torch.ops.oni.ascend_and_project.default, args,
                          {"check_values": False})


@only_real_cpu_kernels
def test_ascend_and_project_check_values_false_on_cpu_still_scans():
    """The CPU kernel scans anyway (its breakpoint sort must not see NaN); the twin skips."""
    args = _project_args()
    args["budget"][0, 0] = math.nan
    with pytest.raises(RuntimeError, match=r"budget\[0, 0\] = nan must be finite"):
        _ops.ascend_and_project(**args, check_values=False)
    args = _project_args()
    args["radius"][2] = -0.5
    assert reference.ascend_and_project(**args, check_values=False).shape == (4, 5)


def test_solver_projections_skip_the_value_scan(monkeypatch):
    """Every projection of the solver passes check_values=False (on CUDA each scan is a
    host sync, once per pass); the budget and radius are validated once up front."""
    model, x, phi = _mlp_problem(8, seed=3, scale=2.0)
    seen = []
    project = reference.ascend_and_project

    def spy(*args, check_values=True):
        seen.append(check_values)
        return project(*args, check_values=check_values)

    monkeypatch.setattr(reference, "ascend_and_project", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oni.optimal_noise(model, x, phi, tau_fraction=0.5, eps=0.5, beta=0.5, backend="torch",
                          max_iter=5, refine_iter=1, polish_iter=1, rescue_starts=2)
    assert len(seen) > 5 and not any(seen)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_and_grad_of_an_undefined_softmax_is_nan(device):
    """A NaN logit, a +inf one, or a row of -inf: softmax is undefined (torch.softmax gives
    NaN); the entropy is NaN too, not a made-up 0, and the other rows are untouched."""
    _need_noise_kernels(device)
    nan, inf = math.nan, math.inf
    logits = torch.tensor([[nan, 1.0, 2.0], [inf, 0.0, 0.0], [-inf, -inf, -inf],
                           [-inf, 0.0, 1.0], [0.5, 1.0, 2.0]], device=device)
    for h, g in (_ops.entropy_and_grad(logits), reference.entropy_and_grad(logits)):
        assert h[:3].isnan().all() and g[:3].isnan().all()
        assert torch.isfinite(h[3:]).all() and torch.isfinite(g[3:]).all()
        h_ok, g_ok = reference.entropy_and_grad(logits[3:].double())
        torch.testing.assert_close(h[3:].double(), h_ok, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g[3:].double(), g_ok, rtol=1e-6, atol=1e-7)
        assert g[3, 0] == 0  # a -inf logit among finite ones: p = 0, no gradient


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_solver_warns_when_the_model_gives_nan_inside_the_box():
    """Points where the model's output is NaN count as failures, and a warning says so
    (the flags alone would blame the budget); no NaN reaches eta."""
    model = small_mlp(5, k=3, seed=4, scale=6.0)
    x = torch.rand(6, 5, generator=torch.Generator().manual_seed(2)).double() * 0.5
    model = model.double()

    def nan_off_x(z):  # finite at the rows of x only
        known = (z[:, None, :] == x[None]).all(2).any(1, keepdim=True)
        return torch.where(known, model(z), math.nan)

    phi = torch.rand(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match="NaN or Inf at some points x \\+ eta"):
        res = oni.optimal_noise(nan_off_x, x, phi, tau_fraction=0.95, eps=0.5, beta=0.5)
    assert not res.feasible.any() and torch.isfinite(res.eta).all()
    assert (res.eta == 0).all()  # every step off x lands on NaN: the starts stay at x
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*flagged infeasible")
        oni.optimal_noise(model, x, phi, tau_fraction=0.95, eps=0.5, beta=0.5)


def test_entropy_and_grad_bad_input():
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        _ops.entropy_and_grad(torch.randn(5))
    with pytest.raises(RuntimeError, match="logits must be float32 or float64"):
        _ops.entropy_and_grad(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"at least one class \(k >= 1\)"):
        _ops.entropy_and_grad(torch.randn(2, 0))


# ============================================================================ 7. uniform noise

def test_uniform_noise():
    x = torch.zeros(300, 40, dtype=torch.float64)
    eta = oni.uniform_noise(x, 0.3, seed=4)
    assert eta.shape == x.shape and eta.dtype == torch.float64
    assert (eta.abs() <= 0.3).all()
    assert eta.abs().max() > 0.29 and abs(eta.mean().item()) < 0.01  # fills U(-eps, eps)
    assert torch.equal(eta, oni.uniform_noise(x, 0.3, seed=4))
    assert not torch.equal(eta, oni.uniform_noise(x, 0.3, seed=5))
    assert (oni.uniform_noise(x, 0.0) == 0).all()
    assert oni.uniform_noise(x.float(), 0.3).dtype == torch.float32


def test_gaussian_noise_std_is_eps():
    x = torch.zeros(500, 400)
    eta = oni.uniform_noise(x, 0.25, kind="gaussian", seed=1)
    assert eta.std().item() == pytest.approx(0.25, rel=0.01)
    assert abs(eta.mean().item()) < 0.003
    assert torch.equal(eta, oni.uniform_noise(x, 0.25, kind="gaussian", seed=1))


@pytest.mark.filterwarnings("ignore:.*flagged infeasible")
def test_starts_depend_on_the_row_not_the_batch():
    """The random starts are hashed from (seed, global row, start): a shard solved with its
    row_offset, or the whole batch in small solver batches, gets the whole batch's answer."""
    model, x, phi = _mlp_problem(12, seed=1, scale=2.0, n=16)
    model, x, phi = model.double(), x.double(), phi.double()
    kwargs = dict(tau_fraction=0.6, eps=0.5, beta=0.5, seed=3, rescue_starts=8)
    whole = oni.optimal_noise(model, x, phi, **kwargs)
    shard = oni.optimal_noise(model, x[5:], phi[5:], row_offset=5, **kwargs)
    torch.testing.assert_close(shard.norm, whole.norm[5:], rtol=1e-9, atol=0)
    assert torch.equal(shard.feasible, whole.feasible[5:])
    assert torch.equal(shard.iterations, whole.iterations[5:])
    from oni import noise
    original = noise._ROW_BATCH
    try:
        noise._ROW_BATCH = 8  # two starts of four rows per solver batch
        small = oni.optimal_noise(model, x, phi, **kwargs)
    finally:
        noise._ROW_BATCH = original
    # the same starts; the model's products batch differently (measured: the same norms to
    # 3e-16 and the same iteration counts, eta up to 1e-5 apart on a row: a point of the
    # same norm)
    torch.testing.assert_close(small.norm, whole.norm, rtol=1e-9, atol=0)
    assert torch.equal(small.iterations, whole.iterations)
    starts = noise._uniform_starts(3, torch.arange(64), 1000, torch.float64)
    assert starts.min() >= -1 and starts.max() < 1 and abs(float(starts.mean())) < 0.01
    assert torch.equal(starts[10:20], noise._uniform_starts(3, torch.arange(10, 20), 1000,
                                                            torch.float64))


# ----------------------------------------------------------------------------- fuzz pass 10

def _fuzz10_problem(n=12, d=8, k=5):
    model = small_mlp(d, k=k, seed=3, scale=2.0)
    x = (torch.rand(n, d, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    phi = oni.shapley_values(model, x, n_permutations=8, seed=0).values
    return model, x, phi


@pytest.mark.filterwarnings("ignore:.*cannot reach entropy tau")
def test_an_outer_autocast_does_not_reach_the_strict_passes():
    """Under a caller's torch.autocast(bf16) the float32 verdict and the radius were bf16
    ones: rows flagged feasible read 0.005 nats below tau in float32, radii 28% off."""
    model, x, phi = _fuzz10_problem()
    settings = dict(tau_fraction=0.7, eps=0.5, beta=0.5)
    plain = oni.optimal_noise(model, x, phi, **settings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = oni.optimal_noise(model, x, phi, **settings)
        radius = oni.robustness_radius(model, x)
    for field in ("eta", "entropy", "feasible", "radius"):
        assert torch.equal(getattr(plain, field), getattr(inside, field)), field
    assert torch.equal(radius, plain.radius)
    # phi computed inside (phi=None): the kernel's walk op failed under the autocast
    own = dict(settings, shapley_kwargs={"n_permutations": 8}, max_iter=20)
    plain = oni.optimal_noise(model, x, **own)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = oni.optimal_noise(model, x, **own)
    for field in ("eta", "entropy", "feasible", "radius"):
        assert torch.equal(getattr(plain, field), getattr(inside, field)), field


def _radius_and_solver_calls(model, x):
    """robustness_radius and optimal_noise on ``model`` and ``x``: the checks of the model
    that both make before any work."""
    return (lambda: oni.robustness_radius(model, x),
            lambda: oni.optimal_noise(model, x, torch.rand(x.shape), tau_fraction=0.5, eps=0.5,
                                      beta=0.5))


def test_a_train_mode_model_with_running_statistics_is_refused_untouched():
    """Every forward updated a training BatchNorm's running statistics (the caller's model
    changed), then the solver failed inside torch on a one-row batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 5))
    x = torch.rand(6, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in _radius_and_solver_calls(model, x):
        with pytest.raises(ValueError, match=r"training mode with normalisation layers that "
                                             r"track running statistics \(\['1'\]\)"):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    assert torch.isfinite(oni.robustness_radius(model, x)).all()  # in eval mode it runs


@pytest.mark.filterwarnings("ignore:.*cannot reach entropy tau")
def test_noise_inputs_of_fuzz_pass_10_get_messages():
    model, x, phi = _fuzz10_problem()
    settings = dict(tau_fraction=0.6, eps=0.5, beta=0.5)

    class Wrapped(torch.nn.Module):  # not a Sequential: no first-layer check applies
        def __init__(self):
            super().__init__()
            self.inner = small_mlp(8, k=5, seed=3, scale=2.0).double()
            self.eval()

        def forward(self, z):
            return self.inner(z)

    with pytest.raises(RuntimeError, match=r"the model failed on x's rows 0 to 11 "
                                           r"\(torch\.float32, shape \(12, 8\); its first "
                                           r"parameter is torch\.float64\)"):
        oni.optimal_noise(Wrapped(), x, phi, **settings)

    def int_logits(z):
        return model(z).round().long()

    for bad in (int_logits, lambda z: model(z).to(torch.complex64)):
        with pytest.raises(TypeError, match="must be real floating class scores"):
            oni.robustness_radius(bad, x)
    with pytest.raises(ValueError, match=r"shapley_kwargs sets \['backend', 'seed'\], which "
                                         r"optimal_noise passes"):
        oni.optimal_noise(model, x, None, **settings,
                          shapley_kwargs={"seed": 1, "backend": "torch"})
    with pytest.raises(ValueError, match="x is on the meta device"):
        oni.optimal_noise(model, x.to("meta"), phi, **settings)
    with pytest.raises(ValueError, match="phi is on the meta device"):
        oni.noise_budget(phi.to("meta"), 0.5, 0.5)
    # a phi with requires_grad gave budgets and eta with a graph
    res = oni.optimal_noise(model, x, phi.clone().requires_grad_(), **settings)
    assert not res.eta.requires_grad and not res.budget.requires_grad


def test_reference_noise_ops_check_their_inputs_as_the_kernels_do():
    """The executable spec took int64 logits (entropy truncated to int) and 3-D ones, and
    gave torch's broadcast error for a wrong step shape."""
    with pytest.raises(TypeError, match="logits must be a float32 or float64 tensor, got "
                                        "torch.int64"):
        reference.entropy_and_grad(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must be 2-D \[N, k\]"):
        reference.entropy_and_grad(torch.ones(2, 3, 4))
    eta = torch.zeros(3, 4)
    args = dict(direction=torch.ones(3, 4), step=torch.ones(3), budget=torch.ones(3, 4),
                radius=torch.ones(3), active=torch.ones(3, dtype=torch.bool))
    reference.ascend_and_project(eta, **args)
    for name, bad in (("step", torch.ones(2)), ("budget", torch.ones(3, 4).double()),
                      ("active", torch.ones(3))):
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            reference.ascend_and_project(eta, **{**args, name: bad})


def test_a_model_returning_probabilities_is_refused():
    """With a final nn.Softmax the entropy was that of softmax(probabilities), near log k:
    every row read as meeting tau, feasible with no noise at all."""
    model = torch.nn.Sequential(small_mlp(8, k=5, seed=1), torch.nn.Softmax(1)).eval()
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    for call in _radius_and_solver_calls(model, x):
        with pytest.raises(ValueError, match=r"look like probabilities .*drop its final "
                                             r"Softmax, or return log-probabilities"):
            call()
    with pytest.warns(UserWarning, match="look like probabilities"):  # a few rows: chance
        oni.robustness_radius(model, x[:3])
