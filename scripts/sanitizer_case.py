"""A small workload that runs every oni CUDA kernel on every path, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python scripts/sanitizer_case.py
    compute-sanitizer --tool racecheck python scripts/sanitizer_case.py

Covers float32 and float64, B > 1 references, ragged active counts (0, 1, many), walks longer
than one kernel tile (256 steps), feature tiles (d > 1024), H not a multiple of the block,
strided and expanded inputs, the global-memory validation path (n_features > 196,608), and
rejected inputs (which must raise before any kernel reads with them). Results are checked
against the CPU kernels, so a silent wrong answer fails too. Exits non-zero on any mismatch.
Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so memcheck sees every buffer's true bounds.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import oni  # noqa: E402
from oni import _ops, reference  # noqa: E402
from oni.shapley import _walk_permutations  # noqa: E402

DEV = "cuda"


def walk_inputs(counts, d, n_refs, n_walks, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    n = len(counts)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    base = torch.randn(n, n_refs, d, generator=gen, dtype=dtype)
    active = torch.zeros(n, d, dtype=torch.bool)
    for row, a in enumerate(counts):
        active[row, torch.randperm(d, generator=gen)[:a]] = True
    n_active = active.sum(1)
    order = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices
    length = int(n_active.max())
    perm = _walk_permutations(seed, torch.arange(n), 0, n_walks // 2, order[:, :length],
                              n_active, antithetic=True)
    return x, base, perm, n_active, reference.interior_steps(n_active, n_walks, n_refs)


def on(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]


def check(name, got, want, exact=False):
    got = [g.cpu() for g in (got if isinstance(got, tuple) else (got,))]
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        if exact:
            ok = torch.equal(g, w)
        else:  # float32: GPU and CPU sum in different orders (the walk origins' matmul)
            tol = 1e-10 if g.dtype == torch.float64 else 1e-4
            ok = torch.allclose(g.double(), w.double(), rtol=tol, atol=tol)
        if not ok:
            raise SystemExit(f"[sanitizer case] MISMATCH in {name}")
    print(f"[sanitizer case] ok: {name}", flush=True)


def expect_error(name, fn, message):
    try:
        fn()
    except RuntimeError as err:
        if message not in str(err):
            raise SystemExit(f"[sanitizer case] {name}: unexpected error {err}")
        print(f"[sanitizer case] ok: {name} rejected", flush=True)
        return
    raise SystemExit(f"[sanitizer case] {name}: bad input was accepted")


def main():
    if not (torch.cuda.is_available() and _ops.has_kernel("cuda", _ops.SHAPLEY_OPS)):
        raise SystemExit(f"[sanitizer case] needs a CUDA device and CUDA kernels "
                         f"(oni.build_info(): {oni.build_info()})")
    for dtype in (torch.float32, torch.float64):
        tag = str(dtype).replace("torch.", "")
        # a = 300 crosses the 256-step tiles; d = 1500 crosses the 1024-feature tiles
        cpu = walk_inputs([0, 1, 2, 300, 17], d=1500, n_refs=2, n_walks=4, seed=1, dtype=dtype)
        x, base, perm, n_active, total = on(DEV, *cpu)
        gen = torch.Generator().manual_seed(2)
        w = torch.randn(300, 1500, generator=gen, dtype=dtype) / 40
        b = torch.randn(300, generator=gen, dtype=dtype)
        check(f"walk_linear {tag}",
              _ops.permutation_walk_linear(x, base, perm, n_active, w.to(DEV), b.to(DEV), total),
              _ops.permutation_walk_linear(*cpu[:4], w, b, total))
        check(f"walk_linear no bias, strided x, expanded baseline {tag}",
              _ops.permutation_walk_linear(x.t().contiguous().t(), base[:1].expand(5, -1, -1),
                                           perm, n_active, w.to(DEV), None, total),
              _ops.permutation_walk_linear(cpu[0], cpu[1][:1].expand(5, -1, -1).contiguous(),
                                           cpu[2], cpu[3], w, None, total))
        check(f"walk_masked {tag}", _ops.permutation_walk_masked(x, base, perm, n_active, total),
              _ops.permutation_walk_masked(*cpu), exact=True)
        for k, softmax in ((1, True), (3, False), (40, True)):
            steps = torch.randn(total, k, generator=gen, dtype=dtype)
            start = torch.randn(5, 2, k, generator=gen, dtype=dtype)
            end = torch.randn(5, k, generator=gen, dtype=dtype)
            target = torch.randint(0, k, (5,), generator=gen)
            args = (steps, start, end, target, cpu[2], cpu[3], 1500, 2, softmax)
            check(f"accumulate k={k} softmax={softmax} {tag}",
                  _ops.shapley_accumulate(*on(DEV, *args)), _ops.shapley_accumulate(*args))
        args = on(DEV, steps.t().contiguous().t(), start[:1].expand(5, -1, -1), end, target,
                  cpu[2], cpu[3], 1500, 1, True)
        check(f"accumulate strided/expanded {tag}", _ops.shapley_accumulate(*args),
              _ops.shapley_accumulate(steps, start[:1].expand(5, -1, -1).contiguous(), end,
                                      target, cpu[2], cpu[3], 1500, 1, True))

    # validation bitmasks too large for shared memory: the global scratch path
    wide = walk_inputs([4, 0, 3], d=200_003, n_refs=1, n_walks=2, seed=3, dtype=torch.float32)
    check("walk_masked, n_features = 200003",
          _ops.permutation_walk_masked(*on(DEV, *wide)), _ops.permutation_walk_masked(*wide),
          exact=True)
    bad = wide[2].clone()
    bad[0, 1, 0] = bad[0, 1, 1]
    expect_error("duplicate index (global scratch)",
                 lambda: _ops.permutation_walk_masked(*on(DEV, wide[0], wide[1], bad, wide[3],
                                                          wide[4])), "perm row 0")

    # rejected inputs: each must raise before a kernel reads with it
    bad_perm = perm.clone()
    bad_perm[3, 1, 5] = 10 ** 9
    expect_error("index out of range", lambda: _ops.permutation_walk_linear(
        x, base, bad_perm, n_active, w.to(DEV).to(x.dtype), None, total), "perm row 3")
    expect_error("n_active past L", lambda: _ops.permutation_walk_masked(
        x, base, perm, n_active + 1000, total), "must lie in")
    expect_error("total_steps", lambda: _ops.permutation_walk_masked(
        x, base, perm, n_active, total + 1), "total_steps")
    bad_target = torch.full((5,), 40, dtype=torch.long, device=DEV)
    expect_error("target out of range", lambda: _ops.shapley_accumulate(
        *on(DEV, steps, start, end), bad_target, perm, n_active, 1500, 2, True),
        "not a class index")
    noise_ops()
    sparse_linear_ops()
    relu_bf16_ops()
    adam_ops()
    torch.cuda.synchronize()
    print("[sanitizer case] all ops ran and matched the CPU kernels", flush=True)


def noise_ops():
    """entropy_and_grad and ascend_and_project: rows not a multiple of the block, one class,
    wide rows (d = 6170), inactive rows, zero and infinite radii, strided inputs."""
    if not _ops.has_kernel("cuda", _ops.NOISE_OPS):
        raise SystemExit(f"[sanitizer case] the noise ops have no CUDA kernels "
                         f"(oni.build_info(): {oni.build_info()})")
    gen = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float64):
        tag = str(dtype).replace("torch.", "")
        for n, k in ((1001, 100), (3, 1), (5, 4099)):
            z = torch.randn(n, k, generator=gen, dtype=dtype) * 3
            check(f"entropy_and_grad n={n} k={k} {tag}", _ops.entropy_and_grad(z.to(DEV)),
                  _ops.entropy_and_grad(z))
        for n, d in ((33, 6170), (257, 600), (2, 1)):
            eta = torch.randn(n, d, generator=gen, dtype=dtype) * 0.1
            direction = torch.randn(n, d, generator=gen, dtype=dtype)
            step = torch.rand(n, generator=gen, dtype=dtype)
            budget = torch.rand(n, d, generator=gen, dtype=dtype) * 0.2
            radius = torch.rand(n, generator=gen, dtype=dtype)
            radius[::3] = float("inf")
            radius[1::5] = 0.0
            active = torch.rand(n, generator=gen) < 0.7
            args = (eta, direction, step, budget, radius, active)
            strided = [torch.stack([t, t], -1)[..., 0] if t.dim() == 2 else t for t in args]
            check(f"ascend_and_project n={n} d={d} {tag}",
                  _ops.ascend_and_project(*on(DEV, *strided)), _ops.ascend_and_project(*args))
            check(f"ascend_and_project n={n} d={d} {tag} check_values=False",
                  _ops.ascend_and_project(*on(DEV, *args), check_values=False),
                  _ops.ascend_and_project(*args))
        bad = budget.clone()
        bad[0, 0] = -1
        expect_error("negative budget", lambda: _ops.ascend_and_project(
            *on(DEV, eta, direction, step, bad, radius, active)), "budget[0, 0]")


def sparse_linear_ops():
    names = ("sparse_input_linear", "sparse_input_weight_grad")
    if not _ops.has_kernel("cuda", names):
        raise SystemExit(f"[sanitizer case] the sparse first-layer ops have no CUDA kernels "
                         f"(oni.build_info(): {oni.build_info()})")
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.float64):
        tag = str(dtype).replace("torch.", "")
        # H = 300 crosses the 256-thread blocks; d = 6170 Texas-sized; rows with no non-zero
        for K, B, d, H, p in ((3, 37, 6170, 300, 0.02), (2, 5, 1, 1, 1.0), (2, 4, 50, 64, 0.0)):
            x = (torch.rand(K, B, d, generator=gen) < p).to(dtype)
            weight_t = torch.randn(K, d, H, generator=gen, dtype=dtype)
            bias = torch.randn(K, H, generator=gen, dtype=dtype)
            grad = torch.randn(K, B, H, generator=gen, dtype=dtype)
            check(f"sparse_input_linear K={K} B={B} d={d} H={H} {tag}",
                  _ops.sparse_input_linear(*on(DEV, x, weight_t, bias)),
                  _ops.sparse_input_linear(x, weight_t, bias))
            out_dev = torch.full((K, d, H), float("nan"), dtype=dtype, device=DEV)
            out = torch.empty(K, d, H, dtype=dtype)
            _ops.sparse_input_weight_grad(*on(DEV, x, grad), out_dev)
            _ops.sparse_input_weight_grad(x, grad, out)
            check(f"sparse_input_weight_grad K={K} B={B} d={d} H={H} {tag}", out_dev, out)


def relu_bf16_ops():
    if not _ops.has_kernel("cuda", ("relu_bf16_", "relu_backward_bf16_")):
        raise SystemExit(f"[sanitizer case] the bfloat16 ReLU ops have no CUDA kernels "
                         f"(oni.build_info(): {oni.build_info()})")
    gen = torch.Generator().manual_seed(13)
    # rows of 1 and 33 (a warp and one more), 128 (the trainer's batch), an empty last dim
    for shape in ((5, 1), (3, 7, 33), (4, 1024, 128), (6, 0)):
        x = torch.randn(shape, generator=gen).to(torch.bfloat16)
        grad = torch.randn(shape, generator=gen).to(torch.bfloat16)
        x_dev = x.to(DEV)
        _ops.relu_bf16_(x_dev)
        _ops.relu_bf16_(x)
        check(f"relu_bf16_ {shape}", x_dev, x, exact=True)
        bias_dev = torch.full(shape[:-1], float("nan"), dtype=torch.bfloat16, device=DEV)
        bias = torch.empty(shape[:-1], dtype=torch.bfloat16)
        grad_dev = grad.to(DEV)
        _ops.relu_backward_bf16_(grad_dev, x_dev, bias_dev)
        _ops.relu_backward_bf16_(grad, x, bias)
        check(f"relu_backward_bf16_ grad {shape}", grad_dev, grad, exact=True)
        # float32 sums in another order, one bfloat16 rounding: within a bfloat16 ulp
        ok = torch.allclose(bias_dev.cpu().double(), bias.double(), rtol=2 ** -7, atol=1e-6)
        if not ok:
            raise SystemExit(f"[sanitizer case] MISMATCH in relu_backward_bf16_ bias {shape}")


def adam_ops():
    """adam_step_bf16: sizes off the block and grid-stride chunks, empty, a non-zero weight
    decay; against the CPU kernel (float32 element-wise, so within float32 rounding), the
    bfloat16 copy the kernel's own parameter rounded."""
    if not _ops.has_kernel("cuda", ("adam_step_bf16",)):
        raise SystemExit(f"[sanitizer case] adam_step_bf16 has no CUDA kernel "
                         f"(oni.build_info(): {oni.build_info()})")
    gen = torch.Generator().manual_seed(17)
    for n, step, decay in ((0, 1, 0.0), (1, 1, 0.0), (257, 2, 0.01), (70_001, 1000, 0.0)):
        param = torch.randn(n, generator=gen)
        exp_avg = torch.randn(n, generator=gen) * 0.1
        exp_avg_sq = torch.rand(n, generator=gen) * 0.01
        grad = (torch.randn(n, generator=gen) * 0.5).to(torch.bfloat16)
        state = [param, exp_avg, exp_avg_sq, torch.zeros(n, dtype=torch.bfloat16), grad]
        host = [t.clone() for t in state]
        dev = [t.to(DEV) for t in state]
        scalars = (step, 1e-3, 0.9, 0.999, 1e-8, decay, 1e-30)
        _ops.adam_step_bf16(*dev, *scalars)
        _ops.adam_step_bf16(*host, *scalars)
        for name, g, w in zip(("param", "exp_avg", "exp_avg_sq"), dev, host):
            if not torch.allclose(g.cpu(), w, rtol=1e-6, atol=1e-7):
                raise SystemExit(f"[sanitizer case] MISMATCH in adam_step_bf16 {name} n={n}")
        if not torch.equal(dev[3].cpu(), dev[0].cpu().to(torch.bfloat16)):
            raise SystemExit(f"[sanitizer case] MISMATCH in adam_step_bf16 bf16 copy n={n}")
        print(f"[sanitizer case] ok: adam_step_bf16 n={n} step={step}", flush=True)


if __name__ == "__main__":
    main()
