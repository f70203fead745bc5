"""Defenses against membership inference behind one interface: training data + a config in,
a defended model and the prediction function an attacker queries out (docs/DESIGN.md, "The
method" items 5-6).

:func:`defend` ``(name, x, y, config=..., train_config=...)`` returns a
:class:`DefendedModel`. The defenses (:data:`DEFENSES`; defaults in :data:`DEFAULTS`, each
documented in :func:`defense_config`):

* ``"undefended"`` — :func:`oni.train.train_model` on ``(x, y)``.
* ``"uniform"`` — the paper's uniform-noise baseline: ``x' = x + U(-eps, eps)`` (the same
  budget for every feature and sample, :func:`oni.uniform_noise`), then the same
  distillation as ONI (soft labels of the undefended ``f`` at ``x'``, hard labels ``y``), so
  the two differ only in the noise.
* ``"oni"`` — Optimal Noise Injection: Shapley values of the undefended ``f``
  (:func:`oni.shapley_values`) -> budget (eq. 7) -> radius (eq. 8) -> minimum-norm noise
  (:func:`oni.optimal_noise`) -> a fresh model of the same architecture distilled on
  ``(x + eta, f(x + eta), y)`` with :func:`distillation_loss`.
* ``"dynanoise"`` — inference-time noise on the undefended model's logits
  (:class:`DynaNoise`).
* ``"dpsgd"`` — DP-SGD through opacus (optional dependency: ``pip install 'oni[defenses]'``),
  for a target ``(epsilon, delta)``; the epsilon spent is reported.
* ``"advreg"`` — Nasr et al. 2018's adversarial regularization (a min-max game with an
  inference model that tells members from a reference set).
* ``"label_smoothing"`` — cross-entropy with label smoothing.

Randomness: ``train_config.seed`` seeds every training run (initialisation and batch order,
:func:`oni.train.train_model`'s conventions); ``seed`` seeds the defense's own draws (noise,
Shapley walks, DynaNoise's stream, AdvReg's reference split), each from its own derived seed.
The same arguments give the same defended model (bitwise on one CPU with one thread count).
:func:`defend` leaves torch's global RNG (the CPU's, and the CUDA device's it runs on) as it
found it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._checks import (
    ADAM_FITS,
    MAX_ADAM_LR,
    NonFiniteLogits,
    check_class_indices,
    check_finite,
    check_finite_weights,
    check_int,
    check_not_meta,
    check_number,
    first_bad_row,
    is_integer_dtype,
)
from .models import (
    MLP,
    PAPER_HIDDEN,
    _check_hidden,
    _check_seed,
    _resolve_device,
    init_parameters_,
    load_model,
    save_model,
)
from .noise import MAX_STARTS, NoiseResult, optimal_noise, uniform_noise
from .shapley import PRECISIONS, shapley_values
from .train import (
    _PREDICT_BATCH,
    FLUSH_EVERY,
    History,
    TrainConfig,
    _batched,
    _cast_checked,
    _check_config,
    _check_features,
    _check_labels,
    _check_label_range,
    _check_one_dtype,
    _derived_seed,
    _epoch_accuracies,
    _kept_global_rng,
    _model_device_dtype,
    _output_width,
    _progress,
    _seeded_global_rng,
    accuracy,
    flush_tiny_moments_,
    predict_logits,
    predict_proba,
    train_model,
)

__all__ = ["DEFENSES", "DEFAULTS", "DefendedModel", "DynaNoise", "defend", "defense_config",
           "distillation_loss", "save_defended", "load_defended"]

MAX_DP_EPSILON = 100.0  # dpsgd's largest epsilon (see _SPECS)
DEFENSES = ("undefended", "uniform", "oni", "dynanoise", "dpsgd", "advreg", "label_smoothing")

# the defenses that train a fresh model of base_model's architecture (init_parameters_)
_RETRAINED = ("uniform", "oni", "dpsgd", "advreg", "label_smoothing")
_FORMAT = "oni-defended"
_FORMAT_VERSION = 1
_KL_DIRECTIONS = ("paper", "forward")
_OPACUS_HINT = ("defend('dpsgd') needs the optional package opacus: pip install "
                "'oni[defenses]' (or pip install 'opacus>=1.5')")


# ----------------------------------------------------------------------------- configs

def _number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False, why: str = ""):
    return functools.partial(check_number, low=low, high=high, low_open=low_open,
                             high_open=high_open, why=why)


def _integer(minimum: int, maximum: float = math.inf):
    return functools.partial(check_int, minimum=minimum, maximum=maximum)


def _choice(options: Tuple[str, ...]):
    def check(value, name):
        if value not in options:
            raise ValueError(f"{name} must be one of {options}, got {value!r}")
        return value
    return check


@dataclass(frozen=True)
class _Param:
    default: Any
    check: Callable[[Any, str], Any]


_DISTILLATION = {
    "alpha": _Param(0.5, _number(0.0, 1.0)),
    "kl_direction": _Param("paper", _choice(_KL_DIRECTIONS)),
}

# Upper bounds of the effort settings: far beyond any use (the paper: 100 walks, 100 steps,
# 1 draw; AdvReg: 1 inference step), and low enough that a typo (1e30 walks) is refused
# instead of running for ever or failing in the allocator when the model is first queried
# (draws x rows x k noise values)
MAX_EFFORT = 10 ** 6
MAX_DRAWS = 10 ** 4

# the one table of hyperparameters: defaults, types and ranges (documented in defense_config)
_SPECS: Dict[str, Dict[str, _Param]] = {
    "undefended": {},
    "uniform": {
        "eps": _Param(0.1, _number(0.0)),
        "kind": _Param("uniform", _choice(("uniform", "gaussian"))),
        **_DISTILLATION,
    },
    "oni": {
        "tau_fraction": _Param(0.5, _number(0.0, 1.0)),
        "eps": _Param(1.0, _number(0.0)),
        "beta": _Param(0.5, _number(0.0, 1.0)),
        "importance": _Param("signed", _choice(("signed", "abs"))),
        **_DISTILLATION,
        "n_permutations": _Param(32, _integer(1, MAX_EFFORT)),
        "max_iter": _Param(50, _integer(1, MAX_EFFORT)),
        "refine_iter": _Param(8, _integer(0, MAX_EFFORT)),
        "polish_iter": _Param(8, _integer(0, MAX_EFFORT)),
        "starts": _Param(2, _integer(1, MAX_STARTS)),
        "backend": _Param("auto", _choice(("auto", "kernel", "torch"))),
        "precision": _Param("float32", _choice(PRECISIONS)),
    },
    "dynanoise": {
        "sigma0_sq": _Param(0.3, _number(0.0)),
        "lambda": _Param(2.0, _number(0.0)),
        "temperature": _Param(10.0, _number(0.0, low_open=True)),
        "draws": _Param(1, _integer(1, MAX_DRAWS)),
    },
    "dpsgd": {
        # epsilon: beyond 100, e^epsilon makes the guarantee empty, and opacus's search for
        # the noise slows down (prv: 53 s at 100) until it never ends (rdp at 1e16)
        "epsilon": _Param(8.0, _number(0.0, MAX_DP_EPSILON, low_open=True)),
        "delta": _Param(1e-5, _number(0.0, 1.0, low_open=True, high_open=True)),
        "max_grad_norm": _Param(1.0, _number(0.0, low_open=True)),
        "accountant": _Param("rdp", _choice(("rdp", "prv"))),
        "grad_sample_mode": _Param("ghost", _choice(("ghost", "hooks"))),
        "optimizer": _Param("sgd", _choice(("sgd", "adam"))),
        "lr": _Param(0.1, _number(0.0, MAX_ADAM_LR, low_open=True, why=ADAM_FITS)),
    },
    "advreg": {
        "lambda": _Param(1.0, _number(0.0)),
        "k_steps": _Param(1, _integer(1, MAX_EFFORT)),
        "reference_fraction": _Param(0.2, _number(0.0, 1.0, low_open=True, high_open=True)),
        "attack_lr": _Param(1e-3, _number(0.0, MAX_ADAM_LR, low_open=True, why=ADAM_FITS)),
    },
    "label_smoothing": {
        "smoothing": _Param(0.1, _number(0.0, 1.0)),
    },
}

#: name -> the default hyperparameters of that defense (a copy: editing it changes nothing;
#: pass ``config=`` to :func:`defend` instead). See :func:`defense_config` for their meaning.
DEFAULTS: Dict[str, Dict[str, Any]] = {
    name: {key: param.default for key, param in spec.items()} for name, spec in _SPECS.items()}


def _check_name(name) -> str:
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; the defenses are {DEFENSES}")
    return name


def defense_config(name: str, config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The hyperparameters of defense ``name``: ``config`` checked and completed with the
    defaults.

    The hyperparameters and their defaults (chosen for Purchase-shaped data,
    :func:`oni.synthetic_purchase`, and to keep ``oni run`` cheap on a CPU):

    ``uniform`` (the paper's uniform-noise baseline, trained like ONI)
        ``eps=0.1``: the noise is ``U(-eps, eps)`` on every feature of every row
        (``kind="gaussian"``: ``N(0, eps^2)``). U(-0.1, 0.1) on 600 features has a norm of
        about 1.4, roughly twice ONI's default mean noise norm there; ``eps`` equal to
        ONI's budget (1.0) would drown binary features. ``alpha``, ``kl_direction``: as ONI.
    ``oni``
        ``tau_fraction=0.5``: the entropy threshold ``tau = 0.5 log k`` (eq. 5);
        ``eps=1.0``, ``beta=0.5``, ``importance="signed"``: the budget of eq. 7
        (:func:`oni.noise_budget`; on binary features ``eps = 1`` lets a feature flip);
        ``alpha=0.5``: the loss ``alpha KL + (1 - alpha) CE`` (:func:`distillation_loss`);
        ``kl_direction="paper"``: ``KL(f'(x') || y')`` as the paper writes it, ``"forward"``:
        ``KL(y' || f'(x'))``; ``n_permutations=32`` Shapley walks per row (16 antithetic
        pairs); ``max_iter=50`` ascent steps, ``refine_iter=8`` norm-reduction rounds,
        ``polish_iter=8`` polish iterations (each of these four at most 10**6) and
        ``starts=2`` starting points of the noise
        solver (:func:`oni.optimal_noise`, whose defaults are 100 walks, 100 steps, 8 rounds,
        64 polish iterations and 4 starts: the walks, steps, polish and starts are cut to
        keep ``oni run`` cheap; on Purchase-shaped data at ``tau_fraction=0.5`` every row was
        still feasible); ``backend="auto"``;
        ``precision="float32"``: the arithmetic of the batched model evaluations of the
        Shapley walks and of the noise solver's search passes, an explicit opt-in
        (``"tf32"`` on CUDA, ``"bf16"``; float32 models only; see :func:`oni.shapley_values`
        and :func:`oni.optimal_noise`: the solver's polish and verdict stay float32).
    ``dynanoise`` (:class:`DynaNoise`)
        ``sigma0_sq=0.3``, ``lambda=2.0``, ``temperature=10.0``, ``draws=1``: the DynaNoise
        paper's defaults. ``draws`` is at most 10,000 (each query draws ``draws x N x k``
        noise values at once); the temperature is at least float32's smallest normal.
    ``dpsgd`` (opacus)
        ``epsilon=8.0``, ``delta=1e-5``: the target budget, spent over
        ``train_config.epochs`` epochs with Poisson-sampled batches of expected size
        ``train_config.batch_size``; ``max_grad_norm=1.0``: per-sample gradient clipping;
        ``accountant="rdp"`` (or ``"prv"``); ``grad_sample_mode="ghost"``: opacus's ghost
        clipping (the same clipped, noised gradients without materialising per-sample
        gradients: 1.7x faster than ``"hooks"`` on the paper's MLP on a CPU);
        ``optimizer="sgd"`` (momentum 0.9; or ``"adam"``) with ``lr=0.1`` (not
        ``train_config.lr``: the noise calls for another step size). Measured on 2,000
        Purchase-shaped rows, the paper's MLP, 10 epochs at epsilon 8: SGD 0.1 reached a test
        accuracy of 0.03, Adam 3e-4 0.009 (chance 0.01; the undefended model 0.37): at this
        size DP-SGD leaves little utility.
    ``advreg`` (Nasr et al. 2018)
        ``lambda=1.0``: the weight of the inference model's member belief in the classifier's
        loss (3, a value used for Purchase100 in the literature, cut the test accuracy of the
        run measured below from 0.37 to 0.13; 1 gave 0.28); ``k_steps=1``: inference-model
        steps per classifier step (at most 10**6);
        ``reference_fraction=0.2``: the share of the training data carved out as the
        reference (non-member) set when none is given; ``attack_lr=1e-3``: the inference
        model's Adam learning rate.
    ``label_smoothing``
        ``smoothing=0.1``: the target is ``(1 - smoothing)`` on the label plus
        ``smoothing / k`` on every class (``torch.nn.functional.cross_entropy``).
    ``undefended``
        none.

    Parameters
    ----------
    name : str
        One of :data:`DEFENSES`.
    config : mapping, optional
        Hyperparameters to override; None or ``{}`` for the defaults.

    Returns
    -------
    dict
        Every hyperparameter of the defense, checked (ints as int, numbers as float).

    Raises
    ------
    ValueError
        Unknown defense or key (the message names it and the known ones), or a value out of
        range.
    TypeError
        ``config`` is not a mapping, or a value has the wrong type.
    """
    spec = _SPECS[_check_name(name)]
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of {name}'s hyperparameters or None, "
                        f"got {type(config).__name__}")
    unknown = [key for key in config if key not in spec]
    if unknown:
        known = ", ".join(spec) if spec else "none"
        raise ValueError(f"unknown hyperparameter(s) {unknown} for defense {name!r}; its "
                         f"hyperparameters are: {known}")
    resolved = {key: param.check(config.get(key, param.default),
                                 f"config[{key!r}] of {name!r}")
                for key, param in spec.items()}
    if name == "dynanoise":  # found here, not after the base model has trained
        _check_dynanoise_scales(resolved["sigma0_sq"], resolved["lambda"],
                                resolved["temperature"], *(f"config[{key!r}] of 'dynanoise'"
                                                           for key in ("sigma0_sq", "lambda",
                                                                       "temperature")))
    return resolved


