"""Where one ``oni.shapley_values`` call spends its time, by phase (torch.profiler).

Phases: permutation generation (``_walk_permutations``), the walk op
(``permutation_walk_linear``: incremental first layer), the tail GEMMs (the rest of the
MLP on every interior prefix), the fused accumulate op (softmax, class pick, differences,
mean and variance), and everything else (model at x and the baseline, chunk planning, merge).
The phases are marked by wrapping oni's internals at run time (no source change), so the
script follows oni's internal names and says so if they change.

Usage::

    python -m benchmarks.profile_shapley --d 600 --walks 100 --inputs 8 --backend kernel
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import oni  # noqa: E402
from benchmarks import workload  # noqa: E402

PHASES = {
    "permutations": ("oni.shapley", "_walk_permutations"),
    "walk op": ("oni._ops", "permutation_walk_linear"),
    "walk op (torch twin)": ("oni.reference", "permutation_walk_linear"),
    "accumulate op": ("oni._ops", "shapley_accumulate"),
    "accumulate (torch twin)": ("oni.reference", "shapley_accumulate"),
}


def _wrap(label, fn):
    def wrapped(*args, **kwargs):
        with record_function(f"phase::{label}"):
            return fn(*args, **kwargs)
    return wrapped


def instrument():
    """Wraps oni's phases in record_function ranges; returns an undo function."""
    import importlib

    undo = []
    for label, (module_name, attr) in PHASES.items():
        module = importlib.import_module(module_name)
        fn = getattr(module, attr, None)
        if fn is None:
            print(f"[profile] {module_name}.{attr} not found: phase '{label}' not marked")
            continue
        setattr(module, attr, _wrap(label, fn))
        undo.append((module, attr, fn))
    game_cls = getattr(oni.shapley, "_Game", None)
    if game_cls is not None and hasattr(game_cls, "tail_outputs"):
        tail = game_cls.tail_outputs
        game_cls.tail_outputs = _wrap("tail GEMMs", tail)
        undo.append((game_cls, "tail_outputs", tail))

    def restore():
        for owner, attr, fn in undo:
            setattr(owner, attr, fn)
    return restore


def profile_call(d: int, walks: int, n_inputs: int, backend: str, repeats: int = 3):
    b = workload.bench(d, n_inputs)

    def call():
        return oni.shapley_values(b.model, b.x, n_permutations=walks, backend=backend)

    call()  # warm-up
    best = min(_timed(call) for _ in range(repeats))
    restore = instrument()
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("call::shapley_values"):
                call()
    finally:
        restore()
    phases = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key.startswith("phase::"):
            phases[evt.key[len("phase::"):]] += evt.cpu_time_total / 1e6
    call_s = sum(e.cpu_time_total for e in prof.key_averages()
                 if e.key == "call::shapley_values") / 1e6
    return best, dict(phases), prof, call_s


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=600, choices=sorted(workload.CONFIGS))
    parser.add_argument("--walks", type=int, default=100)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--backend", default="kernel", choices=("kernel", "torch"))
    parser.add_argument("--top", type=int, default=12, help="also print the top ops")
    args = parser.parse_args(argv)
    best, phases, prof, profiled = profile_call(args.d, args.walks, args.inputs, args.backend)
    total = sum(phases.values())
    print(f"\nd={args.d} walks={args.walks} N={args.inputs} backend={args.backend}: "
          f"{best:.4f} s per call ({best / args.inputs:.5f} s/input, best of 3, unprofiled)")
    print(f"profiled call: {profiled:.4f} s")
    print("| phase | s (profiled call) | share of the call |\n|---|---|---|")
    for label, secs in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {secs:.4f} | {secs / profiled:.0%} |")
    print(f"| other (model at x/baseline, planning, merge) | {profiled - total:.4f} | "
          f"{(profiled - total) / profiled:.0%} |")
    if args.top:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
