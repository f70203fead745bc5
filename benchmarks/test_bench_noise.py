"""Noise-solver throughput (rows per second): kernel backend in float32, kernel backend with
bf16 search passes (``precision="bf16"``, the opt-in), and the torch backend.

Workload: the paper's MLP trained on Purchase-shaped synthetic data (``benchmarks/workload.py``,
``trained_model(600)``), and the first N rows of its own training set (the rows the defense
adds noise to; ``purchase_like`` with the training seed). ``phi`` comes from
``oni.shapley_values(model, x, n_permutations=20)``, computed once outside the timed region
and cached under ``.benchmarks/workload/``. Settings: ``tau_fraction=0.5`` (tau = 0.5 log 100
= 2.30 nats), ``eps=0.1``, ``beta=0.5``, the solver's defaults otherwise (``max_iter=100``,
``refine_iter=8``, ``polish_iter=64``, ``starts=4``, ``rescue_starts=16``). One timed call
per backend (``rounds=1``): a call on N rows is many batched passes, so its own run-to-run
noise is small next to the machine's.

Besides the timing, each case prints the distribution of solver iterations, of the norms of
the feasible solutions (median, p90), the feasibility rate and the share of rows where the
radius ball binds, and writes everything to ``.benchmarks/noise_summary.json``. The bf16
and torch cases also report their agreement with the float32 kernel case (same rows: flags,
norm ratios) and their rows per second against it.

Sizes: ``ONI_NOISE_ROWS`` (both kernel cases, default 2048; ~1 min and ~0.5 min) and
``ONI_NOISE_ROWS_TORCH`` (torch backend, default 256; ~1.5 min). BENCHMARKS.md, "Noise
solver", used ``ONI_NOISE_ROWS=20000 ONI_NOISE_ROWS_TORCH=256`` (about 8 min for the kernel's
20,000 rows and 1 min for the torch backend's 256 on a 2-core CPU). Run::

    ONI_BENCH_WAIT_IDLE=600 pytest benchmarks/test_bench_noise.py --benchmark-only -s \\
        -p no:cacheprovider --benchmark-columns=min,rounds \\
        --benchmark-json=.benchmarks/noise.json
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings

import pytest
import torch

from . import idle, workload

D = 600
SETTINGS = dict(tau_fraction=0.5, eps=0.1, beta=0.5)
SHAPLEY_WALKS = 20
ROWS = {"kernel": int(os.environ.get("ONI_NOISE_ROWS", "2048")),
        "torch": int(os.environ.get("ONI_NOISE_ROWS_TORCH", "256"))}
SUMMARY_PATH = workload.ROOT / ".benchmarks" / "noise_summary.json"

_RESULTS: dict = {}


def _rows(n: int):
    """The first n training rows of the benchmark model (Purchase-shaped, binary)."""
    cfg = workload.config_for(D)
    x, _ = workload.purchase_like(cfg, max(n, cfg.n_train), seed=cfg.seed + 1)
    return x[:n].contiguous()


def _phi(model, x):
    """Shapley values of the rows (20 walks), cached on disk: they are not what is timed."""
    import oni

    cfg = workload.config_for(D)
    path = workload.CACHE_DIR / f"noise_phi_{cfg.key()}_train_n{len(x)}_w{SHAPLEY_WALKS}.pt"
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if torch.equal(blob["x"], x):
            return blob["phi"]
    start = time.perf_counter()
    phi = oni.shapley_values(model, x, n_permutations=SHAPLEY_WALKS, seed=0).values
    print(f"[noise] phi for {len(x)} rows ({SHAPLEY_WALKS} walks) in "
          f"{time.perf_counter() - start:.1f} s (cached to {path})", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "phi": phi}, path)
    return phi


@pytest.fixture(scope="module")
def noise_workload():
    model = workload.trained_model(D)
    x = _rows(max(ROWS.values()))
    return model, x, _phi(model, x)


def _quantile(t: torch.Tensor, q: float) -> float:
    return float(t.double().quantile(q)) if t.numel() else math.nan


def agreement(result, reference) -> dict:
    """Flags and norms of ``result`` against ``reference`` on their common first rows: what
    an opt-in precision, or the twins, cost against the float32 kernels. Norm ratios are
    taken on the rows both solve with a non-zero ``eta``."""
    m = min(len(result.eta), len(reference.eta))
    flags, ref_flags = result.feasible[:m].cpu(), reference.feasible[:m].cpu()
    norm, ref_norm = result.norm[:m].cpu().double(), reference.norm[:m].cpu().double()
    both = flags & ref_flags & (ref_norm > 0)
    ratio = norm[both] / ref_norm[both]
    return {
        "rows": m,
        "same_feasible_flag": float((flags == ref_flags).double().mean()),
        "norm_ratio_median_both_feasible": _quantile(ratio, 0.5),
        "norm_ratio_p10_p90_both_feasible": [_quantile(ratio, 0.1), _quantile(ratio, 0.9)],
        "max_rel_norm_difference_both_feasible":
            float((ratio - 1).abs().max()) if ratio.numel() else math.nan,
    }


def _describe(res, x_entropy) -> dict:
    it = res.iterations.double()
    feas = res.feasible
    norms = res.norm[feas]
    return {
        "feasible_rate": float(feas.double().mean()),
        "already_met": int((x_entropy >= res.tau).sum()),
        "ball_binds": int((res.norm >= res.radius * (1 - 1e-6)).sum()),
        "iterations_median": _quantile(it, 0.5), "iterations_p90": _quantile(it, 0.9),
        "iterations_max": float(it.max()),
        "norm_feasible_median": _quantile(norms, 0.5), "norm_feasible_p90": _quantile(norms, 0.9),
        "entropy_infeasible_median": _quantile(res.entropy[~feas], 0.5),
        "tau": res.tau,
    }


# (case, backend, precision): the kernels in float32, the kernels with bf16 search passes
# (the opt-in; polish and verdict stay float32), the twins
CASES = [("kernel", "kernel", "float32"), ("kernel_bf16", "kernel", "bf16"),
         ("torch", "torch", "float32")]


@pytest.mark.parametrize("case,backend,precision", CASES, ids=[c[0] for c in CASES])
def test_noise_rows_per_second(benchmark, noise_workload, case, backend, precision):
    import oni

    model, x_all, phi_all = noise_workload
    n = ROWS[backend]
    x, phi = x_all[:n], phi_all[:n]
    with torch.no_grad():
        log_p = torch.log_softmax(model(x).double(), dim=1)
    x_entropy = -(log_p.exp() * log_p).sum(1)

    benchmark.group = f"noise solver d={D} (seconds per call on N rows)"
    benchmark.extra_info.update({"backend": backend, "precision": precision, "n_rows": n,
                                 "d": D, **SETTINGS})
    idle.wait_for_idle()  # only with ONI_BENCH_WAIT_IDLE=<seconds> set
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flagged infeasible")
        res = benchmark.pedantic(oni.optimal_noise, args=(model, x, phi),
                                 kwargs=dict(**SETTINGS, backend=backend,
                                             precision=precision), rounds=1,
                                 iterations=1)
    # the solution honours its constraints whatever the backend
    assert (res.eta.abs() <= res.budget).all()
    assert (res.norm <= res.radius * (1 + 1e-6)).all()

    info = _describe(res, x_entropy)
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.min
        info.update(seconds=seconds, rows_per_second=n / seconds,
                    seconds_for_20000_rows_extrapolated=20_000 * seconds / n)
    if case != "kernel" and "kernel" in _RESULTS:
        info["agreement_with_kernel"] = agreement(res, _RESULTS["kernel"]["result"])
    benchmark.extra_info.update({key: v for key, v in info.items() if not isinstance(v, dict)})
    kernel_info = _RESULTS.get("kernel", {}).get("info", {})
    if case != "kernel" and "rows_per_second" in info and "rows_per_second" in kernel_info:
        # rows per second against the float32 kernels' in the same run
        info["rows_per_second_vs_kernel"] = (info["rows_per_second"]
                                             / kernel_info["rows_per_second"])
    _RESULTS[case] = {"result": res, "info": info, "n": n}

    print(f"\n[noise] case={case} N={n}: " + ", ".join(
        f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in info.items()),
        flush=True)
    summary = {"provenance": workload.provenance(), "settings": SETTINGS, "d": D,
               "shapley_walks": SHAPLEY_WALKS,
               "cases": {b: {"n_rows": r["n"], **r["info"]} for b, r in _RESULTS.items()}}
    SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_PATH.write_text(json.dumps(summary, indent=1))