def _check_dynanoise_scales(sigma0_sq: float, lam: float, temperature: float,
                            sigma_name: str, lam_name: str, temperature_name: str) -> None:
    """The noise is drawn and scaled in float32, as the logits are: its largest variance
    must fit, and dividing by the temperature must not overflow."""
    f32 = torch.finfo(torch.float32)
    if not sigma0_sq * (1.0 + lam) <= f32.max:
        raise ValueError(f"{sigma_name} * (1 + {lam_name}) = {sigma0_sq * (1.0 + lam):g} "
                         f"overflows float32, the dtype of the logits and the noise")
    if temperature < f32.tiny:
        raise ValueError(f"{temperature_name} = {temperature:g} is below float32's smallest "
                         f"normal number {f32.tiny:g}: the logits / temperature overflow")


# ----------------------------------------------------------------------------- predictors

class _ModelPredictor:
    """``x -> softmax(model(x))`` (:func:`oni.train.predict_proba`)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x: Tensor) -> Tensor:
        return predict_proba(self.model, x)


class DynaNoise:
    """DynaNoise (inference-time noise on the logits), as a prediction function.

    For logits ``z`` of a row: ``R = 1 - H(softmax(z)) / log k`` (1 for a one-hot
    prediction, 0 for a uniform one), ``sigma^2 = sigma0_sq * (1 + lam * R)``,
    ``z' = z + N(0, sigma^2 I)``, output ``softmax(z' / temperature)``, averaged over
    ``draws`` independent draws. Confident predictions (the ones membership attacks feed on)
    get the most noise; the temperature flattens what is released.

    Randomness: one CPU ``torch.Generator`` seeded with ``noise_seed`` when the object is made
    (and again by :meth:`reset`). A call on ``N`` rows takes
    ``torch.randn((draws, N, k), generator=g)`` (float32) from it: draw ``m`` of row ``i`` is
    ``noise[m, i]``. So repeated queries get fresh noise (an attacker cannot get the same
    draw twice by asking again), and a run that makes the same calls in the same order gets
    the same outputs (and :func:`load_defended` restarts the stream). Outputs depend on how
    the queries are split into calls.

    Parameters
    ----------
    model : nn.Module
        The undefended model: ``[n, d] -> [n, k]`` logits.
    sigma0_sq, lam, temperature, draws :
        ``sigma_0^2 >= 0``, ``lambda >= 0``, ``T > 0``, ``M >= 1`` (DynaNoise's defaults
        0.3, 2, 10, 1).
    noise_seed : int
        Seed of the noise stream.

    The settings are kept as plain attributes of these names (``lam`` for lambda); one set
    after construction takes effect at the next call (``noise_seed``: at :meth:`reset`) and
    is checked there as on construction (a ValueError or TypeError naming it).
    """

    def __init__(self, model: nn.Module, *, sigma0_sq: float = 0.3, lam: float = 2.0,
                 temperature: float = 10.0, draws: int = 1, noise_seed: int = 0):
        if not callable(model):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.sigma0_sq, self.lam, self.temperature, self.draws = sigma0_sq, lam, temperature, draws
        self.sigma0_sq, self.lam, self.temperature, self.draws = self._settings("")
        self.noise_seed = _check_seed(noise_seed, "noise_seed")
        self.reset()

    def _settings(self, prefix: str = "DynaNoise.") -> Tuple[float, float, float, int]:
        """(sigma0_sq, lam, temperature, draws), checked: on construction and again at each
        call, as a user may set the attributes in between (draws = 0 was blamed on float32)."""
        names = [prefix + key for key in ("sigma0_sq", "lam", "temperature", "draws")]
        sigma0_sq = _number(0.0)(self.sigma0_sq, names[0])
        lam = _number(0.0)(self.lam, names[1])
        temperature = _number(0.0, low_open=True)(self.temperature, names[2])
        draws = _integer(1, MAX_DRAWS)(self.draws, names[3])
        _check_dynanoise_scales(sigma0_sq, lam, temperature, *names[:3])
        return sigma0_sq, lam, temperature, draws

    def reset(self) -> None:
        """Restarts the noise stream from ``noise_seed``."""
        self.generator = torch.Generator().manual_seed(
            _check_seed(self.noise_seed, "DynaNoise.noise_seed"))

    def __call__(self, x: Tensor) -> Tensor:
        """Noisy probabilities ``[N, k]`` float32 on the CPU for inputs ``x`` ``[N, d]``."""
        sigma0_sq, lam, temperature, draws = self._settings()  # before drawing any noise
        try:
            logits = predict_logits(self.model, x)  # float32, CPU
        except NonFiniteLogits as err:  # numbers, like the noise's own overflow below
            raise FloatingPointError(f"DynaNoise: {err}") from None
        n, k = logits.shape
        noise = torch.randn((draws, n, k), generator=self.generator)
        log_p = torch.log_softmax(logits, dim=1)
        entropy = -(log_p.exp() * log_p).sum(dim=1)
        # k = 1: a single class carries no information to hide
        certainty = 1.0 - entropy / math.log(k) if k > 1 else torch.zeros_like(entropy)
        sigma = (sigma0_sq * (1.0 + lam * certainty)).sqrt()
        noisy = logits + sigma[:, None] * noise  # [draws, N, k]
        probs = torch.softmax(noisy / temperature, dim=2).mean(dim=0)
        if not bool(torch.isfinite(probs).all()):
            raise FloatingPointError(
                f"DynaNoise's released probabilities are not finite: the noisy logits "
                f"(sigma0_sq = {sigma0_sq:g}, lam = {lam:g}) over the temperature "
                f"({temperature:g}) overflow float32; use smaller noise or a larger "
                f"temperature")
        return probs


# ----------------------------------------------------------------------------- result

@dataclass
class DefendedModel:
    """A defended model and what an attacker may query.

    Attributes
    ----------
    name : str
        The defense, one of :data:`DEFENSES`.
    model : nn.Module
        The trained network in eval mode (on the CPU from :func:`defend`, on ``device``
        from :func:`load_defended`); for ``"dynanoise"`` the undefended model it wraps.
    predict_proba : callable
        ``x [N, d] -> probabilities [N, k]`` float32 on the CPU: what an attacker queries
        (DynaNoise adds its noise here; see :class:`DynaNoise` for its seeded stream).
    history : History or None
        Per-epoch training records of ``model``; None when nothing was trained here (a given
        ``base_model`` used as is).
    config : dict
        The resolved hyperparameters (defaults filled in), JSON-able.
    report : dict
        JSON-able facts about the defense: ONI's feasibility rate, noise norms, solver
        iterations and ``tau``; DP-SGD's epsilon spent; AdvReg's reference set; ...
    artifacts : dict
        In-memory by-products, never saved: ``"noise"``, the :class:`oni.NoiseResult` of
        ``"oni"`` (on the CPU); ``"eta"``, the noise of ``"uniform"``.
    """

    name: str
    model: nn.Module
    predict_proba: Callable[[Tensor], Tensor]
    history: Optional[History]
    config: Dict[str, Any]
    report: Dict[str, Any]
    artifacts: Dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- losses

def distillation_loss(logits: Tensor, y: Tensor, log_soft_labels: Tensor, *, alpha: float,
                      kl_direction: str = "paper") -> Tensor:
    """The defense model's loss (docs/DESIGN.md, item 5): ``alpha KL + (1 - alpha) CE(f'(x'), y)``.

    ``kl_direction="paper"`` takes ``KL(f'(x') || y') = sum_c p_c (log p_c - log y'_c)`` as
    the paper writes it (``p = softmax(logits)``); ``"forward"`` takes the usual
    distillation direction ``KL(y' || f'(x')) = sum_c y'_c (log y'_c - log p_c)``. Both are
    batch means, computed in ``logits``' dtype. A term whose probability (``p_c``, resp.
    ``y'_c``) is 0 adds 0, as ``0 log 0 = 0`` (also where ``p_c`` underflowed to 0 against a
    soft label of probability 0).

    Parameters
    ----------
    logits : Tensor
        ``[b, k]`` the defense model's logits at ``x'``.
    y : Tensor
        ``[b]`` hard labels.
    log_soft_labels : Tensor
        ``[b, k]`` ``log y'``, the undefended model's log-probabilities at ``x'`` (logs, so a
        probability that underflows to 0 stays usable: ``-inf`` adds 0 to the forward KL,
        and makes the paper's KL infinite where the model gives that class mass).
    alpha : float
        In ``[0, 1]``. At 0 (1) the KL (CE) term is left out, so an infinite KL with
        ``alpha = 0`` gives the CE, not NaN.
    kl_direction : str
        ``"paper"`` or ``"forward"``.

    Returns
    -------
    Tensor
        A scalar.

    Raises
    ------
    TypeError
        A tensor argument is not a Tensor.
    ValueError
        A tensor on the meta device; ``logits`` not a floating ``[b, k]`` with
        ``b, k >= 1``, not finite, or with a row whose spread (max - min) overflows
        ``log_softmax`` in their dtype (beyond about 6.5e4 in float16, 3.4e38 in float32 or
        bfloat16) where that makes the loss infinite or NaN; ``y`` not ``[b]`` integer
        class indices in ``[0, k)``;
        ``log_soft_labels`` not floating of ``logits``' shape, holding NaN or ``+inf``, or
        with rows whose probabilities do not sum to 1; tensors on different devices;
        ``alpha`` or ``kl_direction`` out of range.
    """
    alpha = _number(0.0, 1.0)(alpha, "alpha")
    _choice(_KL_DIRECTIONS)(kl_direction, "kl_direction")
    _check_distillation_inputs(logits, y, log_soft_labels)
    loss = _distillation_loss(logits, y, log_soft_labels, alpha=alpha,
                              kl_direction=kl_direction)
    if not bool(torch.isfinite(loss)):
        # a row spread past the dtype's range overflows log_softmax to -inf: the loss is
        # then rounding's, not the formula's (an infinite paper KL is the formula's)
        overflow = torch.isinf(torch.log_softmax(logits.detach(), dim=1))
        row = first_bad_row(overflow)
        if row is not None:
            top = logits[row].detach().double()
            raise ValueError(f"logits[{row}] spans {float(top.max() - top.min()):.6g} (max - "
                             f"min), beyond {logits.dtype}'s range: their log_softmax "
                             f"overflows and the loss is {float(loss.detach())}; pass them in a "
                             f"wider dtype (logits.float() or logits.double())")
    return loss


def _check_distillation_inputs(logits, y, log_soft_labels) -> None:
    """distillation_loss's tensors: torch's own errors name none of them, and a
    broadcastable or unnormalised ``log_soft_labels`` gave a silently wrong loss."""
    for value, name in ((logits, "logits"), (y, "y"), (log_soft_labels, "log_soft_labels")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
        check_not_meta(value, name)
    if not logits.dtype.is_floating_point or logits.dim() != 2 or 0 in logits.shape:
        raise ValueError(f"logits must be a floating [b, k] tensor with b, k >= 1, got "
                         f"{logits.dtype} of shape {tuple(logits.shape)}")
    if not is_integer_dtype(y.dtype) or tuple(y.shape) != logits.shape[:1]:
        raise ValueError(f"y must be integer class indices of shape [{logits.shape[0]}] "
                         f"(logits' rows), got {y.dtype} of shape {tuple(y.shape)}")
    if not log_soft_labels.dtype.is_floating_point or log_soft_labels.shape != logits.shape:
        raise ValueError(f"log_soft_labels must be floating of logits' shape "
                         f"{tuple(logits.shape)}, got {log_soft_labels.dtype} of shape "
                         f"{tuple(log_soft_labels.shape)}")
    for value, name in ((y, "y"), (log_soft_labels, "log_soft_labels")):
        if value.device != logits.device:
            raise ValueError(f"{name} is on {value.device}, logits on {logits.device}")
    check_class_indices(y, "y", logits.shape[1])
    check_finite(logits, "logits")
    row = first_bad_row(torch.isnan(log_soft_labels).any(1)
                        | (log_soft_labels == math.inf).any(1))
    if row is not None:
        raise ValueError(f"log_soft_labels[{row}] holds NaN or +inf; expected "
                         f"log-probabilities (-inf stands for a probability 0)")
    # each row's probabilities must sum to 1: logs of probabilities, not probabilities or
    # raw logits (their KL came out negative). The slack covers the labels' own rounding.
    total = torch.logsumexp(log_soft_labels.double(), dim=1)
    slack = max(1e-3, 16 * torch.finfo(log_soft_labels.dtype).eps)
    row = first_bad_row(~(total.abs() <= slack))
    if row is not None:
        raise ValueError(f"log_soft_labels[{row}] is not a row of log-probabilities: its "
                         f"probabilities sum to {math.exp(float(total[row])):.6g}, not 1 "
                         f"(probabilities or raw logits instead of log-probabilities?)")


def _distillation_loss(logits: Tensor, y: Tensor, log_soft_labels: Tensor, *, alpha: float,
                       kl_direction: str) -> Tensor:
    """:func:`distillation_loss` on checked arguments (the training loops' per-batch loss)."""
    log_p = torch.log_softmax(logits, dim=1)
    log_q = log_soft_labels.to(log_p.dtype)
    if kl_direction == "paper":
        p, diff = log_p.exp(), log_p - log_q
        # 0 log 0 = 0 (xlogy): p underflowed to 0 against log_q = -inf (or log_p = -inf)
        # gave 0 * inf = NaN; zeroing diff there keeps the gradient finite too
        diff = torch.where((p == 0) & ~torch.isfinite(diff), 0.0, diff)
        kl = (p * diff).sum(dim=1).mean()
    else:  # 0 log 0 = 0: a soft label of probability 0 (log -inf) adds nothing
        terms = log_q.exp() * (log_q - log_p)
        kl = torch.where(log_q == -math.inf, 0.0, terms).sum(dim=1).mean()
    ce = F.cross_entropy(logits, y)
    # a term of weight 0 is left out: an infinite KL (p > 0 where a soft label is 0) times 0
    # was NaN; for finite terms the sum is the same bits
    if alpha == 0:
        return ce
    if alpha == 1:
        return kl
    return alpha * kl + (1.0 - alpha) * ce


# ----------------------------------------------------------------------------- defend

@dataclass
class _Job:
    """Checked arguments of one :func:`defend` call."""

    x: Tensor
    y: Tensor
    x_test: Optional[Tensor]
    y_test: Optional[Tensor]
    k: int
    hidden: Tuple[int, ...]
    base_model: Optional[nn.Module]
    train_config: TrainConfig
    seed: int
    device: torch.device
    x_ref: Optional[Tensor]
    y_ref: Optional[Tensor]

    @property
    def test(self) -> dict:
        return {"x_test": self.x_test, "y_test": self.y_test}


def defend(
    name: str,
    x: Tensor,
    y: Tensor,
    *,
    config: Optional[Mapping[str, Any]] = None,
    train_config: Optional[TrainConfig] = None,
    x_test: Optional[Tensor] = None,
    y_test: Optional[Tensor] = None,
    hidden: Sequence[int] = PAPER_HIDDEN,
    base_model: Optional[nn.Module] = None,
    seed: int = 0,
    n_classes: Optional[int] = None,
    x_ref: Optional[Tensor] = None,
    y_ref: Optional[Tensor] = None,
) -> DefendedModel:
    """Trains the defended model of defense ``name`` on ``(x, y)``.

    Parameters
    ----------
    name : str
        One of :data:`DEFENSES`.
    x, y : Tensor
        The target's training data: ``[N, d]`` float features (any floating dtype; every
        defense casts them to its model's dtype, refusing values that overflow it), ``[N]``
        class indices.
    config : mapping, optional
        The defense's hyperparameters (see :func:`defense_config`); missing keys take the
        defaults of :data:`DEFAULTS`.
    train_config : TrainConfig, optional
        Epochs, batch size, lr, weight decay, training seed, device, progress of every model
        trained here (default ``TrainConfig()``). Noise, Shapley values and soft labels are
        computed on its device; the returned model is on the CPU.
    x_test, y_test : Tensor, optional
        Test data, evaluated after every epoch (``history.test_acc``).
    hidden : sequence of int
        Hidden widths of the :class:`oni.models.MLP` trained here (the paper's by default).
        With ``base_model``, its architecture is used instead.
    base_model : nn.Module, optional
        An already trained undefended model ``f`` (logits). ``"oni"`` and ``"uniform"``
        take their soft labels (and ONI its Shapley values and radius) from it,
        ``"dynanoise"`` wraps it, ``"undefended"`` returns it as is (``history`` None); the
        other defenses only copy its architecture. When None, ``f`` is trained here with
        ``train_config`` where needed. It is copied, never changed. Its parameters must be
        float32 or float64, of one dtype; ``x``, ``x_test`` and ``x_ref`` are cast to it.
        The defenses that train a fresh model need ``nn.Linear`` parameters only
        (:func:`oni.models.init_parameters_`), checked before any work.
    seed : int
        Seeds the defense's own randomness (see the module docstring).
    n_classes : int, optional
        ``k``, the number of classes (outputs). Default: ``base_model``'s output width, else
        ``int(y.max()) + 1``; pass it when ``y`` may lack the last classes (a subset).
    x_ref, y_ref : Tensor, optional
        ``"advreg"`` only: the defender's reference (non-member) data. When None, a
        ``reference_fraction`` of ``(x, y)`` (drawn with ``seed``) is held out as the
        reference set and the classifier trains on the rest (``report["reference"]``).

    ``x``, ``x_test`` and ``x_ref`` are used detached (the caller's tensors get no
    ``.grad``).

    Returns
    -------
    DefendedModel

    Raises
    ------
    ValueError, TypeError
        Unknown defense, bad config or arguments (the message names them).
    ImportError
        ``"dpsgd"`` without opacus installed.
    """
    name = _check_name(name)
    cfg = defense_config(name, config)
    train_config = TrainConfig() if train_config is None else train_config
    _check_config(train_config, "train_config")
    seed = _check_seed(seed)
    # detached: with requires_grad, x got a .grad from training (dpsgd and advreg failed)
    x = _check_features(x, "x").detach()
    n, d = x.shape
    y = _check_labels(y, "y", n, "x").long()
    if (x_test is None) != (y_test is None):
        raise ValueError("give both x_test and y_test, or neither")
    if x_test is not None:
        x_test = _check_features(x_test, "x_test").detach()
        if x_test.shape[1] != d:
            raise ValueError(f"x_test must have d = {d} columns (like x), got shape "
                             f"{tuple(x_test.shape)}")
        y_test = _check_labels(y_test, "y_test", x_test.shape[0], "x_test").long()
    if (x_ref is None) != (y_ref is None):
        raise ValueError("give both x_ref and y_ref, or neither")
    if x_ref is not None:
        if name != "advreg":
            raise ValueError(f"x_ref, y_ref are the reference set of 'advreg'; defense "
                             f"{name!r} does not use them")
        x_ref = _check_features(x_ref, "x_ref").detach()
        if x_ref.shape[1] != d:
            raise ValueError(f"x_ref must have d = {d} columns (like x), got shape "
                             f"{tuple(x_ref.shape)}")
        y_ref = _check_labels(y_ref, "y_ref", x_ref.shape[0], "x_ref").long()
    device = _resolve_device(train_config.device, "train_config.device")
    if name == "oni" and cfg["precision"] == "tf32" and device.type != "cuda":
        # found here, not after the base model has trained
        raise ValueError(f"config['precision'] = 'tf32' of 'oni' needs a CUDA device (TF32 is "
                         f"a mode of NVIDIA tensor cores), but train_config.device is "
                         f"{device}; use 'float32' or 'bf16'")
    n_classes_given = n_classes is not None
    if n_classes_given:
        n_classes = _integer(1)(n_classes, "n_classes")

    if base_model is not None:
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"base_model must be an nn.Module (a trained undefended model), "
                            f"got {type(base_model).__name__}")
        # a diverged f would be released as "undefended" and give every defense NaN labels
        check_finite_weights(base_model, "base_model", "a trained undefended model has "
                             "finite weights (did its training diverge?)")
        _check_one_dtype(base_model, "base_model")
        if name in _RETRAINED:  # found here, not after f's Shapley values and noise
            try:
                init_parameters_(copy.deepcopy(base_model), 0)  # a copy: f keeps its weights
            except TypeError as err:
                raise TypeError(f"base_model has parameters outside nn.Linear layers, so "
                                f"{name!r} cannot initialise the fresh model of its "
                                f"architecture that it trains ({err}); 'undefended' and "
                                f"'dynanoise' take such a model as is") from None
        base_model = copy.deepcopy(base_model).to(device).eval()
        width = _output_width(base_model, x[:1].to(device), d)
        if n_classes is not None and n_classes != width:
            raise ValueError(f"n_classes = {n_classes} but base_model has {width} outputs")
        n_classes = width
        # rows in f's dtype (float32 rows are exact in float64): every defense's own loop
        # then feeds the copies of f what they take
        _, base_dtype = _model_device_dtype(base_model)
        if base_dtype is not None and base_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"base_model holds {base_dtype} parameters; the defenses train "
                            f"and query float32 or float64 models")
        if name == "oni" and base_dtype == torch.float64 and cfg["precision"] != "float32":
            raise ValueError(f"config['precision'] = {cfg['precision']!r} of 'oni' trades "
                             f"float32 arithmetic for speed, but base_model is float64, "
                             f"which neither TF32 nor bfloat16 autocast touches: use "
                             f"'float32', or a float32 base_model")
        if base_dtype is not None:
            x, x_test, x_ref = (
                None if t is None else
                _cast_checked(t, base_dtype, f"{name} cast to base_model's {base_dtype}")
                for t, name in ((x, "x"), (x_test, "x_test"), (x_ref, "x_ref")))
    elif n_classes is None:
        n_classes = int(y.max()) + 1
    k = n_classes
    if k < 2:  # a one-output model has loss 0 and nothing to defend (oni.Dataset refuses it)
        source = "base_model has 1 output" if base_model is not None else (
            "n_classes = 1" if n_classes_given else f"y holds only the class {int(y.max())}")
        raise ValueError(f"{source}: a classifier needs k >= 2 classes (give n_classes= when "
                         f"y misses some)")
    for labels, label_name in ((y, "y"), (y_test, "y_test"), (y_ref, "y_ref")):
        if labels is not None:
            _check_label_range(labels, label_name, k)
    hidden = _check_hidden(hidden)

    job = _Job(x=x, y=y, x_test=x_test, y_test=y_test, k=k, hidden=hidden,
               base_model=base_model, train_config=train_config, seed=seed, device=device,
               x_ref=x_ref, y_ref=y_ref)
    # building an MLP or AdvReg's inference model draws nn.Linear's default init from the
    # global RNG (then overwritten by init_parameters_): the caller's state is kept
    with _kept_global_rng(device):
        return _BUILDERS[name](job, cfg)


def _fresh_model(job: _Job) -> nn.Module:
    """An untrained model of the architecture in use, in train mode (its weights are
    re-initialised before training: train_model and the loops here call init_parameters_)."""
    if job.base_model is not None:
        return copy.deepcopy(job.base_model).train()
    return MLP(job.x.shape[1], job.k, job.hidden)


def _finish(model: nn.Module) -> nn.Module:
    return model.cpu().eval()


def _base(job: _Job) -> Tuple[nn.Module, Optional[History]]:
    """The undefended model f on job.device (eval mode), and its history when trained here."""
    if job.base_model is not None:
        return job.base_model, None
    model = _fresh_model(job)
    history = train_model(model, job.x, job.y, config=job.train_config, **job.test)
    return model.eval(), history


def _defend_undefended(job: _Job, cfg: dict) -> DefendedModel:
    model, history = _base(job)
    model = _finish(model)
    return DefendedModel("undefended", model, _ModelPredictor(model), history, cfg,
                         {"base_model": "given" if history is None else "trained"})


def _distill(job: _Job, x_noisy: Tensor, cfg: dict) -> Tuple[nn.Module, History]:
    """Soft labels of f at x_noisy, then a fresh model trained on (x_noisy, y') with
    distillation_loss (y the hard labels)."""
    base, _ = _base(job)
    try:
        logits = _batched(base, x_noisy, _PREDICT_BATCH, None, lambda z: z.float(),
                          name="x + noise")[0]
    except NonFiniteLogits as err:  # an outcome of the noise settings, not a bad argument
        raise FloatingPointError(f"{err}; lower the noise (eps)") from None
    log_soft = torch.log_softmax(logits, dim=1)
    loss_fn = functools.partial(_distillation_loss, alpha=cfg["alpha"],
                                kl_direction=cfg["kl_direction"])
    model = _fresh_model(job)
    history = train_model(model, x_noisy, job.y, config=job.train_config, loss_fn=loss_fn,
                          extra=log_soft, **job.test)
    return _finish(model), history


def _defend_uniform(job: _Job, cfg: dict) -> DefendedModel:
    eta = uniform_noise(job.x, cfg["eps"], kind=cfg["kind"],
                        seed=_derived_seed(job.seed, "uniform:noise"))
    model, history = _distill(job, job.x + eta, cfg)
    norms = eta.double().norm(dim=1)  # float32 norms overflow at eps ~ 1e19
    report = {"base_model": "given" if job.base_model is not None else "trained",
              "noise_norm_mean": float(norms.mean()), "noise_norm_max": float(norms.max())}
    return DefendedModel("uniform", model, _ModelPredictor(model), history, cfg, report,
                         {"eta": eta})


def _oni_noise(base: nn.Module, job: _Job, cfg: dict) -> Tuple[NoiseResult, dict]:
    """Shapley values -> budget (eq. 7) -> radius (eq. 8) -> noise (eqs. 5-8), on the device,
    in the base model's dtype (defend may have built that model: x's dtype is not the user's
    to match to it)."""
    x = job.x.to(job.device, next(iter(base.parameters()), job.x).dtype)
    start = time.perf_counter()
    phi = shapley_values(base, x, n_permutations=cfg["n_permutations"],
                         seed=_derived_seed(job.seed, "oni:shapley"), backend=cfg["backend"],
                         precision=cfg["precision"])
    shapley_seconds = time.perf_counter() - start
    noise = optimal_noise(base, x, phi, tau_fraction=cfg["tau_fraction"], eps=cfg["eps"],
                          beta=cfg["beta"], importance=cfg["importance"],
                          max_iter=cfg["max_iter"], refine_iter=cfg["refine_iter"],
                          polish_iter=cfg["polish_iter"], starts=cfg["starts"],
                          seed=_derived_seed(job.seed, "oni:noise"),
                          backend=cfg["backend"], precision=cfg["precision"])
    noise_seconds = time.perf_counter() - start - shapley_seconds
    noise = NoiseResult(**{f.name: getattr(noise, f.name).cpu()
                           if isinstance(getattr(noise, f.name), Tensor)
                           else getattr(noise, f.name) for f in dataclasses.fields(noise)})
    norms, feasible = noise.norm.double(), noise.feasible
    iterations = noise.iterations.double()
    report = {
        "n_rows": len(feasible),
        "n_feasible": int(feasible.sum()),
        "feasible_rate": float(feasible.double().mean()),
        "tau": float(noise.tau),
        "entropy_mean": float(noise.entropy.double().mean()),
        "norm_mean": float(norms.mean()),
        "norm_median": float(norms.median()),
        "norm_max": float(norms.max()),
        "iterations_mean": float(iterations.mean()),
        "iterations_max": int(noise.iterations.max()),
        "radius_median": float(noise.radius.double().median()),
        "budget_mean": float(noise.budget.double().mean()),
        "shapley_seconds": shapley_seconds,
        "noise_seconds": noise_seconds,
    }
    return noise, report


def _defend_oni(job: _Job, cfg: dict) -> DefendedModel:
    base, base_history = _base(job)
    job = dataclasses.replace(job, base_model=base)  # trained once, reused by _distill
    noise, report = _oni_noise(base, job, cfg)
    model, history = _distill(job, job.x + noise.eta.to(job.x.dtype), cfg)
    report = {"base_model": "given" if base_history is None else "trained", **report}
    return DefendedModel("oni", model, _ModelPredictor(model), history, cfg, report,
                         {"noise": noise})


def _defend_dynanoise(job: _Job, cfg: dict) -> DefendedModel:
    base, history = _base(job)
    model = _finish(base)
    noise_seed = _derived_seed(job.seed, "dynanoise:noise")
    predictor = DynaNoise(model, sigma0_sq=cfg["sigma0_sq"], lam=cfg["lambda"],
                          temperature=cfg["temperature"], draws=cfg["draws"],
                          noise_seed=noise_seed)
    report = {"base_model": "given" if history is None else "trained", "noise_seed": noise_seed}
    return DefendedModel("dynanoise", model, predictor, history, cfg, report)


def _defend_label_smoothing(job: _Job, cfg: dict) -> DefendedModel:
    model = _fresh_model(job)
    loss_fn = functools.partial(F.cross_entropy, label_smoothing=cfg["smoothing"])
    history = train_model(model, job.x, job.y, config=job.train_config, loss_fn=loss_fn,
                          **job.test)
    model = _finish(model)
    return DefendedModel("label_smoothing", model, _ModelPredictor(model), history, cfg, {})


def _record(history: History, model: nn.Module, job: _Job, x: Tensor, y: Tensor,
            loss_sum: float, n_loss: int, bar, settings: str) -> None:
    """Appends one epoch to history (train_model's records) and updates the progress bar.
    ``settings``: what to lower when the loss is not finite (the defense's own, named)."""
    train_loss = loss_sum / max(n_loss, 1)
    if not math.isfinite(train_loss):
        raise FloatingPointError(
            f"training diverged: the mean training loss of epoch {len(history.epochs) + 1} is "
            f"{train_loss}; lower {settings}")
    train_acc, test_acc = _epoch_accuracies(
        model, len(history.epochs) + 1, f"lower {settings}",
        lambda: (accuracy(model, x, y), accuracy(model, job.x_test, job.y_test)
                 if job.x_test is not None else None))
    history.epochs.append(len(history.epochs) + 1)
    history.train_loss.append(train_loss)
    history.train_acc.append(train_acc)
    history.test_acc.append(test_acc)
    stats = {"loss": f"{train_loss:.4f}", "train_acc": f"{train_acc:.3f}"}
    if test_acc is not None:
        stats["test_acc"] = f"{test_acc:.3f}"
    bar.update(stats)


# ----------------------------------------------------------------------------- DP-SGD

@functools.lru_cache(maxsize=128)
def _noise_multiplier(epsilon: float, delta: float, sample_rate: float, epochs: int,
                      accountant: str) -> float:
    """opacus's noise multiplier for (epsilon, delta) after ``epochs`` epochs at this sample
    rate (a binary search over its accountant: seconds on a CPU, hence the cache)."""
    from opacus.accountants.utils import get_noise_multiplier
    try:
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=sample_rate, epochs=epochs,
                                          accountant=accountant))
    except ValueError as err:
        raise ValueError(f"dpsgd: no noise multiplier reaches epsilon = {epsilon} at delta = "
                         f"{delta} over {epochs} epochs (opacus: {err}); raise "
                         f"config['epsilon']") from None


