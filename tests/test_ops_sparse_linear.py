"""oni::sparse_input_linear and oni::sparse_input_weight_grad (the first layer of K shadow
models on mostly-zero inputs) against their twins in oni.reference, on every device present:
the STYLE.md float32 rule, ragged shapes, poisoned outputs, strided inputs, thread-count
independence, skipped zeros, opcheck and bad input."""
import pytest
import torch

from oni import _ops, reference
from helpers import devices

DEVICES = devices(("sparse_input_linear", "sparse_input_weight_grad"))

# K, B, d, H, density: ragged column blocks (H not a multiple of 64), B not a multiple of
# anything, d = 1, rows with no non-zero, one non-zero per row, Texas-sized d, fully dense
CASES = [
    (3, 37, 50, 130, 0.1),
    (2, 1, 1, 1, 1.0),
    (2, 5, 600, 64, 0.0),
    (2, 9, 40, 70, "one"),
    (1, 8, 6170, 70, 0.02),
    (4, 16, 30, 200, 1.0),
    (2, 128, 600, 1024, 0.1),
    (2, 37, 50, 300, 0.1),  # a second block of 256 columns, ragged (CUDA)
]


def _inputs(K, B, d, H, density, seed=0, binary=False):
    gen = torch.Generator().manual_seed(seed)
    if density == "one":
        mask = torch.zeros(K, B, d)
        mask.view(K * B, d)[torch.arange(K * B), torch.randint(d, (K * B,), generator=gen)] = 1
    else:
        mask = (torch.rand(K, B, d, generator=gen) < density).float()
    x = mask if binary else mask * torch.randn(K, B, d, generator=gen)
    weight_t = torch.randn(K, d, H, generator=gen) / max(d * max(density, 0.01)
                                                         if density != "one" else 1, 1) ** 0.5
    bias = torch.randn(K, H, generator=gen)
    grad = torch.randn(K, B, H, generator=gen)
    return x, weight_t, bias, grad


def _weight_grad(fn, x, grad):
    out = torch.full((x.shape[0], x.shape[2], grad.shape[2]), float("nan"), dtype=x.dtype,
                     device=x.device)  # poisoned: every element must be written
    fn(x, grad, out)
    return out


def _assert_style_rule(got, twin, exact, what):
    """Error against float64 at most twice that of the twin in float32 (STYLE.md), with a
    floor of a few float32 ulps of the result's scale for results the twin gets exactly."""
    err = (got.double() - exact).abs().max().item()
    twin_err = (twin.double() - exact).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * max(exact.abs().max().item(), 1.0)
    assert err <= 2 * twin_err + floor, f"{what}: error {err:.3e}, twin {twin_err:.3e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("binary", [True, False])
def test_kernels_match_the_twin(device, case, binary):
    x, weight_t, bias, grad = (t.to(device) for t in _inputs(*case, binary=binary))
    out = _ops.sparse_input_linear(x, weight_t, bias)
    assert out.shape == (case[0], case[1], case[3]) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    exact = reference.sparse_input_linear(x.double(), weight_t.double(), bias.double())
    _assert_style_rule(out, reference.sparse_input_linear(x, weight_t, bias), exact, "forward")

    got = _weight_grad(_ops.sparse_input_weight_grad, x, grad)
    assert torch.isfinite(got).all()
    exact = _weight_grad(reference.sparse_input_weight_grad, x.double(), grad.double())
    twin = _weight_grad(reference.sparse_input_weight_grad, x, grad)
    _assert_style_rule(got, twin, exact, "weight grad")


@pytest.mark.parametrize("device", DEVICES)
def test_no_bias_float64_and_strided_inputs(device):
    x, weight_t, bias, grad = (t.to(device) for t in _inputs(3, 21, 45, 100, 0.2))
    torch.testing.assert_close(_ops.sparse_input_linear(x, weight_t, None),
                               reference.sparse_input_linear(x, weight_t, None))
    x64, w64, b64, g64 = x.double(), weight_t.double(), bias.double(), grad.double()
    torch.testing.assert_close(_ops.sparse_input_linear(x64, w64, b64),
                               reference.sparse_input_linear(x64, w64, b64), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(_weight_grad(_ops.sparse_input_weight_grad, x64, g64),
                               _weight_grad(reference.sparse_input_weight_grad, x64, g64),
                               rtol=1e-12, atol=1e-12)
    # transposed views of the same values (not contiguous) give the same results
    x_s = x.transpose(1, 2).contiguous().transpose(1, 2)
    w_s = weight_t.transpose(1, 2).contiguous().transpose(1, 2)
    b_s = torch.stack([bias, bias], 2)[..., 0]
    g_s = grad.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (x_s.is_contiguous() or w_s.is_contiguous() or b_s.is_contiguous()
                or g_s.is_contiguous())
    assert torch.equal(_ops.sparse_input_linear(x_s, w_s, b_s),
                       _ops.sparse_input_linear(x, weight_t, bias))
    assert torch.equal(_weight_grad(_ops.sparse_input_weight_grad, x_s, g_s),
                       _weight_grad(_ops.sparse_input_weight_grad, x, grad))


def test_results_do_not_depend_on_the_thread_count():
    x, weight_t, bias, grad = _inputs(5, 33, 300, 260, 0.1, binary=True)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((_ops.sparse_input_linear(x, weight_t, bias),
                            _weight_grad(_ops.sparse_input_weight_grad, x, grad)))
    finally:
        torch.set_num_threads(threads)
    for fwd, wgrad in results[1:]:
        assert torch.equal(fwd, results[0][0]) and torch.equal(wgrad, results[0][1])


@pytest.mark.parametrize("device", DEVICES)
def test_zeros_are_skipped(device):
    """Where x is 0 the weight row is never read: an infinite weight there gives no NaN (a
    dense product would give 0 * inf = NaN); where x is not 0 it is used."""
    x, weight_t, bias, grad = (t.to(device) for t in _inputs(2, 6, 20, 70, 0.3))
    x[:, :, 3] = 0
    weight_t[:, 3, :] = float("inf")
    out = _ops.sparse_input_linear(x, weight_t, bias)
    assert torch.isfinite(out).all()
    weight_t[:, 3, :] = 0
    torch.testing.assert_close(out, reference.sparse_input_linear(x, weight_t, bias))
    wgrad = _weight_grad(_ops.sparse_input_weight_grad, x, grad)
    assert torch.equal(wgrad[:, 3, :], torch.zeros_like(wgrad[:, 3, :]))  # x[:, :, 3] == 0
    x[0, 1, 3] = float("nan")  # a NaN input is not a zero: it reaches the output
    assert torch.isnan(_ops.sparse_input_linear(x, weight_t, bias)[0, 1]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 5, 6), (2, 0, 5, 6), (2, 4, 0, 6), (2, 4, 5, 0)])
