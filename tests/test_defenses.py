"""oni.defenses: every defense trains and predicts probabilities, deterministically per seed;
ONI's noise meets the solver's constraints and the model is distilled on it; DynaNoise
follows its formula; DP-SGD reports the epsilon it spent; bad configs are rejected; files
round-trip."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import oni
from oni import defenses as defenses_module
from oni.defenses import (
    DEFAULTS,
    DEFENSES,
    DefendedModel,
    DynaNoise,
    defend,
    defense_config,
    distillation_loss,
    load_defended,
    save_defended,
)
from oni.models import MLP, init_parameters_, save_model
from oni.train import TrainConfig, _derived_seed, predict_logits, train_model

D, K, HIDDEN = 40, 4, (32, 16)
TRAIN = TrainConfig(epochs=3, batch_size=64, progress=False, device="cpu")
HAS_OPACUS = importlib.util.find_spec("opacus") is not None
needs_opacus = pytest.mark.skipif(not HAS_OPACUS, reason="opacus not installed "
                                  "(pip install 'oni[defenses]')")


@pytest.fixture(scope="module")
def data():
    ds = oni.synthetic_purchase(360, d=D, k=K, seed=3)
    return ds.x[:240], ds.y[:240], ds.x[240:], ds.y[240:]


@pytest.fixture(scope="module")
def confident_base(data):
    """An undefended model trained long enough to be confident on its training rows, so
    ONI's noise has work to do."""
    x, y, _, _ = data
    model = MLP(D, K, HIDDEN)
    train_model(model, x, y, config=TrainConfig(epochs=40, batch_size=32, lr=3e-3,
                                                progress=False, device="cpu"))
    return model


def _defend(name, data, **kwargs):
    x, y, x_test, y_test = data
    kwargs.setdefault("train_config", TRAIN)
    kwargs.setdefault("hidden", HIDDEN)
    return defend(name, x, y, x_test=x_test, y_test=y_test, **kwargs)


def _params(dm):
    return {key: t.clone() for key, t in dm.model.state_dict().items()}


