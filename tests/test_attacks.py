"""Membership inference attacks: they find an overfit target's members, sit at chance on a
model that never saw them, and keep their shapes, orientation, seeds and error messages."""
from __future__ import annotations

import dataclasses
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from sklearn.metrics import roc_auc_score

from oni import attacks
from oni.attacks import (ATTACKS, DEFAULTS, METRICS, AttackResult, metric_values, run_attack,
                         run_attacks, scaled_logit)
from oni.data import Dataset, make_splits, synthetic_purchase
from oni.models import MLP
from oni.train import TrainConfig, predict_proba, train_model

HIDDEN = (64, 32)
TRAIN = TrainConfig(epochs=60, batch_size=64, device="cpu", progress=False)
TINY = TrainConfig(epochs=1, batch_size=64, device="cpu", progress=False)  # checks only
SMALL_NET = {"prediction_widths": (64, 32), "label_widths": (32,), "combined_widths": (32,)}
# the shadow attack learns from a few hundred rows here: more shadows and epochs than default
CONFIGS = {"shadow": {**SMALL_NET, "n_shadows": 3, "attack_epochs": 60},
           "lira_online": {"n_shadows": 8}, "lira_offline": {"n_shadows": 8},
           "label_only": {"n_queries": 8}}


@dataclass
class Target:
    """What run_attack needs of an oni.defenses.DefendedModel."""

    model: torch.nn.Module
    name: str = "undefended"

    def predict_proba(self, x):
        return predict_proba(self.model, x)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


@pytest.fixture(scope="module")
def data():
    return synthetic_purchase(1800, d=100, k=10, seed=0)


@pytest.fixture(scope="module")
def splits(data):
    return make_splits(data, sizes={"train": 300, "test": 300, "known": 60, "target": 400,
                                    "shadow_pool": 800}, seed=0)


def _target(data, rows):
    model = MLP(data.d, data.k, HIDDEN)
    train_model(model, data.x[rows], data.y[rows], config=TRAIN)
    return Target(model)


@pytest.fixture(scope="module")
def overfit(data, splits):
    """A target that memorised its 300 training rows (train accuracy ~1, test ~0.6)."""
    return _target(data, splits.train)


@pytest.fixture(scope="module")
def overfit_results(overfit, data, splits):
    return run_attacks(ATTACKS, overfit, data, splits, configs=CONFIGS, train_config=TRAIN,
                       seed=0)


@pytest.fixture(scope="module")
def blind_results(data, splits):
    """A "target" trained on the test rows: it never saw any target row."""
    return run_attacks(ATTACKS, _target(data, splits.test), data, splits, configs=CONFIGS,
                       train_config=TRAIN, seed=0)


def _auc(result, splits):
    return roc_auc_score(splits.target_member.numpy(), result.scores.numpy())


# ----------------------------------------------------------------------------- power

@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_find_the_members_of_an_overfit_target(overfit_results, splits, name):
    assert _auc(overfit_results[name], splits) > 0.6


def test_label_only_beats_the_gap_attack(overfit_results, splits):
    # measured 0.800 vs 0.725: the noisy copies tell members from non-members that the
    # clean label alone (metric_correctness, the gap attack) cannot
    label_only = _auc(overfit_results["label_only"], splits)
    assert label_only > _auc(overfit_results["metric_correctness"], splits) + 0.03
    assert label_only > 0.7


def test_lira_online_is_the_strongest(overfit_results, splits):
    aucs = {name: _auc(result, splits) for name, result in overfit_results.items()}
    assert aucs["lira_online"] == max(aucs.values())
    assert aucs["lira_online"] > 0.8


@pytest.mark.parametrize("name", ATTACKS)
def test_attacks_sit_at_chance_on_a_model_that_never_saw_the_target(blind_results, splits,
                                                                    name):
    n_in = int(splits.target_member.sum())
    n_out = len(splits.target) - n_in
    se = math.sqrt((n_in + n_out + 1) / (12 * n_in * n_out))  # AUC's null standard error
    assert abs(_auc(blind_results[name], splits) - 0.5) < 4 * se


@pytest.mark.parametrize("name", ATTACKS)
def test_calibration_separates_the_shadows_members(overfit_results, name):
    scores, is_member = overfit_results[name].calibration
    assert roc_auc_score(is_member.numpy(), scores.numpy()) > 0.6


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", ATTACKS)
def test_result_shapes_and_types(overfit_results, splits, name):
    result = overfit_results[name]
    assert isinstance(result, AttackResult) and result.name == name
    assert result.scores.dtype == torch.float64
    assert result.scores.shape == (len(splits.target),)
    assert torch.isfinite(result.scores).all()
    cal_scores, cal_member = result.calibration
    assert cal_scores.dtype == torch.float64 and cal_member.dtype == torch.bool
    assert cal_scores.shape == cal_member.shape and torch.isfinite(cal_scores).all()
    assert 0 < int(cal_member.sum()) < len(cal_member)
    assert result.extra["config"]["hidden"] is None and result.extra["hidden"] == list(HIDDEN)
    assert set(result.extra["config"]) == set(DEFAULTS[name])


def test_metric_scores_are_margins_to_the_class_thresholds(overfit_results, overfit, data,
                                                           splits):
    probs = overfit.predict_proba(data.x[splits.target])
    labels = data.y[splits.target]
    for metric in METRICS[1:]:
        result = overfit_results[f"metric_{metric}"]
        thresholds = result.extra["thresholds"]
        assert thresholds.shape == (data.k,)
        expected = metric_values(metric, probs, labels) - thresholds[labels]
        torch.testing.assert_close(result.scores, expected)
    correctness = overfit_results["metric_correctness"].scores
    assert set(correctness.tolist()) <= {0.0, 1.0}


def test_global_thresholds_are_one_value(overfit, data, splits):
    result = run_attack("metric_loss", overfit, data, splits, config={"thresholds": "global"},
                        train_config=TRAIN)
    thresholds = result.extra["thresholds"]
    assert torch.all(thresholds == thresholds[0])
    assert result.extra["fallback_classes"] == []


def test_shadow_accuracies_show_the_shadow_overfits_like_the_target(overfit_results):
    extra = overfit_results["metric_confidence"].extra
    assert len(extra["shadow_train_acc"]) == 1
    assert extra["shadow_train_acc"][0] > 0.9 > extra["shadow_test_acc"][0] + 0.2