def test_empty_shapes(device, shape):
    K, B, d, H = shape
    x = torch.zeros(K, B, d, device=device)
    weight_t = torch.randn(K, d, H, device=device)
    bias = torch.randn(K, H, device=device)
    out = _ops.sparse_input_linear(x, weight_t, bias)
    assert out.shape == (K, B, H)
    torch.testing.assert_close(out, reference.sparse_input_linear(x, weight_t, bias))
    grad = torch.randn(K, B, H, device=device)
    got = _weight_grad(_ops.sparse_input_weight_grad, x, grad)
    torch.testing.assert_close(got, _weight_grad(reference.sparse_input_weight_grad, x, grad))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, weight_t, bias, grad = (t.to(device) for t in _inputs(2, 7, 30, 90, 0.2))
    torch.library.opcheck(torch.ops.oni.sparse_input_linear.default, (x, weight_t, bias))
    torch.library.opcheck(torch.ops.oni.sparse_input_linear.default, (x, weight_t, None))
    out = torch.empty(2, 30, 90, device=device)
    torch.library.opcheck(torch.ops.oni.sparse_input_weight_grad.default, (x, grad, out))


def _good():
    x, weight_t, bias, grad = _inputs(2, 4, 5, 6, 0.5)
    return x, weight_t, bias, grad, torch.empty(2, 5, 6)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "x": a["x"][0]}, "x must be 3-D"),
    (lambda a: {**a, "x": a["x"].long()}, "x must be float32 or float64"),
    (lambda a: {**a, "weight_t": a["weight_t"][:1]}, "weight_t must be \\[K, d, H\\]"),
    (lambda a: {**a, "weight_t": a["weight_t"].transpose(1, 2)}, "weight_t must be \\[K, d, H\\]"),
    (lambda a: {**a, "weight_t": a["weight_t"].double()}, "weight_t must have x's dtype"),
    (lambda a: {**a, "bias": a["bias"][:, :5]}, "bias must be \\[K, H\\]"),
    (lambda a: {**a, "bias": a["bias"].double()}, "bias must have x's dtype"),
])
def test_forward_rejects_bad_input(change, message):
    x, weight_t, bias, _, _ = _good()
    args = change({"x": x, "weight_t": weight_t, "bias": bias})
    with pytest.raises(RuntimeError, match=message):
        _ops.sparse_input_linear(args["x"], args["weight_t"], args["bias"])


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "x": a["x"][0]}, "x must be 3-D"),
    (lambda a: {**a, "grad": a["grad"][:, :3]}, "grad must be \\[K, B, H\\]"),
    (lambda a: {**a, "grad": a["grad"].double()}, "grad must have x's dtype"),
    (lambda a: {**a, "out": a["out"][:, :4]}, "out must be \\[K, d, H\\]"),
    (lambda a: {**a, "out": a["out"].double()}, "out must have x's dtype"),
    (lambda a: {**a, "out": torch.empty(2, 6, 5).transpose(1, 2)}, "out must be contiguous"),
])
def test_weight_grad_rejects_bad_input(change, message):
    x, _, _, grad, out = _good()
    args = change({"x": x, "grad": grad, "out": out})
    with pytest.raises(RuntimeError, match=message):
        _ops.sparse_input_weight_grad(args["x"], args["grad"], args["out"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_are_rejected():
    x, weight_t, bias, grad, out = _good()
    with pytest.raises(RuntimeError, match="weight_t must be on x's device"):
        _ops.sparse_input_linear(x, weight_t.cuda(), bias)
    with pytest.raises(RuntimeError, match="out must be on x's device"):
        _ops.sparse_input_weight_grad(x, grad, out.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_wider_than_one_launch_on_cuda():
    """H past the grid's y limit (65535 blocks of 256 columns): the kernels loop over the
    columns instead of refusing (the emulation runs the same loops at a lowered limit)."""
    H = 65535 * 256 + 300
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([[[1.0, 0.0, -2.0], [0.0, 0.5, 0.0]]])  # [1, 2, 3]
    weight_t = torch.randn(1, 3, H, generator=gen)
    bias = torch.randn(1, H, generator=gen)
    out = _ops.sparse_input_linear(x.cuda(), weight_t.cuda(), bias.cuda()).cpu()
    torch.testing.assert_close(out, reference.sparse_input_linear(x, weight_t, bias))
    grad = torch.randn(1, 2, H, generator=gen)
    got = _weight_grad(_ops.sparse_input_weight_grad, x.cuda(), grad.cuda()).cpu()
    torch.testing.assert_close(got, _weight_grad(reference.sparse_input_weight_grad, x, grad))
