"""Checks that a tool's estimate is an estimate of the benchmark game, before it is timed.

Three checks against oni's high-walk reference on the same inputs:

* efficiency: ``sum_i phi_i = v(N) - v(empty)``. Every permutation estimator satisfies it
  exactly on every walk and KernelSHAP as a constraint, so it holds up to float32 rounding;
  it catches a wrong class, a wrong baseline or a missing softmax at any budget.
* dummy: inactive features (``x_i = 0`` = the baseline) get ``|phi_i| <= 1e-6``.
* error: the mean over rows of ``||phi - phi_ref|| / ||phi_ref||`` lies within
  ``ERROR_BAND`` times the mean *predicted* error of an unbiased estimator of the same kind
  at the same number of walks (:meth:`workload.Reference.predicted_error`: the measured
  per-walk variance of antithetic or plain walks, divided by the walks). The squared error is
  a sum over the ~0.1 d active features, so it concentrates around its mean; with 8 (2) rows
  the measured/predicted ratio of a correct estimator stays within about 0.84-1.10 (see
  BENCHMARKS.md), while a biased game (another class, another baseline, raw logits) lands
  at >= 1 relative error. The band is two-sided because a budget miscounted by 2x either way
  (an antithetic pair counted as one walk, or one walk as a pair) gives the tool twice or
  half the work at "equal walks" and moves the ratio to about 0.71 or 1.41: a one-sided 1.5
  passed both. KernelSHAP has no walk; it is held to the plain-walk prediction at equal
  model evaluations, from above only (its regression lands at 0.5-0.9 of it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import workload

#: measured / predicted error of a correct estimator at its stated budget
ERROR_BAND = (0.75, 1.3)
DUMMY_TOL = 1e-6
EFFICIENCY_RTOL = 1e-4
EFFICIENCY_ATOL = 1e-6


@dataclass
class Agreement:
    error: float  # mean relative L2 error vs the reference
    predicted: float  # mean predicted error of an unbiased estimator at this budget
    bound: float
    floor: float  # 0 where only the upper bound applies (KernelSHAP)
    efficiency_gap: float  # max |sum phi - (v(N) - v(empty))|
    efficiency_ok: bool  # gap <= EFFICIENCY_ATOL + EFFICIENCY_RTOL * |v(N) - v(empty)|
    dummy_max: float  # max |phi_i| over inactive features

    @property
    def ok(self) -> bool:
        return self.floor <= self.error <= self.bound and self.dummy_max <= DUMMY_TOL and \
            self.efficiency_ok

    def describe(self) -> str:
        return (f"rel. error {self.error:.4f} (predicted {self.predicted:.4f}, band "
                f"[{self.floor:.4f}, {self.bound:.4f}]), efficiency gap {self.efficiency_gap:.2e}"
                f"{'' if self.efficiency_ok else ' (too large)'}, max |phi| on inactive "
                f"features {self.dummy_max:.2e}")


def check(phi, x: Tensor, game_gap: Tensor, ref: workload.Reference, walks: int,
          antithetic: bool, walker: bool = True) -> Agreement:
    """Agreement of ``phi [N, d]`` with the reference; see the module docstring.

    Args:
        phi: the tool's estimate.
        x: ``[N, d]`` the explained inputs (inactive = 0).
        game_gap: ``[N]`` ``v(N) - v(empty)`` of the benchmark game.
        ref: the reference for these rows.
        walks: permutation walks the tool was given (equal model evaluations for KernelSHAP).
        antithetic: whether its walks come as (forward, reverse) pairs.
        walker: whether it samples permutation walks (the band's floor applies); False for
            KernelSHAP.
    """
    phi = torch.as_tensor(np.asarray(phi), dtype=torch.float64)
    err = workload.relative_error(phi, ref.values).mean().item()
    pred = ref.predicted_error(walks, antithetic).mean().item()
    gap = (phi.sum(1) - game_gap.double()).abs()
    efficiency_ok = bool((gap <= EFFICIENCY_ATOL + EFFICIENCY_RTOL * game_gap.double().abs()).all())
    inactive = x == 0
    dummy = phi[inactive].abs().max().item() if inactive.any() else 0.0
    low, high = ERROR_BAND
    return Agreement(err, pred, high * pred, low * pred if walker else 0.0, gap.max().item(),
                     efficiency_ok, dummy)