@pytest.mark.parametrize("name", ["lira_online", "lira_offline"])
def test_lira_shadows_come_in_complementary_halves(overfit_results, splits, name):
    extra = overfit_results[name].extra
    keep, pool = extra["shadow_membership"], extra["pool_rows"]
    m = extra["shadow_size"]
    assert m == len(splits.train) and keep.shape == (8, 2 * m) and pool.shape == (2 * m,)
    assert torch.all(keep.sum(0) == 4) and torch.all(keep.sum(1) == m)
    assert torch.all(keep[0::2] ^ keep[1::2])
    assert len(set(pool.tolist())) == 2 * m
    target_rows = set(splits.target.tolist())
    if name == "lira_online":  # every target row is a member of half the shadows
        assert target_rows <= set(pool.tolist())
    else:
        assert not target_rows & set(pool.tolist())
        assert set(pool.tolist()) <= set(splits.shadow_pool.tolist())
    assert extra["global_variance"] is True  # K = 8 < 64


def test_fit_on_known_uses_the_targets_own_outputs(overfit, data, splits):
    result = run_attack("metric_confidence", overfit, data, splits,
                        config={"fit_on": "known"}, train_config=TRAIN)
    assert result.extra["reference_size"] == len(splits.known)
    assert _auc(result, splits) > 0.6
    with pytest.raises(ValueError, match="fit_on"):
        run_attack("metric_confidence", overfit, data, splits, config={"fit_on": "known"},
                   train_config=TRAIN, defense=("undefended", {}))


def test_no_calibration_when_nothing_is_held_out(overfit, data, splits):
    result = run_attack("metric_entropy", overfit, data, splits,
                        config={"calibration_fraction": 0}, train_config=TRAIN)
    assert result.calibration is None


# ----------------------------------------------------------------------------- formulas

def test_metric_values_are_oriented_member_high():
    confident = torch.tensor([[0.97, 0.02, 0.01]])
    unsure = torch.tensor([[0.40, 0.35, 0.25]])
    wrong = torch.tensor([[0.10, 0.80, 0.10]])
    y = torch.tensor([0])
    for metric in METRICS:
        values = [float(metric_values(metric, p, y)) for p in (confident, unsure, wrong)]
        assert values[0] >= values[1], metric
        if metric != "entropy":  # the only label-blind one: a confident mistake looks sure
            assert values[1] >= values[2] and values[0] > values[2], metric
    assert float(metric_values("entropy", confident, y)) > float(
        metric_values("entropy", unsure, y))


def test_metric_values_formulas():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    y = torch.tensor([0])
    log = math.log
    assert float(metric_values("confidence", p, y)) == pytest.approx(0.7)
    assert float(metric_values("loss", p, y)) == pytest.approx(log(0.7))
    assert float(metric_values("entropy", p, y)) == pytest.approx(
        0.7 * log(0.7) + 0.2 * log(0.2) + 0.1 * log(0.1))
    mentr = -(0.3 * log(0.7)) - 0.2 * log(0.8) - 0.1 * log(0.9)
    assert float(metric_values("modified_entropy", p, y)) == pytest.approx(-mentr)
    assert float(metric_values("correctness", p, torch.tensor([1]))) == 0.0
    with pytest.raises(ValueError, match="metric must be one of"):
        metric_values("margin", p, y)


def test_scaled_logit_is_stable():
    p = torch.tensor([[0.7, 0.2, 0.1], [1.0, 1e-30, 0.0], [0.0, 1.0, 0.0]])
    phi = scaled_logit(p, torch.tensor([0, 0, 0]))
    assert phi.dtype == torch.float64
    assert float(phi[0]) == pytest.approx(math.log(0.7 / 0.3), rel=1e-6)
    assert float(phi[1]) == pytest.approx(-math.log(1e-30), rel=1e-5)  # not inf
    assert float(phi[2]) == pytest.approx(math.log(1e-45))
    batched = scaled_logit(torch.stack([p, p.flip(0)]), torch.tensor([0, 0, 0]))
    assert batched.shape == (2, 3) and torch.equal(batched[0], phi)


