"""Utility and privacy metrics: accuracies, ROC of a membership attack, MIDPUT.

Conventions
-----------
* A membership **score** is higher for "more likely a member". An attack with threshold
  ``t`` predicts "member" for every score ``>= t``.
* ``is_member`` is a boolean (or 0/1) vector aligned with the scores: ``True`` for members
  of the evaluated model's training set.
* Balanced accuracy is ``(TPR + TNR) / 2``: it does not reward guessing the larger class,
  so it is comparable across evaluation sets with different member/non-member ratios.
* The ROC curve and AUC come from scikit-learn. ``tpr_at_fpr`` is interpolation-free: the
  largest TPR among the ROC points whose FPR is at most the target (the operating points an
  attacker can actually reach with one threshold); tied scores move together, so they can
  make it jump.
* Thresholds an adversary would use are chosen on **calibration** data (its own shadow or
  reference data); the best threshold on the evaluated set itself is an upper bound no real
  adversary reaches, and is reported under ``oracle_*`` names.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Iterator, Mapping, Optional, Tuple

import numpy as np
import torch
from sklearn import metrics as _skm
from torch import Tensor, nn

from ._checks import (check_class_indices, check_int, check_not_meta, check_number,
                      is_integer_dtype, tensor_to_numpy)
from .shapley import _check_model_width
from .train import _batched

__all__ = [
    "prediction_accuracy",
    "utility_report",
    "generalization_gap",
    "roc_curve",
    "roc_auc",
    "tpr_at_fpr",
    "best_threshold",
    "accuracy_at_threshold",
    "attack_report",
    "midput",
]

#: the low false-positive rates reported for every attack (Carlini et al. 2022)
REPORTED_FPRS = {"tpr@0.1%fpr": 0.001, "tpr@1%fpr": 0.01}


# ----------------------------------------------------------------------------- inputs

def _as_numpy(values, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        check_not_meta(values, name)
        if values.layout != torch.strided:
            raise TypeError(f"{name} must be a dense tensor, got layout {values.layout}")
        values = tensor_to_numpy(values)
    if isinstance(values, np.ma.MaskedArray):  # np.asarray drops the mask: masked entries
        raise TypeError(f"{name} must be a plain array: a masked array's masked entries "
                        f"would be scored; drop them (values.compressed())")
    # (np.asarray makes 0-d object arrays of these: "must be one-dimensional" misled)
    if values is None or isinstance(values, (Mapping, set, frozenset, str, bytes, Iterator)):
        raise TypeError(f"{name} must be array-like (a tensor, array or list), got "
                        f"{type(values).__name__}")
    try:
        return np.asarray(values)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be array-like (a tensor, array or list), got "
                        f"{type(values).__name__}") from err


def _fits_int64(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {int(arr.max())}, beyond int64: not a class index")
    return arr


def _check_scores(scores, name: str = "scores") -> np.ndarray:
    arr = _as_numpy(scores, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "iuf":  # not bool, complex, timedelta, strings or objects
        raise TypeError(f"{name} must be real numbers, got dtype {arr.dtype}")
    wide = arr.astype(np.float64)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8 and \
            len(np.unique(wide)) != len(np.unique(arr)):  # long double
        raise ValueError(f"{name} holds {arr.dtype} values that float64 cannot tell apart; "
                         f"the ROC is computed in float64: cast or rescale them first")
    if arr.dtype.kind in "iu" and arr.size and \
            max(abs(int(arr.min())), abs(int(arr.max()))) > 2 ** 53 and \
            len(np.unique(wide)) != len(np.unique(arr)):
        # float64, where the ROC is computed, merges some of them: the ranking changes
        raise ValueError(f"{name} holds integers beyond 2**53 that float64 cannot tell apart; "
                         f"rescale them (e.g. to float in [0, 1])")
    arr = wide
    if not np.isfinite(arr).all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise ValueError(f"{name} must be finite, got {n_nan} NaN and {n_inf} infinite "
                         f"value(s) (clip infinite scores to a large finite value)")
    return arr


def _check_membership(is_member, n: int, name: str = "is_member",
                      scores_name: str = "scores") -> np.ndarray:
    arr = _as_numpy(is_member, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(arr.shape)}")
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries but {scores_name} has {n}: they must "
                         f"be aligned")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be booleans or 0/1 values, got dtype {arr.dtype}"
                             + (f" with values {np.unique(arr)[:5].tolist()}"
                                if np.issubdtype(arr.dtype, np.number) else ""))
        arr = arr.astype(bool)
    if n == 0:
        raise ValueError(f"{scores_name} and {name} are empty: ROC metrics need members and "
                         f"non-members")
    n_members = int(arr.sum())
    if n_members == 0 or n_members == n:
        only = "members" if n_members else "non-members"
        raise ValueError(f"{name} must hold both members and non-members, got only {only} "
                         f"({n} entries): ROC metrics need both classes")
    return arr


def _check_pair(scores, is_member, scores_name="scores", member_name="is_member"):
    s = _check_scores(scores, scores_name)
    return s, _check_membership(is_member, len(s), member_name, scores_name)


# ----------------------------------------------------------------------------- utility

def prediction_accuracy(outputs, labels) -> float:
    """Share of rows whose predicted class equals the label.

    Parameters
    ----------
    outputs : Tensor or array, ``[N, k]`` scores (logits or probabilities; the class is the
        argmax) or ``[N]`` predicted classes (integers).
    labels : Tensor or array ``[N]`` of class indices.
    """
    out, lab = _as_numpy(outputs, "outputs"), _as_numpy(labels, "labels")
    if lab.ndim != 1 or lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D vector of class indices, got shape "
                         f"{tuple(lab.shape)} and dtype {lab.dtype}")
    if out.dtype.kind not in "iuf":  # bool, complex, strings, objects: not class scores
        raise TypeError(f"outputs must be real class scores or integer predictions, got dtype "
                        f"{out.dtype}")
    # torch compares and indexes int64 (uint32 and uint64 have no CPU kernels there)
    out, lab = (torch.as_tensor(a.astype(np.int64) if a.dtype.kind == "u" else a)
                for a in (_fits_int64(out, "outputs"), _fits_int64(lab, "labels")))
    if out.ndim == 2:
        if out.shape[1] == 0:
            raise ValueError(f"outputs must have at least one class column, got shape "
                             f"{tuple(out.shape)}")
        if out.dtype.is_floating_point and torch.isnan(out).any():
            raise ValueError("outputs contains NaN: the class scores are not usable")
        pred = out.argmax(dim=1)
    elif out.ndim == 1 and not out.dtype.is_floating_point:
        pred = out
        check_class_indices(pred, "outputs", None)  # predicted classes: >= 0
    else:
        raise ValueError(f"outputs must be [N, k] class scores or [N] integer predictions, got "
                         f"shape {tuple(out.shape)} and dtype {out.dtype}")
    if len(pred) != len(lab):
        raise ValueError(f"outputs has {len(pred)} rows but labels has {len(lab)}")
    if len(lab) == 0:
        raise ValueError("labels is empty: accuracy of no rows is undefined")
    k = out.shape[1] if out.ndim == 2 else None
    check_class_indices(lab, "labels", k)
    return float((pred.long() == lab.long()).double().mean())


@torch.no_grad()
def _model_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int,
                    name: str = "x") -> float:
    """Accuracy of ``model`` on ``(x, y)``, the rows cast to the model's dtype and device
    batch by batch, as oni.train.accuracy casts them."""
    predicted, k = _batched(model, x, batch_size, None, lambda z: z.argmax(dim=1),
                            name=f"{name} x")
    check_class_indices(y, f"{name} labels", k)  # the labels must be the model's classes
    return float((predicted == y).double().mean())


def utility_report(model: nn.Module, train: Tuple[Tensor, Tensor], test: Tuple[Tensor, Tensor],
                   *, batch_size: int = 8192) -> dict:
    """Train accuracy, test accuracy and their gap for a classifier.

    Parameters
    ----------
    model : nn.Module mapping ``[N, d]`` inputs to ``[N, k]`` class scores; run in eval mode
        (its mode is restored afterwards) on the device of its parameters.
    train, test : ``(x, y)`` pairs, ``x [N, d]`` float, ``y [N]`` int64 labels.
    batch_size : rows per forward pass.

    Returns
    -------
    dict with ``train_acc``, ``test_acc`` and ``generalization_gap`` (train - test).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    batch_size = check_int(batch_size, "batch_size", 1)
    check_not_meta(model, "model")
    accs = {}
    was_training = model.training
    model.eval()
    try:
        for name, pair in (("train", train), ("test", test)):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"{name} must be an (x, y) pair of tensors")
            x, y = (torch.as_tensor(v) for v in pair)
            if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
                raise ValueError(f"{name} must be x [N, d] and y [N] with N > 0, got shapes "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}")
            if not x.dtype.is_floating_point:
                raise TypeError(f"{name} x must be floating point, got {x.dtype}")
            if not is_integer_dtype(y.dtype):
                raise TypeError(f"{name} labels must be integer class indices, got {y.dtype}")
            check_not_meta(x, f"{name} x")
            check_not_meta(y, f"{name} labels")  # x's values are checked in _batched's pass
            try:
                _check_model_width(model, x.shape[1])
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            accs[name] = _model_accuracy(model, x, y.long().cpu(), batch_size, name)
    finally:
        model.train(was_training)
    return {"train_acc": accs["train"], "test_acc": accs["test"],
            "generalization_gap": generalization_gap(accs["train"], accs["test"])}


