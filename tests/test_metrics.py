"""oni.metrics on hand-made score vectors whose answers are computed by hand."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from oni import metrics

# (scores, is_member): every case below has its answers worked out in the comments
PERFECT = ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
REVERSED = ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])
ALL_TIED = ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1])
# ROC points (fpr, tpr): inf (0, 0); t=3 (0, .5); t=2 (.5, 1); t=1 (1, 1)
PARTLY_TIED = ([1.0, 2.0, 2.0, 3.0], [0, 0, 1, 1])


# ----------------------------------------------------------------------------- AUC

@pytest.mark.parametrize("case, auc", [
    (PERFECT, 1.0),
    (REVERSED, 0.0),
    (ALL_TIED, 0.5),
    # member-non-member pairs: 2>1, 2=2 (one half), 3>1, 3>2 -> 3.5 / 4
    (PARTLY_TIED, 0.875),
])
def test_roc_auc_hand_cases(case, auc):
    assert metrics.roc_auc(*case) == pytest.approx(auc)


def test_roc_auc_is_chance_on_unrelated_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(20_000, generator=gen)
    is_member = torch.rand(20_000, generator=gen) < 0.5
    assert abs(metrics.roc_auc(scores, is_member) - 0.5) < 0.02  # stderr ~0.004


def test_roc_curve_points_and_thresholds():
    fpr, tpr, thresholds = metrics.roc_curve(*PARTLY_TIED, drop_intermediate=False)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert thresholds[0] == math.inf
    np.testing.assert_allclose(thresholds[1:], [3, 2, 1])


def test_roc_curve_accepts_tensors_numpy_and_lists_alike():
    scores, member = PARTLY_TIED
    as_list = metrics.roc_curve(scores, member)
    as_tensor = metrics.roc_curve(torch.tensor(scores), torch.tensor(member, dtype=torch.bool))
    as_numpy = metrics.roc_curve(np.array(scores, dtype=np.float32), np.array(member))
    for a, b, c in zip(as_list, as_tensor, as_numpy):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


# ----------------------------------------------------------------------------- TPR at low FPR

@pytest.mark.parametrize("case, fpr, tpr", [
    (PERFECT, 0.001, 1.0),
    (REVERSED, 0.01, 0.0),
    (ALL_TIED, 0.01, 0.0),     # the tie moves every record at once: (0, 0) then (1, 1)
    (PARTLY_TIED, 0.01, 0.5),
    (PARTLY_TIED, 0.49, 0.5),
    (PARTLY_TIED, 0.5, 1.0),
    (PARTLY_TIED, 1.0, 1.0),
])
def test_tpr_at_fpr_hand_cases(case, fpr, tpr):
    assert metrics.tpr_at_fpr(*case, fpr) == pytest.approx(tpr)


def test_tpr_at_fpr_takes_the_largest_reachable_tpr_without_interpolating():
    # 1,000 non-members score 0..999; members score 999.5, 998.5 and 500.
    # thresholds: 999.5 -> (fpr 0, tpr 1/3); 998.5 -> (1/1000, 2/3); 500 -> (500/1000, 1)
    scores = np.concatenate([np.arange(1000.0), [999.5, 998.5, 500.0]])
    member = np.r_[np.zeros(1000, bool), np.ones(3, bool)]
    assert metrics.tpr_at_fpr(scores, member, 0.001) == pytest.approx(2 / 3)
    assert metrics.tpr_at_fpr(scores, member, 0.01) == pytest.approx(2 / 3)
    # below 1 / n_nonmembers only FPR 0 is admissible (interpolation would give ~1/2)
    assert metrics.tpr_at_fpr(scores, member, 0.0005) == pytest.approx(1 / 3)
    assert metrics.tpr_at_fpr(scores, member, 0.5) == pytest.approx(1.0)


def test_tpr_at_fpr_the_lira_codes_strict_convention_is_one_nextafter_away():
    """At 5,000 non-members "0.1% FPR" admits 5 false positives (FPR <= 0.001); the LiRA
    authors' code admits 4 (FPR < 0.001), which the docstring's nextafter gives."""
    scores = np.r_[np.zeros(4995), np.full(5, 20.0), np.full(100, 10.0)]
    member = np.r_[np.zeros(5000, bool), np.ones(100, bool)]
    assert metrics.tpr_at_fpr(scores, member, 0.001) == 1.0       # 5 false positives
    assert metrics.tpr_at_fpr(scores, member, math.nextafter(0.001, 0)) == 0.0


# ----------------------------------------------------------------------------- thresholds

@pytest.mark.parametrize("case, balanced, threshold", [
    (PERFECT, True, 0.8),           # the highest threshold with every record right
    (REVERSED, True, math.inf),     # nothing beats 0.5; inf is the highest such threshold
    (REVERSED, False, math.inf),
    (ALL_TIED, True, math.inf),
    (PARTLY_TIED, True, 3.0),       # t=3 and t=2 both give 0.75; the higher wins
    (PARTLY_TIED, False, 3.0),
])
def test_best_threshold_hand_cases(case, balanced, threshold):
    assert metrics.best_threshold(*case, balanced=balanced) == threshold


def test_best_threshold_ties_are_exact():
    """Balanced accuracies compared as floats: 2/3 from (1/3 + 1) / 2 and from (1 + 1/3) / 2
    differ in the last bit, and the lower threshold 0.2 was returned. Against exact fractions
    over random tied cases, the documented rule (the highest of the best) must hold."""
    from fractions import Fraction
    scores, member = [0.9, 0.7, 0.2, 0.1, 0.2, 0.5], [1, 0, 1, 0, 1, 0]
    assert metrics.best_threshold(scores, member) == 0.9
    assert metrics.attack_report(scores, member)["oracle_threshold"] == 0.9
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 12))
        member = rng.random(n) < 0.5
        member[:2] = [True, False]
        scores = rng.integers(0, 5, n) / 4
        for balanced in (True, False):
            def exact(t):
                called = scores >= t
                tp, tn = int((called & member).sum()), int((~called & ~member).sum())
                if balanced:
                    return Fraction(tp, int(member.sum())) + Fraction(tn, int((~member).sum()))
                return Fraction(tp + tn)
            candidates = [math.inf, *sorted(set(scores.tolist()), reverse=True)]
            best = max(exact(t) for t in candidates)
            expected = next(t for t in candidates if exact(t) == best)
            assert metrics.best_threshold(scores, member, balanced=balanced) == expected


def test_best_threshold_balanced_versus_plain_accuracy():
    # 9 non-members score 0..8, one member 7.5. "Nobody is a member" (inf) is right 9/10
    # times, as is t=7.5 (member right, non-member 8 wrong); balanced accuracy: 0.5 at inf,
    # (1 + 8/9) / 2 at 7.5.
    scores = [0, 1, 2, 3, 4, 5, 6, 7, 8, 7.5]
    member = [0] * 9 + [1]
    assert metrics.best_threshold(scores, member, balanced=False) == math.inf
    assert metrics.best_threshold(scores, member, balanced=True) == 7.5
    acc, bal = metrics.accuracy_at_threshold(scores, member, 7.5)
    assert acc == pytest.approx(0.9)
    assert bal == pytest.approx((1 + 8 / 9) / 2)
    acc, bal = metrics.accuracy_at_threshold(scores, member, math.inf)
    assert (acc, bal) == (pytest.approx(0.9), pytest.approx(0.5))


def test_accuracy_at_threshold_counts_ties_as_members():
    assert metrics.accuracy_at_threshold(*PARTLY_TIED, 2.0) == (0.75, 0.75)
    assert metrics.accuracy_at_threshold(*PERFECT, 0.8) == (1.0, 1.0)
    assert metrics.accuracy_at_threshold(*PERFECT, -math.inf) == (0.5, 0.5)


# ----------------------------------------------------------------------------- report

def test_attack_report_uses_the_calibration_threshold_and_labels_the_oracle():
    calibration = ([0.0, 1.0, 2.0, 3.0], [0, 0, 1, 1])  # best balanced threshold: 2
    scores = [1.5, 2.5, 1.8, 3.0]
    member = [0, 1, 1, 1]
    report = metrics.attack_report(scores, member, calibration=calibration)
    # at t=2: called [F, T, F, T] -> TPR 2/3, TNR 1
    assert report["threshold"] == 2.0
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["balanced_accuracy"] == pytest.approx(5 / 6)
    # on the evaluated set itself t=1.8 separates perfectly
    assert report["oracle_threshold"] == 1.8
    assert report["oracle_accuracy"] == 1.0
    assert report["oracle_balanced_accuracy"] == 1.0
    assert report["auc"] == 1.0
    assert report["tpr@0.1%fpr"] == 1.0 and report["tpr@1%fpr"] == 1.0
    assert (report["n_members"], report["n_nonmembers"]) == (3, 1)
    fpr, tpr = report["roc"]
    assert fpr[0] == 0 and tpr[-1] == 1 and len(fpr) == len(tpr)


def test_attack_report_without_calibration_leaves_the_adversary_fields_empty():
    report = metrics.attack_report(*PARTLY_TIED)
    assert report["threshold"] is None and report["balanced_accuracy"] is None
    assert report["auc"] == pytest.approx(0.875)
    assert report["tpr@1%fpr"] == pytest.approx(0.5)
    assert report["oracle_threshold"] == 3.0
    assert report["oracle_balanced_accuracy"] == pytest.approx(0.75)


def test_attack_report_agrees_with_the_single_metrics():
    """attack_report computes its TPRs and oracle from one ROC pass: they must be
    tpr_at_fpr's (FPR <= rate: the audit's strict '<' passed the suite) and
    best_threshold(balanced=True)'s (plain accuracy's argmax passed too)."""
    # 100 non-members, one above every member: "1% FPR" allows that one false positive
    scores = np.r_[10.0, np.full(5, 9.0), np.linspace(0, 1, 5), np.linspace(0, 1, 99)]
    member = np.r_[False, np.ones(10, bool), np.zeros(99, bool)]
    report = metrics.attack_report(scores, member)
    assert report["tpr@1%fpr"] == 0.5 == metrics.tpr_at_fpr(scores, member, 0.01)
    assert report["tpr@0.1%fpr"] == 0.0
    # 2 members, 8 non-members: accuracy's best threshold (0.6, 9/10) is not balanced
    # accuracy's (0.3: TPR 1, TNR 3/4)
    scores = [0.6, 0.3, 0.5, 0.4, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1]
    member = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    report = metrics.attack_report(scores, member)
    assert report["oracle_threshold"] == 0.3 == metrics.best_threshold(scores, member)
    assert metrics.best_threshold(scores, member, balanced=False) == 0.6
    assert report["oracle_balanced_accuracy"] == 0.875 and report["oracle_accuracy"] == 0.8
    gen = np.random.default_rng(3)
    for _ in range(50):  # tied scores, rates whose n * rate is whole
        scores = gen.integers(0, 30, 1200).astype(float)
        member = gen.random(1200) < 0.2 + 0.6 * gen.random()
        member[:2], member[2:4] = True, False
        report = metrics.attack_report(scores, member)
        for key, rate in metrics.REPORTED_FPRS.items():
            assert report[key] == metrics.tpr_at_fpr(scores, member, rate)
        assert report["oracle_threshold"] == metrics.best_threshold(scores, member)


def test_attack_report_at_chance():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(4000, generator=gen)
    member = torch.arange(4000) % 2 == 0
    cal = (torch.rand(4000, generator=gen), torch.arange(4000) % 2 == 1)
    report = metrics.attack_report(scores, member, calibration=cal)
    assert abs(report["auc"] - 0.5) < 0.04
    assert abs(report["balanced_accuracy"] - 0.5) < 0.04
    # the oracle overfits the evaluated set: never below the adversary's figure
    assert report["oracle_balanced_accuracy"] >= report["balanced_accuracy"]
    assert report["tpr@1%fpr"] < 0.05


# ----------------------------------------------------------------------------- validation

@pytest.mark.parametrize("fn", [
    metrics.roc_curve, metrics.roc_auc, metrics.best_threshold, metrics.attack_report,
    lambda s, m: metrics.tpr_at_fpr(s, m, 0.01),
    lambda s, m: metrics.accuracy_at_threshold(s, m, 0.5),
])
@pytest.mark.parametrize("scores, member, message", [
    ([0.1, 0.2, 0.3], [0, 1], "is_member has 2 entries but scores has 3"),
    ([0.1, float("nan"), 0.3], [0, 1, 1], "scores must be finite, got 1 NaN"),
    ([0.1, float("inf"), 0.3], [0, 1, 1], "1 infinite"),
    ([0.1, 0.2, 0.3], [1, 1, 1], "is_member must hold both members and non-members"),
    ([0.1, 0.2, 0.3], [0, 0, 0], "got only non-members"),
    ([0.1, 0.2, 0.3], [0, 2, 1], "is_member must be booleans or 0/1"),
    ([[0.1, 0.2]], [0, 1], "scores must be one-dimensional"),
])
def test_inputs_are_validated(fn, scores, member, message):
    with pytest.raises(ValueError, match=message):
        fn(scores, member)


def test_other_argument_errors_name_the_argument():
    with pytest.raises(ValueError,
                       match=r"fpr must be a finite number in \[0.0, 1.0\], got 1.5"):
        metrics.tpr_at_fpr(*PERFECT, 1.5)
    with pytest.raises(ValueError, match="threshold must be a real number"):
        metrics.accuracy_at_threshold(*PERFECT, float("nan"))
    with pytest.raises(TypeError,
                       match=r"threshold must be a real number \(inf allowed\), got str$"):
        metrics.accuracy_at_threshold(*PERFECT, "0.5")  # a wrong type, as elsewhere
    with pytest.raises(ValueError, match="calibration is_member must hold both"):
        metrics.attack_report(*PERFECT, calibration=([0.1, 0.2], [1, 1]))
    with pytest.raises(TypeError, match="calibration must be a"):
        metrics.attack_report(*PERFECT, calibration=[0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="scores must be real numbers"):
        metrics.roc_auc(["a", "b"], [0, 1])
    with pytest.raises(TypeError, match="scores must be real numbers, got dtype complex"):
        metrics.roc_auc(torch.tensor([0.1, 0.9]) + 1j, [0, 1])  # numpy would drop the 1j
    # bfloat16 scores (no numpy dtype) are read exactly in float32
    assert metrics.roc_auc(torch.tensor([0.25, 0.75]).bfloat16(), [0, 1]) == 1.0
    # found by the third fuzz pass: each gave another library's error or a wrong value
    with pytest.raises(ValueError, match="scores and is_member are empty"):
        metrics.roc_auc([], [])
    with pytest.raises(ValueError, match="integers beyond 2\\*\\*53"):  # AUC 0.625, not 0.75
        metrics.roc_auc(torch.tensor([2 ** 62 + 1, 2 ** 62, 0, 1]), [1, 0, 0, 1])
    assert metrics.accuracy_at_threshold(*PERFECT, 10 ** 400) == \
        metrics.accuracy_at_threshold(*PERFECT, math.inf)  # an OverflowError before
    with pytest.raises(TypeError, match="balanced must be True or False, got 'no'"):
        metrics.best_threshold(*PERFECT, balanced="no")
    with pytest.raises(TypeError, match="drop_intermediate must be True or False"):
        metrics.roc_curve(*PERFECT, drop_intermediate="x")
    outcome = {"test_acc": 0.5, "balanced_attack_acc": {1: 0.5, "1": 0.6}}
    assert metrics.midput(outcome, outcome) == 0.0  # sorting int and str keys failed
    # tensors numpy cannot read: torch's own errors named no argument
    with pytest.raises(ValueError, match="scores is on the meta device"):
        metrics.roc_auc(torch.empty(2, device="meta"), [0, 1])
    with pytest.raises(TypeError, match="scores must be a dense tensor, got layout "
                                        "torch.sparse_coo"):
        metrics.roc_auc(torch.tensor([0.25, 0.75]).to_sparse(), [0, 1])


# ----------------------------------------------------------------------------- utility

def test_prediction_accuracy_from_scores_or_labels():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    y = torch.tensor([0, 1, 1])
    assert metrics.prediction_accuracy(logits, y) == pytest.approx(2 / 3)
    assert metrics.prediction_accuracy(torch.tensor([0, 1, 1]), y) == 1.0
    assert metrics.prediction_accuracy(np.array([[0.9, 0.1]]), [0]) == 1.0
    with pytest.raises(ValueError, match="outputs has 3 rows but labels has 2"):
        metrics.prediction_accuracy(logits, y[:2])
    with pytest.raises(ValueError, match="outputs contains NaN"):
        metrics.prediction_accuracy(torch.tensor([[float("nan"), 0.0]]), [0])
    with pytest.raises(ValueError, match=r"at least one class column, got shape \(3, 0\)"):
        metrics.prediction_accuracy(torch.zeros(3, 0), y)
    for wrong in (y.float(), y.to(torch.complex64), y.bool()):
        with pytest.raises(ValueError, match="labels must be a 1-D vector of class indices"):
            metrics.prediction_accuracy(logits, wrong)
    # unsigned labels are class indices too (torch has no uint32 comparisons on the CPU)
    for dtype in (np.uint16, np.uint32, np.uint64):
        assert metrics.prediction_accuracy(logits, y.numpy().astype(dtype)) == \
            metrics.prediction_accuracy(logits, y)
    with pytest.raises(ValueError, match="labels holds 18446744073709551615, beyond int64"):
        metrics.prediction_accuracy(logits, np.array([0, 1, 2 ** 64 - 1], dtype=np.uint64))
    # outputs that are no class scores: bool predictions were compared with the labels, bool
    # and complex scores failed inside argmax, strings inside torch
    for outputs in (torch.tensor([False, True, True]), torch.ones(3, 2).bool(),
                    torch.ones(3, 2, dtype=torch.complex64), np.array([["a", "b"]] * 3)):
        with pytest.raises(TypeError, match="outputs must be real class scores or integer "
                                            "predictions"):
            metrics.prediction_accuracy(outputs, y)
    with pytest.raises(ValueError, match=r"outputs\[0\] = -1 is not a class index"):
        metrics.prediction_accuracy(torch.tensor([-1, 1, 1]), y)
    with pytest.raises(ValueError, match="outputs is on the meta device"):
        metrics.prediction_accuracy(logits.to("meta"), y)
    with pytest.raises(ValueError, match=r"labels\[2\] = 2 is not a class index in \[0, 2\)"):
        metrics.prediction_accuracy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels\[0\] = -1 is not a class index \(>= 0\)"):
        metrics.prediction_accuracy(torch.tensor([0, 1, 1]), torch.tensor([-1, 1, 1]))


def test_utility_report_on_a_hand_set_model():
    model = nn.Linear(2, 2)  # predicts the argmax of the input
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    model.train()
    x_train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y_train = torch.tensor([0, 1, 1])  # last row wrong
    x_test, y_test = torch.tensor([[0.0, 1.0]]), torch.tensor([1])
    report = metrics.utility_report(model, (x_train, y_train), (x_test, y_test),
                                    batch_size=np.int64(2))  # numpy integers are integers
    assert report["train_acc"] == pytest.approx(2 / 3)
    assert report["test_acc"] == 1.0
    assert report["generalization_gap"] == pytest.approx(-1 / 3)
    assert model.training  # mode restored
    # rows are cast to the model's dtype, as oni.train.accuracy casts them (a float64 model
    # failed on float32 rows with "mat1 and mat2 must have the same dtype")
    double = metrics.utility_report(copy.deepcopy(model).double(), (x_train, y_train),
                                    (x_test.double(), y_test))
    assert double == report
    with pytest.raises(ValueError, match="test must be x"):
        metrics.utility_report(model, (x_train, y_train), (x_test, y_train))
    bad_inputs = [  # (train pair, keyword arguments, error, message)
        ((x_train, torch.tensor([0, 2, 1])), {}, ValueError,
         r"train labels\[1\] = 2 is not a class index in \[0, 2\)"),
        ((x_train, torch.tensor([0, -1, 1])), {}, ValueError, r"train labels\[1\] = -1"),
        ((x_train, y_train + 0.5), {}, TypeError, "train labels must be integer class indices"),
        ((x_train * float("nan"), y_train), {}, ValueError, "train x contains NaN or Inf"),
        ((x_train.long(), y_train), {}, TypeError, "train x must be floating point"),
        ((torch.rand(3, 5), y_train), {}, ValueError,  # was torch's shape error, wrapped
         r"train: the model's first layer takes 2 features, x has d = 5"),
        ((x_train, y_train), {"batch_size": True}, TypeError, "batch_size must be an int, got "
                                                              "bool"),
        ((x_train, y_train), {"batch_size": np.int64(0)}, ValueError,
         "batch_size must be >= 1, got 0"),
    ]
    for pair, kwargs, error, message in bad_inputs:
        with pytest.raises(error, match=message):
            metrics.utility_report(model, pair, (x_test, y_test), **kwargs)
    with pytest.raises(TypeError, match="model must be a torch nn.Module, got function"):
        metrics.utility_report(lambda z: z, (x_train, y_train), (x_test, y_test))
    with pytest.raises(ValueError, match="model is on the meta device"):
        metrics.utility_report(nn.Linear(2, 2).to("meta"), (x_train, y_train), (x_test, y_test))
    with pytest.raises(ValueError, match="test x is on the meta device"):
        metrics.utility_report(model, (x_train, y_train), (x_test.to("meta"), y_test))
    # a model whose outputs are NaN on a row of the second batch: its argmax (class 0) was
    # counted as a prediction, so a broken model scored as accurate on class-0 rows
    class NanOnZeroRows(nn.Module):
        def forward(self, z):
            return torch.where(z.abs().sum(1, keepdim=True) == 0, float("nan"), model(z))

    broken = NanOnZeroRows()
    with pytest.raises(ValueError, match="the model's logits at row 2 of train x are NaN"):
        metrics.utility_report(broken, (x_train * torch.tensor([[1.0], [1.0], [0.0]]),
                                        y_train), (x_test, y_test), batch_size=2)
    # a model of the paper's shape names the width it takes
    mlp = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="train: the model's first layer takes 2 features, x "
                                         "has d = 3"):
        metrics.utility_report(mlp, (torch.rand(3, 3), y_train), (x_test, y_test))


def test_generalization_gap():
    assert metrics.generalization_gap(0.9, 0.7) == pytest.approx(0.2)
    with pytest.raises(ValueError,
                       match=r"train_acc must be a finite number in \[0.0, 1.0\], got 90.0"):
        metrics.generalization_gap(90.0, 0.7)


# ----------------------------------------------------------------------------- MIDPUT

def test_midput_hand_example():
    undefended = {"test_acc": 0.80, "balanced_attack_acc": {"loss": 0.70, "lira": 0.60}}
    defended = {"test_acc": 0.75, "balanced_attack_acc": {"loss": 0.55, "lira": 0.52}}
    # privacy gain: mean(0.15, 0.08) = 0.115; utility cost: 0.05
    assert metrics.midput(undefended, defended) == pytest.approx(0.065)
    # no defense: 0; a defense that only costs accuracy: negative
    assert metrics.midput(undefended, undefended) == 0.0
    worse = {"test_acc": 0.70, "balanced_attack_acc": {"loss": 0.70, "lira": 0.60}}
    assert metrics.midput(undefended, worse) == pytest.approx(-0.10)


def test_midput_validates_its_dicts():
    good = {"test_acc": 0.8, "balanced_attack_acc": {"loss": 0.7}}
    with pytest.raises(ValueError, match="same attacks.*only in defended: \\['lira'\\]"):
        metrics.midput(good, {"test_acc": 0.8, "balanced_attack_acc": {"loss": 0.6,
                                                                        "lira": 0.5}})
    with pytest.raises(ValueError, match="defended lacks \\['test_acc'\\]"):
        metrics.midput(good, {"balanced_attack_acc": {"loss": 0.6}})
    with pytest.raises(ValueError, match="balanced_attack_acc'\\]\\['loss'\\] must be"):
        metrics.midput(good, {"test_acc": 0.8, "balanced_attack_acc": {"loss": 60}})
    with pytest.raises(TypeError, match="undefended must be a dict"):
        metrics.midput(0.5, good)


@pytest.mark.parametrize("n_non", [33, 100, 999, 1000, 2500, 5000])
def test_the_reports_false_positive_note_matches_tpr_at_fpr(n_non):
    """The report said "TPR@0.1%FPR counts only thresholds with no false positive at all"
    for any target set; with the paper's 5,000 non-members it allows 5."""
    from oni.report import _false_positive_note
    # scores alternate non-member, member from the top: at m false positives, m members
    scores = np.concatenate([2 * np.arange(n_non) + 1.0, 2 * np.arange(n_non) + 0.0])
    member = np.concatenate([np.zeros(n_non, bool), np.ones(n_non, bool)])
    note = _false_positive_note(n_non)
    for name, rate in metrics.REPORTED_FPRS.items():
        allowed = round(metrics.tpr_at_fpr(scores, member, rate) * n_non)
        label = name.replace("tpr@", "TPR@").replace("fpr", "FPR")
        expected = (f"{label} counts only thresholds with no false positive at all"
                    if allowed == 0 else f"{label} allows at most {allowed} false positive")
        assert expected in note, (note, allowed)


