"""Wait for an idle CPU before timing (shared development machines).

Timings on a 2-core machine are only meaningful when nothing else runs. With
``ONI_BENCH_WAIT_IDLE=<seconds>`` set, the benchmarks call :func:`wait_for_idle` before each
timed case: it samples ``/proc/stat`` and returns once the whole machine has been at most
``busy_max`` busy for ``quiet_s`` seconds, or after the given seconds (then it says so).
"""
from __future__ import annotations

import os
import time

BUSY_MAX = 0.12  # fraction of all CPUs; ~25% of one core on a 2-core machine


def _cpu_times():
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields), idle


def busy_fraction(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (NaN where /proc/stat is missing)."""
    try:
        total0, idle0 = _cpu_times()
        time.sleep(interval)
        total1, idle1 = _cpu_times()
    except OSError:
        return float("nan")
    total = total1 - total0
    return 1.0 - (idle1 - idle0) / total if total > 0 else 0.0


def wait_for_idle(max_wait: float | None = None, quiet_s: float = 2.0,
                  busy_max: float = BUSY_MAX, verbose: bool = True) -> bool:
    """Blocks until the CPU has been idle for ``quiet_s`` s; False if ``max_wait`` ran out.

    ``max_wait`` defaults to ``$ONI_BENCH_WAIT_IDLE`` (seconds); unset or 0 returns at once.
    """
    if max_wait is None:
        max_wait = float(os.environ.get("ONI_BENCH_WAIT_IDLE", "0") or 0)
    if max_wait <= 0:
        return True
    deadline = time.monotonic() + max_wait
    quiet_since = None
    while time.monotonic() < deadline:
        busy = busy_fraction(0.5)
        now = time.monotonic()
        if busy <= busy_max:
            quiet_since = quiet_since or now
            if now - quiet_since >= quiet_s:
                return True
        else:
            quiet_since = None
    if verbose:
        print(f"[idle] machine still busy after {max_wait:.0f} s; timing anyway", flush=True)
    return False