@pytest.mark.parametrize("call", [lambda p, y: metric_values("loss", p, y), scaled_logit])
def test_metric_values_and_scaled_logit_check_their_labels(call):
    """A label per row of probs, each a class index: fewer labels used to broadcast (one
    label for every row) and give a result of the wrong rows, without a word."""
    p = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), 1)
    with pytest.raises(ValueError, match=r"labels must be a tensor \[n\] = \[4\]"):
        call(p, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must be a tensor \[n\] = \[4\]"):
        call(p, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"labels\[2\] = 3 is not a class index in \[0, 3\)"):
        call(p, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(TypeError, match="labels must hold integer class indices"):
        call(p, torch.zeros(4))
    with pytest.raises(ValueError, match="probs must be a floating tensor"):
        call(p[0], torch.tensor([0]))
    y = torch.tensor([0, 1, 2, 0])
    nan = p.clone()
    nan[1, 0] = float("nan")  # the loss of row 1 (label 1) would not even see it
    with pytest.raises(ValueError, match=r"probs contains NaN or Inf \(first at index \[1, 0\]\)"):
        call(nan, y)
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\] \(softmax "
                                         r"outputs, not logits\)"):
        call(torch.log(p), y)
    assert call(p, y).shape == (4,)
    # a predict_proba's rounding (rows summing to 1 within 1e-3, as _query takes them) passes
    near = p.clone()
    near[0] = torch.tensor([1.0005, 0.0, 0.0])
    assert torch.isfinite(call(near, y)).all()


@pytest.mark.parametrize("call", [lambda p, y: metric_values("entropy", p, y), scaled_logit])
def test_metric_values_and_scaled_logit_refuse_rows_that_are_not_distributions(call):
    """Sigmoid outputs, or values in [0, 1] that do not sum to 1, gave entropies and losses
    of no meaning without a word (fuzz pass 7); meta and sparse tensors failed inside
    torch."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 3, generator=gen), 1)
    y = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match=r"probs must be probabilities, rows summing to 1 "
                                         r"\(softmax outputs\): row \[0\] sums to 1\.5\b"):
        call(torch.full((5, 3), 0.5), y)  # three sigmoids of 0
    batched = torch.stack([p, p.clone()])  # scaled_logit's [K, n, k]: the row's place in it
    batched[1, 3] = torch.tensor([0.5, 0.4, 0.0])
    with pytest.raises(ValueError, match=r"row \[1, 3\] sums to 0\.9\b"):
        scaled_logit(batched, y)
    with pytest.raises(ValueError, match=r"row \[3\] sums to 0\.9\b"):
        call(batched[1], y)
    # a bfloat16 row rounds each entry: it may stray up to 4 of its eps from 1
    assert torch.isfinite(call(p.bfloat16(), y)).all()
    with pytest.raises(ValueError, match="probs is on the meta device"):
        call(p.to("meta"), y)
    with pytest.raises(ValueError, match="labels is on the meta device"):
        call(p, y.to("meta"))
    with pytest.raises(TypeError, match="probs must be a dense tensor, got layout "
                                        "torch.sparse_coo"):
        call(p.to_sparse(), y)


def test_best_threshold_is_song_and_mittals_rule():
    # "member iff value >= t": t = 0.8 gives (2/3 + 1) / 2, t = 0.6 gives (1 + 4/5) / 2
    values = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], dtype=torch.float64)
    member = torch.tensor([True, True, False, True, False, False, False, False])
    shuffle = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert attacks._best_threshold(values[shuffle], member[shuffle]) == pytest.approx(0.6)
    assert attacks._best_threshold(values, member) == pytest.approx(0.6)
    assert attacks._best_threshold(values[:3], member[:3]) == pytest.approx(0.8)
    ties = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert attacks._best_threshold(ties, torch.tensor([True, False, False, False])) == 1.0


def test_label_only_value_counts_the_copies_that_keep_the_label():
    def predict(x):  # class 1 iff the first feature is positive
        return torch.nn.functional.one_hot((x[:, 0] > 0).long(), 2).float()

    x = torch.tensor([[-50.0, 0.0], [50.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    clean = predict(x).argmax(1)  # [0, 1, 0]
    gen = torch.Generator().manual_seed(0)
    values = attacks._robustness(predict, x, labels, clean, (1.0, 2.0), 999, gen, 2, "t")
    assert values.shape == (2, 3) and values.dtype == torch.float64
    assert values[:, 0].tolist() == [1.0, 1.0] and values[:, 1].tolist() == [0.0, 0.0]
    assert abs(float(values[0, 2]) - 0.5) < 0.05  # on the boundary: half the copies flip
    assert float(values[0, 2]) == float(values[1, 2])  # every sigma scales the same draws


def test_label_only_noise_is_sigma_times_a_standard_normal():
    """The copies are x + sigma z: predicting 1[x_0 > t] at x = 0, a noisy copy keeps label 1
    iff sigma z_0 > t, with probability Phi(-t / sigma). Checked exactly against the draws
    recomputed from the generator (one block of rows here) and against the closed form
    within 4 binomial standard errors; the check above sits on the boundary t = 0, where any
    scale of z keeps half the copies (the mutation audit's sigma^2 z passed the suite)."""
    t, n, q, d = 1.0, 20, 200, 3

    def predict(x):  # class 1 iff the first feature exceeds t
        return torch.nn.functional.one_hot((x[:, 0] > t).long(), 2).float()

    x = torch.zeros(n, d)
    labels = torch.ones(n, dtype=torch.long)
    clean = torch.zeros(n, dtype=torch.long)  # the clean copy, x_0 = 0 <= t, is class 0
    sigmas = (0.5, 2.0)
    values = attacks._robustness(predict, x, labels, clean, sigmas, q,
                                 torch.Generator().manual_seed(3), 2, "t")
    z = torch.randn(n, q, d, generator=torch.Generator().manual_seed(3))
    for i, sigma in enumerate(sigmas):
        kept = (sigma * z[:, :, 0] > t).sum(1).double()
        assert torch.equal(values[i], kept / (q + 1))
        p = 0.5 * math.erfc(t / sigma / math.sqrt(2))  # Phi(-t / sigma): 0.023, 0.309
        share = float(values[i].sum()) * (q + 1) / (n * q)
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / (n * q)), (sigma, share, p)


def test_lira_scores_on_gaussian_shadows():
    gen = torch.Generator().manual_seed(0)
    n, k = 400, 16
    keep = torch.zeros(k, n, dtype=torch.bool)
    keep[0::2] = torch.rand(k // 2, n, generator=gen) < 0.5
    keep[1::2] = ~keep[0::2]
    mean_in, mean_out = torch.randn(n, generator=gen) + 2, torch.randn(n, generator=gen)
    phi = torch.where(keep, mean_in, mean_out) + 0.5 * torch.randn(k, n, generator=gen)
    phi = phi.double()
    member = torch.rand(n, generator=gen) < 0.5
    observed = (torch.where(member, mean_in, mean_out)
                + 0.5 * torch.randn(n, generator=gen)).double()
    for online in (True, False):
        for global_variance in (True, False):
            scores = attacks._lira_scores(observed, phi, keep, online, global_variance)
            assert roc_auc_score(member.numpy(), scores.numpy()) > 0.9
    mean, var = attacks._gaussian_fit(phi, ~keep, True)
    assert torch.all(var == var[0]) and float(var[0]) == pytest.approx(0.25, rel=0.1)
    torch.testing.assert_close(mean, (phi * ~keep).sum(0) / (~keep).sum(0))


def test_lira_is_the_gaussian_likelihood_ratio_of_its_fits():
    """Against an independent computation: per-row means and unbiased variances from the
    rows' own samples (torch.var, correction 1), the pooled variance as the within-row sum
    of squares over the degrees of freedom, and scipy's normal log densities and CDF. The
    in and out spreads differ per row, which the AUC check above cannot tell apart from a
    plain distance (the mutation audit dropped log(2 pi var), or used var_in on the out
    side, and the suite passed)."""
    norm = pytest.importorskip("scipy.stats").norm
    gen = torch.Generator().manual_seed(11)
    k, n = 7, 5  # an odd count: uneven in/out sample counts per row
    keep = torch.rand(k, n, generator=gen) < 0.5
    keep[0], keep[1] = True, False  # every row has two samples on each side at least
    keep[2], keep[3] = True, False
    spread = torch.where(keep, torch.rand(1, n, generator=gen) + 0.2,
                         3 * torch.rand(1, n, generator=gen) + 0.5)
    phi = (torch.randn(k, n, generator=gen) * spread + keep * 2.0).double()
    observed = (torch.randn(n, generator=gen) + 1).double()

    def fit(side):
        means = torch.stack([phi[side[:, i], i].mean() for i in range(n)])
        variances = torch.stack([phi[side[:, i], i].var(correction=1) for i in range(n)])
        dof = side.sum(0) - 1
        return means, variances, (variances * dof).sum() / dof.sum()

    for side in (keep, ~keep):
        means, variances, pooled = fit(side)
        mean, var = attacks._gaussian_fit(phi, side, False)
        torch.testing.assert_close(mean, means)
        torch.testing.assert_close(var, variances)
        _, var = attacks._gaussian_fit(phi, side, True)
        torch.testing.assert_close(var, pooled.expand(n))
    for global_variance in (False, True):
        (m_in, v_in, p_in), (m_out, v_out, p_out) = fit(keep), fit(~keep)
        if global_variance:
            v_in, v_out = p_in.expand(n), p_out.expand(n)
        online = (norm.logpdf(observed, m_in, v_in.sqrt()) -
                  norm.logpdf(observed, m_out, v_out.sqrt()))
        offline = norm.logcdf(observed, m_out, v_out.sqrt())
        torch.testing.assert_close(attacks._lira_scores(observed, phi, keep, True,
                                                        global_variance),
                                   torch.from_numpy(online))
        torch.testing.assert_close(attacks._lira_scores(observed, phi, keep, False,
                                                        global_variance),
                                   torch.from_numpy(offline))


def test_lira_calibration_is_shadow_0_against_the_other_shadows(overfit, data, splits,
                                                                monkeypatch):
    """LiRA's calibration scores the pool rows' phi under shadow 0 with Gaussians fitted on
    the other K - 1 shadows, its labels being shadow 0's membership: recomputed here from
    each shadow's own predict_proba on the pool rows the result names (the mutation audit
    left shadow 1 out of the fits, and the suite passed)."""
    shadows = []
    train_shadows = attacks._train_shadows

    def recording(*args, **kwargs):
        shadows.extend(train_shadows(*args, **kwargs))
        return list(shadows)

    monkeypatch.setattr(attacks, "_train_shadows", recording)
    result = run_attack("lira_offline", overfit, data, splits,
                        config={"n_shadows": 4, "shadow_size": 50}, train_config=TINY)
    pool, keep = result.extra["pool_rows"], result.extra["shadow_membership"]
    assert len(shadows) == 4 and keep.shape == (4, 100)
    phi = torch.stack([scaled_logit(shadow(data.x[pool]), data.y[pool]) for shadow in shadows])
    expected = attacks._lira_scores(phi[0], phi[1:], keep[1:], False, True)
    scores, is_member = result.calibration
    # (the attack evaluates the shadows batched: they may round apart from one by one)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(is_member, keep[0])


def test_metric_attack_thresholds_take_whole_ties():
    """'member iff value >= t' calls every row of a tied value a member: a threshold is
    scored on whole tie groups only (the audit's case: scoring inside the group at 0.5
    picked 0.5 over the right 0.9), and the label-only attack's balanced accuracy counts
    rows on the threshold as members."""
    values = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    member = torch.tensor([True, True, False, False, False])
    # 0.9: TPR 1/2, FPR 0 -> 0.75; 0.5: TPR 1, FPR 2/3 -> 2/3; 0.1: 0.5
    assert attacks._best_threshold(values, member) == pytest.approx(0.9)
    assert attacks._best_threshold(values.flip(0), member.flip(0)) == pytest.approx(0.9)
    counts = torch.tensor([3.0, 2.0, 1.0, 1.0])
    said = torch.tensor([True, True, False, False])
    assert attacks._balanced_accuracy(counts, said, 2.0) == 1.0
    assert attacks._balanced_accuracy(counts, said, 2.5) == 0.75  # TPR 1/2, TNR 1
    assert attacks._balanced_accuracy(counts, said, 1.0) == 0.5  # TPR 1, TNR 0


def test_attack_net_is_the_papers_model():
    net = attacks._AttackNet(10, (1024, 512, 64), (512, 64), (256, 64))
    net.init_(0.01, torch.Generator().manual_seed(0))
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [1024, 512, 64, 512, 64, 256, 64, 1]
    assert linears[5].in_features == 128  # the concatenation subnet
    assert all(not lin.bias.detach().any() for lin in linears)
    weights = torch.cat([lin.weight.detach().flatten() for lin in linears])
    assert float(weights.std()) == pytest.approx(0.01, rel=0.02)
    assert abs(float(weights.mean())) < 1e-4
    probs = torch.softmax(torch.randn(5, 10), 1)
    out = net(probs, torch.nn.functional.one_hot(torch.arange(5), 10).float())
    assert out.shape == (5,)


# ----------------------------------------------------------------------------- seeds

def test_same_seed_same_scores_other_seed_other_scores(overfit, overfit_results, data, splits):
    for name in ("shadow", "metric_loss", "label_only", "lira_online"):
        again = run_attack(name, overfit, data, splits, config=CONFIGS.get(name),
                           train_config=TRAIN, seed=0)
        # run_attacks shares the shadows of the shadow and metric attacks: same results
        assert torch.equal(again.scores, overfit_results[name].scores), name
        assert torch.equal(again.calibration[0], overfit_results[name].calibration[0]), name
    other = run_attack("lira_offline", overfit, data, splits, config=CONFIGS["lira_offline"],
                       train_config=TRAIN, seed=1)
    assert not torch.equal(other.scores, overfit_results["lira_offline"].scores)
    # label-only: the sigma it picked from the grid, given as its sigma, scales the same draws
    label_only = overfit_results["label_only"]
    fixed = run_attack("label_only", overfit, data, splits,
                       config={**CONFIGS["label_only"], "sigma": label_only.extra["sigma"]},
                       train_config=TRAIN, seed=0)
    assert torch.equal(fixed.scores, label_only.scores)
    assert len(label_only.extra["sigma_balanced_accuracy"]) == len(
        DEFAULTS["label_only"]["sigma_grid"])


def _same_labels_other_probabilities(predict_proba):
    """predict_proba's argmax with other probabilities: 0.6 on the argmax, the rest shuffled."""
    def distorted(x):
        probs = predict_proba(x)
        onehot = torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).float()
        return 0.6 * onehot + 0.4 * probs.roll(1, dims=1)
    return distorted


def test_label_only_uses_only_the_labels(overfit, data, splits, monkeypatch):
    def defend(name, x, y, *, train_config, hidden, n_classes, **_):
        model = MLP(x.shape[1], n_classes, hidden)
        train_model(model, x, y, config=train_config)
        predict = Target(model).predict_proba
        return types.SimpleNamespace(
            predict_proba=_same_labels_other_probabilities(predict) if name == "distort"
            else predict)

    monkeypatch.setitem(sys.modules, "oni.defenses", types.SimpleNamespace(defend=defend))
    distorted = types.SimpleNamespace(
        model=overfit.model, predict_proba=_same_labels_other_probabilities(overfit.predict_proba))
    config = {"n_queries": 4, "sigma_grid": (0.05, 0.1)}
    # the target and (adaptive path) the shadows answer with other probabilities
    plain = run_attacks(["metric_loss", "label_only"], overfit, data, splits,
                        configs={"label_only": config}, train_config=TRAIN,
                        defense=("plain", None))
    other = run_attacks(["metric_loss", "label_only"], distorted, data, splits,
                        configs={"label_only": config}, train_config=TRAIN,
                        defense=("distort", None))
    assert not torch.equal(plain["metric_loss"].scores, other["metric_loss"].scores)
    assert torch.equal(plain["label_only"].scores, other["label_only"].scores)
    assert torch.equal(plain["label_only"].calibration[0], other["label_only"].calibration[0])
    assert plain["label_only"].extra["defense"] == ("plain", None)


def test_label_only_bitflip_keeps_queries_binary_and_flips_a_superset_per_sigma():
    """noise='bitflip': each copy flips each 0/1 feature with probability sigma, from draws
    shared by every sigma, so a row's robustness cannot rise with sigma; sigma = 1 flips
    every feature of every copy."""
    seen = []

    def any_one(x):  # class 1 iff some feature is 1; records every query
        seen.append(x.clone())
        return torch.nn.functional.one_hot((x.sum(1) > 0).long(), 2).double()

    n, d, q = 6, 5, 16
    x = torch.zeros(n, d)
    labels = torch.zeros(n, dtype=torch.long)
    sigmas = (1e-9, 0.05, 0.2, 0.5, 1.0)
    gen = torch.Generator().manual_seed(0)
    values = attacks._robustness(any_one, x, labels, labels, sigmas, q, gen, 2, "target",
                                 "bitflip")
    assert all(bool(((v == 0) | (v == 1)).all()) for v in seen)
    assert torch.equal(values[0], torch.ones(n, dtype=torch.float64))     # nothing flipped
    assert torch.equal(values[-1], torch.full((n,), 1 / (q + 1), dtype=torch.float64))
    assert bool((values[1:] <= values[:-1]).all()) and bool((values[2] < 1).any())
    # a copy's flips at a small sigma are among its flips at a larger one
    small, large = seen[1].bool(), seen[2].bool()
    assert bool((small <= large).all()) and bool((large & ~small).any())


def test_label_only_bitflip_attack_and_its_checks(overfit, data, splits, monkeypatch):
    config = {"n_queries": 8, "noise": "bitflip", "sigma_grid": (0.01, 0.05, 0.2)}
    result = run_attack("label_only", overfit, data, splits, config=config,
                        train_config=TRAIN, seed=0)
    assert result.extra["sigma"] in config["sigma_grid"]
    assert _auc(result, splits) > 0.6
    again = run_attack("label_only", overfit, data, splits, config=config,
                       train_config=TRAIN, seed=0)
    assert torch.equal(again.scores, result.scores)
    for key, bad, message in (("noise", "salt", r"config\['noise'\] must be one of"),
                              ("sigma", 1.5, r"config\['sigma'\] must be a finite number in "
                                             r"\(0\.0, 1\.0\] \(a flip probability"),
                              ("sigma_grid", (0.1, 2.0), r"config\['sigma_grid'\]\[1\]")):
        with pytest.raises(ValueError, match=message):
            run_attack("label_only", overfit, data, splits, config={**config, key: bad},
                       train_config=TINY)
    # features that are not 0/1: refused before any shadow model trains
    halved = dataclasses.replace(data, x=data.x * 0.5)
    monkeypatch.setattr(attacks, "train_mlps_batched",
                        lambda *a, **k: pytest.fail("a shadow trained before the check"))
    with pytest.raises(ValueError, match=r"attack 'label_only': config\['noise'\] = 'bitflip' "
                                         r"flips 0/1 features, but data\.x\[\d+, \d+\] is 0\.5"):
        run_attack("label_only", overfit, halved, splits, config=config, train_config=TINY)
    assert attacks.check_attack_sizes(["label_only"], splits, {"label_only": config},
                                      data=data) == attacks.check_attack_sizes(
        ["label_only"], splits, {"label_only": config})


def test_the_bitflip_check_names_the_first_non_binary_value_across_blocks():
    from oni.data import from_arrays
    d = 1 << 20  # the scan takes 4 rows at a time here
    x = torch.zeros(6, d)
    x[5, 7] = 2.0
    data = from_arrays(x.numpy(), torch.arange(6).numpy() % 2)
    with pytest.raises(ValueError, match=r"data\.x\[5, 7\] is 2\.0"):
        attacks._check_binary(data)
    x[5, 7] = 1.0
    attacks._check_binary(from_arrays(x.numpy(), torch.arange(6).numpy() % 2))


# ----------------------------------------------------------------------------- adaptive

def test_adaptive_attack_trains_its_shadows_with_the_defense(overfit, data, splits,
                                                             monkeypatch):
    calls = []

    def defend(name, x, y, *, config=None, train_config, hidden, seed, n_classes, **_):
        calls.append((name, config, len(x), tuple(hidden), seed, train_config.seed))
        assert n_classes == data.k
        model = MLP(x.shape[1], n_classes, hidden)
        train_model(model, x, y, config=train_config)
        smoothed = Target(model)  # an inference-time defense: flattened outputs
        return types.SimpleNamespace(
            predict_proba=lambda rows: 0.5 * smoothed.predict_proba(rows) + 0.5 / data.k)

    monkeypatch.setitem(sys.modules, "oni.defenses", types.SimpleNamespace(defend=defend))
    result = run_attack("lira_offline", overfit, data, splits, config={"n_shadows": 4},
                        train_config=TRAIN, defense=("flatten", {"strength": 0.5}))
    assert len(calls) == 4
    assert all(c[:4] == ("flatten", {"strength": 0.5}, 300, HIDDEN) for c in calls)
    assert len({c[4] for c in calls}) == 4 and all(c[4] == c[5] for c in calls)
    assert result.extra["defense"] == ("flatten", {"strength": 0.5})
    assert _auc(result, splits) > 0.6
    calls.clear()
    run_attack("metric_confidence", overfit, data, splits, train_config=TRAIN,
               defense=("flatten", None))
    assert len(calls) == 1 and calls[0][:3] == ("flatten", None, 300)


# ----------------------------------------------------------------------------- errors

def test_bad_inputs_get_clear_errors(overfit, data, splits):
    def run(name="metric_loss", target=overfit, data_=data, splits_=splits, **kw):
        kw.setdefault("train_config", TRAIN)
        return run_attack(name, target, data_, splits_, **kw)

    with pytest.raises(ValueError, match="unknown attack 'lira'"):
        run("lira")
    with pytest.raises(ValueError, match=r"unknown keys \['n_shadow'\]"):
        run(config={"n_shadow": 3})
    with pytest.raises(ValueError, match="even and >= 4"):
        run("lira_online", config={"n_shadows": 5})
    with pytest.raises(ValueError, match="calibration_fraction"):
        run(config={"calibration_fraction": 1.0})
    with pytest.raises(ValueError, match="thresholds"):
        run(config={"thresholds": "row"})
    for key, bad in (("n_queries", 0), ("sigma", -0.1), ("sigma", float("nan")),
                     ("sigma_grid", ()), ("sigma_grid", "0.1"), ("sigma_grid", (0.1, 0)),
                     ("thresholds", "row")):
        with pytest.raises((TypeError, ValueError), match=rf"config\['{key}'\]"):
            run("label_only", config={key: bad})
    with pytest.raises(ValueError, match=r"unknown keys \['n_queries'\]"):
        run(config={"n_queries": 8})  # a label-only setting given to a metric attack
    with pytest.raises(TypeError, match="predict_proba"):
        run(target=overfit.model)
    with pytest.raises(ValueError, match="logits instead of probabilities"):
        run(target=types.SimpleNamespace(model=overfit.model,
                                         predict_proba=lambda x: overfit.model(x).detach()))
    with pytest.raises(ValueError, match=r"must return \[n, k\]"):
        run(target=types.SimpleNamespace(model=overfit.model,
                                         predict_proba=lambda x: torch.ones(len(x))))
    with pytest.raises(ValueError, match="config\\['hidden'\\]"):
        run(target=types.SimpleNamespace(model=torch.nn.Linear(data.d, data.k),
                                         predict_proba=overfit.predict_proba))
    with pytest.raises(ValueError, match="another data set"):
        run(data_=synthetic_purchase(500, d=100, k=10))
    with pytest.raises(TypeError, match="splits must be"):
        run(splits_={"target": splits.target})
    with pytest.raises(TypeError, match=r"splits\.target must be a 1-D int64 tensor of row "
                                        r"indices, got list"):
        run(splits_=dataclasses.replace(splits, target=splits.target.tolist()))
    with pytest.raises(TypeError, match=r"splits\.shadow_pool must be a 1-D int64 tensor .*"
                                        r"torch\.float32"):
        run(splits_=dataclasses.replace(splits, shadow_pool=splits.shadow_pool.float()))
    with pytest.raises(TypeError, match="defense must be"):
        run(defense="oni")
    with pytest.raises(ValueError, match="shadow_size"):
        run(config={"shadow_size": 500})
    with pytest.raises(ValueError, match="must hold the 400 target rows"):
        run("lira_online", config={"shadow_size": 150, "n_shadows": 4})
    with pytest.raises(TypeError, match="^train_config must be a TrainConfig"):
        run(train_config={"epochs": 3})
    with pytest.raises(TypeError, match="seed"):
        run(seed=1.5)
    with pytest.raises(ValueError, match="not in names"):
        run_attacks(["shadow"], overfit, data, splits, configs={"lira_online": {}},
                    train_config=TRAIN)
    with pytest.raises(ValueError, match="more than once"):
        run_attacks(["shadow", "shadow"], overfit, data, splits, train_config=TRAIN)
    with pytest.raises(TypeError, match="sequence of attack names"):
        run_attacks("shadow", overfit, data, splits, train_config=TRAIN)


def test_pool_size_messages_say_what_is_too_small(overfit, data, splits):
    """An empty pool said "it needs 2 <= shadow_size <= 0", a 1-row LiRA pool
    "m must be in [1, 0]; got 0" (for a shadow_size the user never gave)."""
    tiny = dict(train_config=TINY)
    empty = dataclasses.replace(splits, shadow_pool=splits.shadow_pool[:0])
    with pytest.raises(ValueError, match="need a shadow pool of at least 4 rows .* got 0"):
        run_attack("metric_loss", overfit, data, empty, **tiny)
    one = dataclasses.replace(splits, shadow_pool=splits.shadow_pool[:1])
    with pytest.raises(ValueError, match="has 1 rows .*too few for any m .*at least 2"):
        run_attack("lira_offline", overfit, data, one, config={"n_shadows": 4}, **tiny)
    with pytest.raises(ValueError, match=r"shadow_size = 3 rows each: it needs 2 <= "
                                         r"shadow_size <= 2"):
        run_attack("metric_loss", overfit, data,
                   dataclasses.replace(splits, shadow_pool=splits.shadow_pool[:5]),
                   config={"shadow_size": 3}, **tiny)


def test_bfloat16_probabilities_are_read(overfit, data, splits):
    """Rows of bfloat16 probabilities sum to 1 only up to bfloat16's rounding: they were
    refused as "logits instead of probabilities" although every value was in [0, 1]."""
    rounded = types.SimpleNamespace(
        model=overfit.model,
        predict_proba=lambda x: overfit.predict_proba(x).to(torch.bfloat16))
    config = {"fit_on": "known", "calibration_fraction": 0.0}
    got = run_attack("metric_confidence", rounded, data, splits, config=config,
                     train_config=TRAIN)
    assert torch.isfinite(got.scores).all()
    doubled = types.SimpleNamespace(model=overfit.model,
                                    predict_proba=lambda x: overfit.predict_proba(x) * 2)
    with pytest.raises(ValueError, match=r"rows summing to 1: row \d+ sums to 2"):
        run_attack("metric_confidence", doubled, data, splits, config=config,
                   train_config=TRAIN)


def test_overflowing_settings_name_the_setting(overfit, data, splits):
    tiny = dict(train_config=TINY)
    shadow = {**SMALL_NET, "n_shadows": 1, "attack_epochs": 2}
    with pytest.raises(ValueError, match=r"config\['attack_lr'\] must be a finite number in "
                                         r"\(0.0, 3.4028234663852877e\+37\] \(Adam's update must "
                                         r"fit"):
        run_attack("shadow", overfit, data, splits, config={**shadow, "attack_lr": 1e38}, **tiny)
    # fits float32 but blows the attack net up: named, not NaN scores
    with pytest.raises(FloatingPointError, match=r"diverged.*attack_lr"):
        run_attack("shadow", overfit, data, splits, config={**shadow, "attack_lr": 1e30}, **tiny)
    with pytest.raises(ValueError, match=r"overflow torch.float32 at sigma = 1e\+300"):
        run_attack("label_only", overfit, data, splits,
                   config={"n_shadows": 1, "n_queries": 2, "sigma": 1e300}, **tiny)


def test_a_dead_attack_net_is_reported(overfit, data, splits):
    """weight_std = 1e-300 (or a huge attack_lr) left every score the same: AUC 0.5, silently."""
    tiny = dict(train_config=TINY)
    shadow = {**SMALL_NET, "n_shadows": 1, "attack_epochs": 1}
    with pytest.warns(UserWarning, match="gives every target row the same score"):
        result = run_attack("shadow", overfit, data, splits,
                            config={**shadow, "weight_std": 1e-300}, **tiny)
    assert (result.scores == result.scores[0]).all()


def test_settings_are_checked_before_any_training(overfit, data, splits, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the settings")

    monkeypatch.setattr(attacks, "train_mlps_batched", no_training)
    with pytest.raises(ValueError, match="attack_lr"):
        run_attacks(["metric_loss", "shadow"], overfit, data, splits,
                    configs={"shadow": {"attack_lr": 0}}, train_config=TRAIN)


def test_sizes_are_checked_before_any_training(overfit, data, splits, monkeypatch):
    """A LiRA shadow_size the pool cannot hold was refused only after the earlier attacks'
    shadows had trained; so were bf16 shadows and fit_on='known' with a defense, after the
    earlier attacks' defended shadows (fuzz pass 7)."""
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the sizes")

    monkeypatch.setattr(attacks, "train_mlps_batched", no_training)
    monkeypatch.setattr(attacks, "_train_shadows", no_training)
    with pytest.raises(ValueError, match=r"attack 'lira_online': config\['shadow_precision'\] "
                                         r"= 'bf16' applies to undefended shadows"):
        run_attacks(["metric_loss", "lira_online"], overfit, data, splits,
                    configs={"lira_online": {"n_shadows": 4, "shadow_precision": "bf16"}},
                    train_config=TRAIN, defense=("uniform", None))
    with pytest.raises(ValueError, match=r"attack 'metric_entropy': defense applies to shadow "
                                         r"models, but config\['fit_on'\] = 'known'"):
        run_attacks(["metric_loss", "metric_entropy"], overfit, data, splits,
                    configs={"metric_entropy": {"fit_on": "known"}}, train_config=TRAIN,
                    defense=("uniform", None))
    with pytest.raises(ValueError, match=r"defense applies to shadow models"):  # one attack
        run_attack("metric_loss", overfit, data, splits, config={"fit_on": "known"},
                   train_config=TRAIN, defense=("uniform", None))
    # without a defense both are the attacker's choice
    assert attacks.check_attack_sizes(
        ["lira_online", "metric_entropy"], splits,
        {"lira_online": {"n_shadows": 4, "shadow_precision": "bf16"},
         "metric_entropy": {"fit_on": "known"}}) == {"lira_online": 300, "metric_entropy": 60}
    with pytest.raises(TypeError, match="defense must be None or a"):
        attacks.check_attack_sizes(["metric_loss"], splits, defense="uniform")
    with pytest.raises(ValueError, match=r"attack 'lira_offline': LiRA offline .*m must be in "
                                         r"\[1, 400\]; got 401"):
        run_attacks(["metric_loss", "lira_offline"], overfit, data, splits,
                    configs={"lira_offline": {"n_shadows": 4, "shadow_size": 401}},
                    train_config=TRAIN)
    with pytest.raises(ValueError, match=r"attack 'shadow': config\['shadow_size'\] = 61 but "
                                         r"fit_on='known' has only 60 rows"):
        attacks.check_attack_sizes(["shadow"], splits,
                                   {"shadow": {"fit_on": "known", "shadow_size": 61}})
    with pytest.raises(TypeError, match="splits must be an oni.data.Splits"):
        attacks.check_attack_sizes(["shadow"], {"train": splits.train})
    with pytest.raises(TypeError, match="names must be a sequence of attack names, got str"):
        attacks.check_attack_sizes("shadow", splits)  # iterated by character
    with pytest.raises(TypeError, match="configs must be a dict"):
        attacks.check_attack_sizes(["shadow"], splits, [("shadow", {})])
    with pytest.raises(ValueError, match=r"configs names attacks \['lira_online'\]"):
        attacks.check_attack_sizes(["shadow"], splits, {"lira_online": {"n_shadows": 3}})
    with pytest.raises(ValueError, match=r"attack 'lira_online': config\['n_shadows'\] must be "
                                         r"even"):
        attacks.check_attack_sizes(["lira_online"], splits, {"lira_online": {"n_shadows": 3}})


def test_attack_setting_messages_of_fuzz_pass_7(overfit, data, splits):
    """A shadow_size of 1 with fit_on='known' blamed splits of 60 and 400 rows; a value built
    by YAML aliases was printed whole (tens of MB); a sigma_grid int past float64's range was
    an OverflowError; a NaN feature of a target row was named by its place among the target
    rows, without naming data.x."""
    with pytest.raises(ValueError, match=r"config\['shadow_size'\] = 1, but fit_on='known' "
                                         r"needs at least 2 members"):
        attacks.check_attack_sizes(["metric_loss"], splits,
                                   {"metric_loss": {"fit_on": "known", "shadow_size": 1}})
    huge = ["x"] * 10
    for _ in range(6):
        huge = [huge] * 10  # 10 million leaves, shared
    with pytest.raises(ValueError, match="config\\['fit_on'\\] must be") as err:
        attacks.check_attack_sizes(["metric_loss"], splits, {"metric_loss": {"fit_on": huge}})
    assert len(str(err.value)) < 300
    with pytest.raises(ValueError, match=r"config\['sigma_grid'\]\[1\] must be a finite number "
                                         r"> 0.0, got inf"):
        attacks.check_attack_sizes(["label_only"], splits,
                                   {"label_only": {"sigma_grid": [0.1, 10 ** 400]}})
    x = data.x.clone()
    row = int(splits.target[3])
    x[row, 5] = float("nan")
    nan_data = Dataset(x, data.y, classes=data.classes, name=data.name)
    with pytest.raises(ValueError, match=rf"data.x contains NaN or Inf \(first at index "
                                         rf"\[{row}, 5\]\)"):
        run_attack("metric_loss", overfit, nan_data, splits, train_config=TRAIN)


def test_checked_sizes_are_the_sizes_the_attacks_use(overfit_results, splits):
    sizes = attacks.check_attack_sizes(ATTACKS, splits, CONFIGS)
    assert set(sizes) == set(ATTACKS)
    for name, result in overfit_results.items():
        assert sizes[name] == result.extra["shadow_size"], name
    assert sizes["shadow"] == 300 and sizes["lira_offline"] == 300  # the train split's size
    known = attacks.check_attack_sizes(["metric_loss"], splits,
                                       {"metric_loss": {"fit_on": "known"}})
    assert known == {"metric_loss": 60}  # splits.known's 60 rows


def test_adaptive_attack_with_the_real_defenses(overfit, data, splits):
    pytest.importorskip("oni.defenses")
    plain = run_attack("lira_offline", overfit, data, splits, config={"n_shadows": 4},
                       train_config=TRAIN)
    # DynaNoise noises the shadows' outputs (inference time): the attacker's reference
    # statistics change though the shadows' weights are the same as undefended ones
    noisy = run_attack("lira_offline", overfit, data, splits, config={"n_shadows": 4},
                       train_config=TRAIN, defense=("dynanoise", None))
    assert noisy.scores.shape == plain.scores.shape and torch.isfinite(noisy.scores).all()
    assert not torch.equal(noisy.scores, plain.scores)
    smoothed = run_attack("metric_loss", overfit, data, splits, train_config=TRAIN,
                          defense=("label_smoothing", None))
    assert smoothed.extra["defense"] == ("label_smoothing", None)
    assert torch.isfinite(smoothed.scores).all()


# ----------------------------------------------------------------------------- helpers' inputs

REFERENCE = {"n_shadows": 2, "shadow_size": 40, "calibration_fraction": 0.3}
LABEL_ONLY = {**REFERENCE, "n_queries": 5, "sigma": 0.1}


@pytest.fixture(scope="module")
def recorded(overfit, data, splits):
    """One cheap shadow and label-only run (two shadows of 40 members and 40 non-members,
    one epoch) recording the shadow seeds, the reference data, the rows the attack net is
    trained on and the number of rows of each query the target answers."""
    log = {"seeds": [], "net_rows": [], "target_rows": []}
    train_mlps_batched, build = attacks.train_mlps_batched, attacks._build_reference
    train_net = attacks._train_attack_net

    def shadows(*args, seeds, **kwargs):
        log["seeds"].append(list(seeds))
        return train_mlps_batched(*args, seeds=seeds, **kwargs)

    def reference(*args, **kwargs):
        log["reference"] = build(*args, **kwargs)
        return log["reference"]

    def net(cfg, probs, labels, member, *args):
        log["net_rows"].append((probs.clone(), labels.clone(), member.clone()))
        return train_net(cfg, probs, labels, member, *args)

    def predict(x):
        log["target_rows"].append(len(x))
        return overfit.predict_proba(x)

    target = types.SimpleNamespace(model=overfit.model, predict_proba=predict)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attacks, "train_mlps_batched", shadows)
        patch.setattr(attacks, "_build_reference", reference)
        patch.setattr(attacks, "_train_attack_net", net)
        log["results"] = run_attacks(
            ["shadow", "label_only"], target, data, splits,
            configs={"shadow": {**REFERENCE, **SMALL_NET, "attack_epochs": 1},
                     "label_only": LABEL_ONLY}, train_config=TINY)
    return log


def test_reference_shadows_get_distinct_seeds(recorded):
    """Each reference shadow trains from its own seed (the same seed gave two copies of one
    initialisation and batch order: the mutation audit's one seed for all passed)."""
    assert len(recorded["seeds"]) == 1  # the shadow and label-only attacks share them
    seeds = recorded["seeds"][0]
    assert len(seeds) == REFERENCE["n_shadows"] == len(set(seeds))


def test_calibration_holds_out_the_documented_share(recorded):
    """calibration_fraction: round(0.3 * 40) = 12 of each shadow's 40 members and 40
    non-members are held out, so the calibration has 2 shadows x 2 sides x 12 rows, half of
    them members (the mutation audit held out half as many, and the suite passed)."""
    held = round(REFERENCE["calibration_fraction"] * REFERENCE["shadow_size"])
    ref = recorded["reference"]
    blocks = ref.fit.view(2 * REFERENCE["n_shadows"], REFERENCE["shadow_size"])
    assert blocks.sum(1).tolist() == [REFERENCE["shadow_size"] - held] * 4
    for name in ("shadow", "label_only"):
        scores, is_member = recorded["results"][name].calibration
        assert len(scores) == 4 * held == 48 and int(is_member.sum()) == 2 * held, name


def test_the_attack_net_learns_from_the_fit_rows_only(recorded):
    """The shadow attack's net is trained on the reference rows kept for fitting, 2 shadows x
    2 sides x (40 - 12), never on the held-out calibration rows (the mutation audit trained
    it on all of them, and the suite passed)."""
    ref = recorded["reference"]
    (probs, labels, member), = recorded["net_rows"]
    assert len(probs) == 4 * (40 - 12) == 112 and int(member.sum()) == 56
    assert torch.equal(probs, ref.probs[ref.fit])
    assert torch.equal(labels, ref.labels[ref.fit])
    assert torch.equal(member, ref.member[ref.fit])


def test_label_only_queries_the_target_n_queries_times_per_row(recorded, splits):
    """The target answers n_queries noisy copies of each target row, plus one clean query
    of the target rows per attack (the mutation audit scored the target with n_queries // 2
    copies, and the suite passed); its robustness is a share of the n_queries + 1 copies."""
    n, q = len(splits.target), LABEL_ONLY["n_queries"]
    assert sum(recorded["target_rows"]) == 2 * n + q * n
    observed = recorded["results"]["label_only"].extra["observed_robustness"]
    copies = observed * (q + 1)
    assert torch.equal(copies, copies.round())