@functools.lru_cache(maxsize=128)
def _epsilon_spent(history: tuple, delta: float, accountant: str) -> float:
    """The epsilon an opacus accountant with this history (noise multiplier, sample rate,
    steps) reports at ``delta``."""
    from opacus.accountants import create_accountant
    counter = create_accountant(mechanism=accountant)
    counter.history = list(history)
    return float(counter.get_epsilon(delta=delta))


def _defend_dpsgd(job: _Job, cfg: dict) -> DefendedModel:
    """DP-SGD (Abadi et al. 2016) with opacus: per-sample clipping, Gaussian noise, Poisson
    sampling, and the noise multiplier opacus computes for the target (epsilon, delta)
    over train_config.epochs. SGD with momentum 0.9 (or Adam) at config["lr"], with
    train_config's weight decay, on the privatised gradients; the initialisation follows train_model's convention, the batches are
    opacus's Poisson samples (a CPU generator seeded from train_config.seed) and the noise
    comes from a generator seeded from it too."""
    try:
        from opacus import PrivacyEngine
    except ImportError as err:
        raise ImportError(_OPACUS_HINT) from err
    tc, device = job.train_config, job.device
    n = job.x.shape[0]
    model = _fresh_model(job)
    init_parameters_(model, tc.seed)
    model.to(device)
    dtype = _model_device_dtype(model)[1]  # rows in the model's dtype, as train_model casts
    x_model = _cast_checked(job.x, dtype, f"x cast to the model's {dtype}")
    if cfg["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9,
                                    weight_decay=tc.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"],
                                     weight_decay=tc.weight_decay)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_model, job.y), batch_size=min(tc.batch_size, n),
        generator=torch.Generator().manual_seed(tc.seed))
    noise_generator = torch.Generator(device=device).manual_seed(
        _derived_seed(tc.seed, "dpsgd:noise"))
    with warnings.catch_warnings():
        # expected and harmless here: opacus's RNG is seeded on purpose (reproducible
        # experiments, not a deployment); an RDP order at the end of opacus's range only makes
        # the bound looser (still valid); the full-backward-hook notice is about inputs
        # without grad (ours), which opacus's per-sample gradients do not need
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the.*alpha.*")
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook is firing.*")
        engine = PrivacyEngine(accountant=cfg["accountant"])
        criterion = nn.CrossEntropyLoss()
        # what make_private_with_epsilon would compute, cached: shadow models share it
        noise_multiplier = _noise_multiplier(cfg["epsilon"], cfg["delta"], 1 / len(loader),
                                             tc.epochs, cfg["accountant"])
        # what the run will spend, known before it: close to delta = 1 the accountants'
        # conversion goes below 0, a bound that means nothing (refused before training)
        planned = _epsilon_spent(((noise_multiplier, 1 / len(loader),
                                   tc.epochs * len(loader)),), cfg["delta"], cfg["accountant"])
        if not planned >= 0:  # opacus meets the target only to within 0.01
            raise ValueError(f"config['epsilon'] = {cfg['epsilon']:g} and config['delta'] = "
                             f"{cfg['delta']:g} of 'dpsgd': the noise opacus finds for them "
                             f"gives epsilon = {planned:.3g} under the {cfg['accountant']} "
                             f"accountant, a bound that means nothing (opacus meets a target "
                             f"epsilon only to within 0.01; a delta close to 1 guarantees "
                             f"nothing): raise epsilon, or use a delta below 1/n = "
                             f"{1 / n:.3g}")
        private = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=cfg["max_grad_norm"],
            noise_generator=noise_generator, grad_sample_mode=cfg["grad_sample_mode"])
        if cfg["grad_sample_mode"] == "ghost":  # its loss wrapper runs the two backward passes
            private_model, private_optimizer, criterion, private_loader = private
        else:
            private_model, private_optimizer, private_loader = private
        x, y = x_model.to(device), job.y.to(device)
        history = History()
        steps = 0
        start = time.perf_counter()
        with _progress(tc.progress, tc.epochs) as bar, \
                _seeded_global_rng(_derived_seed(tc.seed, "global"), device):
            for _ in range(tc.epochs):
                private_model.train()
                loss_sum, n_loss = 0.0, 0
                for xb, yb in private_loader:
                    if xb.shape[0] == 0:
                        continue  # a Poisson batch can be empty (rare): no loss to take
                    steps += 1
                    xb, yb = xb.to(device), yb.to(device)
                    loss = criterion(private_model(xb), yb)
                    private_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    private_optimizer.step()
                    loss_sum += float(loss.detach()) * xb.shape[0]
                    n_loss += xb.shape[0]
                private_model.eval()
                _record(history, model, job, x, y, loss_sum, n_loss, bar,
                        f"config['lr'] = {cfg['lr']} or config['max_grad_norm'] = "
                        f"{cfg['max_grad_norm']} of 'dpsgd'")
        history.seconds = time.perf_counter() - start
        epsilon = _epsilon_spent(tuple(engine.accountant.history), cfg["delta"],
                                 cfg["accountant"])
    private_model._close()  # removes opacus's hooks and per-sample gradients
    clean = _fresh_model(job)  # a plain copy without opacus's attributes
    clean.load_state_dict(model.state_dict())
    clean = _finish(clean)
    report = {"epsilon_spent": epsilon, "target_epsilon": cfg["epsilon"],
              "delta": cfg["delta"], "noise_multiplier": noise_multiplier,
              "sample_rate": float(private_loader.sample_rate),
              "steps": steps}
    return DefendedModel("dpsgd", clean, _ModelPredictor(clean), history, cfg, report)


