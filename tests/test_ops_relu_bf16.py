"""oni::relu_bf16_ and oni::relu_backward_bf16_ (the bfloat16 ReLU passes of shadow
training) against their twins in oni.reference, on every device present."""
import math

import pytest
import torch

from oni import _ops, reference
from helpers import devices

DEVICES = devices(_ops.TRAIN_OPS)
BF16 = torch.bfloat16
# patterns the masks must get right: +-0, +-inf, NaNs of both signs, the smallest subnormal
SPECIALS = torch.tensor([0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0xffc0, 0x7f81, 0x0001, 0x8001],
                        dtype=torch.int32).to(torch.int16).view(BF16)


def _activations(shape, seed, device, specials=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(BF16)
    flat = x.view(-1)
    if specials and flat.numel():
        n = min(flat.numel(), SPECIALS.numel())
        where = torch.randperm(flat.numel(), generator=gen)[:n]
        flat[where] = SPECIALS[:n]
    return x.to(device)


def _bits(t):
    return t.view(torch.int16)


SHAPES = [(0,), (1,), (15,), (16,), (17,), (3, 5, 1), (4, 37, 128), (2, 3, 130), (1000,),
          (2, 70_001)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_matches_reference(device, shape):
    x = _activations(shape, seed=len(shape) + shape[-1], device=device)
    got, want = x.clone(), x.clone()
    _ops.relu_bf16_(got)
    reference.relu_bf16_(want)
    assert got.dtype == BF16 and got.shape == x.shape
    # the same bits as torch.relu (-0 kept), NaN where x was NaN
    assert torch.equal(got.isnan(), x.isnan())
    keep = ~x.isnan()
    assert torch.equal(_bits(got[keep]), _bits(want[keep]))
    assert (got[keep] >= 0).all()
    assert torch.equal(got[x > 0], x[x > 0])  # positives untouched, bit for bit
    assert torch.equal(_bits(got[x > 0]), _bits(x[x > 0]))


@pytest.mark.parametrize("device", DEVICES)
def test_relu_zeroes_negatives_keeps_nan_and_inf(device):
    x = SPECIALS.to(device).clone()
    _ops.relu_bf16_(x)
    values = x.float().tolist()
    assert values[:4] == [0.0, 0.0, float("inf"), 0.0]
    assert [math.copysign(1.0, v) for v in values[:2]] == [1.0, -1.0]  # -0 kept, as torch
    assert all(v != v for v in values[4:7])  # NaNs of both signs stay NaN
    assert values[7] > 0 and values[8] == 0.0  # +subnormal kept, -subnormal zeroed


def _exact_bias(grad, output):
    """float64 sum of the gradients threshold_backward lets through."""
    passes = ~(output.double() <= 0)
    return torch.where(passes, grad.double(), 0.0).sum(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) > 1 or s[0] > 0] + [(4, 0)])
def test_relu_backward_matches_reference(device, shape):
    seed = sum(shape)
    output = _activations(shape, seed, device)
    reference.relu_bf16_(output)
    output.view(-1)[:SPECIALS.numel()] = SPECIALS.to(device)[:output.numel()]
    grad = _activations(shape, seed + 1, device, specials=False)
    got_grad, want_grad = grad.clone(), grad.clone()
    rows = shape[:-1]
    got_bias = torch.full(rows, float("nan"), dtype=BF16, device=device)  # poisoned
    want_bias = torch.empty(rows, dtype=BF16, device=device)
    _ops.relu_backward_bf16_(got_grad, output, got_bias)
    reference.relu_backward_bf16_(want_grad, output, want_bias)
    assert torch.equal(_bits(got_grad), _bits(want_grad))  # a mask: bit for bit
    # the sums: one float32 sum rounded once to bfloat16, in the kernel's own order. Error
    # against float64 at most twice the twin's, or half a bfloat16 ulp plus the float32
    # sum's own rounding where the twin happened to land exactly
    exact = _exact_bias(grad, output)
    err_got = (got_bias.double() - exact).abs()
    err_want = (want_bias.double() - exact).abs()
    magnitude = torch.where(~(output.double() <= 0), grad.double(), 0.0).abs().sum(-1)
    half_ulp = exact.abs() * 2.0 ** -8 + 1e-40
    bound = torch.maximum(2 * err_want, half_ulp) + shape[-1] * 2.0 ** -23 * magnitude
    assert (err_got <= bound).all(), float((err_got - bound).max())
    assert not got_bias.isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_relu_backward_passes_gradient_where_threshold_backward_does(device):
    """Positive and NaN outputs pass their gradient (threshold_backward's !(output <= 0));
    zeros of both signs, negatives and -inf pass nothing."""
    output = SPECIALS.to(device).view(1, -1)
    grad = torch.arange(1, SPECIALS.numel() + 1, dtype=BF16, device=device).view(1, -1)
    bias = torch.empty(1, dtype=BF16, device=device)
    _ops.relu_backward_bf16_(grad, output, bias)
    # 0, -0, +inf, -inf, NaN, -NaN, NaN, +subnormal, -subnormal
    assert grad.float().view(-1).tolist() == [0, 0, 3, 0, 5, 6, 7, 8, 0]
    assert float(bias) == 29.0


