"""The benchmark suite's solver tools (benchmarks/noise_passes.py): what they count and time
is what BENCHMARKS.md's GPU predictions rest on, so they are tested like the library."""
from __future__ import annotations

import warnings

import torch

import oni
from benchmarks import noise_passes
from helpers import small_mlp
from oni import noise

SETTINGS = dict(tau_fraction=0.6, eps=0.5, beta=0.5)


def _problem(n=24, d=10):
    model = small_mlp(d, k=5, seed=2, scale=2.0)
    x = (torch.rand(n, d, generator=torch.Generator().manual_seed(5)) < 0.4).float()
    phi = oni.shapley_values(model, x, n_permutations=8, seed=0).values
    return model, x, phi


def test_count_sees_passes_launches_and_no_projection_syncs():
    model, x, phi = _problem()
    out = noise_passes.count(model, x, phi, SETTINGS, batch=1 << 18)
    assert out["rows"] == len(x) and 0 <= out["feasible_rate"] <= 1
    assert out["passes"] > 0 and out["launches"] > out["passes"]
    assert out["matmul_tflop"] > 0
    # the solver projects on every pass, and skips the op's value scan (a sync on CUDA)
    assert out["projections"] >= out["passes_forward_backward"] > 0
    assert out["projection_syncs"] == 0
    assert noise._EntropyOracle.value.__name__ == "value"  # the counting hooks are gone


def test_count_sees_the_projection_scan_of_a_direct_call():
    counter = noise_passes._Count()
    eta = torch.zeros(3, 4)
    args = (eta, torch.ones_like(eta), torch.ones(3), torch.ones_like(eta), torch.ones(3),
            torch.ones(3, dtype=torch.bool))
    with counter:
        oni._ops.ascend_and_project(*args)
        oni._ops.ascend_and_project(*args, check_values=False)
    assert counter.projections == 2 and counter.projection_syncs == 1


def test_stage_seconds_splits_the_call_and_restores_the_solver():
    model, x, phi = _problem()
    saved = {name: getattr(noise, name) for name in noise_passes._STAGES}
    synced = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = noise_passes.stage_seconds(
            lambda: oni.optimal_noise(model, x, phi, **SETTINGS, rescue_starts=4),
            sync=lambda: synced.append(1))
    assert {getattr(noise, name) for name in saved} == set(saved.values())
    parts = {k: v for k, v in out.items() if k != "total"}
    assert set(parts) == {f"{p}/{s}" for p in ("first", "rescue")
                          for s in ("ascent", "reduce_norm", "polish")} | {"outside"}
    assert all(v >= 0 for v in parts.values())
    assert out["first/ascent"] > 0 and out["first/reduce_norm"] > 0
    assert abs(sum(parts.values()) - out["total"]) <= 1e-6
    assert len(synced) >= 2 * 3  # entry and exit of each stage, at least
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        none = noise_passes.stage_seconds(
            lambda: oni.optimal_noise(model, x, phi, **SETTINGS, rescue_starts=0))
    assert none["rescue/ascent"] == none["rescue/reduce_norm"] == none["rescue/polish"] == 0
