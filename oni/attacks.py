"""Membership inference attacks: shadow-model, metric-based, label-only and LiRA, plain or
adaptive.

Every attack scores the rows of ``splits.target`` against a target model it can only query
(``target.predict_proba``, what a :class:`oni.defenses.DefendedModel` exposes), and returns
an :class:`AttackResult` whose scores are **higher for "more likely a member"** (the
convention of :mod:`oni.metrics`), aligned with ``splits.target``.

Threat model (docs/DESIGN.md, "Attacks and metrics")
------------------------------------------------
The adversary knows the target's architecture and training recipe (the ``TrainConfig``),
holds population data (``splits.shadow_pool``: rows the target never trained on) and part
of the training set (``splits.known``), and knows the labels of the rows it attacks. It
never sees ``splits.train`` beyond ``known``, ``splits.test``, or ``splits.target_member``.
It may query the target on any input (the label-only attack queries noisy copies of rows).
Hand-made splits are held to these definitions before any attack runs
(:meth:`oni.data.Splits.check`): a shadow pool that holds training rows, or a
``target_member`` that disagrees with ``train``, would give a silently wrong attack.

**Adaptive attacks** (the paper's threat model: the attacker knows the defense): with
``defense=(name, config)`` every shadow model is trained with
``oni.defenses.defend(name, ..., config=config)``, i.e. with the same defense as the target,
and queried through its ``predict_proba`` (so inference-time defenses such as DynaNoise are
applied to the shadows' outputs too). ``defense=None`` trains the shadows undefended.

Undefended shadows are trained together by :func:`oni.shadows.train_mlps_batched`; the
setting ``shadow_precision`` (every attack with shadows; default ``"float32"``, the models
``train_model`` gives) set to ``"bf16"`` trains them in mixed precision instead, faster on
CPUs with AMX, and not the same models (``train_mlps_batched``'s ``precision``). Adaptive
attacks train their shadows in float32 and reject ``"bf16"``.

The attacks (``ATTACKS``)
-------------------------
* ``"shadow"`` (Shokri et al. 2017; Salem et al. 2019; the attack model of Nasr et al.
  2018): shadow model(s) trained like the target on half of a random split of the shadow
  pool (its members), the other half being its non-members. The attack model has three fully
  connected subnets: one on the prediction vector, one on the one-hot label, and one on the
  concatenation of their outputs, ending in one member logit. Weights ``N(0, 0.01)`` (read as
  standard deviation 0.01, as in Nasr et al.'s code), zero biases, Adam lr 1e-3, binary
  cross-entropy. It is trained on the shadows' (prediction, label, in/out) triples; the score
  of a target row is the attack model's member probability on ``target.predict_proba``.
* ``"metric_*"`` (Song & Mittal 2021): a value per row, oriented so that higher means member:
  ``correctness`` (1 if the predicted class is the label, else 0), ``confidence`` (``p_y``),
  ``entropy`` (``-H(p)``), ``modified_entropy`` (``-Mentr(p, y)``,
  ``Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)``) and ``loss``
  (``log p_y``, minus the cross-entropy). Class-wise thresholds ``tau_c`` are fitted on the
  shadow model's outputs on its members and non-members (per class, the value maximising the
  balanced accuracy of "member iff value >= tau_c"; classes lacking members or non-members in
  the fitting data use the threshold fitted on all classes). The score is the **margin to the
  threshold of the row's class**, ``value - tau_y``: positive means "member" by the class-wise
  rule, and margins of different classes are comparable since they are in the value's units.
  ``correctness`` needs no threshold: its score is the 0/1 value itself.
* ``"label_only"`` (Choquette-Choo et al. 2021, the noise-robustness variant): the adversary
  uses only the predicted class, the argmax of ``predict_proba`` (the probabilities are
  never looked at). For a row ``x`` with label ``y`` it queries ``n_queries`` noisy copies
  ``x + sigma z``, ``z ~ N(0, I)`` (from a ``torch.Generator`` seeded from ``seed``); the
  value is the share of the ``n_queries + 1`` copies, the clean one included, classified as
  ``y``: members sit farther from the decision boundary, so more of their copies keep the
  label. On binary features (Purchase, Texas, Location) the noisy copies leave ``{0, 1}^d``;
  they are queries, not data, and the model labels them like any input. ``config['noise']
  = "bitflip"`` keeps them in ``{0, 1}^d`` instead: each feature of each copy is flipped
  (``1 - x_i``) with probability ``sigma``, from draws ``u ~ U(0, 1)`` shared by every
  sigma (a larger one flips a superset); it refuses data with other values. ``sigma`` is
  fixed by ``config['sigma']`` or, by default, picked from ``sigma_grid`` on the reference
  (shadow) fitting rows: the one whose best threshold has the highest balanced accuracy
  (every sigma scales the same draws ``z``). The threshold is then fitted like the metric
  attacks' (``thresholds``: ``"global"`` by default, as the value takes only
  ``n_queries + 2`` levels; ``"class"`` also works) and the score is ``value - tau_y``. It
  shares the shadow models of the shadow and metric attacks, and costs
  ``n_queries x (len(sigma_grid) x reference rows + target rows)`` label queries
  (``n_queries x (reference rows + target rows)`` with ``sigma`` fixed).
* ``"lira_online"`` / ``"lira_offline"`` (Carlini et al. 2022): ``K`` shadow models, in
  complementary pairs, each trained on one half of a pool of ``2m`` rows (model ``2i`` on a
  random half, model ``2i + 1`` on the other half), so every pool row is a member of exactly
  ``K / 2`` shadows and every shadow trains on ``m`` rows. Online, the pool holds the target
  rows plus shadow-pool rows; offline, shadow-pool rows only. The statistic is the
  logit-scaled confidence ``phi = log p_y - log sum_{i != y} p_i`` (computed from the
  probabilities in float64, the sum taken over the other classes directly rather than as
  ``1 - p_y``, each term floored at ``1e-45``). Per target row, Gaussians are fitted to the
  shadows' ``phi`` where the row was in (online) and out; the score is the log likelihood
  ratio ``log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)`` online, and the one-sided
  test ``log Pr[Z <= phi]``, ``Z ~ N(mu_out, s_out^2)`` (i.e. ``log(1 - p-value)``) offline.
  With few shadows the per-row variances are unreliable; ``global_variance`` (default: when
  ``K < 64``, as the paper advises) uses one variance for all rows: the pooled within-row
  variance of the shadows' ``phi`` (each row's deviations from its own mean), as the paper
  describes it. The authors' released code differs in two ways: its global variance is that
  of all the scores about their overall mean, which adds the spread between rows' means
  (larger, so flatter Gaussians); and it centres each row's Gaussians on the median. Scores
  from the two are not directly comparable.

Calibration (for choosing a threshold, :func:`oni.metrics.attack_report`)
--------------------------------------------------------------------------
``AttackResult.calibration`` holds ``(scores, is_member)`` on data the adversary owns: for the
shadow, metric and label-only attacks, a held-out ``calibration_fraction`` of each shadow's
members and non-members (not used to fit the attack model, the thresholds or sigma); for
LiRA, shadow model 0 plays the target: the pool rows are scored against it with Gaussians
fitted on the other ``K - 1`` shadows (leave-one-out), their membership being known to the
adversary.

Seeds: every random choice (pool splits, shadow seeds, attack-model initialisation and batch
order, the label-only noise) follows from ``seed`` through named derived seeds; the shadow,
metric and label-only attacks share their shadow models for the same ``seed`` and settings,
so :func:`run_attacks` trains them once and gives the same results as separate
:func:`run_attack` calls.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import (ADAM_FITS, MAX_ADAM_LR, check_class_indices, check_finite,
                      check_int as _check_int, check_not_meta, check_number, check_seed,
                      is_integer_dtype, short_repr, warning_context)
from .data import Dataset, Splits
from .models import MLP, _check_hidden, _resolve_device
from .shadows import PRECISIONS, predict_logits_batched, train_mlps_batched
from .train import TrainConfig, _check_config, _derived_seed, predict_proba

__all__ = ["AttackResult", "ATTACKS", "DEFAULTS", "METRICS", "check_attack_sizes",
           "metric_values", "run_attack", "run_attacks", "scaled_logit"]

METRICS = ("correctness", "confidence", "entropy", "modified_entropy", "loss")
#: the label-only attack's noise kinds (config["noise"])
LABEL_ONLY_NOISES = ("gaussian", "bitflip")
ATTACKS = ("shadow", *(f"metric_{m}" for m in METRICS), "label_only", "lira_offline",
           "lira_online")

#: settings of the shadow models behind the shadow, metric and label-only attacks (shared)
_REFERENCE_DEFAULTS: Dict[str, Any] = {
    "n_shadows": 1,             # shadow models; their data are pooled
    "shadow_size": None,        # rows per shadow model; None: the target's training-set
                                # size, capped at half the shadow pool
    "calibration_fraction": 0.2,  # share of each shadow's members and non-members held out
    "fit_on": "shadow",         # "shadow": shadow models' outputs; "known": the target's own
                                # outputs on splits.known (members) and shadow-pool rows
    "hidden": None,             # shadow architecture; None: the target model's (an MLP)
    "shadow_precision": "float32",  # undefended shadows' training arithmetic: "float32" or
                                    # "bf16" (oni.shadows.train_mlps_batched's precision)
}
_ATTACK_NET_DEFAULTS: Dict[str, Any] = {
    "prediction_widths": (1024, 512, 64),  # subnet on the prediction vector
    "label_widths": (512, 64),             # subnet on the one-hot label
    "combined_widths": (256, 64),          # subnet on their concatenation (then 1 logit)
    "weight_std": 0.01,
    "attack_epochs": 30,
    "attack_batch_size": 128,
    "attack_lr": 1e-3,
}
_LIRA_DEFAULTS: Dict[str, Any] = {
    "n_shadows": 16,            # K, even (complementary pairs), >= 4
    "shadow_size": None,        # m rows per shadow; None: the target's training-set size,
                                # capped at half the available pool
    "global_variance": None,    # None: True when K < 64
    "hidden": None,
    "shadow_precision": "float32",  # as for the reference attacks above
}

#: every attack's settings and their defaults (``config`` overrides any of them)
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "shadow": {**_REFERENCE_DEFAULTS, **_ATTACK_NET_DEFAULTS},
    **{f"metric_{m}": {**_REFERENCE_DEFAULTS, "thresholds": "class"} for m in METRICS},
    "label_only": {**_REFERENCE_DEFAULTS,
                   "n_queries": 64,        # noisy copies per row (the score's share also counts
                                           # the clean copy: n_queries + 1 in all)
                   "noise": "gaussian",    # x + sigma z; "bitflip": each feature of 0/1
                                           # data flipped with probability sigma
                   "sigma": None,          # the noise's scale (a standard deviation, or a
                                           # flip probability); None: picked from
                                           # sigma_grid on the reference fit rows
                   "sigma_grid": (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0),
                   "thresholds": "global"},  # robustness takes few values: one threshold
    "lira_offline": dict(_LIRA_DEFAULTS),
    "lira_online": dict(_LIRA_DEFAULTS),
}

_PHI_FLOOR = 1e-45  # probabilities below this count as this (float32's smallest subnormal)
_LOG_FLOOR = 1e-30  # probabilities are floored here inside the metric attacks' logarithms
# How far a predict_proba's row sums, and so its largest probabilities, may stray from 1
# (float rounding of a model's own normalisation).
_PROB_SLACK = 1e-3
#: shadow models per attack at most: far beyond any use (LiRA: 256 in its paper)
MAX_SHADOWS = 4096
_MIN_VARIANCE = 1e-12  # LiRA: keeps constant shadow outputs from dividing by zero
_PHI_MODEL_CHUNK = 8  # LiRA: shadow models evaluated at a time (bounds the [K, n, k] block)
_NOISE_BLOCK = 1 << 22  # label-only: noise values drawn at a time (16 MiB of float32)


@dataclass
class AttackResult:
    """What :func:`run_attack` found.

    Attributes
    ----------
    name : str
        The attack (one of ``ATTACKS``).
    scores : Tensor
        ``[len(splits.target)]`` float64, aligned with ``splits.target``; higher = more
        likely a member.
    calibration : tuple of (Tensor, Tensor) or None
        ``(scores float64 [n], is_member bool [n])`` on the adversary's own data, scored the
        same way (see the module docstring), for threshold choice; None when
        ``calibration_fraction`` is 0.
    extra : dict
        The resolved settings (``"config"``), ``"defense"`` and ``"seed"``, and attack facts:
        with shadow models, ``shadow_size``, ``hidden``, and ``shadow_train_acc`` /
        ``shadow_test_acc`` (per shadow; not LiRA); with ``fit_on="known"`` instead,
        ``reference_size`` (the rows per side fitted on); metric and label-only attacks:
        ``thresholds`` (``[k]`` float64) and ``fallback_classes``; label-only: ``sigma`` (the
        one used),
        ``sigma_balanced_accuracy`` (per candidate sigma, on the fitting rows),
        ``observed_robustness`` (the value of each target row); LiRA: ``pool_size``,
        ``pool_rows`` (``[2m]`` row indices), ``shadow_membership`` (``[K, 2m]`` bool: pool
        row ``i`` trained shadow ``j``), ``global_variance``, ``observed_phi`` (the target's
        ``phi`` on the target rows).
    """

    name: str
    scores: Tensor
    calibration: Optional[Tuple[Tensor, Tensor]]
    extra: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks

def _resolve_config(name: str, config: Optional[Mapping]) -> Dict[str, Any]:
    """The attack's defaults overridden by ``config``, checked."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of settings or None, got "
                        f"{type(config).__name__}")
    defaults = DEFAULTS[name]
    unknown = sorted(str(key) for key in config if key not in defaults)
    if unknown:
        raise ValueError(f"config has unknown keys {unknown} for attack {name!r}; its settings "
                         f"are {sorted(defaults)}")
    cfg = {**defaults, **config}
    cfg["n_shadows"] = _check_int(cfg["n_shadows"], "config['n_shadows']", 1)
    if cfg["n_shadows"] > MAX_SHADOWS:  # a typo (1e8) ran on for ever, holding 13 GB
        raise ValueError(f"config['n_shadows'] must be <= {MAX_SHADOWS}, got "
                         f"{cfg['n_shadows']}")
    if cfg["shadow_size"] is not None:
        cfg["shadow_size"] = _check_int(cfg["shadow_size"], "config['shadow_size']", 1)
    if cfg["hidden"] is not None:
        cfg["hidden"] = _check_hidden(cfg["hidden"], "config['hidden']")
    if not isinstance(cfg["shadow_precision"], str) or cfg["shadow_precision"] not in PRECISIONS:
        raise ValueError(f"config['shadow_precision'] must be one of {PRECISIONS}, got "
                         f"{short_repr(cfg['shadow_precision'])}")
    if name.startswith("lira"):
        k = cfg["n_shadows"]
        if k < 4 or k % 2:
            raise ValueError(f"config['n_shadows'] must be even and >= 4 for LiRA (shadows come "
                             f"in complementary pairs; leave-one-out calibration needs 3 more), "
                             f"got {k}")
        if cfg["global_variance"] is not None and not isinstance(cfg["global_variance"], bool):
            raise TypeError(f"config['global_variance'] must be True, False or None (auto), "
                            f"got {short_repr(cfg['global_variance'])}")
        return cfg
    cfg["calibration_fraction"] = check_number(cfg["calibration_fraction"],
                                               "config['calibration_fraction']", 0.0, 1.0,
                                               high_open=True)
    if cfg["fit_on"] not in ("shadow", "known"):
        raise ValueError(f"config['fit_on'] must be 'shadow' or 'known', got "
                         f"{short_repr(cfg['fit_on'])}")
    if name == "shadow":
        for key in ("prediction_widths", "label_widths", "combined_widths"):
            cfg[key] = _check_hidden(cfg[key], f"config[{key!r}]")
        for key in ("prediction_widths", "label_widths"):
            if not cfg[key]:
                raise ValueError(f"config[{key!r}] needs at least one width (the subnet's "
                                 f"output feeds the combined subnet)")
        cfg["attack_epochs"] = _check_int(cfg["attack_epochs"], "config['attack_epochs']", 1)
        cfg["attack_batch_size"] = _check_int(cfg["attack_batch_size"],
                                              "config['attack_batch_size']", 1)
        cfg["weight_std"] = check_number(cfg["weight_std"], "config['weight_std']", 0.0,
                                         low_open=True)
        cfg["attack_lr"] = check_number(cfg["attack_lr"], "config['attack_lr']", 0.0, MAX_ADAM_LR,
                                        low_open=True, why=ADAM_FITS)
    else:
        if cfg["thresholds"] not in ("class", "global"):
            raise ValueError(f"config['thresholds'] must be 'class' or 'global', got "
                             f"{short_repr(cfg['thresholds'])}")
    if name == "label_only":
        cfg["n_queries"] = _check_int(cfg["n_queries"], "config['n_queries']", 1)
        if cfg["noise"] not in LABEL_ONLY_NOISES:
            raise ValueError(f"config['noise'] must be one of {LABEL_ONLY_NOISES}, got "
                             f"{short_repr(cfg['noise'])}")
        # a flip probability is at most 1
        high, why = (1.0, " (a flip probability, noise='bitflip')") \
            if cfg["noise"] == "bitflip" else (math.inf, "")
        if cfg["sigma"] is not None:
            cfg["sigma"] = check_number(cfg["sigma"], "config['sigma']", 0.0, high,
                                        low_open=True, why=why)
        grid = cfg["sigma_grid"]
        if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
            raise ValueError(f"config['sigma_grid'] must be a non-empty sequence of finite "
                             f"numbers > 0, got {short_repr(grid)}")
        cfg["sigma_grid"] = tuple(check_number(v, f"config['sigma_grid'][{i}]", 0.0, high,
                                               low_open=True, why=why)
                                  for i, v in enumerate(grid))
    return cfg