def generalization_gap(train_acc: float, test_acc: float) -> float:
    """``train_acc - test_acc`` (accuracies in [0, 1]): how much better the model does on the
    rows it was trained on, the signal membership inference exploits."""
    return (check_number(train_acc, "train_acc", 0.0, 1.0)
            - check_number(test_acc, "test_acc", 0.0, 1.0))


# ----------------------------------------------------------------------------- attacks

def roc_curve(scores, is_member, *, drop_intermediate: bool = True
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of the rule "member iff score >= threshold" (scikit-learn's ``roc_curve``).

    Returns
    -------
    (fpr, tpr, thresholds) : float64 arrays, thresholds decreasing; the first point is
        ``(0, 0)`` at threshold ``inf`` (nobody called a member). ``drop_intermediate``
        drops points that do not change the curve's shape (scikit-learn's default).
    """
    s, m = _check_pair(scores, is_member)
    if not isinstance(drop_intermediate, bool):
        raise TypeError(f"drop_intermediate must be True or False, got {drop_intermediate!r}")
    return _skm.roc_curve(m, s, drop_intermediate=drop_intermediate)


def roc_auc(scores, is_member) -> float:
    """Area under the ROC curve: the probability that a random member scores higher than a
    random non-member (ties count one half). 0.5 is chance."""
    s, m = _check_pair(scores, is_member)
    return float(_skm.roc_auc_score(m, s))


def tpr_at_fpr(scores, is_member, fpr: float) -> float:
    """True-positive rate at a false-positive rate of at most ``fpr``.

    Interpolation-free: the largest TPR among the ROC points with FPR <= ``fpr``, i.e. the
    best an attacker does with one threshold that keeps its false-positive rate within the
    target. With ``n`` non-members, any target below ``1 / n`` only admits FPR 0.

    The LiRA authors' released code takes FPR < ``fpr``, strictly. The two differ when
    ``n * fpr`` is a whole number: with 5,000 non-members, "0.1% FPR" allows 5 false
    positives here and 4 there. ``fpr=math.nextafter(fpr, 0)`` gives their convention.
    """
    target = check_number(fpr, "fpr", 0.0, 1.0)
    s, m = _check_pair(scores, is_member)
    fprs, tprs, *_ = _rates(s, m)
    return _tpr_within(fprs, tprs, target)


def _rates(scores: np.ndarray, is_member: np.ndarray):
    """ROC points with their thresholds, and the member / non-member counts."""
    fprs, tprs, thresholds = _skm.roc_curve(is_member, scores, drop_intermediate=False)
    return fprs, tprs, thresholds, int(is_member.sum()), int((~is_member).sum())


def _tpr_within(fprs, tprs, rate: float) -> float:
    """The largest TPR among the ROC points with FPR <= ``rate``."""
    return float(tprs[fprs <= rate].max())  # (0, 0) is always a point: never empty


def _best_of(fprs, tprs, thresholds, n_members, n_non, balanced: bool) -> float:
    """The ROC point's threshold of the best (balanced) accuracy; the highest of equally
    good ones (argmax takes the first, thresholds decrease)."""
    accuracy, balanced_accuracy = _accuracies(fprs, tprs, n_members, n_non)
    return float(thresholds[int(np.argmax(balanced_accuracy if balanced else accuracy))])


def _accuracies(fprs, tprs, n_members, n_non):
    """Each ROC point's (accuracy, balanced accuracy), as exact integers scaled by their
    constant denominators: for comparing points only. As rates, two equally good thresholds
    could differ in the last bit (2/3 as 0.66...6 and 0.66...7), and the argmax then chose
    the lower one against the documented tie rule."""
    members_called = np.rint(tprs * n_members).astype(np.int64)  # true positives
    others_passed = np.rint((1.0 - fprs) * n_non).astype(np.int64)  # true negatives
    # (tp + tn) / n and (tp / n_members + tn / n_non) / 2 (Python ints past int64's range)
    exact = np.int64 if 2 * n_members * n_non < 2 ** 63 else object
    balanced = (members_called.astype(exact) * n_non
                + others_passed.astype(exact) * n_members)
    return members_called + others_passed, balanced


def best_threshold(scores, is_member, *, balanced: bool = True) -> float:
    """The threshold that maximises the (balanced) accuracy of "member iff score >= t".

    The candidates are the distinct scores and ``inf`` (nobody a member); among equally good
    thresholds the highest is returned. Fit it on data the adversary has (calibration data)
    and apply it with :func:`accuracy_at_threshold` to the evaluated set.
    """
    s, m = _check_pair(scores, is_member)
    if not isinstance(balanced, bool):
        raise TypeError(f"balanced must be True or False, got {balanced!r}")
    return _best_of(*_rates(s, m), balanced=balanced)


def accuracy_at_threshold(scores, is_member, threshold: float) -> Tuple[float, float]:
    """``(accuracy, balanced_accuracy)`` of the rule "member iff score >= threshold"."""
    s, m = _check_pair(scores, is_member)
    if isinstance(threshold, bool) or not isinstance(threshold, Real):
        raise TypeError(f"threshold must be a real number (inf allowed), got "
                        f"{type(threshold).__name__}")
    try:
        threshold = float(threshold)
    except OverflowError:  # an int past float64's range: above or below every score
        threshold = math.inf if threshold > 0 else -math.inf
    if math.isnan(threshold):
        raise ValueError(f"threshold must be a real number (inf allowed), got {threshold!r}")
    called = s >= threshold
    tpr = float(called[m].mean())
    tnr = float((~called[~m]).mean())
    return float((called == m).mean()), (tpr + tnr) / 2.0


def attack_report(scores, is_member, *, calibration: Optional[Tuple[object, object]] = None
                  ) -> dict:
    """Every attack metric for one set of membership scores.

    Parameters
    ----------
    scores, is_member : ``[N]`` scores of the evaluated records and their true membership.
    calibration : optional ``(scores, is_member)`` on the adversary's own data (e.g. shadow
        model members and non-members, scored the same way). The balanced-accuracy-best
        threshold on it is the attack's threshold on the evaluated set.

    Returns
    -------
    dict with
        ``auc``, ``tpr@0.1%fpr``, ``tpr@1%fpr`` (threshold-free);
        ``threshold``, ``accuracy``, ``balanced_accuracy``: at the calibration threshold
        (all ``None`` when no calibration data is given);
        ``oracle_threshold``, ``oracle_accuracy``, ``oracle_balanced_accuracy``: at the
        threshold maximising balanced accuracy on the evaluated set itself (an upper bound);
        ``n_members``, ``n_nonmembers``; ``roc``: ``(fpr, tpr)`` float64 arrays.
    """
    s, m = _check_pair(scores, is_member)
    rates = _rates(s, m)
    fprs, tprs, _, n_members, n_non = rates
    oracle = _best_of(*rates, balanced=True)  # best_threshold's, on this ROC pass
    oracle_acc, oracle_bal = accuracy_at_threshold(s, m, oracle)
    report = {"auc": float(_skm.roc_auc_score(m, s))}
    for key, target in REPORTED_FPRS.items():
        report[key] = _tpr_within(fprs, tprs, target)  # tpr_at_fpr's
    report.update(threshold=None, accuracy=None, balanced_accuracy=None)
    if calibration is not None:
        if not (isinstance(calibration, (tuple, list)) and len(calibration) == 2):
            raise TypeError("calibration must be a (scores, is_member) pair on the adversary's "
                            f"data, got {type(calibration).__name__}")
        cal_s, cal_m = _check_pair(*calibration, scores_name="calibration scores",
                                   member_name="calibration is_member")
        threshold = best_threshold(cal_s, cal_m, balanced=True)
        acc, bal = accuracy_at_threshold(s, m, threshold)
        report.update(threshold=threshold, accuracy=acc, balanced_accuracy=bal)
    report.update(oracle_threshold=oracle, oracle_accuracy=oracle_acc,
                  oracle_balanced_accuracy=oracle_bal, n_members=n_members,
                  n_nonmembers=n_non, roc=(fprs, tprs))
    return report


# ----------------------------------------------------------------------------- trade-off

def _check_outcome(outcome, name: str) -> Tuple[float, Mapping[str, float]]:
    if not isinstance(outcome, Mapping):
        raise TypeError(f"{name} must be a dict with 'test_acc' and 'balanced_attack_acc', got "
                        f"{type(outcome).__name__}")
    missing = [key for key in ("test_acc", "balanced_attack_acc") if key not in outcome]
    if missing:
        raise ValueError(f"{name} lacks {missing}: expected {{'test_acc': float, "
                         f"'balanced_attack_acc': {{attack_name: float}}}}")
    attacks = outcome["balanced_attack_acc"]
    if not isinstance(attacks, Mapping) or not attacks:
        raise ValueError(f"{name}['balanced_attack_acc'] must be a non-empty dict "
                         f"{{attack_name: balanced accuracy}}, got {attacks!r}")
    for attack, value in attacks.items():
        check_number(value, f"{name}['balanced_attack_acc'][{attack!r}]", 0.0, 1.0)
    return check_number(outcome["test_acc"], f"{name}['test_acc']", 0.0, 1.0), attacks


def midput(undefended: Mapping, defended: Mapping) -> float:
    """MIDPUT, the privacy-utility trade-off of a defense (as DynaNoise defines it).

    ``mean over attacks a of (bal_acc_a(undefended) - bal_acc_a(defended))
    - (test_acc(undefended) - test_acc(defended))``: the drop in balanced attack accuracy the
    defense buys, minus the test accuracy it costs. Higher is better; 0 for no defense.

    Parameters
    ----------
    undefended, defended : ``{"test_acc": float, "balanced_attack_acc": {attack: float}}``,
        the same attacks in both.
    """
    acc_u, attacks_u = _check_outcome(undefended, "undefended")
    acc_d, attacks_d = _check_outcome(defended, "defended")
    if set(attacks_u) != set(attacks_d):
        raise ValueError(f"undefended and defended must report the same attacks; only in "
                         f"undefended: {sorted(set(attacks_u) - set(attacks_d), key=str)}, "
                         f"only in defended: {sorted(set(attacks_d) - set(attacks_u), key=str)}")
    privacy_gain = float(np.mean([attacks_u[a] - attacks_d[a] for a in sorted(attacks_u, key=str)]))
    return privacy_gain - (acc_u - acc_d)
