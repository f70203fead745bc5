"""Collects per-input timings of the benchmark tests and prints them as a markdown table."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .workload import ROOT, provenance

_RESULTS = []
#: ONI_BENCH_SUMMARY sets another file (scripts/bench.sh quick: a d = 600 run keeps the full
#: run's summary)
SUMMARY_PATH = Path(os.environ.get("ONI_BENCH_SUMMARY") or
                    ROOT / ".benchmarks" / "equal_walks_summary.json")
BASELINE_TOOL = "shap_permutation"


@pytest.fixture
def record_result():
    def record(**row):
        _RESULTS.append(row)
    return record


def summary_table(rows) -> str:
    """Markdown: seconds per input (min and median over rounds) and speedup over shap's
    PermutationExplainer, per (d, walks) group."""
    lines = ["| d | walks | tool | s/input (min) | s/input (median) | rounds | "
             "speedup vs shap Permutation (min) | rel. error (predicted) |",
             "|---|---|---|---|---|---|---|---|"]
    groups = sorted({(r["d"], r["walks"]) for r in rows})
    for d, walks in groups:
        group = sorted((r for r in rows if (r["d"], r["walks"]) == (d, walks)),
                       key=lambda r: r["s_min"])
        base = next((r for r in group if r["name"] == BASELINE_TOOL), None)
        for r in group:
            speedup = f"{base['s_min'] / r['s_min']:.2f}x" if base else "n/a"
            lines.append(f"| {d} | {walks} | {r['label']} | {r['s_min']:.4g} | "
                         f"{r['s_median']:.4g} | {r['rounds']} | {speedup} | "
                         f"{r['error']:.3f} ({r['predicted']:.3f}) |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    from .tools import TOOLS
    terminalreporter.section("seconds per explained input at equal walks")
    terminalreporter.write_line(summary_table(_RESULTS))
    missing = [tool.label for name, tool in TOOLS.items()
               if not any(r["name"] == name for r in _RESULTS)]
    if missing:  # a tool left out is said, not silently absent from the table
        terminalreporter.write_line(f"no rows (not installed, skipped or deselected): "
                                    f"{', '.join(missing)}")
    SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_PATH.write_text(json.dumps({"provenance": provenance(), "rows": _RESULTS}, indent=1))
    terminalreporter.write_line(f"(also written to {SUMMARY_PATH})")


# GPU benchmarks never measured yet go first (the current noise solver, the captum row), so
# a lease cut short still times them; everything else keeps its order.
_RUN_FIRST = ("test_noise_gpu", "test_shapley_gpu_captum")


def pytest_collection_modifyitems(items):
    # sorted() is stable: a test's parametrisations keep their order
    first = sorted((item for item in items if getattr(item, "originalname", None) in _RUN_FIRST),
                   key=lambda item: _RUN_FIRST.index(item.originalname))
    items[:] = first + [item for item in items if item not in first]
