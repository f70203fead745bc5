"""Relative error vs wall time per input, every tool, and the time each needs for 10% error.

For each tool and a ladder of budgets (in permutation walks; KernelExplainer gets equal model
evaluations, ``nsamples = walks * (a - 1)``), explain the same N inputs, measure wall time
per input and the relative error ``||phi - phi_ref||_2 / ||phi_ref||_2`` averaged over the
inputs, against oni's high-walk reference (cached). Calls under a second are run with three
seeds (median time, mean error); slower ones once. The time to 10% relative error is
interpolated log-log between the two budgets that bracket 0.10; a tool that never gets there within the time cap reports a lower
bound. This is the fair figure across estimators: KernelSHAP gets more accuracy per model
evaluation than plain permutation sampling, antithetic walks more than plain walks.

Usage::

    python -m benchmarks.error_vs_time --d 600            # ~8 inputs, several minutes
    python -m benchmarks.error_vs_time --d 6170 --inputs 2
    python -m benchmarks.error_vs_time --d 600 --tools oni_kernel shap_kernel

Importable: :func:`measure`, :func:`time_to_error`, :func:`markdown`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import idle, tools, workload  # noqa: E402

TARGET_ERROR = 0.10
#: stop a tool's ladder once its error is this far below the target (the target is bracketed),
#: or already once it is below the target if the next budget would take over CHEAP_CALL s
STOP_BELOW = 0.07
CHEAP_CALL = 30.0
#: skip budgets whose call (all N inputs) is predicted to take longer than this (seconds;
#: time grows about linearly with the budget)
TIME_CAP = 60.0
#: calls (all N inputs) under CHEAP_SECONDS are repeated with SEEDS_IF_CHEAP seeds: median time,
#: mean error (one seed's error can sit 10% off its expectation)
CHEAP_SECONDS = 1.0
SEEDS_IF_CHEAP = 3

BUDGETS: Dict[int, Dict[str, Sequence[int]]] = {
    600: {
        "oni_kernel": (10, 20, 50, 100, 200, 500, 1000),
        "oni_torch": (10, 20, 50, 100, 200, 500, 1000),
        "shap_permutation": (10, 20, 50, 100, 200, 500, 1000),
        "shap_kernel": (2, 5, 10, 20, 50, 100),
        "captum": (10, 30, 100, 300, 1000),
        "shapiq": (10, 30, 100, 300, 1000),
    },
    6170: {
        "oni_kernel": (10, 20, 50, 100, 200, 500, 1000),
        "oni_torch": (10, 20, 50, 100, 200, 500, 1000),
        "shap_permutation": (10, 20, 50, 100, 200, 500),
        "shap_kernel": (2, 5, 10, 20, 50, 100),
        "captum": (10, 30, 100),
        "shapiq": (10, 30, 100),
    },
}
DEFAULT_INPUTS = {600: 8, 6170: 2}


def measure(b: workload.Bench, name: str, budgets: Sequence[int], time_cap: float = TIME_CAP,
            verbose: bool = True) -> List[dict]:
    """Points ``{walks, budget, s_per_input, error, predicted}`` for one tool, ascending
    budgets, stopping once the error is below ``STOP_BELOW`` (or below the target and the next
    call would be slow) or the next call is predicted to exceed ``time_cap`` seconds."""
    tool = tools.TOOLS[name]
    n = b.x.shape[0]
    # warm-up on one input at the smallest budget (numba compilation in shap, thread pools)
    tools.run_at_walks(tool, b.model, b.x[:1], b.classes[:1], budgets[0], 0)
    points = []
    for k, walks in enumerate(budgets):
        budget = tool.per_row_budget(walks, b.x)
        errors, times = [], []
        # cheap calls: three calls with seeds 0, 1, 2 and the mean error; the time is the
        # median, which a single slow call shares (a min of three favoured cheap calls)
        for seed in range(SEEDS_IF_CHEAP):
            idle.wait_for_idle()  # only with ONI_BENCH_WAIT_IDLE=<seconds> set
            start = time.perf_counter()
            phi = tool.run(b.model, b.x, b.classes, budget, seed)
            times.append(time.perf_counter() - start)
            errors.append(workload.relative_error(phi, b.ref.values).mean().item())
            if times[0] >= CHEAP_SECONDS:
                break
        elapsed = statistics.median(times)
        err = sum(errors) / len(errors)
        # KernelSHAP: compared with plain walks at equal model evaluations
        pred = b.ref.predicted_error(walks, tool.antithetic).mean().item()
        point = {"tool": name, "label": tool.label, "walks": walks, "unit": tool.unit,
                 "budget_mean": sum(budget) / len(budget), "s_per_input": elapsed / n,
                 "error": err, "seeds": len(errors), "predicted": pred}
        points.append(point)
        if verbose:
            print(f"  {tool.label:30s} walks {walks:5d} ({tool.unit} ~{point['budget_mean']:.0f})"
                  f"  {elapsed / n:9.4f} s/input  rel. error {err:.4f} over {len(errors)} "
                  f"seed(s) (predicted {pred:.4f})", flush=True)
        next_call = (elapsed * budgets[k + 1] / walks) if k + 1 < len(budgets) else math.inf
        if err < STOP_BELOW or (err < TARGET_ERROR and next_call > CHEAP_CALL):
            break
        if next_call > time_cap:
            if verbose and k + 1 < len(budgets):
                print(f"  (next budget, {budgets[k + 1]} walks, predicted {next_call:.0f} s for "
                      f"{n} inputs > cap {time_cap:.0f} s: stopping)", flush=True)
            break
    return points


def time_to_error(points: Sequence[dict], target: float = TARGET_ERROR) -> dict:
    """Log-log interpolation of (time, walks) at ``target`` error between the bracketing
    budgets. Returns ``{"seconds", "walks", "bound"}`` with bound "=" (interpolated), ">"
    (target not reached: the largest measured point) or "<" (already below at the smallest)."""
    if not points:
        return {"seconds": math.nan, "walks": math.nan, "bound": "?"}
    if points[0]["error"] <= target:
        return {"seconds": points[0]["s_per_input"], "walks": points[0]["walks"], "bound": "<"}
    for lo, hi in zip(points, points[1:]):
        if lo["error"] > target >= hi["error"]:
            frac = (math.log(target) - math.log(lo["error"])) / (
                math.log(hi["error"]) - math.log(lo["error"]))

            def interp(key):
                return math.exp(math.log(lo[key]) + frac * (math.log(hi[key]) - math.log(lo[key])))
            return {"seconds": interp("s_per_input"), "walks": interp("walks"), "bound": "="}
    last = points[-1]
    return {"seconds": last["s_per_input"], "walks": last["walks"], "bound": ">",
            "error_at_bound": last["error"]}


def markdown(d: int, points_by_tool: Dict[str, List[dict]], b: Optional[workload.Bench] = None) -> str:
    """Two markdown tables: every measured point, and the time to 10% error per tool."""
    out = []
    if b is not None:
        out.append(f"d = {d}, N = {b.x.shape[0]} inputs, mean active features "
                   f"{b.n_active.double().mean():.1f}, reference: {b.ref.walks} antithetic walks "
                   f"(its own relative noise {b.ref.relative_noise().mean():.4f})\n")
    out += ["| tool | walks | budget (unit) | s/input | rel. error (seeds) | predicted (unbiased) |",
            "|---|---|---|---|---|---|"]
    for pts in points_by_tool.values():
        for p in pts:
            out.append(f"| {p['label']} | {p['walks']} | {p['budget_mean']:.0f} ({p['unit']}) | "
                       f"{p['s_per_input']:.4g} | {p['error']:.4f} ({p.get('seeds', 1)}) | "
                       f"{p['predicted']:.4f} |")
    out += ["", f"| tool | time to {TARGET_ERROR:.0%} rel. error (s/input) | walks at "
            f"{TARGET_ERROR:.0%} (KernelExplainer: equal-evaluation walks) |", "|---|---|---|"]
    rows = []
    for pts in points_by_tool.values():
        t = time_to_error(pts)
        rows.append(((t["bound"] == ">", t["seconds"]), pts[0]["label"], t))
    for _, label, t in sorted(rows, key=lambda r: r[0]):
        prefix = {"=": "", "<": "< ", ">": "> "}.get(t["bound"], "? ")
        note = (f" (error still {t['error_at_bound']:.3f} there)" if t["bound"] == ">" else "")
        out.append(f"| {label} | {prefix}{t['seconds']:.4g}{note} | {prefix}{t['walks']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=600, choices=sorted(BUDGETS))
    parser.add_argument("--inputs", type=int, default=None, help="explained inputs (N)")
    parser.add_argument("--tools", nargs="*", default=None, choices=sorted(tools.TOOLS))
    parser.add_argument("--time-cap", type=float, default=TIME_CAP,
                        help="stop a tool's ladder after a call longer than this (s)")
    parser.add_argument("--json", default=None, help="write the points here "
                        "(default .benchmarks/error_vs_time_d<d>.json)")
    args = parser.parse_args(argv)

    n = args.inputs or DEFAULT_INPUTS[args.d]
    b = workload.bench(args.d, n)
    names = args.tools or list(tools.TOOLS)
    points = {}
    for name in names:
        if not tools.available(tools.TOOLS[name]):
            print(f"skipping {name}: package {tools.TOOLS[name].package!r} not installed")
            continue
        print(f"[{name}]", flush=True)
        points[name] = measure(b, name, BUDGETS[args.d][name], args.time_cap)
    table = markdown(args.d, points, b)
    print()
    print(table)
    path = args.json or str(workload.ROOT / ".benchmarks" / f"error_vs_time_d{args.d}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"provenance": workload.provenance(), "d": args.d, "n_inputs": n, "reference_walks": b.ref.walks,
                   "reference_noise": b.ref.relative_noise().mean().item(),
                   "points": points,
                   "time_to_error": {k: time_to_error(v) for k, v in points.items()}}, f, indent=1)
    print(f"\n(points written to {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
