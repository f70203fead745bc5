"""The benchmark suite's solver tools (benchmarks/noise_passes.py): what they count and time
is what BENCHMARKS.md's GPU predictions rest on, so they are tested like the library."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

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


# ----------------------------------------------------------------------------- GPU summary
# scripts/gpu_check.sh ends with this table; a lease is too rare to find a broken printer
# there, so it is run here on the recorded H100 summary plus one row of each later kind.

def _gpu_summary() -> dict:
    summary = json.loads((Path(__file__).parents[1] / "benchmarks" / "gpu_summary_h100.json")
                         .read_text())
    summary["baselines"] = [{"d": 600, "n_inputs": 16, "walks": 10, "seconds": 3.2,
                             "inputs_per_s": 5.0, "oni_kernel_speedup": {"tf32": 4000.0}}]
    summary["noise"] += [
        {"op": "optimal_noise", "d": 600, "backend": "kernel", "precision": "tf32",
         "n_rows": 20000, "seconds": 1.25, "rows_per_s": 16000.0, "feasible_rate": 0.945,
         "iterations_median": 150.0,
         "agreement_with_float32": {"norm_ratio_median_both_feasible": 1.0012,
                                    "same_feasible_flag": 0.999},
         "profile": {"wall_s": 1.5, "gpu_busy_fraction": 0.75, "kernel_launches": 32851,
                     "sync_calls": 287, "kernel_s": {"matmul": 0.8, "oni": 0.2,
                                                     "other": 0.125}},
         "stage_seconds": {"total": 1.3, "first/ascent": 0.4, "first/reduce_norm": 0.5,
                           "rescue/polish": 0.0, "outside": 0.05},
         "matmul_tflop": 40.8, "passes": 637, "tflops": 32.6, "fraction_of_peak": 0.082},
        {"op": "optimal_noise", "d": 600, "backend": "kernel", "precision": "bf16",
         "n_rows": 20000, "seconds": 1.1, "rows_per_s": 18181.8, "feasible_rate": 0.944,
         "iterations_median": 150.0, "profile": {"error": "RuntimeError('x')"},
         "stage_seconds": {"error": "RuntimeError('x')"}, "count_error": "RuntimeError('x')"},
]
    summary["shadows"] = [
        {"op": "shadow_training", "case": "train_model", "n_models": 16, "rows_per_model": 5000,
         "epochs": 2, "seconds": 8.0, "model_steps_per_s": 160.0, "mean_test_acc": 0.61},
        {"op": "shadow_training", "case": "batched", "n_models": 16, "rows_per_model": 5000,
         "epochs": 2, "seconds": 1.0, "model_steps_per_s": 1280.0, "mean_test_acc": 0.612}]
    return summary


def test_gpu_summary_table_prints_every_kind_of_row():
    from benchmarks import test_bench_gpu

    lines = test_bench_gpu.summary_table(_gpu_summary()).splitlines()
    assert lines[0].startswith("GPU: NVIDIA H100 80GB HBM3, torch 2.11.0+cu130")
    # the recorded kernel / float32 row at d = 600, and its ratio to the twin (2.698 / 1.604)
    row = next(line for line in lines if "kernel/float32" in line and "d=600 N=8192" in line)
    assert "5106" in row and " 1.7 " in row
    assert any("captum" in line and "tf32 4000x faster" in line for line in lines)
    tf32 = next(line for line in lines if "optimal_noise" in line and "kernel/tf32" in line)
    assert "16000" in tf32 and "norm/f32 1.0012" in tf32 and "32.6 TFLOP/s, 8% of peak" in tf32
    # over the recorded twin's rows/s: 16000 / 42.37
    assert " 377.7 " in tf32
    assert any("GPU busy 75% of 1.50 s" in line and "32851 launches, 287 syncs" in line
               for line in lines)
    stages = next(line for line in lines if line.strip().startswith("stages (s):"))
    assert "first/ascent 0.40" in stages and "rescue/polish" not in stages
    assert "total 1.30" in stages
    # rows whose profile, stages or count failed still print their timing
    assert any("kernel/bf16" in line and "18182" in line for line in lines)
    batched = next(line for line in lines if line.startswith("shadows") and "batched" in line)
    assert " 8.0 " in batched and "acc 0.612" in batched


def test_profile_breakdown_runs_where_there_is_no_gpu():
    from torch.profiler import ProfilerActivity

    from benchmarks.test_bench_gpu import profile_breakdown

    calls = []
    out = profile_breakdown(lambda: calls.append(torch.ones(64, 64) @ torch.ones(64, 64)),
                            [ProfilerActivity.CPU])
    assert len(calls) == 1
    assert out["wall_s"] > 0 and set(out["kernel_s"]) == {"matmul", "oni", "other"}
    # no CUDA activity was recorded: no kernel time, launches or syncs, and a busy share of 0
    assert sum(out["kernel_s"].values()) == 0 and out["gpu_busy_fraction"] == 0
    assert out["kernel_launches"] == 0 and out["sync_calls"] == 0
    # but the trace held the host's ops: two fills and the matmul at least
    assert out["aten_ops"] >= 3


# ----------------------------------------------------------------------------- Shapley suite
# the equal-walks comparison rests on these: an agreement check that passes a tool given
# twice or half the work, or a reference cached for another model, would make its ratios
# wrong without a word (an audit of the suite, 2026-12-07)

def _reference(values, stderr, walks=100):
    from benchmarks.workload import Reference
    values, stderr = torch.as_tensor(values).double(), torch.as_tensor(stderr).double()
    return Reference(values, stderr, walks, stderr * 1.5, walks, 0.0)


def test_agreement_band_catches_a_budget_off_by_two_either_way():
    from benchmarks import agreement

    gen = torch.Generator().manual_seed(0)
    d, n = 400, 8
    x = (torch.rand(n, d, generator=gen) < 0.5).double()
    truth = torch.randn(n, d, generator=gen).double() * x
    # a reference of 10,000 walks: its own error is small next to the estimates'
    ref = _reference(truth, 0.01 * x, walks=10_000)
    gap = truth.sum(1)

    def estimate(true_walks):
        """An unbiased estimate at true_walks walks with the reference's per-walk spread,
        shifted to keep efficiency exact."""
        noise = torch.randn(n, d, generator=gen).double() * x
        noise *= 0.01 * (10_000 / true_walks) ** 0.5
        noise -= x * (noise.sum(1, keepdim=True) / x.sum(1, keepdim=True))
        return truth + noise

    right = agreement.check(estimate(100), x, gap, ref, 100, True)
    assert right.ok, right.describe()
    for true_walks in (50, 200):  # told 100: half or twice the work
        wrong = agreement.check(estimate(true_walks), x, gap, ref, 100, True)
        assert not wrong.ok, (true_walks, wrong.describe())
    # KernelSHAP is held from above only: a better-than-predicted error passes
    assert agreement.check(estimate(200), x, gap, ref, 100, False, walker=False).ok
    # efficiency and dummies still count
    assert not agreement.check(estimate(100) + 0.01 * x, x, gap, ref, 100, True).ok
    assert not agreement.check(estimate(100) + 1e-3 * (1 - x), x, gap, ref, 100, True).ok


def test_reference_cache_is_recomputed_for_another_model(tmp_path, monkeypatch):
    from benchmarks import workload

    monkeypatch.setattr(workload, "CACHE_DIR", tmp_path)
    x = workload.explained_inputs(600, 1)
    first, second = (small_mlp(600, k=5, seed=seed) for seed in (1, 2))
    a = workload.reference(first, 600, x, 7, walks=4, plain_walks=4, verbose=False)
    calls = []
    real = oni.shapley_values
    monkeypatch.setattr(oni, "shapley_values", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = workload.reference(first, 600, x, 7, walks=4, plain_walks=4, verbose=False)
    assert not calls and torch.equal(again.values, a.values)  # the cached row, reused
    other = workload.reference(second, 600, x, 7, walks=4, plain_walks=4, verbose=False)
    assert calls and not torch.equal(other.values, a.values)  # not the first model's row
    assert workload.model_fingerprint(first) != workload.model_fingerprint(second)


def test_time_to_error_interpolates_log_log_and_states_bounds():
    from benchmarks.error_vs_time import time_to_error

    points = [{"walks": 10, "s_per_input": 0.01, "error": 0.4},
              {"walks": 100, "s_per_input": 0.1, "error": 0.2},
              {"walks": 1000, "s_per_input": 1.0, "error": 0.05}]
    out = time_to_error(points, target=0.1)
    # log-log between (0.1 s, 0.2) and (1 s, 0.05): halfway in log error -> sqrt(0.1 * 1)
    assert out["bound"] == "=" and abs(out["seconds"] - 0.1 ** 0.5) < 1e-12
    assert abs(out["walks"] - (100 * 1000) ** 0.5) < 1e-9
    assert time_to_error(points, target=0.01)["bound"] == ">"
    assert time_to_error(points, target=0.5)["bound"] == "<"