@pytest.mark.parametrize("device", DEVICES)
def test_relu_backward_on_an_empty_last_dim_gives_zero_sums(device):
    grad = torch.empty(3, 0, dtype=BF16, device=device)
    bias = torch.full((3,), 7.0, dtype=BF16, device=device)
    _ops.relu_backward_bf16_(grad, grad.clone(), bias)
    assert torch.equal(bias, torch.zeros(3, dtype=BF16, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = _activations((3, 5, 33), 0, device)
    torch.library.opcheck(torch.ops.oni.relu_bf16_.default, (x,))
    output = x.clone()
    _ops.relu_bf16_(output)
    grad = _activations((3, 5, 33), 1, device, specials=False)
    bias = torch.empty(3, 5, dtype=BF16, device=device)
    torch.library.opcheck(torch.ops.oni.relu_backward_bf16_.default, (grad, output, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_relu_refuses_bad_tensors(device):
    with pytest.raises(RuntimeError, match="x must be bfloat16, got Float"):
        _ops.relu_bf16_(torch.randn(4, device=device))
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        _ops.relu_bf16_(torch.randn(4, 4, device=device).to(BF16).t())


def _backward_args(device="cpu"):
    grad = torch.randn(2, 3, 8, device=device).to(BF16)
    return [grad, grad.clone().relu_(), torch.empty(2, 3, dtype=BF16, device=device)]


# each bad tensor made on the device under test (a copy would lose the strides)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index, make_bad, message", [
    (0, lambda dev: torch.randn(2, 3, 8, device=dev), "grad must be bfloat16, got Float"),
    (1, lambda dev: torch.randn(2, 3, 8, device=dev).half(), "output must be bfloat16, got Half"),
    (2, lambda dev: torch.empty(2, 3, device=dev), "bias_grad must be bfloat16, got Float"),
    (0, lambda dev: torch.randn(2, 8, 3, device=dev).to(BF16).transpose(1, 2),
     "grad must be contiguous"),
    (1, lambda dev: torch.randn(2, 3, 16, device=dev).to(BF16)[:, :, ::2],
     "output must be contiguous"),
    (1, lambda dev: torch.randn(2, 3, 9, device=dev).to(BF16),
     r"output must have grad's shape \[2, 3, 8\], got \[2, 3, 9\]"),
    (2, lambda dev: torch.empty(2, 3, 8, dtype=BF16, device=dev),
     r"bias_grad must be grad's shape without its last dim \[2, 3\], got \[2, 3, 8\]"),
    (0, lambda dev: torch.tensor(1.0, dtype=BF16, device=dev), "grad must be at least 1-D"),
])
def test_relu_backward_refuses_bad_tensors(device, index, make_bad, message):
    args = _backward_args(device)
    args[index] = make_bad(device)
    with pytest.raises(RuntimeError, match=message):
        _ops.relu_backward_bf16_(*args)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs the CUDA kernels")
def test_relu_backward_refuses_a_cpu_tensor_on_cuda():
    args = _backward_args("cuda")
    args[1] = args[1].cpu()
    with pytest.raises(RuntimeError, match="output must be on grad's device cuda"):
        _ops.relu_backward_bf16_(*args)


def test_relu_backward_refuses_another_device():
    """A tensor on another device than grad (the CPU kernel called directly: the dispatcher
    would otherwise route a mixed CPU/meta call to the fake kernel)."""
    args = _backward_args()
    args[1] = torch.empty(2, 3, 8, dtype=BF16, device="meta")
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match="output must be on grad's device cpu, got meta"):
        torch.ops.oni.relu_backward_bf16_.default.redispatch(cpu, *args)