# ----------------------------------------------------------------------------- AdvReg

class _InferenceModel(nn.Module):
    """Nasr et al.'s inference model h(f(x), y) -> member logit, narrower than theirs: a
    prediction branch (k -> 256 -> 64), a label branch (one-hot k -> 64) and a head on both
    (128 -> 64 -> 1), ReLU throughout. Only nn.Linear parameters (init_parameters_)."""

    def __init__(self, k: int):
        super().__init__()
        self.prediction = nn.Sequential(nn.Linear(k, 256), nn.ReLU(), nn.Linear(256, 64),
                                        nn.ReLU())
        self.label = nn.Sequential(nn.Linear(k, 64), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, probs: Tensor, one_hot: Tensor) -> Tensor:
        return self.head(torch.cat([self.prediction(probs), self.label(one_hot)], dim=1))[:, 0]


def _reference_split(job: _Job, cfg: dict):
    """(x_members, y_members, x_ref, y_ref, report): the given reference set, or a seeded
    reference_fraction of the training data held out."""
    if job.x_ref is not None:
        return job.x, job.y, job.x_ref, job.y_ref, {"source": "given",
                                                     "n_members": len(job.x),
                                                     "n_reference": len(job.x_ref)}
    n = job.x.shape[0]
    if n < 2:
        raise ValueError("advreg needs at least 2 training rows to hold out a reference set "
                         "(or give x_ref, y_ref)")
    n_ref = max(1, round(cfg["reference_fraction"] * n))
    if n_ref >= n:  # it used to keep one member row, silently
        raise ValueError(f"config['reference_fraction'] = {cfg['reference_fraction']} of "
                         f"'advreg' holds out {n_ref} of the {n} training rows, leaving no "
                         f"members to train on; lower it (or give x_ref, y_ref)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(
        _derived_seed(job.seed, "advreg:reference")))
    ref, members = order[:n_ref], order[n_ref:].sort().values
    return job.x[members], job.y[members], job.x[ref], job.y[ref], {
        "source": "held out of the training data", "n_members": n - n_ref,
        "n_reference": n_ref}