def _same_params(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# the solver warns about the rows it flags infeasible; the tests check the flags themselves
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*cannot reach entropy tau")]

TRAINED = [pytest.param(name, marks=needs_opacus) if name == "dpsgd" else name
           for name in DEFENSES]


# ----------------------------------------------------------------------------- every defense

@pytest.mark.parametrize("name", TRAINED)
def test_every_defense_trains_predicts_and_is_deterministic(name, data):
    _, _, x_test, _ = data
    first = _defend(name, data, seed=5)
    assert isinstance(first, DefendedModel) and first.name == name
    assert first.config == DEFAULTS[name]
    assert not first.model.training
    assert all(p.device.type == "cpu" for p in first.model.parameters())
    assert len(first.history.epochs) == TRAIN.epochs
    assert all(acc is not None for acc in first.history.test_acc)
    probs = first.predict_proba(x_test)
    assert probs.shape == (len(x_test), K) and probs.dtype == torch.float32
    assert probs.device.type == "cpu" and (probs >= 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(len(x_test)), atol=1e-5)
    # the same arguments: the same weights and the same answers (a fresh DynaNoise stream)
    second = _defend(name, data, seed=5)
    assert _same_params(_params(first), _params(second))
    assert torch.equal(second.predict_proba(x_test), probs)
    assert second.report.keys() == first.report.keys()


@pytest.mark.parametrize("name", [n for n in TRAINED if n not in ("undefended",
                                                                   "label_smoothing")])
def test_the_defense_seed_changes_the_defense(name, data, confident_base):
    _, _, x_test, _ = data
    # ONI's noise is zero where the model is already unsure: give it a confident one
    extra = {"base_model": confident_base, "config": {"tau_fraction": 0.6}} \
        if name == "oni" else {}
    a = _defend(name, data, seed=1, **extra)
    b = _defend(name, data, seed=2, **extra)
    if name in ("dynanoise", "dpsgd"):
        # DynaNoise's seed picks its noise stream; DP-SGD's noise follows train_config.seed
        other = _defend(name, data, seed=1, train_config=TrainConfig(
            epochs=TRAIN.epochs, batch_size=TRAIN.batch_size, progress=False, device="cpu",
            seed=9)) if name == "dpsgd" else b
        assert not torch.equal(a.predict_proba(x_test), other.predict_proba(x_test))
    else:
        assert not _same_params(_params(a), _params(b))


def test_train_config_seed_changes_the_model(data):
    a = _defend("undefended", data)
    b = _defend("undefended", data, train_config=TrainConfig(
        epochs=TRAIN.epochs, batch_size=TRAIN.batch_size, progress=False, device="cpu", seed=1))
    assert not _same_params(_params(a), _params(b))


def test_undefended_is_train_model(data):
    x, y, x_test, y_test = data
    dm = _defend("undefended", data)
    model = MLP(D, K, HIDDEN)
    history = train_model(model, x, y, config=TRAIN, x_test=x_test, y_test=y_test)
    assert _same_params(_params(dm), model.state_dict())
    assert dm.history.train_acc == history.train_acc
    assert dm.report == {"base_model": "trained"}


def test_a_given_base_model_is_used_as_is_and_never_changed(data, confident_base):
    _, _, x_test, _ = data
    before = {key: t.clone() for key, t in confident_base.state_dict().items()}
    dm = _defend("undefended", data, base_model=confident_base)
    assert dm.history is None and dm.report == {"base_model": "given"}
    assert dm.model is not confident_base
    assert torch.equal(dm.predict_proba(x_test),
                       torch.softmax(confident_base(x_test), 1).detach())
    _defend("oni", data, base_model=confident_base)
    assert _same_params(before, confident_base.state_dict())


@pytest.mark.parametrize("name", TRAINED)
def test_trained_defenses_copy_the_base_models_architecture(name, data, confident_base):
    """A base model in eval mode: the defenses that train a fresh copy still train it."""
    _, _, x_test, _ = data
    confident_base.eval()
    dm = _defend(name, data, base_model=confident_base, hidden=(7,))
    assert [tuple(p.shape) for p in dm.model.parameters()] == \
        [tuple(p.shape) for p in confident_base.parameters()]
    assert dm.predict_proba(x_test).shape == (len(x_test), K)


def test_n_classes_covers_labels_missing_from_the_data(data):
    x, y, _, _ = data
    keep = y < K - 1
    dm = defend("label_smoothing", x[keep], y[keep], train_config=TRAIN, hidden=HIDDEN,
                n_classes=K)
    assert dm.predict_proba(x[:3]).shape == (3, K)
    inferred = defend("label_smoothing", x[keep], y[keep], train_config=TRAIN, hidden=HIDDEN)
    assert inferred.predict_proba(x[:3]).shape == (3, K - 1)


# ----------------------------------------------------------------------------- ONI and uniform

def test_oni_noise_meets_the_solver_constraints_and_is_what_the_model_learns(
        data, confident_base):
    x, y, x_test, y_test = data
    config = {"tau_fraction": 0.6, "eps": 0.5}
    dm = _defend("oni", data, base_model=confident_base, config=config, seed=4)
    noise = dm.artifacts["noise"]
    tol = 1e-5
    assert noise.eta.shape == x.shape
    assert (noise.eta.abs() <= noise.budget + tol).all()            # box, eq. 7
    assert (noise.norm <= noise.radius + tol).all()                 # ball, eq. 8
    assert torch.allclose(noise.norm, noise.eta.norm(dim=1))
    assert math.isclose(noise.tau, 0.6 * math.log(K), rel_tol=1e-12)
    assert (noise.entropy[noise.feasible] >= noise.tau - tol).all()  # feasible rows reach tau
    assert noise.feasible.float().mean() > 0.5 and (noise.norm > 0).any()
    report = dm.report
    assert report["n_rows"] == len(x) and report["n_feasible"] == int(noise.feasible.sum())
    assert report["feasible_rate"] == pytest.approx(noise.feasible.double().mean().item())
    assert report["tau"] == pytest.approx(noise.tau)
    assert report["norm_max"] == pytest.approx(noise.norm.max().item())
    assert report["base_model"] == "given"
    # the means are means (a median and a max in their place passed the suite), recomputed
    # from eta and from f's entropy at x + eta
    norms = noise.eta.double().pow(2).sum(1).sqrt()
    assert report["norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-5)
    assert report["norm_median"] == pytest.approx(float(norms.median()), rel=1e-5)
    with torch.no_grad():
        log_p = torch.log_softmax(confident_base(x + noise.eta).double(), 1)
    entropy = -(log_p.exp() * log_p).sum(1)
    assert report["entropy_mean"] == pytest.approx(float(entropy.mean()), rel=1e-4)
    # the budget of eq. 7 from the same Shapley values the defense computed
    phi = oni.shapley_values(confident_base.eval(), x, n_permutations=32,
                             seed=_derived_seed(4, "oni:shapley"))
    assert torch.allclose(noise.budget, oni.noise_budget(phi, 0.5, 0.5))
    # the defended model is a fresh model distilled on (x + eta, f(x + eta), y)
    x_noisy = x + noise.eta
    log_soft = torch.log_softmax(predict_logits(confident_base, x_noisy), 1)
    model = MLP(D, K, HIDDEN)
    train_model(model, x_noisy, y, config=TRAIN, x_test=x_test, y_test=y_test,
                extra=log_soft, loss_fn=lambda z, t, q: distillation_loss(
                    z, t, q, alpha=0.5, kl_direction="paper"))
    assert _same_params(_params(dm), model.state_dict())


def test_oni_kl_direction_is_an_option(data, confident_base):
    paper = _defend("oni", data, base_model=confident_base, config={"tau_fraction": 0.6})
    forward = _defend("oni", data, base_model=confident_base,
                      config={"tau_fraction": 0.6, "kl_direction": "forward"})
    assert paper.config["kl_direction"] == "paper"
    assert forward.config["kl_direction"] == "forward"
    assert not _same_params(_params(paper), _params(forward))


def test_oni_precision_reaches_the_shapley_walks_and_the_noise_search(data, confident_base):
    """defenses.oni.precision is the opt-in of both: the defense's phi and eta are those of
    shapley_values and optimal_noise called with it, and its verdicts are float32 ones."""
    x = data[0]
    dm = _defend("oni", data, base_model=confident_base,
                 config={"tau_fraction": 0.6, "eps": 0.5, "precision": "bf16"}, seed=4)
    noise = dm.artifacts["noise"]
    base = confident_base.eval()
    phi = oni.shapley_values(base, x, n_permutations=32, seed=_derived_seed(4, "oni:shapley"),
                             precision="bf16")
    assert torch.allclose(noise.budget, oni.noise_budget(phi, 0.5, 0.5))
    plain = oni.shapley_values(base, x, n_permutations=32, seed=_derived_seed(4, "oni:shapley"))
    assert not torch.equal(phi.values, plain.values)  # bf16 walks really ran
    with torch.no_grad():
        log_p = torch.log_softmax(base(x + noise.eta).double(), dim=1)
    entropy = -(log_p.exp() * log_p).sum(1)
    assert (entropy[noise.feasible] >= noise.tau - 1e-5).all()
    assert noise.feasible.float().mean() > 0.5


def test_uniform_noise_has_one_budget_and_is_trained_like_oni(data, confident_base):
    x, y, x_test, y_test = data
    dm = _defend("uniform", data, base_model=confident_base, config={"eps": 0.2}, seed=6)
    eta = dm.artifacts["eta"]
    assert torch.equal(eta, oni.uniform_noise(x, 0.2, seed=_derived_seed(6, "uniform:noise")))
    assert (eta.abs() <= 0.2).all() and eta.abs().max() > 0.15
    # the report's norms are Euclidean (L1 norms passed the suite)
    norms = eta.double().pow(2).sum(1).sqrt()
    assert dm.report["noise_norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-12)
    assert dm.report["noise_norm_max"] == pytest.approx(float(norms.max()), rel=1e-12)
    log_soft = torch.log_softmax(predict_logits(confident_base, x + eta), 1)
    model = MLP(D, K, HIDDEN)
    train_model(model, x + eta, y, config=TRAIN, x_test=x_test, y_test=y_test, extra=log_soft,
                loss_fn=lambda z, t, q: distillation_loss(z, t, q, alpha=0.5))
    assert _same_params(_params(dm), model.state_dict())


def test_distillation_loss_follows_its_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    log_q = torch.log_softmax(torch.randn(6, 5, generator=gen, dtype=torch.float64), 1)
    y = torch.randint(5, (6,), generator=gen)
    p, q = torch.softmax(logits, 1), log_q.exp()
    kl_paper = (p * (p.log() - q.log())).sum(1).mean()      # KL(f'(x') || y')
    kl_forward = (q * (q.log() - p.log())).sum(1).mean()    # KL(y' || f'(x'))
    ce = F.cross_entropy(logits, y)
    for alpha in (0.0, 0.3, 1.0):
        got = distillation_loss(logits, y, log_q, alpha=alpha, kl_direction="paper")
        assert torch.allclose(got, alpha * kl_paper + (1 - alpha) * ce)
        got = distillation_loss(logits, y, log_q, alpha=alpha, kl_direction="forward")
        assert torch.allclose(got, alpha * kl_forward + (1 - alpha) * ce)
    assert not torch.allclose(kl_paper, kl_forward)
    assert torch.allclose(kl_forward, F.kl_div(torch.log_softmax(logits, 1), log_q,
                                               log_target=True, reduction="batchmean"))
    with pytest.raises(ValueError, match="kl_direction"):
        distillation_loss(logits, y, log_q, alpha=0.5, kl_direction="reverse")


def test_distillation_loss_keeps_zero_soft_labels_finite():
    """A soft label of probability 0 (log -inf) adds 0 to the forward KL (it gave NaN)."""
    logits = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    log_q = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=torch.float64)
    y = torch.tensor([0])
    got = distillation_loss(logits, y, log_q, alpha=1.0, kl_direction="forward")
    assert torch.allclose(got, -torch.log_softmax(logits, 1)[0, 0])
    got.backward()
    assert torch.isfinite(logits.grad).all()
    # the paper's direction puts the mass the labels rule out at +inf, as KL does
    assert distillation_loss(logits, y, log_q, alpha=1.0, kl_direction="paper") == math.inf
    # ... and with alpha = 0 that term is left out, not 0 * inf = NaN: the loss is the CE
    ce = F.cross_entropy(logits, y)
    assert torch.equal(distillation_loss(logits, y, log_q, alpha=0.0, kl_direction="paper"), ce)


@pytest.mark.parametrize("dtype, big", [(torch.float16, 4e4), (torch.bfloat16, 2e38),
                                        (torch.float32, 2e38)])
@pytest.mark.parametrize("kl_direction", ["paper", "forward"])
def test_distillation_loss_refuses_logits_whose_log_softmax_overflows(dtype, big, kl_direction):
    """Finite logits spread past the dtype's range gave NaN ("paper": 0 * -inf) or inf
    ("forward") from log_softmax's overflow. The paper's KL now takes the vanished p as 0,
    its limit, and is right; a loss that rounding made infinite is refused, naming the row."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [big, -big, 0.0]], dtype=dtype)
    log_q = torch.log_softmax(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]), 1)
    y = torch.tensor([0, 0])
    wide = distillation_loss(logits.double(), y, log_q, alpha=0.5,
                             kl_direction=kl_direction)  # what the message advises
    assert torch.isfinite(wide)
    if kl_direction == "forward":  # the label's mass on the vanished class: inf in dtype
        with pytest.raises(ValueError, match=rf"^logits\[1\] spans [0-9.e+]+ \(max - min\), "
                                             rf"beyond {dtype}'s range"):
            distillation_loss(logits, y, log_q, alpha=0.5, kl_direction=kl_direction)
    else:
        got = distillation_loss(logits, y, log_q, alpha=0.5, kl_direction=kl_direction)
        assert float(got) == pytest.approx(float(wide), rel=1e-2)


def test_distillation_loss_forward_kl_ignores_an_overflowed_class_of_zero_label():
    """A class the soft labels give probability 0 adds nothing to the forward KL, so its
    log_softmax overflowing is harmless: the loss stays finite (it was refused for a while,
    a review found)."""
    logits = torch.tensor([[3e38, -3e38, 0.0]], requires_grad=True)
    log_q = torch.tensor([[0.0, -math.inf, -math.inf]])
    for alpha in (0.0, 0.5, 1.0):
        got = distillation_loss(logits, torch.tensor([0]), log_q, alpha=alpha,
                                kl_direction="forward")
        grad, = torch.autograd.grad(got, logits)
        assert float(got.detach()) == 0.0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype, low", [(torch.float32, -120.0), (torch.float16, -20.0)])
def test_distillation_loss_paper_kl_takes_an_underflowed_p_against_a_zero_label_as_0(dtype,
                                                                                     low):
    """p_c underflowing to 0 where the soft label is 0 (log -inf) gave 0 * inf = NaN, and a
    NaN gradient; 0 log 0 = 0 gives the KL of the other classes."""
    logits = torch.tensor([[0.0, low, 0.5]], dtype=dtype, requires_grad=True)
    log_q = torch.log_softmax(torch.tensor([[0.0, -math.inf, 0.0]]), 1).to(dtype)
    y = torch.tensor([2])
    got = distillation_loss(logits, y, log_q, alpha=0.5, kl_direction="paper")
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(logits.grad).all()
    log_p = torch.log_softmax(logits.detach().double(), 1)
    kl = sum(float(log_p[0, c].exp() * (log_p[0, c] - log_q[0, c].double())) for c in (0, 2))
    want = 0.5 * kl + 0.5 * float(F.cross_entropy(logits.detach().double(), y))
    assert float(got.detach()) == pytest.approx(want, rel=5e-3 if dtype == torch.float16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_distillation_loss_on_ordinary_inputs_is_the_plain_formula_bitwise(dtype):
    """The guards above change no value or gradient of an ordinary input."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(16, 5, generator=gen) * 8).to(dtype).requires_grad_()
    log_q = torch.log_softmax(torch.randn(16, 5, generator=gen) * 8, 1).to(dtype)
    y = torch.randint(5, (16,), generator=gen)
    for kl_direction in ("paper", "forward"):
        got = distillation_loss(logits, y, log_q, alpha=0.3, kl_direction=kl_direction)
        got_grad, = torch.autograd.grad(got, logits)
        log_p = torch.log_softmax(logits, 1)
        kl = ((log_p.exp() * (log_p - log_q)) if kl_direction == "paper" else
              (log_q.exp() * (log_q - log_p))).sum(1).mean()
        want = 0.3 * kl + 0.7 * F.cross_entropy(logits, y)
        want_grad, = torch.autograd.grad(want, logits)
        assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("change, error, match", [
    (lambda z, y, q: (z, y, q[:, :1]), ValueError, "log_soft_labels must be floating of"),
    (lambda z, y, q: (z, y, q[:1]), ValueError, "log_soft_labels must be floating of"),
    (lambda z, y, q: (z, y, q[0]), ValueError, "log_soft_labels must be floating of"),
    (lambda z, y, q: (z, y, q.exp()), ValueError, r"log_soft_labels\[0\] is not a row of log-p"),
    (lambda z, y, q: (z, y, q + 1.0), ValueError, "probabilities sum to 2.71828"),
    (lambda z, y, q: (z, y, q.clone().fill_(math.nan)), ValueError, "NaN or \\+inf"),
    (lambda z, y, q: (z[:0], y[:0], q[:0]), ValueError, "b, k >= 1"),
    (lambda z, y, q: (z, y - 100, q), ValueError, r"y\[0\] = -\d+ is not a class index"),
    (lambda z, y, q: (z, y + 5, q), ValueError, "is not a class index in \\[0, 3\\)"),
    (lambda z, y, q: (z, y[:2], q), ValueError, "y must be integer class indices of shape"),
    (lambda z, y, q: (z, y.float(), q), ValueError, "y must be integer class indices"),
    (lambda z, y, q: (z.long(), y, q), ValueError, "logits must be a floating"),
    (lambda z, y, q: (z.clone().fill_(math.inf), y, q), ValueError, "^logits contains NaN"),
    (lambda z, y, q: (z, y.tolist(), q), TypeError, "y must be a Tensor"),
])
def test_distillation_loss_refuses_bad_tensors_by_name(change, error, match):
    """Torch's own errors named no argument, and a broadcastable or unnormalised
    log_soft_labels gave a silently wrong (even negative) loss."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, generator=gen)
    log_q = torch.log_softmax(torch.randn(4, 3, generator=gen), 1)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(error, match=match):
        distillation_loss(*change(logits, y, log_q), alpha=0.5)
    # bfloat16 labels are rounded: their sums stray further from 1, and are accepted
    distillation_loss(logits, y, log_q.to(torch.bfloat16), alpha=0.5)


# ----------------------------------------------------------------------------- DynaNoise

def _dynanoise_by_hand(logits, noise, sigma0_sq, lam, temperature):
    """The formula in float64, one draw at a time."""
    logits, k = logits.double(), logits.shape[1]
    p = torch.softmax(logits, 1)
    certainty = 1 - (-(p * p.log()).sum(1)) / math.log(k)
    sigma = torch.sqrt(sigma0_sq * (1 + lam * certainty))
    outs = [torch.softmax((logits + sigma[:, None] * draw.double()) / temperature, 1)
            for draw in noise]
    return sum(outs) / len(outs)


def test_dynanoise_follows_its_formula(data):
    _, _, x_test, _ = data
    config = {"sigma0_sq": 0.5, "lambda": 3.0, "temperature": 4.0, "draws": 3}
    dm = _defend("dynanoise", data, config=config, seed=2)
    predictor = dm.predict_proba
    assert isinstance(predictor, DynaNoise)
    assert predictor.noise_seed == dm.report["noise_seed"] == _derived_seed(2, "dynanoise:noise")
    logits = predict_logits(dm.model, x_test)
    gen = torch.Generator().manual_seed(predictor.noise_seed)
    for _ in range(2):  # the second query continues the stream: fresh noise
        noise = torch.randn((3, len(x_test), K), generator=gen)
        expected = _dynanoise_by_hand(logits, noise, 0.5, 3.0, 4.0)
        assert torch.allclose(predictor(x_test).double(), expected, atol=1e-6)
    predictor.reset()
    gen = torch.Generator().manual_seed(predictor.noise_seed)
    first = _dynanoise_by_hand(logits, torch.randn((3, len(x_test), K), generator=gen),
                               0.5, 3.0, 4.0)
    assert torch.allclose(predictor(x_test).double(), first, atol=1e-6)
    # the M draws are averaged: one draw alone is another answer
    single = _dynanoise_by_hand(logits, torch.randn((3, len(x_test), K),
                                generator=torch.Generator().manual_seed(
                                    predictor.noise_seed))[:1], 0.5, 3.0, 4.0)
    assert not torch.allclose(single, first, atol=1e-4)


def test_dynanoise_noise_grows_with_certainty_and_vanishes_without_sigma():
    model = torch.nn.Linear(3, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]))
    x = torch.zeros(5, 3)
    # uniform logits: R = 0, sigma^2 = sigma0^2 exactly
    predictor = DynaNoise(model, sigma0_sq=0.3, lam=2.0, temperature=1.0, noise_seed=7)
    noise = torch.randn((1, 5, 4), generator=torch.Generator().manual_seed(7))
    assert torch.allclose(predictor(x), torch.softmax(math.sqrt(0.3) * noise[0], 1), atol=1e-6)
    # no noise and T = 1: the model's softmax
    quiet = DynaNoise(model, sigma0_sq=0.0, lam=2.0, temperature=1.0)
    assert torch.allclose(quiet(x), torch.full((5, 4), 0.25))
    with pytest.raises(ValueError, match="temperature"):
        DynaNoise(model, temperature=0.0)
    with pytest.raises(TypeError, match="draws"):
        DynaNoise(model, draws=1.5)
    # values that pass the range checks but overflow float32: refused, not NaN released
    with pytest.raises(ValueError, match="sigma0_sq \\* \\(1 \\+ lam\\) = 3e\\+300 overflows"):
        DynaNoise(model, sigma0_sq=1e300)
    with pytest.raises(ValueError, match="temperature = 1e-300 is below float32's smallest"):
        DynaNoise(model, temperature=1e-300)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([1e3, 0.0, 0.0, 0.0]))
    with pytest.raises(FloatingPointError, match="released probabilities are not finite"):
        DynaNoise(model, sigma0_sq=0.0, temperature=1e-37)(x)


# ----------------------------------------------------------------------------- DP-SGD

@needs_opacus
def test_dpsgd_reports_the_epsilon_it_spent(data):
    loose = _defend("dpsgd", data, config={"epsilon": 8.0})
    tight = _defend("dpsgd", data, config={"epsilon": 1.0, "delta": 1e-4})
    for dm, target in ((loose, 8.0), (tight, 1.0)):
        assert 0 < dm.report["epsilon_spent"] <= target + 0.05
        assert dm.report["epsilon_spent"] >= 0.5 * target  # the budget is used, not wasted
        assert dm.report["target_epsilon"] == target
        assert dm.report["steps"] > 0
    assert tight.report["noise_multiplier"] > loose.report["noise_multiplier"]
    assert tight.report["delta"] == 1e-4
    assert not hasattr(next(loose.model.parameters()), "grad_sample")
    # near delta = 1 the accountant's epsilon went below 0 (-0.002), which oni run's report
    # then refused after every stage had run: refused before training, naming delta
    for delta in (0.999999, 0.01):  # a tiny target epsilon does it too
        with pytest.raises(ValueError, match=rf"config\['epsilon'\] = 0.001 and "
                                             rf"config\['delta'\] = {delta:g} of 'dpsgd': .* "
                                             rf"gives epsilon = -"):
            _defend("dpsgd", data, config={"delta": delta, "epsilon": 1e-3})


@needs_opacus
def test_dpsgd_options_change_the_training(data):
    base = _params(_defend("dpsgd", data))
    for config in ({"optimizer": "adam", "lr": 1e-3}, {"max_grad_norm": 0.1}):
        assert not _same_params(_params(_defend("dpsgd", data, config=config)), base), config
    # ghost clipping computes the same clipped gradients as per-sample hooks, and the same
    # noise is drawn: the same model up to float rounding
    hooks = _params(_defend("dpsgd", data, config={"grad_sample_mode": "hooks"}))
    assert all(torch.allclose(hooks[key], base[key], atol=1e-5) for key in base)


@needs_opacus
@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_dpsgd_hands_opacus_the_documented_settings(data, monkeypatch):
    """Clipping at 10 C, a noise 1.5x opacus's, noise sized for one epoch too many and SGD
    without momentum all passed the suite. What reaches make_private is checked against the
    config and opacus's own search and accountant: max_grad_norm, the noise multiplier for
    the target over train_config.epochs at the sample rate 1 / (batches per epoch), SGD with
    momentum 0.9 at config['lr'] and train_config's weight decay; the epsilon spent is the
    RDP accountant's for the steps taken at that noise, within opacus's 0.01 of the target."""
    from opacus import PrivacyEngine
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    seen = {}
    make_private = PrivacyEngine.make_private

    def spy(self, **kwargs):
        seen.update(kwargs)
        return make_private(self, **kwargs)

    monkeypatch.setattr(PrivacyEngine, "make_private", spy)
    train_config = TrainConfig(epochs=2, batch_size=64, weight_decay=1e-3, progress=False,
                               device="cpu")
    dm = _defend("dpsgd", data, train_config=train_config,
                 config={"epsilon": 1.0, "max_grad_norm": 0.7, "lr": 0.05})
    sample_rate = 1 / math.ceil(240 / 64)
    sigma = get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5,
                                 sample_rate=sample_rate, epochs=2, accountant="rdp")
    assert seen["max_grad_norm"] == 0.7
    assert seen["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
    assert dm.report["noise_multiplier"] == pytest.approx(sigma, rel=1e-12)
    assert dm.report["sample_rate"] == pytest.approx(sample_rate, rel=1e-12)
    optimizer = seen["optimizer"]
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["lr"], group["weight_decay"]) == (0.9, 0.05, 1e-3)
    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, dm.report["steps"])]
    assert dm.report["epsilon_spent"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert 1.0 - 0.02 <= dm.report["epsilon_spent"] <= 1.0


@needs_opacus
def test_dpsgd_records_each_epochs_mean_loss_over_its_rows(data, monkeypatch):
    """An epoch's loss that summed the batch means unweighted, then divided by the rows seen
    (a batch size's fraction of the mean), passed the suite. Every training batch's logits
    and labels are captured at the cross-entropy opacus calls, and each epoch's record is
    recomputed from them: the sum of the rows' losses over the rows seen."""
    batches, epochs = [], []
    cross_entropy, record = F.cross_entropy, defenses_module._record

    def capture(logits, target, *args, **kwargs):
        if logits.requires_grad:  # a training step (accuracy passes run without grad)
            batches.append((logits.detach().double(), target.clone()))
        return cross_entropy(logits, target, *args, **kwargs)

    def close_epoch(*args, **kwargs):
        epochs.append(list(batches))
        batches.clear()
        return record(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", capture)
    monkeypatch.setattr(defenses_module, "_record", close_epoch)
    dm = _defend("dpsgd", data, train_config=dataclasses.replace(TRAIN, epochs=2))
    assert len(epochs) == 2 and all(epoch for epoch in epochs)
    want = [sum(float(cross_entropy(z, t, reduction="sum")) for z, t in epoch)
            / sum(len(t) for _, t in epoch) for epoch in epochs]
    assert sum(len(epoch) for epoch in epochs) == dm.report["steps"]
    assert dm.history.train_loss == pytest.approx(want, rel=1e-6)
    assert 0.5 * math.log(K) < want[0] < 2 * math.log(K)  # a fresh model's loss, near ln k


def test_dpsgd_without_opacus_names_the_extra(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus -> ImportError
    with pytest.raises(ImportError, match=r"oni\[defenses\]"):
        _defend("dpsgd", data)


# ----------------------------------------------------------------------------- AdvReg

def test_advreg_reference_set_given_or_held_out(data):
    x, y, x_test, y_test = data
    held_out = _defend("advreg", data, config={"reference_fraction": 0.25})
    assert held_out.report["reference"]["n_reference"] == 60
    assert held_out.report["reference"]["n_members"] == 180
    assert 0.0 <= held_out.report["inference_balanced_accuracy"] <= 1.0
    given = defend("advreg", x, y, train_config=TRAIN, hidden=HIDDEN, x_ref=x_test[:50],
                   y_ref=y_test[:50])
    assert given.report["reference"] == {"source": "given", "n_members": len(x),
                                         "n_reference": 50}
    assert given.history.train_acc[-1] > 0
    # lambda = 0 leaves only cross-entropy: a different model than the default's
    plain = _defend("advreg", data, config={"lambda": 0.0, "reference_fraction": 0.25})
    assert not _same_params(_params(plain), _params(held_out))
    with pytest.raises(ValueError, match="holds out 240 of the 240 training rows, leaving no"):
        _defend("advreg", data, config={"reference_fraction": 0.999})


def _advreg_by_hand(x, y, x_ref, y_ref, cfg, tc):
    """Nasr et al.'s min-max as defend documents it, written out: per batch of members,
    k_steps Adam steps of h on the batch (target 1) and as many reference rows drawn with
    replacement (target 0), binary cross-entropy; then one Adam step of f on
    CE + lambda * (mean member belief of h on the batch). Returns f, h and the epochs' mean
    losses (weighted by batch size)."""
    f = init_parameters_(MLP(D, K, HIDDEN), tc.seed)
    h = init_parameters_(defenses_module._InferenceModel(K),
                         _derived_seed(tc.seed, "advreg:attack"))
    f_opt = torch.optim.Adam(f.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    h_opt = torch.optim.Adam(h.parameters(), lr=cfg["attack_lr"])
    order_gen = torch.Generator().manual_seed(tc.seed)
    ref_gen = torch.Generator().manual_seed(_derived_seed(tc.seed, "advreg:batches"))

    def one_hot(labels):
        return F.one_hot(labels, K).float()

    losses = []
    for _ in range(tc.epochs):
        total = 0.0
        order = torch.randperm(len(x), generator=order_gen)
        for lo in range(0, len(x), tc.batch_size):
            idx = order[lo:lo + tc.batch_size]
            for _ in range(cfg["k_steps"]):
                ridx = torch.randint(len(x_ref), (len(idx),), generator=ref_gen)
                with torch.no_grad():
                    p_in, p_out = torch.softmax(f(x[idx]), 1), torch.softmax(f(x_ref[ridx]), 1)
                z_in, z_out = h(p_in, one_hot(y[idx])), h(p_out, one_hot(y_ref[ridx]))
                # -log sigmoid(z) for a member, -log(1 - sigmoid(z)) for a reference row
                h_loss = -(F.logsigmoid(z_in).sum() + F.logsigmoid(-z_out).sum()) / (2 * len(idx))
                h_opt.zero_grad()
                h_loss.backward()
                h_opt.step()
            logits = f(x[idx])
            gain = torch.sigmoid(h(torch.softmax(logits, 1), one_hot(y[idx]))).mean()
            loss = F.cross_entropy(logits, y[idx]) + cfg["lambda"] * gain
            f_opt.zero_grad()
            loss.backward()
            f_opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    return f.eval(), h.eval(), losses


def test_advreg_is_nasr_et_al_min_max_step_by_step(data):
    """Mutants of the game passed the suite: h trained with the member labels swapped, on
    uniform probabilities instead of f's, with the members' labels on the reference rows, one
    step too few; f rewarded (not penalised) for h's belief; the report's balanced accuracy
    inverted. The defense now matches the documented algorithm written out by hand, and its
    inference_balanced_accuracy is h's balanced accuracy recomputed on both sets."""
    x, y, x_test, y_test = data
    x, y, x_ref, y_ref = x[:120], y[:120], x_test[:40], y_test[:40]
    cfg = {**DEFAULTS["advreg"], "lambda": 3.0, "k_steps": 2, "attack_lr": 1e-2}
    dm = defend("advreg", x, y, x_ref=x_ref, y_ref=y_ref, config=cfg, train_config=TRAIN,
                hidden=HIDDEN)
    f, h, losses = _advreg_by_hand(x, y, x_ref, y_ref, cfg, TRAIN)
    got = _params(dm)
    assert all(torch.allclose(got[key], want, atol=1e-6, rtol=0)
               for key, want in f.state_dict().items())
    assert dm.history.train_loss == pytest.approx(losses, rel=1e-5)
    with torch.no_grad():
        def belief(rows, labels):
            return h(torch.softmax(dm.model(rows), 1), F.one_hot(labels, K).float())
        balanced = 0.5 * ((belief(x, y) > 0).double().mean()
                          + (belief(x_ref, y_ref) <= 0).double().mean())
    assert dm.report["inference_balanced_accuracy"] == pytest.approx(float(balanced), abs=1e-12)


def test_advreg_holds_out_the_documented_reference_rows(data):
    """A member slice starting one row early (a row both member and reference) passed the
    suite: the held-out split is the seeded permutation's first reference_fraction rows as
    the reference set and the rest, in order, as members, exactly as if given."""
    x, y, _, _ = data
    x, y = x[:120], y[:120]
    held_out = defend("advreg", x, y, config={"reference_fraction": 0.25}, seed=3,
                      train_config=TRAIN, hidden=HIDDEN)
    order = torch.randperm(120, generator=torch.Generator().manual_seed(
        _derived_seed(3, "advreg:reference")))
    ref, members = order[:30], order[30:].sort().values
    given = defend("advreg", x[members], y[members], x_ref=x[ref], y_ref=y[ref], seed=3,
                   train_config=TRAIN, hidden=HIDDEN)
    assert held_out.report["reference"]["n_members"] == 90
    assert held_out.report["reference"]["n_reference"] == 30
    assert _same_params(_params(held_out), _params(given))
    assert held_out.history.train_acc == given.history.train_acc
    assert held_out.report["inference_balanced_accuracy"] == \
        given.report["inference_balanced_accuracy"]


def test_label_smoothing_is_cross_entropy_with_smoothing(data):
    x, y, x_test, y_test = data
    dm = _defend("label_smoothing", data, config={"smoothing": 0.2})
    model = MLP(D, K, HIDDEN)
    train_model(model, x, y, config=TRAIN, x_test=x_test, y_test=y_test,
                loss_fn=lambda z, t: F.cross_entropy(z, t, label_smoothing=0.2))
    assert _same_params(_params(dm), model.state_dict())


# ----------------------------------------------------------------------------- configs

def test_defaults_are_the_resolved_empty_config():
    assert set(DEFAULTS) == set(DEFENSES)
    for name in DEFENSES:
        assert defense_config(name) == DEFAULTS[name]
        assert defense_config(name, {}) == DEFAULTS[name]
    assert DEFAULTS["dynanoise"] == {"sigma0_sq": 0.3, "lambda": 2.0, "temperature": 10.0,
                                     "draws": 1}
    assert DEFAULTS["oni"]["kl_direction"] == "paper"
    assert defense_config("oni", {"eps": 2})["eps"] == 2.0


@pytest.mark.parametrize("name, config, error, match", [
    ("oni", {"epsilon": 1.0}, ValueError, r"'epsilon'.*tau_fraction, eps, beta"),
    ("undefended", {"eps": 1.0}, ValueError, r"'eps'.*none"),
    ("oni", {"eps": "big"}, TypeError, r"config\['eps'\] of 'oni' must be a number"),
    ("oni", {"eps": -1.0}, ValueError, r"config\['eps'\]"),
    ("oni", {"beta": 1.5}, ValueError, r"beta.*\[0.0, 1.0\]"),
    ("oni", {"alpha": float("nan")}, ValueError, "alpha"),
    ("oni", {"kl_direction": "reverse"}, ValueError, r"kl_direction.*'paper', 'forward'"),
    ("oni", {"n_permutations": 0}, ValueError, r"n_permutations'\] of 'oni' must be >= 1"),
    ("oni", {"max_iter": 2.5}, TypeError, "max_iter.*int"),
    ("oni", {"starts": True}, TypeError, "starts.*int"),
    ("oni", {"starts": 10 ** 8}, ValueError, r"starts'\] of 'oni' must be <= 4096"),
    ("oni", {"precision": "fp16"}, ValueError, r"precision.*'float32', 'tf32', 'bf16'"),
    ("dynanoise", {"temperature": 0}, ValueError, "temperature"),
    ("dynanoise", {"draws": 0}, ValueError, "draws"),
    # refused here, not by the allocator at the first query or after the base model trained
    ("dynanoise", {"draws": 10 ** 12}, ValueError, r"draws'\] of 'dynanoise' must be <= 10000"),
    ("dynanoise", {"temperature": 1e-320}, ValueError,
     r"temperature'\] of 'dynanoise' = [0-9.e-]+ is below float32's smallest"),
    ("dynanoise", {"sigma0_sq": 1e38, "lambda": 10.0}, ValueError, "overflows float32"),
    ("oni", {"n_permutations": 10 ** 30}, ValueError, r"n_permutations'\] of 'oni' must be <="),
    ("oni", {"max_iter": 10 ** 7}, ValueError, r"max_iter'\] of 'oni' must be <= 1000000"),
    ("dpsgd", {"epsilon": 0.0}, ValueError, "epsilon"),
    ("dpsgd", {"delta": 1.5}, ValueError, "delta"),
    # opacus's noise search never ended at 1e16 (rdp); a delta of 1 guarantees nothing
    ("dpsgd", {"epsilon": 1e16}, ValueError, r"epsilon'\] of 'dpsgd' must be a finite number "
                                             r"in \(0.0, 100.0\]"),
    ("dpsgd", {"delta": 1.0}, ValueError, r"delta'\] of 'dpsgd' .* in \(0.0, 1.0\), got 1.0"),
    ("dpsgd", {"accountant": "gdp"}, ValueError, "accountant"),
    ("advreg", {"reference_fraction": 1.5}, ValueError, "reference_fraction"),
    # it ran for ever (every other effort setting stops at 10**6)
    ("advreg", {"k_steps": 10 ** 12}, ValueError, r"k_steps'\] of 'advreg' must be <= 1000000"),
    # it kept one member row, silently
    ("advreg", {"reference_fraction": 1.0}, ValueError, r"reference_fraction.*\(0.0, 1.0\)"),
    ("label_smoothing", {"smoothing": -0.1}, ValueError, "smoothing"),
    ("oni", [("eps", 1.0)], TypeError, "config must be a dict"),
])
def test_bad_configs_are_rejected(name, config, error, match, data):
    with pytest.raises(error, match=match):
        defense_config(name, config)
    with pytest.raises(error, match=match):
        _defend(name, data, config=config)


def test_bad_arguments_are_rejected(data, confident_base):
    x, y, x_test, y_test = data
    with pytest.raises(ValueError, match="unknown defense 'dp'.*undefended"):
        defend("dp", x, y)
    with pytest.raises(TypeError, match="^train_config must be a TrainConfig"):
        defend("undefended", x, y, train_config={"epochs": 1})
    with pytest.raises(ValueError, match="x_test and y_test"):
        defend("undefended", x, y, train_config=TRAIN, x_test=x_test)
    with pytest.raises(ValueError, match="x_ref, y_ref.*'oni' does not use them"):
        defend("oni", x, y, train_config=TRAIN, x_ref=x_test, y_ref=y_test)
    with pytest.raises(ValueError, match="n_classes = 7 but base_model has 4"):
        defend("oni", x, y, train_config=TRAIN, base_model=confident_base, n_classes=7)
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 2\)"):
        defend("undefended", x, y, train_config=TRAIN, n_classes=2)
    with pytest.raises(TypeError, match="base_model must be an nn.Module"):
        defend("oni", x, y, train_config=TRAIN, base_model=lambda z: z)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        defend("undefended", x.long(), y, train_config=TRAIN)
    with pytest.raises(TypeError, match="hidden"):
        defend("undefended", x, y, train_config=TRAIN, hidden=32)
    with pytest.raises(ValueError, match="seed"):
        defend("undefended", x, y, train_config=TRAIN, seed=-1)


@pytest.mark.parametrize("name", DEFENSES)
def test_a_diverged_base_model_is_refused_by_name(name, data, confident_base):
    """A base model with a NaN weight was released as "undefended", or failed later as
    extra[0] (distillation) or as DynaNoise's noise overflowing."""
    broken = copy.deepcopy(confident_base)
    with torch.no_grad():
        broken[2].bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"base_model's parameter '2\.bias' contains NaN "
                                         r"or Inf \(first at index \[1\]\).*diverge"):
        _defend(name, data, base_model=broken)
    with torch.device("meta"):
        skeleton = MLP(D, K, HIDDEN)
    with pytest.raises(ValueError, match=r"base_model's parameter '0\.weight' is on the meta "
                                         r"device"):
        _defend(name, data, base_model=skeleton)


def test_non_finite_logits_of_a_finite_model_are_named(data, confident_base):
    """Finite weights can still overflow: the logits are named, on the rows the defense made
    (x + noise), as a numerical failure (FloatingPointError, exit 1 in `oni run`), not as the
    distillation's extra[0] or the noise's overflow."""
    x, y, _, _ = data
    loud = copy.deepcopy(confident_base)
    with torch.no_grad():
        loud[0].weight.mul_(1e38)
    with pytest.raises(FloatingPointError, match=r"the model's logits at row \d+ of x \+ noise "
                                                 r"are NaN or beyond float32's range.*eps"):
        _defend("uniform", data, base_model=loud)
    with pytest.raises(FloatingPointError, match=r"DynaNoise: the model's logits at row \d+ of "
                                                 r"x are NaN"):
        DynaNoise(loud)(x)


def test_a_divergence_on_an_epochs_last_step_is_a_divergence(data):
    """The epoch's loss is taken before each step: a full batch at a huge learning rate left
    NaN weights that the accuracy then blamed on the model (a ValueError, exit 2)."""
    x, y, _, _ = data
    full_batch = TrainConfig(epochs=2, batch_size=len(x), lr=1e30, progress=False,
                             device="cpu")
    diverged = r"training diverged: (the last step of epoch 1 left NaN or Inf|after epoch 1 " \
        r"the model's logits at row \d+ of x are NaN or beyond float32's range)"
    with pytest.raises(FloatingPointError, match=diverged):
        defend("undefended", x, y, train_config=full_batch, hidden=HIDDEN)
    with pytest.raises(FloatingPointError, match=diverged + ".*; lower .*train_config.lr"):
        defend("advreg", x, y, train_config=full_batch, hidden=HIDDEN)


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("name", ["undefended", "oni", "dynanoise"])
def test_save_load_roundtrip(name, data, tmp_path):
    _, _, x_test, _ = data
    dm = _defend(name, data, config={"draws": 2} if name == "dynanoise" else None)
    expected = dm.predict_proba(x_test)
    save_defended(dm, tmp_path / "defended")
    back = load_defended(tmp_path / "defended")
    assert back.name == name and back.config == dm.config and back.report == dm.report
    assert back.history == dm.history
    assert _same_params(_params(back), _params(dm))
    assert back.artifacts == {}
    # a DynaNoise stream restarts from its seed: the first query is answered as before
    assert torch.equal(back.predict_proba(x_test), expected)


def test_load_defended_rejects_a_plain_model(tmp_path):
    save_model(MLP(D, K, HIDDEN), tmp_path / "plain")
    with pytest.raises(ValueError, match="no defense"):
        load_defended(tmp_path / "plain")
    with pytest.raises(TypeError, match="DefendedModel"):
        save_defended(MLP(D, K, HIDDEN), tmp_path / "x")


def test_save_defended_refuses_what_load_defended_would(data, tmp_path):
    """A save that load_defended refuses used to replace a good one."""
    dm = _defend("dynanoise", data)
    save_defended(dm, tmp_path / "good")
    for change, match in ((dict(name="dp"), "unknown defense 'dp'"),
                          (dict(config={"draws": 0}), "draws"),
                          (dict(report=None), "report must be a dict"),
                          (dict(report={}), "report\\['noise_seed'\\] must be an int"),
                          (dict(history={"epochs": [1]}), "history must be an oni.train.History"),
                          # these were saved, then refused by load_defended
                          (dict(history=dataclasses.replace(
                              dm.history, epochs=dm.history.epochs + [9])),
                           r"history\['train_loss'\] must be a list as long as"),
                          (dict(history=dataclasses.replace(dm.history, seconds=-1.0)),
                           r"history\['seconds'\] must be a number >= 0"),
                          (dict(history=dataclasses.replace(dm.history, seconds=math.inf)),
                           r"history\['seconds'\] must be a number >= 0"),
                          # these blamed extra, which the user never passed
                          (dict(history=dataclasses.replace(
                              dm.history, train_loss=[torch.tensor(0.5)] * len(
                                  dm.history.epochs))),
                           r"history\['train_loss'\] holds tensor\(0.5"),
                          (dict(history=dataclasses.replace(
                              dm.history, train_acc=[np.float32(0.5)] * len(
                                  dm.history.epochs))),
                           r"history\['train_acc'\] holds"),
                          (dict(report={**dm.report, "t": torch.tensor(1.0)}),
                           "report must hold only JSON-able values"),
                          (dict(report={**dm.report, "t": np.float32(1.0)}),
                           "report must hold only JSON-able values")):
        with pytest.raises((TypeError, ValueError), match="save_defended: .*" + match):
            save_defended(dataclasses.replace(dm, **change), tmp_path / "good")
    back = load_defended(tmp_path / "good")  # the good save is as it was
    assert back.config == dm.config and back.report == dm.report
    # a partial config is saved completed, as load_defended completes it
    save_defended(dataclasses.replace(dm, config={"draws": 2}), tmp_path / "partial")
    assert load_defended(tmp_path / "partial").config == {**DEFAULTS["dynanoise"], "draws": 2}


@pytest.mark.parametrize("edit, match", [
    (lambda meta: meta["report"].pop("noise_seed"), "noise_seed"),  # was read as seed 0
    (lambda meta: meta["report"].update(noise_seed="7"), "noise_seed"),
    (lambda meta: meta["report"].update(noise_seed=-5), "noise_seed"),
    (lambda meta: meta["history"].update(epochs="x"), "history\\['epochs'\\]"),
    (lambda meta: meta["history"].update(train_loss=[0.5]), "as long as history\\['epochs'\\]"),
    (lambda meta: meta["history"].update(seconds="x"), "history\\['seconds'\\]"),
    (lambda meta: meta["history"].update(seconds=math.nan), "history\\['seconds'\\]"),
    (lambda meta: meta["history"].pop("train_acc"), "exactly the fields"),
])
def test_load_defended_checks_the_report_and_history(data, tmp_path, edit, match):
    import json
    dm = _defend("dynanoise", data)
    path = save_defended(dm, tmp_path / "d")
    meta_path = path / "model.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["extra"]["defense"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{path}: bad defense metadata: .*{match}"):
        load_defended(path)


def test_a_float64_base_model_serves_every_defense(data):
    """Every defense failed on a float64 f ("mat1 and mat2 must have the same dtype", blamed
    on x's width); x is now cast to f's dtype, as oni's own noise step already did."""
    x, y, x_test, y_test = data
    base = MLP(D, K, HIDDEN).double()
    train_model(base, x, y, config=TRAIN)
    for name in DEFENSES:
        if name == "dpsgd" and importlib.util.find_spec("opacus") is None:
            continue
        config = {"n_permutations": 4, "max_iter": 5} if name == "oni" else None
        dm = defend(name, x, y, x_test=x_test, y_test=y_test, train_config=TRAIN,
                    base_model=base, config=config)
        probs = dm.predict_proba(x_test)
        assert probs.dtype == torch.float32 and torch.isfinite(probs).all(), name
        assert next(dm.model.parameters()).dtype == torch.float64, name


def test_oni_refuses_a_float32_precision_opt_in_on_a_float64_base_model(data):
    """It ran in float64 as if float32 had been asked for (a silent no-op), then, from the
    solvers, blamed x, which was float32."""
    x, y, _, _ = data
    base = MLP(D, K, HIDDEN).double()
    with pytest.raises(ValueError, match=r"config\['precision'\] = 'bf16' of 'oni' .*"
                                         r"base_model is float64"):
        defend("oni", x, y, train_config=TRAIN, base_model=base, config={"precision": "bf16"})


def test_a_half_precision_base_model_is_refused(data):
    """A bfloat16 f had x rounded to bfloat16 by some defenses and refused by others."""
    x, y, _, _ = data
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(TypeError, match=f"base_model holds {dtype} parameters"):
            defend("undefended", x, y, train_config=TRAIN,
                   base_model=MLP(D, K, HIDDEN).to(dtype))


def test_one_class_is_refused(data):
    """Six of the seven defenses trained a 1-output model with loss 0 (oni.Dataset refuses
    one class too)."""
    x, _, _, _ = data
    for name in ("undefended", "uniform"):
        with pytest.raises(ValueError, match="y holds only the class 0: a classifier needs"):
            defend(name, x, torch.zeros(len(x), dtype=torch.long), train_config=TRAIN)
    with pytest.raises(ValueError, match="n_classes = 1: a classifier needs"):
        defend("undefended", x, torch.zeros(len(x), dtype=torch.long), n_classes=1,
               train_config=TRAIN)


def test_public_names_are_exported():
    for public in defenses_module.__all__:
        assert getattr(oni, public) is getattr(defenses_module, public)


def test_readme_defenses_example_runs():
    import pathlib
    import re

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("## Defenses", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md:## Defenses", "exec"), {})


def test_oni_takes_float64_rows_for_the_model_it_builds(data):
    """defend builds the float32 base model itself, so float64 x (which the other defenses
    take) is the defense's to cast, not the user's: it said "cast one to the other"."""
    x, y, _, _ = data
    dm = defend("oni", x[:60].double(), y[:60], hidden=HIDDEN, train_config=TRAIN,
                config={"n_permutations": 4, "max_iter": 5})
    assert dm.report["feasible_rate"] >= 0 and dm.model(x[:2]).shape == (2, K)


@pytest.mark.parametrize("name, config, hint", [
    ("advreg", {"lambda": 1e308}, r"lower train_config\.lr = .* or config\['lambda'\] = "
                                  r"1e\+308 of 'advreg'"),
    pytest.param("dpsgd", {"lr": 1e30}, r"lower config\['lr'\] = 1e\+30 or "
                                        r"config\['max_grad_norm'\] = 1.0 of 'dpsgd'",
                 marks=needs_opacus),
])
def test_divergence_names_the_defenses_own_settings(data, name, config, hint):
    """DP-SGD trains at config['lr']: the message told the user to lower train_config.lr,
    which it never uses."""
    x, y, _, _ = data
    with pytest.raises(FloatingPointError, match="training diverged: .*" + hint):
        defend(name, x[:60], y[:60], hidden=HIDDEN, config=config,
               train_config=TrainConfig(epochs=2, batch_size=32, progress=False))


# ----------------------------------------------------------------------------- robustness

@pytest.mark.parametrize("name", [pytest.param("dpsgd", marks=needs_opacus), "advreg"])
def test_dpsgd_and_advreg_cast_x_to_the_models_dtype(name, data):
    """They failed with torch's "mat1 and mat2 must have the same dtype" on float64 or
    bfloat16 x (and advreg on such an x_ref); the other defenses cast x, as these now do."""
    x, y, x_test, y_test = data
    x, y = x[:60], y[:60]
    small = dict(hidden=HIDDEN, train_config=TRAIN)
    want = _params(defend(name, x, y, **small))
    assert _same_params(_params(defend(name, x.double(), y, **small)), want)
    bf16 = x.bfloat16()
    assert _same_params(_params(defend(name, bf16, y, **small)),
                        _params(defend(name, bf16.float(), y, **small)))
    big = x.double()
    big[2, 3] = 1e300
    with pytest.raises(ValueError, match=r"x cast to the model's torch.float32 contains NaN"):
        defend(name, big, y, **small)
    if name == "advreg":
        ref = dict(x_ref=x_test[:20].double(), y_ref=y_test[:20])
        assert _same_params(_params(defend(name, x, y, **ref, **small)),
                            _params(defend(name, x, y, x_ref=x_test[:20], y_ref=y_test[:20],
                                           **small)))
        ref["x_ref"][0, 0] = 1e300
        with pytest.raises(ValueError, match=r"x_ref cast to the model's torch.float32"):
            defend(name, x, y, **ref, **small)


SMALL_ONI = {"n_permutations": 4, "max_iter": 5, "refine_iter": 1, "polish_iter": 1}


@pytest.mark.parametrize("name", TRAINED)
def test_inputs_with_requires_grad_are_left_untouched(name, data):
    """dpsgd failed inside deepcopy and advreg with "backward through the graph a second
    time"; the other defenses filled the caller's x.grad. The inputs are now detached."""
    x, y, x_test, y_test = (t[:60] for t in data)
    config = SMALL_ONI if name == "oni" else None
    plain = defend(name, x, y, x_test=x_test, y_test=y_test, hidden=HIDDEN,
                   train_config=TRAIN, config=config)
    xg, xg_test = x.clone().requires_grad_(), x_test.clone().requires_grad_()
    got = defend(name, xg, y, x_test=xg_test, y_test=y_test, hidden=HIDDEN,
                 train_config=TRAIN, config=config)
    assert xg.grad is None and xg_test.grad is None
    assert _same_params(_params(got), _params(plain))


def test_a_base_model_mixing_dtypes_is_named(data):
    """It was said not to accept x's width (torch's "mat1 and mat2 must have the same
    dtype")."""
    x, y, _, _ = data
    base = MLP(D, K, HIDDEN)
    base[2].double()
    with pytest.raises(TypeError, match=r"^base_model mixes parameter dtypes"):
        defend("dynanoise", x, y, base_model=base, train_config=TRAIN)


class _WithBatchNorm(torch.nn.Module):
    """A classifier with parameters outside nn.Linear layers."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = (torch.nn.Linear(D, 16), torch.nn.BatchNorm1d(16),
                                   torch.nn.Linear(16, K))

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


def _nothing_may_run(monkeypatch):
    def ran(*args, **kwargs):
        raise AssertionError("an expensive stage ran before the check")
    for stage in ("train_model", "shapley_values", "optimal_noise", "uniform_noise"):
        monkeypatch.setattr(defenses_module, stage, ran)


@pytest.mark.parametrize("name", ["uniform", "oni", "label_smoothing", "advreg",
                                  pytest.param("dpsgd", marks=needs_opacus)])
def test_a_base_model_the_defense_cannot_reinitialise_is_refused_first(name, data,
                                                                       monkeypatch):
    """It failed only when the fresh copy was initialised (for oni after the Shapley values
    and the noise), naming init_parameters_ instead of base_model."""
    x, y, _, _ = data
    _nothing_may_run(monkeypatch)
    with pytest.raises(TypeError, match=r"^base_model has parameters outside nn.Linear layers, "
                                        rf"so '{name}' cannot.*module 'bn' \(BatchNorm1d\)"):
        defend(name, x, y, base_model=_WithBatchNorm().eval(), train_config=TRAIN)


def test_a_base_model_with_other_parameters_serves_the_defenses_that_use_it_as_is(data):
    x, y, _, _ = data
    for name in ("undefended", "dynanoise"):
        dm = defend(name, x, y, base_model=_WithBatchNorm().eval(), train_config=TRAIN)
        assert dm.predict_proba(x[:3]).shape == (3, K)


def test_tf32_without_cuda_is_refused_before_the_base_model_trains(data, monkeypatch):
    x, y, _, _ = data
    _nothing_may_run(monkeypatch)
    with pytest.raises(ValueError, match=r"^config\['precision'\] = 'tf32' of 'oni' needs a "
                                         r"CUDA device .* train_config.device is cpu"):
        defend("oni", x, y, config={"precision": "tf32"}, train_config=TRAIN)


@pytest.mark.parametrize("name", TRAINED)
def test_defend_leaves_the_global_rng_as_it_was(name, data):
    """Building an MLP (and AdvReg's inference model, even with base_model given) drew
    nn.Linear's default init from the global RNG: the caller's later draws depended on
    which defense ran. The defended model never depended on that state."""
    x, y, _, _ = (t[:60] for t in data)
    base = MLP(D, K, HIDDEN)
    config = SMALL_ONI if name == "oni" else None
    params = []
    for state_seed, base_model in ((1, None), (2, None), (1, base)):
        torch.manual_seed(state_seed)
        dm = defend(name, x, y, hidden=HIDDEN, train_config=TRAIN, config=config,
                    base_model=base_model)
        after = torch.rand(4)
        torch.manual_seed(state_seed)
        assert torch.equal(after, torch.rand(4))
        params.append(_params(dm))
    assert _same_params(params[0], params[1])


@pytest.mark.parametrize("attribute, value, error, match", [
    ("draws", 0, ValueError, r"^DynaNoise.draws must be >= 1, got 0"),  # "overflows float32"
    ("draws", -1, ValueError, r"^DynaNoise.draws must be >= 1"),  # torch's negative dimension
    ("draws", 2.0, TypeError, r"^DynaNoise.draws must be an int"),
    ("temperature", 0, ValueError, r"^DynaNoise.temperature must be a finite number > 0.0"),
    ("sigma0_sq", -1, ValueError, r"^DynaNoise.sigma0_sq must be a finite number >= 0.0"),
    ("lam", 1e300, ValueError, r"^DynaNoise.sigma0_sq \* \(1 \+ DynaNoise.lam\)"),
])
def test_dynanoise_settings_changed_after_construction_are_checked(attribute, value, error,
                                                                   match):
    model = MLP(D, K, HIDDEN).eval()
    x = torch.rand(5, D)
    predictor = DynaNoise(model, noise_seed=3)
    setattr(predictor, attribute, value)
    with pytest.raises(error, match=match):
        predictor(x)
    predictor.noise_seed = -1
    with pytest.raises(ValueError, match=r"^DynaNoise.noise_seed must be in"):
        predictor.reset()
    # a valid change takes effect at the next call
    changed = DynaNoise(model, noise_seed=3)
    changed.temperature, changed.draws = 2.0, 3
    assert torch.equal(changed(x), DynaNoise(model, temperature=2.0, draws=3, noise_seed=3)(x))