def _check_defense(defense) -> Optional[Tuple[str, Optional[dict]]]:
    if defense is None:
        return None
    if not isinstance(defense, (tuple, list)) or len(defense) != 2 or \
            not isinstance(defense[0], str) or \
            not (defense[1] is None or isinstance(defense[1], Mapping)):
        raise TypeError(f"defense must be None or a (name, config dict) pair, e.g. "
                        f"('oni', {{}}), got {short_repr(defense)}")
    return defense[0], None if defense[1] is None else dict(defense[1])


def _check_adaptive(cfg, defense) -> None:
    """The settings an adaptive attack (shadow models trained with ``defense``) refuses."""
    if defense is None:
        return
    if cfg.get("fit_on") == "known":
        raise ValueError("defense applies to shadow models, but config['fit_on'] = 'known' "
                         "trains none (the attack fits on the target's own outputs); use "
                         "fit_on='shadow' for an adaptive attack")
    if cfg["shadow_precision"] != "float32":
        raise ValueError(f"config['shadow_precision'] = {cfg['shadow_precision']!r} applies to "
                         f"undefended shadows (oni.shadows.train_mlps_batched); the adaptive "
                         f"attack trains its shadows with defense {defense[0]!r} in float32")


def _check_inputs(target, data, splits, train_config, seed) -> None:
    if not callable(getattr(target, "predict_proba", None)):
        raise TypeError(f"target must have a callable predict_proba (an "
                        f"oni.defenses.DefendedModel), got {type(target).__name__}")
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be an oni.data.Dataset, got {type(data).__name__}")
    if not isinstance(splits, Splits):
        raise TypeError(f"splits must be an oni.data.Splits, got {type(splits).__name__}")
    _check_config(train_config, "train_config")
    check_seed(seed)
    splits.check(data.n)
    if len(splits.target) == 0:
        raise ValueError("splits.target is empty: there is nothing to attack")
    # here, or a target's predict_proba names the row by its place among the queried rows
    check_finite(data.x, "data.x")