def test_scores_that_would_be_read_wrong_are_refused():
    """A masked array's masked entries were scored (np.asarray drops the mask); long double
    scores that float64 merges changed the ranking (AUC 0.833 for a perfect 1.0); None, a
    dict, a set or a generator read as 'must be one-dimensional, got shape ()'."""
    member = [0, 1, 0, 0]
    masked = np.ma.masked_array([0.1, 0.9, 0.2, 0.3], mask=[0, 0, 1, 0])
    with pytest.raises(TypeError, match=r"scores must be a plain array: a masked array"):
        metrics.roc_auc(masked, member)
    long = np.array([1, 1 + np.finfo(np.longdouble).eps * 4, 0.5, 0.25], dtype=np.longdouble)
    if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:  # (a real long double here)
        with pytest.raises(ValueError, match=r"float64 cannot tell apart"):
            metrics.roc_auc(long, member)
    for bad in (None, {"a": 1}, {0.5}, (s for s in [0.1, 0.2])):
        with pytest.raises(TypeError, match=r"scores must be array-like .*got "
                                            rf"{type(bad).__name__}"):
            metrics.roc_auc(bad, member)
    assert metrics.roc_auc(np.array([0.1, 0.9, 0.2, 0.3], dtype=np.longdouble), member) == 1.0
    with pytest.raises(TypeError, match=r"scores must be real numbers, got dtype timedelta64"):
        metrics.roc_auc(np.array([1, 9, 2, 3], dtype="timedelta64[s]"), member)