def _defend_advreg(job: _Job, cfg: dict) -> DefendedModel:
    """Adversarial regularization (Nasr, Shokri, Houmansadr 2018), alternating per batch of
    members: ``k_steps`` Adam steps of the inference model h on the batch (label 1) and as
    many reference rows drawn with replacement (label 0), binary cross-entropy on
    ``h(softmax(f(x)), onehot(y))``; then one step of the classifier on
    ``CE(f(x), y) + lambda * mean(sigmoid(h(softmax(f(x)), onehot(y))))``, the members'
    mean member belief (the gain term of Nasr et al.'s released code). The classifier
    follows train_model's init and batch-order conventions on the member rows."""
    tc, device, k = job.train_config, job.device, job.k
    x_mem, y_mem, x_ref, y_ref, reference = _reference_split(job, cfg)
    n, n_ref = x_mem.shape[0], x_ref.shape[0]
    model = _fresh_model(job)
    init_parameters_(model, tc.seed)
    model.to(device)
    dtype = _model_device_dtype(model)[1]  # h reads f's outputs: in f's dtype
    # rows in the model's dtype, as train_model casts them
    x_mem = _cast_checked(x_mem, dtype, f"x cast to the model's {dtype}").to(device)
    ref_name = "x_ref" if job.x_ref is not None else "x"  # else held out of x
    x_ref = _cast_checked(x_ref, dtype, f"{ref_name} cast to the model's {dtype}").to(device)
    y_mem, y_ref = y_mem.to(device), y_ref.to(device)
    attack = _InferenceModel(k)
    init_parameters_(attack, _derived_seed(tc.seed, "advreg:attack"))
    attack.to(device, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    attack_optimizer = torch.optim.Adam(attack.parameters(), lr=cfg["attack_lr"])
    order_gen = torch.Generator().manual_seed(tc.seed)
    ref_gen = torch.Generator().manual_seed(_derived_seed(tc.seed, "advreg:batches"))
    eye = torch.eye(k, device=device, dtype=dtype)
    history = History()
    n_steps = 0
    start = time.perf_counter()
    with _progress(tc.progress, tc.epochs) as bar, \
            _seeded_global_rng(_derived_seed(tc.seed, "global"), device):
        for _ in range(tc.epochs):
            model.train()
            attack.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            order = torch.randperm(n, generator=order_gen).to(device)
            for lo in range(0, n, tc.batch_size):
                idx = order[lo:lo + tc.batch_size]
                xb, yb = x_mem[idx], y_mem[idx]
                b = idx.shape[0]
                is_member = torch.cat([torch.ones(b, device=device),
                                       torch.zeros(b, device=device)])
                for _ in range(cfg["k_steps"]):
                    ridx = torch.randint(n_ref, (b,), generator=ref_gen).to(device)
                    with torch.no_grad():
                        probs = torch.softmax(model(torch.cat([xb, x_ref[ridx]])), dim=1)
                    member_logit = attack(probs, eye[torch.cat([yb, y_ref[ridx]])])
                    attack_loss = F.binary_cross_entropy_with_logits(member_logit, is_member)
                    attack_optimizer.zero_grad(set_to_none=True)
                    attack_loss.backward()
                    attack_optimizer.step()
                logits = model(xb)
                belief = torch.sigmoid(attack(torch.softmax(logits, dim=1), eye[yb])).mean()
                loss = F.cross_entropy(logits, yb) + cfg["lambda"] * belief
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # also reaches h's parameters: cleared before h's next step
                optimizer.step()
                n_steps += 1
                if n_steps % FLUSH_EVERY == 0:  # as train_model does (keeps off subnormals)
                    flush_tiny_moments_(optimizer)
                    flush_tiny_moments_(attack_optimizer)
                loss_sum += loss.detach().double() * b
            model.eval()
            _record(history, model, job, x_mem, y_mem, float(loss_sum), n, bar,
                    f"train_config.lr = {job.train_config.lr} or config['lambda'] = "
                    f"{cfg['lambda']} of 'advreg'")
    history.seconds = time.perf_counter() - start
    attack.eval()
    with torch.no_grad():
        def mean_member_correct(x, y, member: bool) -> float:
            logit = attack(predict_proba(model, x).to(device, dtype), eye[y])
            return float(((logit > 0) == member).double().mean())
        inference_accuracy = 0.5 * (mean_member_correct(x_mem, y_mem, True)
                                     + mean_member_correct(x_ref, y_ref, False))
    model = _finish(model)
    report = {"reference": reference, "inference_balanced_accuracy": inference_accuracy}
    return DefendedModel("advreg", model, _ModelPredictor(model), history, cfg, report)


_BUILDERS = {
    "undefended": _defend_undefended,
    "uniform": _defend_uniform,
    "oni": _defend_oni,
    "dynanoise": _defend_dynanoise,
    "dpsgd": _defend_dpsgd,
    "advreg": _defend_advreg,
    "label_smoothing": _defend_label_smoothing,
}


# ----------------------------------------------------------------------------- files

def save_defended(defended: DefendedModel, path) -> Any:
    """Saves a defended model to the directory ``path`` with :func:`oni.models.save_model`
    (atomically, no pickle): the weights, and in ``model.json``'s metadata the defense's
    name, resolved config, report and history. ``artifacts`` are not saved.

    What :func:`load_defended` would refuse (a config out of range, a history whose lists
    differ in length or hold non-numbers, negative or infinite seconds) and a report that is
    not JSON-able are refused first (TypeError, ValueError), before an earlier save at
    ``path`` is replaced.

    Returns
    -------
    pathlib.Path
        The model directory.
    """
    if not isinstance(defended, DefendedModel):
        raise TypeError(f"defended must be a DefendedModel, got {type(defended).__name__}")
    # what load_defended would refuse is refused here, before a good save is replaced
    try:
        name = _check_name(defended.name)
        config = defense_config(name, defended.config)  # saved complete, as loaded
        _check_report(name, defended.report)
        if defended.history is not None:
            if not isinstance(defended.history, History):
                raise TypeError(f"history must be an oni.train.History or None, got "
                                f"{type(defended.history).__name__}")
            # its lengths, numbers and seconds (a shallow dict: asdict deep-copies tensors)
            _history_from({f.name: getattr(defended.history, f.name)
                           for f in dataclasses.fields(History)})
    except (TypeError, ValueError) as err:
        raise type(err)(f"save_defended: load_defended would refuse this defense: "
                        f"{err}") from None
    try:  # else save_model blamed its own argument, extra, which the user never passed
        json.dumps(defended.report)
    except (TypeError, ValueError) as err:
        raise TypeError(f"save_defended: report must hold only JSON-able values (dicts, "
                        f"lists, strings, numbers, bools, None): {err}") from None
    history = dataclasses.asdict(defended.history) if defended.history is not None else None
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "name": name,
            "config": config, "report": defended.report, "history": history}
    return save_model(defended.model, path, extra={"defense": meta})


