"""oni::adam_step_bf16 (the fused mixed-precision Adam step of shadow training) against its
twin in oni.reference and against torch.optim.Adam, on every device present."""
import math

import pytest
import torch

from oni import _ops, reference
from helpers import devices

DEVICES = devices(_ops.TRAIN_OPS)
LR, BETA1, BETA2, EPS = 1e-3, 0.9, 0.999, 1e-8
TINY = 1e-30


def _state(n, device, seed=0, step=1):
    """Random float32 parameters and moments (zero moments at step 1, as Adam starts), a
    bfloat16 gradient, and a bfloat16 copy buffer filled with garbage."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=gen)
    if step == 1:
        exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    else:
        exp_avg = torch.randn(n, generator=gen) * 0.1
        exp_avg_sq = torch.rand(n, generator=gen) * 0.01
    grad = (torch.randn(n, generator=gen) * 0.5).to(torch.bfloat16)
    low = torch.full((n,), 7.0, dtype=torch.bfloat16)
    return [t.to(device) for t in (param, exp_avg, exp_avg_sq, low, grad)]


def _run(fn, state, step, weight_decay=0.0, flush_below=TINY, lr=LR):
    out = [t.clone() for t in state]
    fn(*out, step, lr, BETA1, BETA2, EPS, weight_decay, flush_below)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 7, 33, 1000, 70_001])  # 70,001: several odd chunks
@pytest.mark.parametrize("step", [1, 2, 1000])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_step_matches_reference(device, n, step, weight_decay):
    state = _state(n, device, seed=n + step, step=step)
    got = _run(_ops.adam_step_bf16, state, step, weight_decay)
    want = _run(reference.adam_step_bf16, state, step, weight_decay)
    for name, g, w in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, msg=name)
    # the bfloat16 copy is the kernel's own new parameter rounded to nearest even
    assert got[3].dtype == torch.bfloat16
    assert torch.equal(got[3], got[0].to(torch.bfloat16))
    assert torch.equal(got[4], state[4])  # the gradient is read only


@pytest.mark.parametrize("device", DEVICES)
def test_first_step_bias_correction(device):
    """Step 1 from zero moments: the corrected moments are g and g^2, so every parameter
    moves by lr * g / (|g| + eps), i.e. lr in the direction against its gradient."""
    param, exp_avg, exp_avg_sq, low, grad = _state(500, device, seed=3)
    start = param.clone()
    _ops.adam_step_bf16(param, exp_avg, exp_avg_sq, low, grad, 1, LR, BETA1, BETA2, EPS, 0.0,
                        TINY)
    g = grad.double()
    expected = start.double() - LR * g / (g.abs() + EPS)
    torch.testing.assert_close(param.double(), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(exp_avg, (0.1 * g).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(exp_avg_sq, (0.001 * g * g).float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_torch_adam_over_steps(device, weight_decay, fused):
    """Twenty steps from the same start and gradients: the op is torch.optim.Adam's update
    (train_model's optimiser) to float rounding. flush_below=0: no flush, as in Adam."""
    if fused and device == "cuda":
        pytest.skip("torch's fused Adam on CUDA is compared on the CPU")
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(3001, generator=gen)
    grads = [(torch.randn(3001, generator=gen) * 0.3).to(torch.bfloat16) for _ in range(20)]
    param = start.clone().to(device)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    low = torch.empty_like(param, dtype=torch.bfloat16)
    adam_param = start.clone().to(device).requires_grad_()
    adam = torch.optim.Adam([adam_param], lr=LR, weight_decay=weight_decay, fused=fused)
    for step, grad in enumerate(grads, 1):
        grad = grad.to(device)
        _ops.adam_step_bf16(param, exp_avg, exp_avg_sq, low, grad, step, LR, BETA1, BETA2, EPS,
                            weight_decay, 0.0)
        adam_param.grad = grad.float()
        adam.step()
    state = adam.state[adam_param]
    torch.testing.assert_close(param, adam_param.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert torch.equal(low, param.to(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_moments_are_flushed(device):
    """Moments that end the step below flush_below become exactly 0 (no subnormals); the
    others are Adam's; flush_below=0 keeps even subnormal ones."""
    n = 8
    param = torch.ones(n, device=device)
    exp_avg = torch.tensor([5e-31, -5e-31, 1e-20, -1e-20, 1e-38, 0, 0, 0], device=device)
    exp_avg_sq = torch.tensor([5e-31, 1e-20, 1e-38, 0, 0, 0, 0, 0], device=device)
    grad = torch.zeros(n, dtype=torch.bfloat16, device=device)
    low = torch.empty(n, dtype=torch.bfloat16, device=device)
    state = [param, exp_avg, exp_avg_sq, low, grad]
    flushed = _run(_ops.adam_step_bf16, state, 5)
    f32 = dict(device=device, dtype=torch.float32)
    zero_m, zero_v = [0, 1, 4, 5, 6, 7], [0, 2, 3, 4, 5, 6, 7]
    assert torch.equal(flushed[1][zero_m], torch.zeros(6, **f32))
    assert torch.equal(flushed[2][zero_v], torch.zeros(7, **f32))
    torch.testing.assert_close(flushed[1][2:4], torch.tensor([1e-20, -1e-20], **f32) * BETA1,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(flushed[2][1], torch.tensor(1e-20 * BETA2, **f32), rtol=1e-6,
                               atol=0)
    kept = _run(_ops.adam_step_bf16, state, 5, flush_below=0.0)
    assert 0 < float(kept[1][4]) < torch.finfo(torch.float32).tiny  # subnormal, kept
    for got, want in zip(flushed, _run(reference.adam_step_bf16, state, 5)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # the same zeros


@pytest.mark.parametrize("device", DEVICES)
def test_nan_gradient_propagates(device):
    state = _state(5, device)
    state[4][2] = float("nan")
    param, _, _, low, _ = _run(_ops.adam_step_bf16, state, 1)
    assert param[2].isnan() and low[2].isnan()
    assert not param[[0, 1, 3, 4]].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_no_decay_term_without_weight_decay(device):
    """weight_decay = 0 adds nothing, as torch.optim.Adam and the twin: an infinite
    parameter stays infinite with finite moments (0 * inf would make the step NaN); with
    decay the twin's NaN is matched."""
    for weight_decay in (0.0, 0.01):
        state = _state(4, device)
        state[0][1], state[0][2] = math.inf, -math.inf
        got = _run(_ops.adam_step_bf16, state, 1, weight_decay)
        want = _run(reference.adam_step_bf16, state, 1, weight_decay)
        for g, w in zip(got[:4], want[:4]):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7, equal_nan=True)
        if weight_decay == 0.0:
            assert got[0][1] == math.inf and got[0][2] == -math.inf
            assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    state = _state(37, device, step=2)
    torch.library.opcheck(torch.ops.oni.adam_step_bf16.default,
                          (*state, 2, LR, BETA1, BETA2, EPS, 0.01, TINY))


def _bad(name, fn):
    def mutate(state):
        names = ["param", "exp_avg", "exp_avg_sq", "param_bf16", "grad_bf16"]
        state = list(state)
        state[names.index(name)] = fn(state[names.index(name)])
        return state
    return mutate


BAD_TENSORS = [
    (_bad("param", lambda t: t.double()), "param must be float32, got Double"),
    (_bad("exp_avg", lambda t: t.to(torch.bfloat16)), "exp_avg must be Float, got BFloat16"),
    (_bad("exp_avg_sq", lambda t: t.half()), "exp_avg_sq must be Float, got Half"),
    (_bad("param_bf16", lambda t: t.float()), "param_bf16 must be BFloat16, got Float"),
    (_bad("grad_bf16", lambda t: t.float()), "grad_bf16 must be BFloat16, got Float"),
    (_bad("exp_avg", lambda t: t[:-1]), r"exp_avg must have param's shape \[10\], got \[9\]"),
    (_bad("grad_bf16", lambda t: t.view(2, 5)), r"grad_bf16 must have param's shape \[10\]"),
    (_bad("param_bf16", lambda t: torch.empty(20, dtype=t.dtype, device=t.device)[::2]),
     "param_bf16 must be contiguous"),
    (_bad("exp_avg_sq", lambda t: torch.zeros(10, 2, device=t.device)[:, 0]),
     "exp_avg_sq must be contiguous"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mutate, message", BAD_TENSORS)
def test_bad_tensors_are_refused(device, mutate, message):
    state = mutate(_state(10, device))
    with pytest.raises(RuntimeError, match=message):
        _ops.adam_step_bf16(*state, 1, LR, BETA1, BETA2, EPS, 0.0, TINY)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_param_is_refused(device):
    state = _state(10, device)
    state[0] = torch.randn(20, device=device)[::2]
    with pytest.raises(RuntimeError, match="param must be contiguous"):
        _ops.adam_step_bf16(*state, 1, LR, BETA1, BETA2, EPS, 0.0, TINY)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels")
def test_state_on_another_device_is_refused_on_cuda():
    state = _state(10, "cuda")
    state[1] = state[1].cpu()
    with pytest.raises(RuntimeError, match="exp_avg must be on param's device cuda"):
        _ops.adam_step_bf16(*state, 1, LR, BETA1, BETA2, EPS, 0.0, TINY)


def test_wrong_device_is_refused():
    """A tensor on another device than param (the CPU kernel called directly: the
    dispatcher would otherwise route a mixed CPU/meta call to the fake kernel)."""
    state = _state(10, "cpu")
    state[1] = torch.empty(10, device="meta")
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="exp_avg must be on param's device cpu, got meta"):
        torch.ops.oni.adam_step_bf16.default.redispatch(
            cpu, *state, 1, LR, BETA1, BETA2, EPS, 0.0, TINY)


@pytest.mark.parametrize("scalars, message", [
    (dict(step=0), "step must be >= 1"),
    (dict(lr=-1.0), "lr must be >= 0"),
    (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
    (dict(beta2=-0.1), r"beta2 must be in \[0, 1\)"),
    (dict(eps=-1e-8), "eps must be >= 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(flush_below=math.nan), "flush_below must be >= 0"),
])
@pytest.mark.parametrize("device", DEVICES)
def test_bad_scalars_are_refused(device, scalars, message):
    args = dict(step=1, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, weight_decay=0.0,
                flush_below=TINY)
    args.update(scalars)
    with pytest.raises(RuntimeError, match=message):
        _ops.adam_step_bf16(*_state(10, device), *args.values())
