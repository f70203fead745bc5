"""One adapter per Shapley tool, all estimating the same game.

The game (oni's default, ``oni.shapley_values(model, x)``): ``v(S) = softmax(model(z_S))[c]``
with ``z_S = x`` on ``S`` and 0 elsewhere (one zero baseline row), ``c`` the model's
predicted class at ``x``. Every adapter has the signature::

    run(model, x [N, d] float32, classes [N] int64, budget: int, seed: int) -> [N, d] float64

and a ``budget`` in its own natural unit (``Tool.unit``). ``walks_to_budget`` converts a
number of permutation walks to that unit (an antithetic pair counts as two walks), so every
tool can be run "at equal walks":

============================  ======================================  ====================
tool                          budget = what the tool is given         cost per walk
============================  ======================================  ====================
oni kernel / oni torch        ``n_permutations`` = walks              ``a - 1`` evaluations
shap PermutationExplainer     ``max_evals = (walks / 2) * (2a + 1)``  ``a`` evaluations
                              (one shap "permutation" is a forward
                              and a reverse walk over the a varying
                              features)
shap KernelExplainer          ``nsamples`` = walks * (a - 1)          (equal model
                              coalitions, ``l1_reg=False``            evaluations)
captum ShapleyValueSampling   ``n_samples`` = walks                   ``d`` evaluations
                              (one forward walk over all d features)
shapiq PermutationSamplingSV  ``budget = 2 + walks * (d - 1)``         ``d - 1`` evaluations
                              game evaluations
============================  ======================================  ====================

``a`` is the number of active features (``x_i != 0``, about ``0.1 d``): oni and shap skip
the inactive ones (their Shapley value is exactly 0), captum and shapiq walk all ``d``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np
import torch
from torch import Tensor, nn

import oni

# captum: forward evaluations are batched perturbations_per_eval x N rows; about this many
# rows per model call (measured: larger batches gain nothing on this CPU).
CAPTUM_ROWS_PER_CALL = 1024
# shapiq: permutations per game call, capped so a call holds about this many coalition rows.
SHAPIQ_ROWS_PER_CALL = 4096


@dataclass(frozen=True)
class Tool:
    name: str
    label: str  # for tables
    unit: str  # what its budget counts
    antithetic: bool  # walks come as (forward, reverse) pairs
    package: str  # optional package it needs ("" for oni)
    run: Callable  # (model, x, classes, budget, seed) -> np.ndarray [N, d]
    walks_to_budget: Callable  # (walks, x [1, d] row, d) -> budget for that row

    def per_row_budget(self, walks: int, x: Tensor) -> list:
        return [self.walks_to_budget(walks, x[i]) for i in range(x.shape[0])]


def _scalar(budget) -> int:
    """One budget for every row (adapters that take a single budget per call)."""
    if isinstance(budget, (list, tuple)):
        if len(set(budget)) != 1:
            raise ValueError(f"this tool takes one budget for all rows, got {sorted(set(budget))}")
        budget = budget[0]
    return int(budget)


def _n_active(row: Tensor) -> int:
    return int((row != 0).sum())


def _class_probability(model: nn.Module, c: int) -> Callable[[np.ndarray], np.ndarray]:
    """numpy ``[m, d] -> [m]``: softmax probability of class ``c`` (float64 out)."""
    def f(z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
            return torch.softmax(model(t), dim=1)[:, c].double().numpy()
    return f


# ----------------------------------------------------------------------------- oni

def _oni(backend: str):
    def run(model, x, classes, budget, seed):
        res = oni.shapley_values(model, x, n_permutations=_scalar(budget), seed=seed, backend=backend)
        if not torch.equal(res.target, classes):
            raise AssertionError("oni explained a different class than the benchmark's")
        return res.values.double().numpy()
    return run


# ----------------------------------------------------------------------------- shap

def _shap_permutation(model, x, classes, budget, seed):
    """``budget``: a list of per-row ``max_evals`` (or one int for every row)."""
    import shap

    d = x.shape[1]
    masker = shap.maskers.Independent(np.zeros((1, d), dtype=np.float32), max_samples=1)
    out = np.zeros((x.shape[0], d))
    xs = x.numpy()
    for i in range(x.shape[0]):
        max_evals = budget[i] if isinstance(budget, (list, tuple)) else budget
        explainer = shap.PermutationExplainer(_class_probability(model, int(classes[i])), masker,
                                              seed=seed + i)
        out[i] = explainer(xs[i:i + 1], max_evals=int(max_evals), silent=True).values[0]
    return out


def _shap_permutation_budget(walks: int, row: Tensor) -> int:
    a = _n_active(row)
    pairs = max(1, -(-walks // 2))  # as oni rounds an odd walk count: up to whole pairs
    return pairs * (2 * a + 1)


def _shap_kernel(model, x, classes, budget, seed):
    """``budget``: per-row ``nsamples`` (coalitions), ``l1_reg=False``."""
    import shap

    d = x.shape[1]
    out = np.zeros((x.shape[0], d))
    xs = x.numpy()
    background = np.zeros((1, d), dtype=np.float32)
    for i in range(x.shape[0]):
        nsamples = budget[i] if isinstance(budget, (list, tuple)) else budget
        explainer = shap.KernelExplainer(_class_probability(model, int(classes[i])), background)
        np.random.seed(seed + i)  # KernelExplainer samples coalitions from numpy's global RNG
        # l1_reg=False: the default "num_features(10)" keeps 10 features, and at these output
        # scales silently returns (nearly) all zeros
        out[i] = explainer.shap_values(xs[i:i + 1], nsamples=int(nsamples), l1_reg=False,
                                       silent=True)[0]
    return out


def _shap_kernel_budget(walks: int, row: Tensor) -> int:
    return walks * max(1, _n_active(row) - 1)


# ----------------------------------------------------------------------------- captum

def _captum(model, x, classes, budget, seed, rows_per_call: int = CAPTUM_ROWS_PER_CALL):
    """``budget``: ``n_samples`` permutations (forward walks over all d features), all rows
    in one call (captum shares each permutation across the batch). On any device (x's);
    ``rows_per_call`` sets captum's ``perturbations_per_eval`` (a GPU takes larger calls)."""
    from captum.attr import ShapleyValueSampling

    budget = _scalar(budget)
    torch.manual_seed(seed)  # captum draws permutations with torch.randperm

    def forward(z):
        return torch.softmax(model(z), dim=1)

    ppe = max(1, rows_per_call // x.shape[0])
    with torch.inference_mode():
        phi = ShapleyValueSampling(forward).attribute(
            x, baselines=0.0, target=classes, n_samples=int(budget), perturbations_per_eval=ppe)
    return phi.cpu().double().numpy()


# ----------------------------------------------------------------------------- shapiq

def _shapiq(model, x, classes, budget, seed):
    """``budget``: game evaluations (``2 + walks * (d - 1)``), one approximator per row."""
    from shapiq.approximator import PermutationSamplingSV

    budget = _scalar(budget)
    n, d = x.shape
    out = np.zeros((n, d))
    batch = max(1, SHAPIQ_ROWS_PER_CALL // d)  # permutations per game call
    for i in range(n):
        row, c = x[i], int(classes[i])

        def game(coalitions: np.ndarray, row=row, c=c) -> np.ndarray:
            with torch.inference_mode():
                # shapiq passes the empty and full coalitions as 1-D [d]
                mask = torch.from_numpy(np.atleast_2d(coalitions))
                z = mask.to(row.dtype) * row  # zero baseline
                return torch.softmax(model(z), dim=1)[:, c].double().numpy()

        approximator = PermutationSamplingSV(n=d, random_state=seed + i)
        values = approximator.approximate(int(budget), game, batch_size=batch)
        out[i] = values.get_n_order_values(1)
    return out


# ----------------------------------------------------------------------------- registry

TOOLS: Dict[str, Tool] = {t.name: t for t in (
    Tool("oni_kernel", "oni kernel", "walks", True, "", _oni("kernel"),
         lambda walks, row: walks),
    Tool("oni_torch", "oni torch", "walks", True, "", _oni("torch"),
         lambda walks, row: walks),
    Tool("shap_permutation", "shap PermutationExplainer", "max_evals", True, "shap",
         _shap_permutation, _shap_permutation_budget),
    Tool("shap_kernel", "shap KernelExplainer", "nsamples", False, "shap", _shap_kernel,
         _shap_kernel_budget),
    Tool("captum", "captum ShapleyValueSampling", "n_samples", False, "captum", _captum,
         lambda walks, row: walks),
    Tool("shapiq", "shapiq PermutationSamplingSV", "evaluations", False, "shapiq", _shapiq,
         lambda walks, row: 2 + walks * (row.shape[0] - 1)),
)}


def run_at_walks(tool: Tool, model, x: Tensor, classes: Tensor, walks: int, seed: int):
    """The tool at ``walks`` permutation walks per row (equal model evaluations for
    KernelExplainer)."""
    return tool.run(model, x, classes, tool.per_row_budget(walks, x), seed)


def available(tool: Tool) -> bool:
    if not tool.package:
        return True
    try:
        __import__(tool.package)
    except ImportError:
        return False
    return True