def _check_report(name: str, report) -> None:
    if not isinstance(report, dict):
        raise TypeError(f"report must be a dict, got {type(report).__name__}")
    if name == "dynanoise":  # the noise stream restarts from it when loaded
        _check_seed(report.get("noise_seed"), "report['noise_seed']")


def _history_from(record) -> History:
    """A saved history's fields, each checked: they are plotted and reported later."""
    if not isinstance(record, dict):
        raise TypeError(f"history must be an object or null, got {type(record).__name__}")
    fields = [f.name for f in dataclasses.fields(History)]
    if sorted(record) != sorted(fields):
        raise ValueError(f"history must have exactly the fields {fields}, got "
                         f"{sorted(record)}")
    n = len(record["epochs"]) if isinstance(record["epochs"], list) else -1
    for key in ("epochs", "train_loss", "train_acc", "test_acc"):
        values = record[key]
        if not isinstance(values, list) or len(values) != n:
            raise ValueError(f"history[{key!r}] must be a list as long as history['epochs']")
        for value in values:
            if key == "epochs":
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = ((value is None and key == "test_acc") or
                      (isinstance(value, (int, float)) and not isinstance(value, bool)))
            if not ok:
                raise ValueError(f"history[{key!r}] holds {value!r}, not a number")
    seconds = record["seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
            not 0 <= seconds < math.inf:  # NaN fails both comparisons
        raise ValueError(f"history['seconds'] must be a number >= 0, got {seconds!r}")
    return History(**record)


def load_defended(path, *, device="cpu") -> DefendedModel:
    """Loads what :func:`save_defended` wrote; the prediction function is rebuilt from the
    name and config (a DynaNoise stream restarts from its seed).

    Parameters
    ----------
    path : path
        The directory :func:`save_defended` wrote.
    device : str or torch.device
        Where the model's weights are loaded (default ``"cpu"``).

    Raises
    ------
    FileNotFoundError, ValueError
        Missing or corrupt files, or a model directory that holds no defense (the message
        names the path).
    """
    model, extra = load_model(path, device=device)
    meta = extra.get("defense")
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{path} holds an oni model but no defense (save it with "
                         f"save_defended, or load it with oni.models.load_model)")
    if meta.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: defense format version {meta.get('version')!r}; this oni "
                         f"reads version {_FORMAT_VERSION}")
    try:
        name = _check_name(meta.get("name"))
        config = defense_config(name, meta.get("config"))
        report = meta.get("report")
        _check_report(name, report)
        history = _history_from(meta["history"]) if meta.get("history") is not None else None
        if name == "dynanoise":
            predictor = DynaNoise(model, sigma0_sq=config["sigma0_sq"], lam=config["lambda"],
                                  temperature=config["temperature"], draws=config["draws"],
                                  noise_seed=report["noise_seed"])
        else:
            predictor = _ModelPredictor(model)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: bad defense metadata: {err}") from None
    return DefendedModel(name, model, predictor, history, config, report)