def _shadow_hidden(cfg, target, data: Dataset) -> Tuple[int, ...]:
    """The shadows' hidden widths: config['hidden'], else the target model's."""
    if cfg["hidden"] is not None:
        return cfg["hidden"]
    model = getattr(target, "model", None)
    if not isinstance(model, MLP):
        raise ValueError(f"target.model is not an oni.models.MLP ({type(model).__name__}): "
                         f"give the shadow architecture as config['hidden']")
    if (model.d, model.k) != (data.d, data.k):
        raise ValueError(f"target.model maps {model.d} features to {model.k} classes but data "
                         f"has d = {data.d}, k = {data.k}")
    return tuple(model.hidden)


def _row_off_one(probs: Tensor, dtype: torch.dtype) -> Optional[Tuple[Tuple[int, ...], float]]:
    """The index of the row of ``probs`` ``[..., k]`` whose sum strays furthest from 1, and
    that sum, when it strays further than rows of ``dtype`` may (bfloat16 or float16
    probabilities are rounded each, so their rows stray further); None otherwise."""
    sums = probs.double().sum(-1)
    worst = tuple(int(i) for i in np.unravel_index(int((sums - 1).abs().argmax()),
                                                   tuple(sums.shape)))
    total = float(sums[worst])
    return (worst, total) if abs(total - 1) > max(_PROB_SLACK, 4 * torch.finfo(dtype).eps) \
        else None


def _query(predict: Callable[[Tensor], Tensor], x: Tensor, k: int, who: str) -> Tensor:
    """``predict(x)`` checked to be ``[n, k]`` probabilities; float32 CPU."""
    probs = predict(x)
    if not isinstance(probs, Tensor) or probs.shape != (x.shape[0], k) or \
            not probs.dtype.is_floating_point:
        got = (f"{probs.dtype} {tuple(probs.shape)}" if isinstance(probs, Tensor)
               else type(probs).__name__)
        raise ValueError(f"{who}.predict_proba must return [n, k] = [{x.shape[0]}, {k}] "
                         f"floating probabilities, got {got}")
    dtype = probs.dtype
    probs = probs.detach().float().cpu()
    if not probs.numel():
        return probs
    if not torch.isfinite(probs).all() or probs.min() < 0:
        raise ValueError(f"{who}.predict_proba must return probabilities (finite, >= 0, rows "
                         f"summing to 1): got values in [{float(probs.min())}, "
                         f"{float(probs.max())}] (logits instead of probabilities?)")
    off = _row_off_one(probs, dtype)
    if off is not None:
        (row,), total = off
        raise ValueError(f"{who}.predict_proba must return probabilities, rows summing to 1: "
                         f"row {row} sums to {total:.6g} (values "
                         f"in [{float(probs.min())}, {float(probs.max())}]; logits instead "
                         f"of probabilities?)")
    return probs


# ----------------------------------------------------------------------------- shadows

def _train_shadows(data: Dataset, index_sets: Tensor, seeds: List[int], hidden, train_config,
                   defense, precision: str = "float32") -> List[Callable[[Tensor], Tensor]]:
    """Trains one shadow per row of ``index_sets`` [K, m]; returns their predict_proba.

    Undefended shadows are trained together (:func:`oni.shadows.train_mlps_batched`, the same
    models as ``train_model`` one by one; ``precision="bf16"``: mixed precision, faster, not
    the same models); defended ones one by one with ``oni.defenses.defend`` (the adaptive
    attacker), in float32 only."""
    if defense is None:
        models = train_mlps_batched(data.d, data.k, hidden, index_sets, data.x, data.y,
                                    seeds=seeds, config=train_config, precision=precision)
        return [_UndefendedShadow(model) for model in models]
    from .defenses import defend  # here: only adaptive attacks need the defenses

    name, defense_config = defense
    predictors = []
    for j, (idx, shadow_seed) in enumerate(zip(index_sets, seeds)):
        # n_classes: a shadow's rows may lack the last classes
        with warning_context(f"adaptive shadow model {j + 1} of {len(seeds)} ({name} "
                             f"defense)"):
            defended = defend(name, data.x[idx], data.y[idx], config=defense_config,
                              train_config=replace(train_config, seed=shadow_seed),
                              hidden=hidden, seed=shadow_seed, n_classes=data.k)
        predictors.append(defended.predict_proba)
    return predictors


