"""Seconds per explained input at equal numbers of permutation walks, every tool, same game.

Workload (``benchmarks/workload.py``): the paper's MLP trained on Purchase-shaped synthetic
data, Bernoulli(0.1) inputs, zero baseline, explained class = predicted class (softmax
probability). An antithetic pair counts as two walks; shap KernelExplainer, which has no
walks, gets equal model evaluations (``nsamples = walks * (a - 1)``). What each tool's budget
means is tabled in ``benchmarks/tools.py``.

Every case first runs the tool once (untimed: warm-up, e.g. numba compilation in shap) and
checks that estimate against oni's high-walk reference (``benchmarks/agreement.py``), then
times ``rounds`` calls on the same N inputs. Groups are ``d=<d> walks=<M>`` with the same N
inputs for every tool, so pytest-benchmark's per-group table compares like with like; the
terminal summary adds seconds per input and the speedup over shap's PermutationExplainer.

Run (about 5 minutes on an idle 2-core CPU, plus ~3 minutes the first time to train the
models and compute the references; on a shared machine set ONI_BENCH_WAIT_IDLE=<seconds>
to wait for an idle CPU before each timed case, see ``benchmarks/idle.py``)::

    pytest benchmarks/test_bench_shapley.py --benchmark-only -p no:cacheprovider \\
        --benchmark-columns=min,median,max,rounds \\
        --benchmark-sort=min --benchmark-json=.benchmarks/equal_walks.json
"""
from __future__ import annotations

import pytest

from . import agreement, idle, tools, workload

#: N inputs per size (the same for every tool in a group) and timed rounds per case
N_INPUTS = {600: 8, 6170: 2}
WALKS = (10, 100)
#: tools too slow for d = 6170 at 100 walks (minutes per input): run at 10 walks only
SLOW = ("shap_kernel", "captum", "shapiq")


def _rounds(tool: str, d: int, walks: int) -> int:
    if tool.startswith("oni"):
        return 10
    cost = walks * d  # rough: the slow tools walk (or evaluate) all d features
    if tool == "shap_permutation":
        return 5 if cost <= 6_000 else (3 if cost <= 60_000 else 1)
    return 3 if cost <= 6_000 else (2 if cost <= 60_000 else 1)


def _cases():
    for d in N_INPUTS:
        for walks in WALKS:
            for name in tools.TOOLS:
                if d > 600 and walks > 10 and name in SLOW:
                    continue
                marks = [pytest.mark.slow] if name in SLOW or d > 600 else []
                yield pytest.param(d, walks, name, id=f"d{d}-M{walks}-{name}", marks=marks)


_BENCH = {}


@pytest.fixture(scope="module")
def bench_for():
    def get(d: int) -> workload.Bench:
        if d not in _BENCH:
            _BENCH[d] = workload.bench(d, N_INPUTS[d])
        return _BENCH[d]
    return get


@pytest.mark.parametrize("d,walks,name", list(_cases()))
def test_shapley_equal_walks(benchmark, bench_for, record_result, d, walks, name):
    tool = tools.TOOLS[name]
    if tool.package:
        pytest.importorskip(tool.package)
    b = bench_for(d)
    budget = tool.per_row_budget(walks, b.x)
    args = (b.model, b.x, b.classes, budget, 0)

    # agreement before timing (this run is also the warm-up)
    phi = tool.run(*args)
    check = agreement.check(phi, b.x, b.game_gap, b.ref, walks, tool.antithetic,
                            walker=tool.name != "shap_kernel")
    assert check.ok, f"{tool.label} disagrees with the reference: {check.describe()}"

    n = b.x.shape[0]
    benchmark.group = f"d={d} walks={walks} (N={n} inputs, seconds per call on all N)"
    benchmark.extra_info.update({
        "tool": tool.label, "d": d, "walks": walks, "n_inputs": n,
        "budget_unit": tool.unit, "budget_per_row": budget,
        "rel_error": check.error, "predicted_error": check.predicted,
    })
    idle.wait_for_idle()  # only with ONI_BENCH_WAIT_IDLE=<seconds> set
    benchmark.pedantic(tool.run, args=args, rounds=_rounds(name, d, walks), iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        benchmark.extra_info["s_per_input_min"] = stats.min / n
        benchmark.extra_info["s_per_input_median"] = stats.median / n
        record_result(d=d, walks=walks, name=name, label=tool.label, n=n,
                      s_min=stats.min / n, s_median=stats.median / n, rounds=stats.rounds,
                      error=check.error, predicted=check.predicted)
