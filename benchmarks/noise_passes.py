"""Counts what one ``oni.optimal_noise`` call asks of a device, to predict its GPU time from
a CPU run: the sequential model passes (oracle calls) and their rows, the aten ops the host
issues (each one a kernel launch on a GPU), the host syncs, the FLOPs of the model's
matmuls, and the bytes the other launches read and write.

Why: the H100 figure for the noise target (20,000 rows in 6.3-8.6 s, BENCHMARKS.md "GPU")
was taken when the solver ran 4,096 starts per batch, so 20 batches one after another; a
run on the GPU is host-bound when every pass is small. The counts let a CPU session say how
many launches and FLOPs a solver version needs before a GPU is lent to time it.

    python -m benchmarks.noise_passes --rows 2048 [--batch 262144] [--precision bf16]

``--batch`` sets the starts per batched pass (the CUDA default, 262,144, puts 20,000 rows
of 4 starts in one batch; the CPU default is 4,096). The workload is that of
``benchmarks/test_bench_noise.py`` (the same rows, phi and settings). Counting slows the
run (a Python hook per aten op); the CPU seconds it prints are not a benchmark.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNCS = {"aten.nonzero.default", "aten._local_scalar_dense.default",
          "aten.is_nonzero.default", "aten.item.default"}
# views and metadata: no kernel on a GPU
_NO_KERNEL = {"aten.t.default", "aten.detach.default", "aten.unsqueeze.default",
              "aten.view.default", "aten._unsafe_view.default", "aten.expand.default",
              "aten.slice.Tensor", "aten.select.int", "aten.alias.default",
              "aten.transpose.int", "aten.reshape.default", "aten.permute.default",
              "aten.squeeze.dim", "aten.as_strided.default", "aten.split.Tensor"}


class _Count(TorchDispatchMode):
    """Aten ops, launches (ops that are not views), syncs, matmul FLOPs, and the bytes the
    other launches read and write (their tensor arguments and results: an upper bound on
    their memory traffic, for the element-wise side of a GPU's time). Syncs are those a CUDA
    run would make: the aten-level ones and the projection op's value scan (a readback on
    CUDA, skipped with ``check_values=False``); the CUDA op's own launches are not seen."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.launches = self.syncs = self.flops = self.bytes = 0
        self.projections = self.projection_syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops[name] += 1
        self.launches += name not in _NO_KERNEL
        self.syncs += name in _SYNCS
        if name == "oni.ascend_and_project.default":
            self.projections += 1
            scans = args[6] if len(args) > 6 else (kwargs or {}).get("check_values", True)
            self.projection_syncs += bool(scans)
            self.syncs += bool(scans)
        if name in ("aten.mm.default", "aten.addmm.default"):
            a, b = (args[1], args[2]) if name == "aten.addmm.default" else (args[0], args[1])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif name not in _NO_KERNEL:
            results = out if isinstance(out, (tuple, list)) else (out,)
            for t in (*args, *results):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


@contextlib.contextmanager
def _patched(target, **replacements):
    """``target``'s attributes replaced for the block, restored however it ends."""
    saved = {name: getattr(target, name) for name in replacements}
    for name, value in replacements.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(target, name, value)


