"""The sparse first layer of shadow training, CPU: ``oni::sparse_input_linear`` and
``oni::sparse_input_weight_grad`` against the dense products they replace (their twins in
``oni.reference``: ``baddbmm`` and ``bmm`` into a preallocated output), same inputs.

Shapes: ``K`` paper MLPs' first layer (``d = 600 -> H = 1024``, batch 128) at 16 and 2
models (the float32 and bf16 chunk sizes), at input densities 0.1 (Purchase-shaped), 0.3
(past the crossover, which sets ``oni.shadows._SPARSE_MAX_DENSITY``) and a Texas-shaped
``d = 6170`` at 0.1 and 0.02. Each call is timed alone (inputs warm in cache: the whole
training step, where Adam streams the state through the caches in between, gains less; see
``benchmarks/test_bench_shadows.py``). The ratios (dense / kernel, same run) are printed
after the last case and written to ``.benchmarks/sparse_linear_summary.json``. Run::

    ONI_BENCH_WAIT_IDLE=120 python -m pytest benchmarks/test_bench_sparse_linear.py \\
        --benchmark-only -s -p no:cacheprovider --benchmark-columns=min,median,rounds
"""
from __future__ import annotations

import json

import pytest
import torch

from oni import _ops, reference

from . import idle, workload

SHAPES = [(16, 600, 1024, 0.1), (2, 600, 1024, 0.1), (16, 600, 1024, 0.3),
          (2, 6170, 1024, 0.1), (2, 6170, 1024, 0.02)]
BATCH = 128
SUMMARY_PATH = workload.ROOT / ".benchmarks" / "sparse_linear_summary.json"
_RESULTS: dict = {}


def _inputs(K, d, H, density):
    gen = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((K, BATCH, d), density), generator=gen)
    weight_t = torch.randn(K, d, H, generator=gen) * 0.03
    bias = torch.randn(K, H, generator=gen)
    grad = torch.randn(K, BATCH, H, generator=gen)
    return x, weight_t, bias, grad, torch.empty(K, d, H)


@pytest.mark.parametrize("direction", ["forward", "weight_grad"])
@pytest.mark.parametrize("impl", ["kernel", "dense"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"K{k}-d{d}-H{h}-p{p}" for k, d, h, p in SHAPES])
def test_sparse_first_layer_seconds(benchmark, shape, impl, direction):
    if impl == "kernel" and not _ops.has_kernel("cpu", ("sparse_input_linear",)):
        pytest.skip("no compiled CPU kernel")
    x, weight_t, bias, grad, out = _inputs(*shape)
    module = _ops if impl == "kernel" else reference
    if direction == "forward":
        def call():
            return module.sparse_input_linear(x, weight_t, bias)
    else:
        def call():
            module.sparse_input_weight_grad(x, grad, out)
    for _ in range(3):
        call()  # warm-up: page in the outputs, BLAS threads
    benchmark.group = f"{direction} K={shape[0]} d={shape[1]} H={shape[2]} density={shape[3]}"
    idle.wait_for_idle()
    benchmark.pedantic(call, rounds=20, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable
        return
    key = (direction, shape)
    _RESULTS.setdefault(key, {})[impl] = benchmark.stats.stats.min
    complete = sum(len(times) == 2 for times in _RESULTS.values())
    if complete == 2 * len(SHAPES) and len(_RESULTS[key]) == 2:  # the last case of the run
        rows = []
        for (dirn, shp), times in sorted(_RESULTS.items(), key=lambda kv: str(kv[0])):
            if {"kernel", "dense"} <= times.keys():
                rows.append({"direction": dirn, "K": shp[0], "d": shp[1], "H": shp[2],
                             "density": shp[3], "kernel_ms": times["kernel"] * 1e3,
                             "dense_ms": times["dense"] * 1e3,
                             "dense_over_kernel": times["dense"] / times["kernel"]})
                print(f"[sparse_linear] {dirn} K={shp[0]} d={shp[1]} p={shp[3]}: kernel "
                      f"{times['kernel'] * 1e3:.2f} ms, dense {times['dense'] * 1e3:.2f} ms, "
                      f"{times['dense'] / times['kernel']:.2f}x", flush=True)
        SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY_PATH.write_text(json.dumps({"provenance": workload.provenance(),
                                            "threads": torch.get_num_threads(),
                                            "rows": rows}, indent=1))