class _UndefendedShadow:
    """An undefended shadow's predict_proba; LiRA evaluates these batched (through
    ``.model``), never a defended shadow, whose outputs only its predict_proba gives."""

    def __init__(self, model: MLP):
        self.model = model

    def __call__(self, x: Tensor) -> Tensor:
        return predict_proba(self.model, x)


def _shadow_seeds(seed: int, purpose: str, n: int) -> List[int]:
    return [_derived_seed(seed, f"{purpose}:model:{j}") for j in range(n)]


# ----------------------------------------------------------------------------- reference data

@dataclass
class _Reference:
    """Outputs of the adversary's reference models on rows whose membership it knows."""

    probs: Tensor    # [n, k] float32
    labels: Tensor   # [n] int64
    member: Tensor   # [n] bool
    fit: Tensor      # [n] bool: True = fits the attack, False = held out for calibration
    info: Dict[str, Any]
    rows: Tensor     # [n] int64: the data rows queried
    source: Tensor   # [n] int64: which of ``predictors`` answered each row
    predictors: List[Callable[[Tensor], Tensor]]  # the label-only attack queries them again


_REFERENCE_KEYS = tuple(_REFERENCE_DEFAULTS)


def _holdout_mask(n_rows: int, fraction: float, gen: torch.Generator) -> Tensor:
    """True for the rows kept for fitting; a random ``round(fraction * n)`` are held out
    (at least one when the fraction is positive, never all)."""
    n_hold = min(max(round(fraction * n_rows), 1 if fraction > 0 else 0), n_rows - 1)
    fit = torch.ones(n_rows, dtype=torch.bool)
    fit[torch.randperm(n_rows, generator=gen)[:n_hold]] = False
    return fit