def count(model, x, phi, settings: dict, batch: int, precision: str = "float32") -> dict:
    """Run the solver once under the counter (on x's device: the CPU for a prediction, or the
    GPU for the FLOPs behind a measured time), ``batch`` starts per pass."""
    import oni
    from oni import noise

    passes = []  # (kind, rows, launches since the previous pass)
    counter = _Count()
    oracle = noise._EntropyOracle
    last = [0]

    def logged(method, kind):
        def call(self, eta, rows, *args, **kwargs):
            passes.append((kind, len(rows), counter.launches - last[0]))
            last[0] = counter.launches
            return method(self, eta, rows, *args, **kwargs)
        return call

    with _patched(oracle, value=logged(oracle.value, "f"),
                  value_and_grad=logged(oracle.value_and_grad, "fb")), \
            _patched(noise, _row_batch=lambda _x: batch):
        start = time.perf_counter()
        with warnings.catch_warnings(), counter:
            warnings.filterwarnings("ignore", message=".*flagged infeasible")
            res = oni.optimal_noise(model, x, phi, backend="kernel", precision=precision,
                                    **settings)
        seconds = time.perf_counter() - start
    sizes = collections.Counter("<512" if r < 512 else "<4096" if r < 4096 else
                                "<65536" if r < 65536 else ">=65536" for _, r, _ in passes)
    return {
        "rows": len(x), "batch": batch, "precision": precision, "cpu_seconds": seconds,
        "feasible_rate": float(res.feasible.double().mean()),
        "passes": len(passes), "passes_forward_backward": sum(k == "fb" for k, _, _ in passes),
        "pass_rows_total": sum(r for _, r, _ in passes),
        "pass_sizes": dict(sizes), "aten_ops": sum(counter.ops.values()),
        "launches": counter.launches, "syncs": counter.syncs,
        "projections": counter.projections, "projection_syncs": counter.projection_syncs,
        "matmul_tflop": counter.flops / 1e12,
        "other_launches_gb": counter.bytes / 1e9,
        "top_ops": counter.ops.most_common(12),
    }


_STAGES = ("_solve_rows", "_reduce_norm", "_polish")


def stage_seconds(fn, sync=lambda: None) -> dict:
    """Runs ``fn()`` (one ``optimal_noise`` call) with the solver's stages timed: seconds
    of the first pass and of the rescue, each split into the ascent (with the starts, the
    pick of a winner and the verdict), the norm reduction and the polish, plus ``outside``
    (the model at x, the budget, the radius). ``sync`` (``torch.cuda.synchronize`` on a
    GPU) runs at each stage boundary: a few per batch, so the timing barely moves the run.
    Returns ``{"total": s, "first/ascent": s, ..., "rescue/polish": s, "outside": s}``."""
    from oni import noise

    spent = collections.Counter()
    which = ["first"]  # the pass the stage belongs to

    def timed(name, function):
        def call(*args, **kwargs):
            if name == "_solve_rows":
                which[0] = "rescue" if kwargs.get("rescue") else "first"
            sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                spent[which[0], name] += time.perf_counter() - start
        return call

    # module globals: _solve_rows looks them up at each call
    with _patched(noise, **{name: timed(name, getattr(noise, name)) for name in _STAGES}):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        total = time.perf_counter() - start
    out = {"total": total}
    for part in ("first", "rescue"):
        reduce, polish = spent[part, "_reduce_norm"], spent[part, "_polish"]
        out[f"{part}/ascent"] = spent[part, "_solve_rows"] - reduce - polish
        out[f"{part}/reduce_norm"], out[f"{part}/polish"] = reduce, polish
    out["outside"] = total - spent["first", "_solve_rows"] - spent["rescue", "_solve_rows"]
    return out


def main() -> None:
    from . import workload
    from .test_bench_noise import D, SETTINGS, _phi, _rows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1 << 18)
    parser.add_argument("--precision", default="float32", choices=("float32", "bf16"))
    parser.add_argument("--json", help="also write the counts here")
    parser.add_argument("--stages", action="store_true",
                        help="also time the solver's stages in a second, uncounted call")
    args = parser.parse_args()
    model = workload.trained_model(D, verbose=False)
    x = _rows(args.rows)
    phi = _phi(model, x)
    out = count(model, x, phi, SETTINGS, args.batch, args.precision)
    if args.stages:
        import oni
        from oni import noise

        with _patched(noise, _row_batch=lambda _x: args.batch), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flagged infeasible")
            out["stage_seconds"] = stage_seconds(lambda: oni.optimal_noise(
                model, x, phi, backend="kernel", precision=args.precision, **SETTINGS))
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