def _reference_size(cfg, splits: Splits) -> int:
    """Rows per side (members, non-members) of the shadow, metric and label-only attacks'
    reference data: ``shadow_size``, or its default. Raises ValueError when the splits cannot
    hold it (checked by :func:`check_attack_sizes` before any model trains)."""
    pool = splits.shadow_pool
    if cfg["fit_on"] == "known":
        m = min(len(splits.known), len(pool))
        if cfg["shadow_size"] is not None:
            if cfg["shadow_size"] > m:
                raise ValueError(f"config['shadow_size'] = {cfg['shadow_size']} but fit_on="
                                 f"'known' has only {m} rows per side (splits.known: "
                                 f"{len(splits.known)}, shadow pool: {len(pool)})")
            m = cfg["shadow_size"]
            if m < 2:
                raise ValueError(f"config['shadow_size'] = {m}, but fit_on='known' needs at "
                                 f"least 2 members and 2 non-members")
        if m < 2:
            raise ValueError(f"fit_on='known' needs at least 2 rows in splits.known and in the "
                             f"shadow pool, got {len(splits.known)} and {len(pool)}")
        return m
    m = cfg["shadow_size"] or min(len(splits.train), len(pool) // 2)
    if 2 * m > len(pool) or m < 2:
        if len(pool) < 4:
            raise ValueError(f"attacks with shadow models need a shadow pool of at least 4 "
                             f"rows (2 members and 2 non-members per shadow), got "
                             f"{len(pool)}")
        raise ValueError(f"attacks with shadow models split the shadow pool ({len(pool)} "
                         f"rows) into each shadow's members and non-members of shadow_size = "
                         f"{m} rows each"
                         f"{_default_size_note(cfg, splits)}: it needs 2 <= shadow_size <= "
                         f"{len(pool) // 2}")
    return m


def _build_reference(cfg, target, data: Dataset, splits: Splits, train_config, defense,
                     seed: int) -> _Reference:
    gen = torch.Generator().manual_seed(_derived_seed(seed, "reference:split"))
    pool = splits.shadow_pool
    frac = cfg["calibration_fraction"]
    probs, labels, member, fit = [], [], [], []
    if cfg["fit_on"] == "known":
        m = _reference_size(cfg, splits)
        inside = splits.known[torch.randperm(len(splits.known), generator=gen)[:m]]
        outside = pool[torch.randperm(len(pool), generator=gen)[:m]]
        for rows, is_member in ((inside, True), (outside, False)):
            probs.append(_query(target.predict_proba, data.x[rows], data.k, "target"))
            labels.append(data.y[rows])
            member.append(torch.full((m,), is_member))
            fit.append(_holdout_mask(m, frac, gen))
        return _Reference(torch.cat(probs), torch.cat(labels), torch.cat(member),
                          torch.cat(fit), {"reference_size": m},
                          torch.cat([inside, outside]), torch.zeros(2 * m, dtype=torch.long),
                          [target.predict_proba])

    hidden = _shadow_hidden(cfg, target, data)
    m = _reference_size(cfg, splits)
    n_shadows = cfg["n_shadows"]
    splits_in, splits_out = [], []
    for _ in range(n_shadows):
        order = pool[torch.randperm(len(pool), generator=gen)]
        splits_in.append(order[:m])
        splits_out.append(order[m:2 * m])
    predictors = _train_shadows(data, torch.stack(splits_in),
                                _shadow_seeds(seed, "reference", n_shadows), hidden,
                                train_config, defense, cfg["shadow_precision"])
    train_acc, test_acc, queried, source = [], [], [], []
    for j, (predict, inside, outside) in enumerate(zip(predictors, splits_in, splits_out)):
        for rows, is_member, accs in ((inside, True, train_acc), (outside, False, test_acc)):
            p = _query(predict, data.x[rows], data.k, "shadow model")
            probs.append(p)
            labels.append(data.y[rows])
            member.append(torch.full((m,), is_member))
            fit.append(_holdout_mask(m, frac, gen))
            accs.append(float((p.argmax(1) == data.y[rows]).double().mean()))
            queried.append(rows)
            source.append(torch.full((m,), j, dtype=torch.long))
    return _Reference(torch.cat(probs), torch.cat(labels), torch.cat(member), torch.cat(fit),
                      {"shadow_size": m, "hidden": list(hidden),
                       "shadow_train_acc": train_acc, "shadow_test_acc": test_acc},
                      torch.cat(queried), torch.cat(source), predictors)


def _calibration(scores: Tensor, ref: _Reference) -> Optional[Tuple[Tensor, Tensor]]:
    held = ~ref.fit
    if not bool(held.any()):
        return None
    return scores[held].double(), ref.member[held].clone()


# ----------------------------------------------------------------------------- shadow attack

class _AttackNet(nn.Module):
    """The attack model: subnets on the prediction vector and on the one-hot label, and one
    on the concatenation of their outputs ending in a member logit (ReLU between layers)."""

    def __init__(self, k: int, prediction_widths, label_widths, combined_widths):
        super().__init__()
        self.prediction = _relu_stack(k, prediction_widths)
        self.label = _relu_stack(k, label_widths)
        width = prediction_widths[-1] + label_widths[-1]
        self.combined = nn.Sequential(_relu_stack(width, combined_widths),
                                      nn.Linear((width, *combined_widths)[-1], 1))

    def forward(self, probs: Tensor, onehot: Tensor) -> Tensor:
        joint = torch.cat([self.prediction(probs), self.label(onehot)], dim=1)
        return self.combined(joint).squeeze(1)

    def init_(self, std: float, gen: torch.Generator) -> "_AttackNet":
        """Weights ~ N(0, std^2), zero biases; drawn on the CPU from ``gen``."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.empty(module.weight.shape).normal_(
                        0.0, std, generator=gen))
                    module.bias.zero_()
        return self


def _relu_stack(width: int, widths) -> nn.Sequential:
    layers = []
    for w in widths:
        layers += [nn.Linear(width, w), nn.ReLU()]
        width = w
    return nn.Sequential(*layers)


def _train_attack_net(cfg, probs: Tensor, labels: Tensor, member: Tensor, k: int,
                      device: torch.device, seed: int) -> _AttackNet:
    net = _AttackNet(k, cfg["prediction_widths"], cfg["label_widths"], cfg["combined_widths"])
    net.init_(cfg["weight_std"], torch.Generator().manual_seed(_derived_seed(seed, "net:init")))
    net.to(device).train()
    x = probs.to(device)
    onehot = nn.functional.one_hot(labels, k).float().to(device)
    target = member.float().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg["attack_lr"])
    order_gen = torch.Generator().manual_seed(_derived_seed(seed, "net:order"))
    n, bs = len(target), cfg["attack_batch_size"]
    for _ in range(cfg["attack_epochs"]):
        order = torch.randperm(n, generator=order_gen).to(device)
        for lo in range(0, n, bs):
            idx = order[lo:lo + bs]
            loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx], onehot[idx]),
                                                                  target[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    # one check at the end: a diverged net would only surface later as NaN scores
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        raise FloatingPointError(f"the shadow attack's model diverged (its weights hold NaN or "
                                 f"Inf); lower config['attack_lr'] = {cfg['attack_lr']:g} or "
                                 f"config['weight_std'] = {cfg['weight_std']:g}")
    return net.eval()


@torch.no_grad()
def _member_probability(net: _AttackNet, probs: Tensor, labels: Tensor, k: int,
                        device: torch.device) -> Tensor:
    logits = [net(probs[lo:lo + 8192].to(device),
                  nn.functional.one_hot(labels[lo:lo + 8192], k).float().to(device)).cpu()
              for lo in range(0, max(len(labels), 1), 8192)]
    return torch.sigmoid(torch.cat(logits).double())  # float64: later saturation


def _shadow_attack(cfg, ref: _Reference, target_probs: Tensor, target_labels: Tensor, k: int,
                   device: torch.device, seed: int):
    net = _train_attack_net(cfg, ref.probs[ref.fit], ref.labels[ref.fit], ref.member[ref.fit],
                            k, device, seed)
    scores = _member_probability(net, target_probs, target_labels, k, device)
    if len(scores) > 1 and bool((scores == scores[0]).all()):
        # a legitimate outcome would vary a little; one value is a dead or saturated net
        warnings.warn(f"the shadow attack's model gives every target row the same score "
                      f"({float(scores[0]):.6g}), so its AUC is 0.5 by construction: its units "
                      f"died or saturated (config['attack_lr'] = {cfg['attack_lr']:g}, "
                      f"config['weight_std'] = {cfg['weight_std']:g})",
                      stacklevel=5)  # run_attacks' caller (_run, its dict comprehension)
    calibration = _calibration(_member_probability(net, ref.probs, ref.labels, k, device), ref)
    return scores, calibration, {}


# ----------------------------------------------------------------------------- metric attacks

def _check_probs_and_labels(probs, labels) -> None:
    """probs ``[..., n, k]`` floating, labels ``[n]`` integer class indices in [0, k): a
    mismatch would broadcast (one label for every row) or gather the wrong rows."""
    if not isinstance(probs, Tensor) or probs.dim() < 2 or not probs.dtype.is_floating_point:
        raise ValueError(f"probs must be a floating tensor [..., n, k], got "
                         f"{tuple(probs.shape) if isinstance(probs, Tensor) else type(probs)}")
    n, k = probs.shape[-2:]
    if not isinstance(labels, Tensor) or labels.dim() != 1 or len(labels) != n:
        raise ValueError(f"labels must be a tensor [n] = [{n}] (one per row of probs), got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels)}")
    if not is_integer_dtype(labels.dtype):
        raise TypeError(f"labels must hold integer class indices, got {labels.dtype}")
    for tensor, name in ((probs, "probs"), (labels, "labels")):
        if tensor.layout != torch.strided:
            raise TypeError(f"{name} must be a dense tensor, got layout {tensor.layout}")
        check_not_meta(tensor, name)
    check_class_indices(labels, "labels", k)
    # probabilities (softmax outputs): NaN would pass silently into (or out of) the scores,
    # and logits or sigmoids given by mistake would give entropies and losses of no meaning.
    # The slack is _query's, which takes a predict_proba's rows summing to 1 within it.
    check_finite(probs, "probs")
    if not probs.numel():
        return
    if float(probs.min()) < 0 or float(probs.max()) > 1 + _PROB_SLACK:
        raise ValueError(f"probs must be probabilities in [0, 1] (softmax outputs, not "
                         f"logits), got values in [{float(probs.min()):g}, "
                         f"{float(probs.max()):g}]")
    off = _row_off_one(probs, probs.dtype)
    if off is not None:
        worst, total = off
        raise ValueError(f"probs must be probabilities, rows summing to 1 (softmax outputs): "
                         f"row [{', '.join(map(str, worst))}] sums to {total:.6g}")

def metric_values(metric: str, probs: Tensor, labels: Tensor) -> Tensor:
    """Song & Mittal's per-row values, oriented so that higher = more likely a member.

    Parameters
    ----------
    metric : str
        One of ``"correctness"``, ``"confidence"``, ``"entropy"``, ``"modified_entropy"``,
        ``"loss"`` (see the module docstring for the formulas).
    probs : Tensor
        ``[n, k]`` probabilities (softmax outputs): finite, in [0, 1], each row summing to 1
        within 1e-3 (4 epsilons of a bfloat16 or float16 ``probs``); a dense tensor.
    labels : Tensor
        ``[n]`` class indices.

    Returns
    -------
    Tensor
        ``[n]`` float64.

    Raises
    ------
    ValueError
        ``probs`` that are not such probabilities (logits or sigmoid outputs by mistake),
        on the meta device, or of another shape; ``labels`` out of range.
    TypeError
        A sparse tensor, or labels that are not integers.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {short_repr(metric)}")
    _check_probs_and_labels(probs, labels)
    if probs.dim() != 2:
        raise ValueError(f"probs must be [n, k], got shape {tuple(probs.shape)}")
    return _metric_values(metric, probs, labels)


def _metric_values(metric: str, probs: Tensor, labels: Tensor) -> Tensor:
    """:func:`metric_values` of rows checked already (by ``_query``: a bfloat16 target's
    rows were checked with bfloat16's slack before they became float32)."""
    p = probs.double()
    y = labels.long().unsqueeze(1)
    p_y = p.gather(1, y).squeeze(1)
    if metric == "correctness":
        return (p.argmax(1) == labels).double()
    if metric == "confidence":
        return p_y
    log_p = p.clamp_min(_LOG_FLOOR).log()
    if metric == "entropy":
        return (p * log_p).sum(1)  # -H(p)
    if metric == "loss":
        return log_p.gather(1, y).squeeze(1)  # -cross-entropy
    # modified entropy: -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i), negated
    log_not_p = (1.0 - p).clamp_min(_LOG_FLOOR).log()
    others = (p * log_not_p).scatter(1, y, 0.0).sum(1)
    return (1.0 - p_y) * log_p.gather(1, y).squeeze(1) + others


def _best_threshold(values: Tensor, member: Tensor) -> float:
    """The value ``t`` maximising the balanced accuracy of "member iff value >= t" (Song &
    Mittal's rule; the candidates are the values themselves, the highest wins ties)."""
    v = values.numpy()
    is_in = member.numpy()
    order = np.argsort(-v, kind="stable")
    v, is_in = v[order], is_in[order]
    tpr = np.cumsum(is_in) / max(int(is_in.sum()), 1)
    fpr = np.cumsum(~is_in) / max(int((~is_in).sum()), 1)
    last_of_value = np.append(v[1:] != v[:-1], True)  # "value >= t" takes every tie
    balanced = np.where(last_of_value, (tpr + 1.0 - fpr) / 2.0, -1.0)
    return float(v[int(np.argmax(balanced))])


def _fit_thresholds(values: Tensor, labels: Tensor, member: Tensor, k: int, mode: str
                    ) -> Tuple[Tensor, List[int]]:
    """Per-class thresholds [k] float64, and the classes that fell back to the global one."""
    overall = _best_threshold(values, member)
    thresholds = torch.full((k,), overall, dtype=torch.float64)
    fallback = []
    if mode == "global":
        return thresholds, fallback
    for c in range(k):
        rows = labels == c
        in_c = member[rows]
        if bool(in_c.any()) and bool((~in_c).any()):
            thresholds[c] = _best_threshold(values[rows], in_c)
        else:
            fallback.append(c)
    return thresholds, fallback


def _metric_attack(metric: str, cfg, ref: _Reference, target_probs: Tensor,
                   target_labels: Tensor, k: int):
    values = _metric_values(metric, ref.probs, ref.labels)
    target_values = _metric_values(metric, target_probs, target_labels)
    if metric == "correctness":  # a 0/1 rule: no threshold to fit
        return target_values, _calibration(values, ref), {}
    fit = ref.fit
    thresholds, fallback = _fit_thresholds(values[fit], ref.labels[fit], ref.member[fit], k,
                                           cfg["thresholds"])
    scores = target_values - thresholds[target_labels]
    calibration = _calibration(values - thresholds[ref.labels], ref)
    return scores, calibration, {"thresholds": thresholds, "fallback_classes": fallback}


# ----------------------------------------------------------------------------- label-only

def _robustness(predict: Callable[[Tensor], Tensor], x: Tensor, labels: Tensor, clean: Tensor,
                sigmas: Sequence[float], n_queries: int, gen: torch.Generator, k: int,
                who: str, noise: str = "gaussian") -> Tensor:
    """The label-only value: per sigma, the share of the ``n_queries + 1`` copies of each row
    (the clean one, whose predicted class is ``clean``, and the noisy ones: ``x + sigma z``,
    ``z ~ N(0, I)``, or for ``noise="bitflip"`` ``x`` with each feature flipped where
    ``u < sigma``, ``u ~ U(0, 1)``) that ``predict`` labels ``labels``. ``[len(sigmas), n]``
    float64.

    Every sigma uses the same draws (so the sigmas are compared on the same noise, and a
    larger flip probability flips a superset of the features); the draws come from ``gen``
    in blocks of rows whose size depends only on ``n_queries`` and ``d``, and only the
    argmax of ``predict``'s output is used."""
    n, d = x.shape
    kept = torch.zeros(len(sigmas), n, dtype=torch.float64)
    block = max(1, _NOISE_BLOCK // (n_queries * max(d, 1)))
    for lo in range(0, n, block):
        xb, yb = x[lo:lo + block], labels[lo:lo + block].unsqueeze(1)
        draw = torch.rand if noise == "bitflip" else torch.randn
        z = draw(len(xb), n_queries, d, generator=gen, dtype=xb.dtype)
        for i, sigma in enumerate(sigmas):
            if noise == "bitflip":
                rows = xb.unsqueeze(1).expand(-1, n_queries, -1)
                noisy = torch.where(z < sigma, 1 - rows, rows).reshape(-1, d)
            else:
                noisy = (xb.unsqueeze(1) + sigma * z).reshape(-1, d)  # [b * n_queries, d]
            if not bool(torch.isfinite(noisy).all()):  # x is finite: sigma overflowed
                raise ValueError(f"the label-only queries x + sigma * z overflow {x.dtype} at "
                                 f"sigma = {sigma:g}; lower config['sigma'] or "
                                 f"config['sigma_grid']")
            predicted = _query(predict, noisy, k, who).argmax(1).view(len(xb), n_queries)
            kept[i, lo:lo + len(xb)] = (predicted == yb).sum(1).double()
    return (kept + (clean == labels).double()) / (n_queries + 1)


def _check_binary(data: Dataset) -> None:
    """Flipping a feature means 1 - x: for 0/1 features only. Scanned in row blocks: whole,
    the masks of Texas100-sized data took 1.2 GB."""
    block = max(1, (1 << 22) // max(data.d, 1))
    for lo in range(0, data.n, block):
        rows = data.x[lo:lo + block]
        off = (rows != 0) & (rows != 1)
        if bool(off.any()):
            row, col = (int(i) for i in off.nonzero()[0])
            raise ValueError(f"config['noise'] = 'bitflip' flips 0/1 features, but "
                             f"data.x[{lo + row}, {col}] is {float(rows[row, col])!r}; use "
                             f"noise='gaussian'")


def _balanced_accuracy(values: Tensor, member: Tensor, threshold: float) -> float:
    """Balanced accuracy of "member iff value >= threshold"."""
    said_in = values >= threshold
    return 0.5 * (float(said_in[member].double().mean()) +
                  float((~said_in[~member]).double().mean()))


def _label_only_attack(cfg, ref: _Reference, target, data: Dataset, target_rows: Tensor,
                       target_probs: Tensor, seed: int):
    """Choquette-Choo et al. 2021's noise-robustness attack (see the module docstring)."""
    k, n_queries, noise = data.k, cfg["n_queries"], cfg["noise"]
    sigmas = cfg["sigma_grid"] if cfg["sigma"] is None else (cfg["sigma"],)
    values = torch.empty(len(sigmas), len(ref.labels), dtype=torch.float64)
    for j, predict in enumerate(ref.predictors):
        rows = (ref.source == j).nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(_derived_seed(seed, f"label-only:reference:{j}"))
        values[:, rows] = _robustness(predict, data.x[ref.rows[rows]], ref.labels[rows],
                                      ref.probs[rows].argmax(1), sigmas, n_queries, gen, k,
                                      "shadow model" if cfg["fit_on"] == "shadow" else "target",
                                      noise)
    fit = ref.fit
    accuracy = [_balanced_accuracy(v[fit], ref.member[fit], _best_threshold(v[fit],
                                                                            ref.member[fit]))
                for v in values]
    best = int(np.argmax(accuracy))  # ties: the grid's earliest sigma
    sigma, values = sigmas[best], values[best]
    thresholds, fallback = _fit_thresholds(values[fit], ref.labels[fit], ref.member[fit], k,
                                           cfg["thresholds"])
    target_labels = data.y[target_rows]
    gen = torch.Generator().manual_seed(_derived_seed(seed, "label-only:target"))
    target_values = _robustness(target.predict_proba, data.x[target_rows], target_labels,
                                target_probs.argmax(1), (sigma,), n_queries, gen, k,
                                "target", noise)[0]
    scores = target_values - thresholds[target_labels]
    calibration = _calibration(values - thresholds[ref.labels], ref)
    return scores, calibration, {"sigma": sigma, "sigma_balanced_accuracy": accuracy,
                                 "thresholds": thresholds, "fallback_classes": fallback,
                                 "observed_robustness": target_values}


# ----------------------------------------------------------------------------- LiRA

def scaled_logit(probs: Tensor, labels: Tensor) -> Tensor:
    """LiRA's logit-scaled confidence ``phi = log p_y - log sum_{i != y} p_i``.

    Computed in float64 from the probabilities, the sum over the other classes taken directly
    (not as ``1 - p_y``, which rounds to 0 for confident rows); both terms are floored at
    ``1e-45``, so ``phi`` stays finite (within about +-104).

    Parameters
    ----------
    probs : Tensor
        ``[..., n, k]`` probabilities, checked as by :func:`metric_values`.
    labels : Tensor
        ``[n]`` class indices.

    Returns
    -------
    Tensor
        ``[..., n]`` float64.
    """
    _check_probs_and_labels(probs, labels)
    return _scaled_logit(probs, labels)


def _scaled_logit(probs: Tensor, labels: Tensor) -> Tensor:
    """:func:`scaled_logit` of rows checked already (see :func:`_metric_values`)."""
    p = probs.double()
    y = labels.long().expand(p.shape[:-1]).unsqueeze(-1)
    p_y = p.gather(-1, y).squeeze(-1)
    rest = p.scatter(-1, y, 0.0).sum(-1)
    return p_y.clamp_min(_PHI_FLOOR).log() - rest.clamp_min(_PHI_FLOOR).log()


def _shadow_phi(predictors, x: Tensor, labels: Tensor, k: int, device) -> Tensor:
    """``phi`` of every shadow on the rows ``x``: ``[K, n]`` float64."""
    out = []
    for first in range(0, len(predictors), _PHI_MODEL_CHUNK):
        chunk = predictors[first:first + _PHI_MODEL_CHUNK]
        if all(isinstance(p, _UndefendedShadow) for p in chunk):
            probs = torch.softmax(predict_logits_batched([p.model for p in chunk], x,
                                                         device=device), dim=2)
            check_finite(probs, "the shadow models' probabilities")  # logits that overflow
        else:
            probs = torch.stack([_query(p, x, k, "shadow model") for p in chunk])
        out.append(_scaled_logit(probs, labels))
    return torch.cat(out)


def _gaussian_fit(phi: Tensor, mask: Tensor, global_variance: bool) -> Tuple[Tensor, Tensor]:
    """Per-row mean and variance of ``phi`` [K, n] over the models where ``mask`` [K, n].

    The global variance is the pooled within-row variance (each row's squared deviations
    from its own mean, over all rows' degrees of freedom); rows with fewer than two samples
    use it also when per-row variances are asked for."""
    count = mask.sum(0)
    if bool((count == 0).any()):
        raise RuntimeError("LiRA: a row has no shadow model on one side (a bug: the pairs "
                           "design gives every row both sides)")
    w = mask.double()
    mean = (phi * w).sum(0) / count
    squares = ((phi - mean) ** 2 * w).sum(0)
    dof = count - 1
    pooled = squares.sum() / dof.sum().clamp_min(1)
    if global_variance:
        var = pooled.expand_as(mean)
    else:
        var = torch.where(dof > 0, squares / dof.clamp_min(1), pooled)
    return mean, var.clamp_min(_MIN_VARIANCE)


def _log_normal(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def _lira_scores(observed: Tensor, phi: Tensor, keep: Tensor, online: bool,
                 global_variance: bool) -> Tensor:
    """LiRA's score of rows with target-side ``observed`` [n] given shadows' ``phi`` [K, n]
    and their membership ``keep`` [K, n]."""
    mean_out, var_out = _gaussian_fit(phi, ~keep, global_variance)
    if online:
        mean_in, var_in = _gaussian_fit(phi, keep, global_variance)
        return _log_normal(observed, mean_in, var_in) - _log_normal(observed, mean_out, var_out)
    return torch.special.log_ndtr((observed - mean_out) / var_out.sqrt())


def _default_size_note(cfg, splits: Splits) -> str:
    """Where a shadow size the user did not give came from."""
    if cfg["shadow_size"] is not None:
        return ""
    return (f" (config['shadow_size'] = None: the target's {len(splits.train)} training rows, "
            f"capped at half the pool)")


def _lira_size(online: bool, cfg, splits: Splits) -> int:
    """LiRA's m (rows per shadow, from a pool of 2m): ``shadow_size``, or its default. Raises
    ValueError when the splits cannot hold it (checked by :func:`check_attack_sizes` before any
    model trains)."""
    n_target = len(splits.target)
    available = len(splits.shadow_pool) + (n_target if online else 0)
    m = cfg["shadow_size"] or min(len(splits.train), available // 2)
    mode = "online" if online else "offline"
    low, high = (max(1, -(-n_target // 2)) if online else 1), available // 2
    if 2 * m > available or m < 1 or (online and 2 * m < n_target):
        pool_text = (f"the available pool has {available} rows (shadow pool"
                     f"{' + target rows' if online else ''})"
                     + (f" and must hold the {n_target} target rows" if online else ""))
        if low > high:
            raise ValueError(f"LiRA {mode} trains each shadow on m rows of a pool of 2m: "
                             f"{pool_text}, too few for any m (it needs at least {2 * low})")
        raise ValueError(f"LiRA {mode} trains each shadow on shadow_size = m rows of a pool of "
                         f"2m: {pool_text}, so m must be in [{low}, {high}]; got {m}"
                         f"{_default_size_note(cfg, splits)}")
    return m


def _lira(online: bool, cfg, target, data: Dataset, splits: Splits, train_config, defense,
          seed: int, target_probs: Tensor):
    n_shadows = cfg["n_shadows"]
    target_rows = splits.target
    n_target = len(target_rows)
    pool_src = splits.shadow_pool
    m = _lira_size(online, cfg, splits)
    mode = "online" if online else "offline"
    purpose = f"lira-{mode}"
    gen = torch.Generator().manual_seed(_derived_seed(seed, f"{purpose}:pool"))
    extra_rows = pool_src[torch.randperm(len(pool_src), generator=gen)]
    pool = torch.cat([target_rows, extra_rows[:2 * m - n_target]]) if online \
        else extra_rows[:2 * m]
    keep = torch.zeros(n_shadows, 2 * m, dtype=torch.bool)
    for pair in range(n_shadows // 2):
        half = torch.randperm(2 * m, generator=gen)[:m]
        keep[2 * pair, half] = True
        keep[2 * pair + 1] = ~keep[2 * pair]
    index_sets = torch.stack([pool[row.nonzero().squeeze(1)] for row in keep])
    hidden = _shadow_hidden(cfg, target, data)
    predictors = _train_shadows(data, index_sets, _shadow_seeds(seed, purpose, n_shadows),
                                hidden, train_config, defense, cfg["shadow_precision"])
    global_variance = cfg["global_variance"]
    if global_variance is None:
        global_variance = n_shadows < 64
    device = _resolve_device(train_config.device)

    phi_pool = _shadow_phi(predictors, data.x[pool], data.y[pool], data.k, device)
    observed = _scaled_logit(target_probs, data.y[target_rows])
    if online:  # the target rows are the pool's first n_target rows
        phi_t, keep_t = phi_pool[:, :n_target], keep[:, :n_target]
    else:
        phi_t = _shadow_phi(predictors, data.x[target_rows], data.y[target_rows], data.k,
                            device)
        keep_t = torch.zeros_like(phi_t, dtype=torch.bool)
    scores = _lira_scores(observed, phi_t, keep_t, online, global_variance)
    # calibration: shadow 0 plays the target, the other K - 1 shadows are the reference
    cal_scores = _lira_scores(phi_pool[0], phi_pool[1:], keep[1:], online, global_variance)
    info = {"shadow_size": m, "pool_size": 2 * m, "hidden": list(hidden),
            "global_variance": global_variance, "observed_phi": observed,
            "pool_rows": pool, "shadow_membership": keep}
    return scores, (cal_scores, keep[0].clone()), info


# ----------------------------------------------------------------------------- entry points

def _run(name: str, target, data: Dataset, splits: Splits, config, train_config, defense,
         seed: int, cache: Dict[tuple, _Reference]) -> AttackResult:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {short_repr(name)}; the attacks are {ATTACKS}")
    cfg = _resolve_config(name, config)
    _check_adaptive(cfg, defense)
    target_x, target_y = data.x[splits.target], data.y[splits.target]
    target_probs = _query(target.predict_proba, target_x, data.k, "target")
    extra: Dict[str, Any] = {"config": dict(cfg), "defense": defense, "seed": seed}
    if name.startswith("lira"):
        scores, calibration, info = _lira(name == "lira_online", cfg, target, data, splits,
                                          train_config, defense, seed, target_probs)
    else:
        key = tuple(cfg[k] for k in _REFERENCE_KEYS)
        if key not in cache:
            cache[key] = _build_reference(cfg, target, data, splits, train_config, defense,
                                          seed)
        ref = cache[key]
        if name == "shadow":
            device = _resolve_device(train_config.device)
            scores, calibration, info = _shadow_attack(cfg, ref, target_probs, target_y,
                                                       data.k, device, seed)
        elif name == "label_only":
            scores, calibration, info = _label_only_attack(cfg, ref, target, data,
                                                           splits.target, target_probs, seed)
        else:
            scores, calibration, info = _metric_attack(name[len("metric_"):], cfg, ref,
                                                       target_probs, target_y, data.k)
        info = {**ref.info, **info}
    extra.update(info)
    return AttackResult(name, scores.double().contiguous(), calibration, extra)


def run_attack(name: str, target, data: Dataset, splits: Splits, *,
               config: Optional[Mapping] = None, train_config: TrainConfig,
               defense: Optional[Tuple[str, Optional[dict]]] = None,
               seed: int = 0) -> AttackResult:
    """Runs one membership inference attack on ``target``'s predictions for ``splits.target``.

    Parameters
    ----------
    name : str
        One of ``ATTACKS`` (see the module docstring for each).
    target : oni.defenses.DefendedModel
        What is attacked: only ``target.predict_proba`` is queried (``[n, d] -> [n, k]``
        probabilities); ``target.model`` (an :class:`oni.models.MLP`) gives the shadows'
        architecture unless ``config['hidden']`` does.
    data : Dataset
        The data set ``splits`` indexes; its features must be finite (every row, used or
        not).
    splits : Splits
        The adversary uses ``shadow_pool`` (and ``known`` with ``fit_on='known'``), and the
        labels of ``target``; scores are aligned with ``splits.target``.
    config : dict, optional
        Overrides of ``DEFAULTS[name]``:

        * shadow, metric and label-only attacks: ``n_shadows`` (1), ``shadow_size`` (None:
          the target's training-set size, capped at half the shadow pool),
          ``calibration_fraction`` (0.2), ``fit_on`` (``"shadow"``; ``"known"`` fits on the
          target's own outputs on ``splits.known`` and as many shadow-pool rows, no shadow
          model), ``hidden`` (None: the target model's), ``shadow_precision``
          (``"float32"``; ``"bf16"`` trains undefended shadows in mixed precision, see the
          module notes);
        * ``"shadow"`` also: ``prediction_widths`` ((1024, 512, 64)), ``label_widths``
          ((512, 64)), ``combined_widths`` ((256, 64)), ``weight_std`` (0.01),
          ``attack_epochs`` (30), ``attack_batch_size`` (128), ``attack_lr`` (1e-3);
        * metric attacks also: ``thresholds`` (``"class"`` or ``"global"``);
        * ``"label_only"`` also: ``n_queries`` (64), ``noise`` (``"gaussian"``, or
          ``"bitflip"`` for 0/1 features), ``sigma`` (None: picked from ``sigma_grid`` on
          the reference data; with ``"bitflip"`` a flip probability in (0, 1]),
          ``sigma_grid`` ((0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0)), ``thresholds``
          (``"global"``);
        * LiRA: ``n_shadows`` (16; even, >= 4; 64 and more are fine; at most 4096),
          ``shadow_size`` (None: the target's training-set size, capped at half the pool),
          ``global_variance`` (None: True when ``n_shadows < 64``), ``hidden``,
          ``shadow_precision`` (as above).
    train_config : TrainConfig
        How the target was trained; the shadows are trained the same way (with their own
        seeds), on ``train_config.device``, which also runs the attack model.
    defense : (str, dict) or None
        The adaptive attacker's knowledge: shadows are trained with
        ``oni.defenses.defend(defense[0], ..., config=defense[1])``. None: undefended
        shadows (trained batched with :func:`oni.shadows.train_mlps_batched`).
    seed : int
        Every random choice of the attack follows from it: the same seed gives the same
        scores (on the same machine and device).

    Returns
    -------
    AttackResult

    Raises
    ------
    TypeError, ValueError
        An unknown attack or setting, a bad argument, or splits too small for the attack
        (the message says what it needs).
    """
    return run_attacks((name,), target, data, splits,
                       configs=None if config is None else {name: config},
                       train_config=train_config, defense=defense, seed=seed)[name]


def check_attack_sizes(names: Sequence[str], splits: Splits,
                       configs: Optional[Mapping[str, Mapping]] = None, *,
                       defense: Optional[Tuple[str, Optional[dict]]] = None,
                       data: Optional[Dataset] = None) -> Dict[str, int]:
    """Checks that ``splits`` can hold the shadow models of the attacks ``names`` (each with
    ``configs.get(name)``, adaptive with ``defense`` as :func:`run_attack` takes it) before
    any model trains; :func:`run_attacks` does it first, and ``oni run`` as soon as the
    splits are drawn (before the target trains).

    Returns ``{name: m}``: the rows each shadow model trains on (LiRA: from a pool of 2m),
    or with ``fit_on='known'`` the members and the non-members the reference takes each.
    Raises TypeError or ValueError for ``names``, ``configs`` or ``defense`` that are not as
    :func:`run_attacks` takes them, and, naming the attack, for settings an attack refuses
    (with ``defense`` too: ``fit_on='known'``, bf16 shadows) or a ``shadow_size`` (or its
    default) that the splits cannot hold; with ``data``, also label-only's
    ``noise='bitflip'`` on features that are not all 0 or 1.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a sequence of attack names, got {type(names).__name__}")
    for name in names:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {short_repr(name)}; the attacks are {ATTACKS}")
    if len(set(names)) != len(names):
        raise ValueError(f"names lists an attack more than once: {list(names)}")
    configs = {} if configs is None else configs
    if not isinstance(configs, Mapping):
        raise TypeError(f"configs must be a dict {{attack name: config}}, got "
                        f"{type(configs).__name__}")
    stray = sorted(str(key) for key in configs if key not in names)
    if stray:
        raise ValueError(f"configs names attacks {stray} that are not in names {list(names)}")
    if not isinstance(splits, Splits):
        raise TypeError(f"splits must be an oni.data.Splits, got {type(splits).__name__}")
    defense = _check_defense(defense)
    sizes = {}
    for name in names:
        try:
            cfg = _resolve_config(name, configs.get(name))
            _check_adaptive(cfg, defense)
            if data is not None and cfg.get("noise") == "bitflip":
                _check_binary(data)
            sizes[name] = _lira_size(name == "lira_online", cfg, splits) \
                if name.startswith("lira") else _reference_size(cfg, splits)
        except (TypeError, ValueError) as err:
            raise type(err)(f"attack {name!r}: {err}") from None
    return sizes


def run_attacks(names: Sequence[str], target, data: Dataset, splits: Splits, *,
                configs: Optional[Mapping[str, Mapping]] = None, train_config: TrainConfig,
                defense: Optional[Tuple[str, Optional[dict]]] = None,
                seed: int = 0) -> Dict[str, AttackResult]:
    """Runs several attacks (see :func:`run_attack`), training the shadow models that the
    shadow, metric and label-only attacks share once: the results equal separate
    :func:`run_attack` calls with the same ``seed``.

    Parameters
    ----------
    names : sequence of str
        Attacks from ``ATTACKS``, each at most once.
    configs : dict, optional
        ``{attack name: config}`` for any of ``names``.
    target, data, splits, train_config, defense, seed
        As for :func:`run_attack`.

    Returns
    -------
    dict
        ``{name: AttackResult}`` in the order of ``names``.

    Every attack's settings and shadow size (:func:`check_attack_sizes`) are checked before
    the first shadow model trains.
    """
    return _run_attacks(names, target, data, splits, configs=configs,
                        train_config=train_config, defense=defense, seed=seed)


def _run_attacks(names: Sequence[str], target, data: Dataset, splits: Splits, *,
                 configs: Optional[Mapping[str, Mapping]] = None, train_config: TrainConfig,
                 defense: Optional[Tuple[str, Optional[dict]]] = None, seed: int = 0,
                 data_checked: bool = False) -> Dict[str, AttackResult]:
    """:func:`run_attacks`; ``data_checked``: the caller has already passed ``data`` to
    :func:`check_attack_sizes` with these attacks (``oni run`` does, once for all its
    defenses: the bitflip scan of data.x takes about 1 s at Texas100's size), so it is not
    scanned again."""
    _check_inputs(target, data, splits, train_config, seed)
    defense = _check_defense(defense)
    check_attack_sizes(names, splits, configs, defense=defense,  # before training
                       data=None if data_checked else data)
    configs = {} if configs is None else configs
    cache: Dict[tuple, _Reference] = {}
    return {name: _run(name, target, data, splits, configs.get(name), train_config, defense,
                       seed, cache) for name in names}
