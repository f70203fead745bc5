"""A run's report: the results table (CSV), the paper's figures (PNG) and ``report.md``.

Everything here is rebuilt from what ``oni run`` saved in the run directory —
``results.json`` (every metric, per-epoch histories, the config, the machine) and
``roc.npz`` (each attack's ROC curve) — so ``oni report RUN_DIR`` reproduces the report
without training or querying a model.

Figures (``RUN_DIR/figures/``, matplotlib's Agg backend, no display needed):

* ``test_accuracy_per_epoch.png`` — test accuracy per epoch of every trained defense (the
  paper's Figure 2);
* ``attack_auc.png`` — each attack's ROC AUC per defense (Figure 3);
* ``attack_accuracy_vs_gap.png`` — inference (balanced attack) accuracy against the
  generalization gap (Figure 4);
* ``lira_roc.png`` — LiRA's ROC curves on log-log axes (Carlini et al. 2022);
* ``privacy_utility.png`` — test accuracy against mean balanced attack accuracy, each
  defense labelled with its MIDPUT.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from .models import _fsync_dir

__all__ = ["write_atomic", "build_report", "results_rows", "results_json_bytes",
           "results_from_json", "CSV_COLUMNS", "FIGURES", "FINISHING"]

#: the columns of results.csv: one row per defense x attack
CSV_COLUMNS = ("defense", "attack", "train_acc", "test_acc", "generalization_gap", "midput",
               "auc", "tpr@0.1%fpr", "tpr@1%fpr", "threshold", "accuracy",
               "balanced_accuracy", "oracle_threshold", "oracle_accuracy",
               "oracle_balanced_accuracy", "n_members", "n_nonmembers")
_DEFENSE_COLUMNS = ("train_acc", "test_acc", "generalization_gap", "midput")

FIGURES = {
    "accuracy": "test_accuracy_per_epoch.png",
    "auc": "attack_auc.png",
    "gap": "attack_accuracy_vs_gap.png",
    "lira": "lira_roc.png",
    "tradeoff": "privacy_utility.png",
}


#: present in a run directory while ``oni run`` replaces its results files, one by one:
#: a run killed there (kill -9, power loss, a full disk) leaves it, and the files may then
#: come from two runs
FINISHING = ".finishing"

# strict JSON has no infinities or NaN (JavaScript, jq and most parsers refuse Python's
# bare Infinity): they are written as these strings and read back as floats
_NONFINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


# ----------------------------------------------------------------------------- files

def results_json_bytes(results: Mapping, default=None) -> bytes:
    """``results`` as strict JSON (UTF-8, indented): an infinite or NaN float is written as
    the string ``"Infinity"``, ``"-Infinity"`` or ``"NaN"``; ``default`` serialises other
    types as in :func:`json.dumps`."""
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        if isinstance(value, Mapping):
            return {key: strict(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(item) for item in value]
        if default is not None and not isinstance(value, (str, int, float, bool, type(None))):
            return strict(default(value))
        return value
    return (json.dumps(strict(results), indent=1, allow_nan=False) + "\n").encode()


# the parts of results.json that hold the user's own strings (a data file named "NaN"):
# never read as numbers
_VERBATIM = frozenset({"config", "data", "machine"})


def results_from_json(text) -> Any:
    """What :func:`results_json_bytes` wrote, with its non-finite strings as floats again,
    except under the keys ``config``, ``data`` and ``machine``, whose strings are the
    user's (an older run's bare ``Infinity`` is read as well)."""
    return nonfinite_restored(json.loads(text))


def nonfinite_restored(value, verbatim=_VERBATIM) -> Any:
    """Parsed JSON written by :func:`results_json_bytes`, with the strings ``"Infinity"``,
    ``"-Infinity"`` and ``"NaN"`` as floats again, except under the keys ``verbatim``."""
    def restore(value):
        if isinstance(value, str):
            return _NONFINITE.get(value, value)
        if isinstance(value, dict):
            return {key: item if key in verbatim else restore(item)
                    for key, item in value.items()}
        if isinstance(value, list):
            return [restore(item) for item in value]
        return value
    return restore(value)


def write_atomic(path: os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically: a temporary file in the same directory,
    flushed and fsynced, then ``os.replace``; a killed write leaves the old file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)  # the rename itself survives a crash
    return path


def _load(run_dir: Path):
    results = results_from_json((run_dir / "results.json").read_text())
    if not (run_dir / "roc.npz").is_file():  # oni run writes both (a curve per attack)
        raise ValueError("roc.npz is missing")
    with np.load(run_dir / "roc.npz", allow_pickle=False) as data:
        roc = {key: data[key] for key in data.files}
    return results, roc


# ----------------------------------------------------------------------------- tables

def results_rows(results: Mapping) -> List[Dict[str, Any]]:
    """One dict per defense x attack with every :data:`CSV_COLUMNS` entry."""
    rows = []
    for defense, facts in results["defenses"].items():
        for attack, found in results["attacks"].get(defense, {}).items():
            metrics = found["metrics"]
            row = {"defense": defense, "attack": attack}
            row.update({key: facts.get(key) for key in _DEFENSE_COLUMNS})
            row.update({key: metrics.get(key) for key in CSV_COLUMNS if key not in row})
            rows.append(row)
    return rows


def _csv_bytes(rows: Sequence[Mapping]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_COLUMNS})
    return buffer.getvalue().encode()


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |"
              for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures

def _figure(width: float = 6.4, height: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global state
    return fig


def _save(fig, path: Path, rendered: Dict[Path, bytes]) -> None:
    """The figure's PNG into ``rendered`` (written only once every file has rendered)."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    rendered[path] = buffer.getvalue()


def _fig_accuracy(results, path: Path, rendered: Dict[Path, bytes]) -> Optional[str]:
    fig = _figure()
    ax = fig.add_subplot()
    drawn, untrained = 0, []
    for defense, facts in results["defenses"].items():
        history = facts.get("history")
        if not history or not history.get("test_acc") or history["test_acc"][0] is None:
            untrained.append(defense)
            continue
        ax.plot(history["epochs"], history["test_acc"], marker="o", markersize=2.5,
                label=defense)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    title = "Test accuracy per epoch (paper Fig. 2)"
    if untrained:
        title += f"\n({', '.join(untrained)}: no training of its own; the undefended curve)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path, rendered)
    return path.name


def _attack_order(results) -> List[str]:
    order = results.get("attack_order") or []
    seen = {a for found in results["attacks"].values() for a in found}
    return [a for a in order if a in seen] + sorted(seen - set(order))


def _fig_auc(results, path: Path, rendered: Dict[Path, bytes]) -> Optional[str]:
    defenses = list(results["defenses"])
    attacks = _attack_order(results)
    if not attacks:
        return None
    fig = _figure(max(6.4, 1.2 * len(defenses) + 4.5), 4.4)
    ax = fig.add_subplot()
    width = 0.8 / len(attacks)
    for j, attack in enumerate(attacks):
        values = [results["attacks"][d].get(attack, {}).get("metrics", {}).get("auc", np.nan)
                  for d in defenses]
        ax.bar(np.arange(len(defenses)) + (j - (len(attacks) - 1) / 2) * width, values, width,
               label=attack)
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(np.arange(len(defenses)))
    ax.set_xticklabels(defenses)
    ax.set_ylabel("attack ROC AUC")
    ax.set_ylim(0.4, 1.0)
    ax.set_title("Attack AUC per defense (paper Fig. 3); 0.5 = chance", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path, rendered)
    return path.name


_MARKERS = "osD^v<>ph*"


def _fig_gap(results, path: Path, rendered: Dict[Path, bytes]) -> Optional[str]:
    attacks = _attack_order(results)
    points = [(d, facts) for d, facts in results["defenses"].items()
              if facts.get("generalization_gap") is not None]
    if not attacks or not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    colors = {d: f"C{i}" for i, d in enumerate(results["defenses"])}
    for j, attack in enumerate(attacks):
        for defense, facts in points:
            metrics = results["attacks"][defense].get(attack, {}).get("metrics")
            if metrics is None:
                continue
            value = metrics.get("balanced_accuracy")
            if value is None:
                value = metrics["oracle_balanced_accuracy"]
            ax.scatter(facts["generalization_gap"], value, color=colors[defense],
                       marker=_MARKERS[j % len(_MARKERS)], s=28)
    for defense, _ in points:
        ax.scatter([], [], color=colors[defense], marker="o", label=defense)
    for j, attack in enumerate(attacks):
        ax.scatter([], [], color="gray", marker=_MARKERS[j % len(_MARKERS)], label=attack)
    ax.set_xlabel("generalization gap (train acc - test acc)")
    ax.set_ylabel("balanced attack accuracy")
    ax.set_title("Inference accuracy vs generalization gap (paper Fig. 4)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    _save(fig, path, rendered)
    return path.name


def _fig_lira(results, roc, path: Path, rendered: Dict[Path, bytes]) -> Optional[str]:
    liras = [a for a in _attack_order(results) if a.startswith("lira")]
    if not liras:
        return None
    fig = _figure(5.0 * len(liras), 4.6)
    for i, attack in enumerate(liras):
        ax = fig.add_subplot(1, len(liras), i + 1)
        floor = 0.1  # at least a decade: one non-member would make the axes a point
        for defense in results["defenses"]:
            fpr = roc.get(f"{defense}/{attack}/fpr")
            tpr = roc.get(f"{defense}/{attack}/tpr")
            if fpr is None:
                continue
            n_non = results["attacks"][defense][attack]["metrics"].get("n_nonmembers") or 1
            floor = min(floor, 1.0 / n_non)
            auc = results["attacks"][defense][attack]["metrics"]["auc"]
            keep = fpr > 0
            ax.loglog(fpr[keep], np.maximum(tpr[keep], 1e-5), label=f"{defense} (AUC {auc:.3f})")
        grid = np.logspace(math.log10(floor), 0, 50)
        ax.loglog(grid, grid, color="black", linewidth=0.8, linestyle="--", label="chance")
        ax.set_xlim(floor, 1.0)
        ax.set_ylim(floor, 1.0)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{attack} ROC (log-log)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    _save(fig, path, rendered)
    return path.name


def _fig_tradeoff(results, path: Path, rendered: Dict[Path, bytes]) -> Optional[str]:
    points = [(d, f) for d, f in results["defenses"].items()
              if f.get("test_acc") is not None and f.get("mean_balanced_attack_acc") is not None]
    if not points:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for i, (defense, facts) in enumerate(points):
        x, y = facts["mean_balanced_attack_acc"], facts["test_acc"]
        ax.scatter(x, y, color=f"C{i}", s=40)
        midput = facts.get("midput")
        ax.annotate(f"{defense}\nMIDPUT {_fmt(midput)}", (x, y), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel("mean balanced attack accuracy (privacy loss)")
    ax.set_ylabel("test accuracy (utility)")
    ax.set_title("Privacy-utility plane (up and left is better)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.25)
    _save(fig, path, rendered)
    return path.name


# ----------------------------------------------------------------------------- markdown

def _false_positive_note(n_non: int) -> str:
    """What each reported TPR@FPR allows with ``n_non`` non-members: at most m false
    positives, the largest m with m / n_non <= the rate (as ``tpr_at_fpr`` compares)."""
    from .metrics import REPORTED_FPRS
    parts = []
    for key, rate in REPORTED_FPRS.items():
        allowed = int(math.floor(rate * n_non))
        while (allowed + 1) / n_non <= rate:  # the product's rounding, either way
            allowed += 1
        while allowed > 0 and allowed / n_non > rate:
            allowed -= 1
        name = key.replace("tpr@", "TPR@").replace("fpr", "FPR")
        parts.append(f"{name} counts only thresholds with no false positive at all"
                     if allowed == 0 else f"{name} allows at most {allowed} false "
                                          f"positive{'s' if allowed > 1 else ''}")
    members = "non-member" if n_non == 1 else "non-members"
    return f"With {n_non} {members} in the target set, " + "; ".join(parts) + "."


def _markdown(results, figures: Mapping[str, Optional[str]]) -> str:
    cfg = results["config"]
    data, splits = results["data"], results["splits"]
    machine = results.get("machine", {})
    source = cfg["data"]["path"] or (f"oni.synthetic_purchase(n={cfg['data']['synthetic']['n']}"
                                     f", d={cfg['data']['synthetic']['d']}, "
                                     f"k={cfg['data']['synthetic']['k']})")
    hidden = "-".join(str(h) for h in cfg["model"]["hidden"])
    lines = [
        "# oni run report", "",
        f"* preset `{cfg['preset']}`, seed {cfg['seed']}; data {source}: {data['n']} rows, "
        f"{data['d']} features, {data['k']} classes",
        f"* splits ({splits['preset']}): train {splits['train']}, test {splits['test']}, known "
        f"{splits['known']}, target {splits['target']} ({splits['target_members']} members), "
        f"shadow pool {splits['shadow_pool']}",
        f"* model: MLP {data['d']}-{hidden}-{data['k']}, {cfg['train']['epochs']} epochs, "
        f"batch {cfg['train']['batch_size']}, Adam lr {cfg['train']['lr']}",
        "* attacks " + ("adaptive (shadow models trained with the defense they attack)"
                        if cfg["attacks"]["adaptive"] else "with undefended shadow models"),
        f"* compute {results.get('compute_seconds', 0):.0f} s over all stages; this invocation "
        f"{results.get('wall_seconds', 0):.0f} s wall; finished {results.get('finished', '?')}",
        f"* machine: {machine.get('cpu_model') or machine.get('processor', '?')}, "
        f"{machine.get('cpus', '?')} CPUs, torch {machine.get('torch', '?')}"
        + (f", GPU {machine['cuda']}" if machine.get("cuda") else ", no GPU"),
        "", "## Defenses", "",
    ]
    rows = []
    for defense, facts in results["defenses"].items():
        report = facts.get("report") or {}
        note = ""
        if "feasible_rate" in report:
            note = (f"feasible {report['feasible_rate']:.1%}, mean noise norm "
                    f"{report['norm_mean']:.3f}")
        elif "noise_norm_mean" in report:
            note = f"mean noise norm {report['noise_norm_mean']:.3f}"
        elif "epsilon_spent" in report:
            note = f"epsilon spent {report['epsilon_spent']:.2f}"
        rows.append([defense, facts.get("train_acc"), facts.get("test_acc"),
                     facts.get("generalization_gap"), facts.get("mean_balanced_attack_acc"),
                     facts.get("midput"), note])
    lines.append(_table(["defense", "train acc", "test acc", "gap", "mean bal. attack acc",
                         "MIDPUT", "notes"], rows))
    # an attack without calibration data has no adversary's threshold: the mean and MIDPUT
    # take its oracle balanced accuracy (oni run's choice), said here so they can be redone
    oracle = sorted({attack for per_defense in results["attacks"].values()
                     for attack, facts in per_defense.items()
                     if facts["metrics"].get("balanced_accuracy") is None})
    if oracle:
        lines += ["", f"The attacks without calibration data ({', '.join(oracle)}: "
                      f"calibration_fraction 0) enter the mean balanced attack accuracy and "
                      f"MIDPUT with their oracle balanced accuracy, an upper bound no real "
                      f"adversary reaches."]
    lines += ["", "## Attacks", "",
              "Accuracy and balanced accuracy at the threshold the adversary picks on its own "
              "(shadow) data; the oracle columns use the best threshold on the evaluated set "
              "itself (an upper bound no real adversary reaches).", ""]
    rows = []
    for row in results_rows(results):
        rows.append([row["defense"], row["attack"], row["auc"], row["tpr@0.1%fpr"],
                     row["tpr@1%fpr"], row["accuracy"], row["balanced_accuracy"],
                     row["oracle_accuracy"], row["oracle_balanced_accuracy"]])
    lines.append(_table(["defense", "attack", "AUC", "TPR@0.1%FPR", "TPR@1%FPR", "acc",
                         "bal. acc", "oracle acc", "oracle bal. acc"], rows))
    n_non = min((r["n_nonmembers"] for r in results_rows(results) if r["n_nonmembers"]),
                default=None)
    if n_non:
        lines += ["", _false_positive_note(n_non)]
    captions = {
        "accuracy": "Test accuracy per epoch (paper Figure 2)",
        "auc": "Attack AUC per defense (paper Figure 3)",
        "gap": "Inference accuracy vs generalization gap (paper Figure 4)",
        "lira": "LiRA ROC curves, log-log",
        "tradeoff": "Privacy-utility plane with MIDPUT",
    }
    shown = [(key, name) for key, name in figures.items() if name]
    if shown:
        lines += ["", "## Figures", ""]
        for key, name in shown:
            lines += [f"### {captions[key]}", "", f"![{captions[key]}](figures/{name})", ""]
    lines += ["## Stages", "", _table(
        ["stage", "hash", "compute s", "this run"],
        [[name, s["hash"], s["seconds"], "reused" if s["reused"] else "computed"]
         for name, s in results.get("stages", {}).items()]), ""]
    return "\n".join(lines) + "\n"


# an attack's metrics that are rates in [0, 1] (None where undefined; the first two never)
_ATTACK_RATES = ("auc", "oracle_balanced_accuracy", "tpr@0.1%fpr", "tpr@1%fpr", "accuracy",
                 "balanced_accuracy", "oracle_accuracy")


def _check_value(value, where: str, *, low: float = -math.inf, high: float = math.inf,
                 required: bool = False, integer: bool = False, finite: bool = True) -> None:
    """``value`` is None (unless ``required``) or a number in [low, high]: an int when
    ``integer``, a float that is not NaN (nor infinite when ``finite``) otherwise."""
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        ok = False
    elif isinstance(value, float) and (math.isnan(value) or finite and math.isinf(value)):
        ok = False
    else:
        ok = low <= value <= high
    if not ok:
        what = "an integer" if integer else ("a finite number" if finite else "a number")
        bounds = "" if (low, high) == (-math.inf, math.inf) else \
            f" in [{low:g}, {'inf' if high == math.inf else f'{high:g}'}]"
        raise ValueError(f"results.json: {where} must be {what}{bounds}, got {value!r}")


def _check_name(name, where: str) -> None:
    # a name is a cell of the markdown tables and a key of roc.npz
    if not isinstance(name, str) or not name or any(c in name for c in "|\n\r/"):
        raise ValueError(f"results.json: {where} name {name!r} is not a name oni run writes "
                         f"(a non-empty string without '|', '/' or line breaks)")


def _mapping(value, where: str) -> Mapping:
    if not isinstance(value, dict):
        raise ValueError(f"results.json: {where} must be a JSON object, got "
                         f"{type(value).__name__}")
    return value


def _check_results(results, roc: Mapping[str, np.ndarray]) -> None:
    """A ValueError naming the first value of ``results.json`` or ``roc.npz`` that the report
    reads and that is not what ``oni run`` writes: numbers out of range, NaN or of the wrong
    type, and ROC curves that are not equal-length 1-D rates in [0, 1]. Without it an edited
    or damaged file gave a report of "nan" and "7.000" cells, or a numpy error naming none."""
    defenses = _mapping(_mapping(results, "the top level").get("defenses"), "defenses")
    attacks = _mapping(results.get("attacks"), "attacks")
    if not defenses:
        raise ValueError("results.json: defenses is empty; oni run always writes the "
                         "undefended model's results")
    if set(attacks) != set(defenses):
        raise ValueError(f"results.json: attacks has results for {sorted(attacks)} but "
                         f"defenses lists {sorted(defenses)}")
    for defense, facts in defenses.items():
        _check_name(defense, "defense")
        where = f"defenses.{defense}"
        facts = _mapping(facts, where)
        for key in ("train_acc", "test_acc", "mean_balanced_attack_acc"):
            _check_value(facts.get(key), f"{where}.{key}", low=0.0, high=1.0)
        _check_value(facts.get("generalization_gap"), f"{where}.generalization_gap",
                     low=-1.0, high=1.0)
        _check_value(facts.get("midput"), f"{where}.midput")
        history = facts.get("history")
        if history is not None:
            history = _mapping(history, f"{where}.history")
            epochs, test_acc = history.get("epochs"), history.get("test_acc")
            if not isinstance(epochs, list) or not isinstance(test_acc, list) or \
                    len(epochs) != len(test_acc):
                raise ValueError(f"results.json: {where}.history must hold lists epochs and "
                                 f"test_acc of one length")
            for i, (epoch, acc) in enumerate(zip(epochs, test_acc)):
                _check_value(epoch, f"{where}.history.epochs[{i}]", low=1, integer=True,
                             required=True)
                _check_value(acc, f"{where}.history.test_acc[{i}]", low=0.0, high=1.0)
        report = _mapping(facts.get("report") or {}, f"{where}.report")
        # the notes column: ONI's feasibility and norm, a noise norm, DP's epsilon
        noted = ("feasible_rate", "norm_mean") if "feasible_rate" in report else \
            [key for key in ("noise_norm_mean", "epsilon_spent") if key in report]
        for key in noted:
            _check_value(report.get(key), f"{where}.report.{key}", low=0.0,
                         high=1.0 if key == "feasible_rate" else math.inf, required=True)
        for attack, found in _mapping(attacks[defense], f"attacks.{defense}").items():
            _check_name(attack, f"attacks.{defense} attack")
            there = f"attacks.{defense}.{attack}.metrics"
            metrics = _mapping(_mapping(found, there[:-8]).get("metrics"), there)
            for key in _ATTACK_RATES:
                _check_value(metrics.get(key), f"{there}.{key}", low=0.0, high=1.0,
                             required=key in _ATTACK_RATES[:2])
            for key in ("threshold", "oracle_threshold"):  # +-inf: everything or nothing
                _check_value(metrics.get(key), f"{there}.{key}", finite=False)
            for key in ("n_members", "n_nonmembers"):
                _check_value(metrics.get(key), f"{there}.{key}", low=0, integer=True)
            _check_roc(roc, f"{defense}/{attack}")
    for key in ("compute_seconds", "wall_seconds"):
        _check_value(results.get(key), key, low=0.0)
    for name, stage in _mapping(results.get("stages") or {}, "stages").items():
        stage = _mapping(stage, f"stages.{name}")
        _check_value(stage.get("seconds"), f"stages.{name}.seconds", low=0.0, required=True)


def _check_roc(roc: Mapping[str, np.ndarray], key: str) -> None:
    fpr, tpr = roc.get(f"{key}/fpr"), roc.get(f"{key}/tpr")
    for part, curve in (("fpr", fpr), ("tpr", tpr)):
        if curve is None or curve.ndim != 1 or curve.dtype.kind not in "fiu" or \
                not len(curve) or not np.isfinite(curve).all() or \
                curve.min() < 0 or curve.max() > 1:
            got = "missing" if curve is None else f"{curve.dtype} {curve.shape}"
            raise ValueError(f"roc.npz: {key}/{part} must be a non-empty 1-D array of rates "
                             f"in [0, 1], got {got}")
    if len(fpr) != len(tpr):
        raise ValueError(f"roc.npz: {key}/fpr and {key}/tpr have {len(fpr)} and {len(tpr)} "
                         f"points; a curve has one tpr per fpr")


def build_report(run_dir: os.PathLike) -> Path:
    """Writes ``results.csv``, ``figures/*.png`` and ``report.md`` of a run directory from
    its ``results.json`` and ``roc.npz``; returns the path of ``report.md``. A ValueError
    says the two are damaged, not what `oni run` writes, or left by a run stopped while it
    replaced them (:data:`FINISHING`)."""
    run_dir = Path(run_dir)
    if (run_dir / FINISHING).exists():
        raise ValueError(f"{run_dir}: the last `oni run` here was stopped while replacing "
                         f"its results files, so they may come from two runs; run it again "
                         f"(its stages are saved: it only rewrites the results)")
    try:
        results, roc = _load(run_dir)
    # JSON, UTF-8, npz damage; JSON nested deeper than Python's recursion limit
    except (ValueError, EOFError, zipfile.BadZipFile, RecursionError) as err:
        raise ValueError(f"{run_dir}: results.json or roc.npz is damaged ({err}); run the "
                         f"same `oni run` again to rewrite them") from None
    try:
        rendered = render_report(run_dir, results, roc)
    except ValueError as err:
        raise ValueError(f"{run_dir}: {err}; run the same `oni run` again to rewrite "
                         f"it") from None
    return write_rendered(rendered)


class RenderedReport(NamedTuple):
    """A run's report in memory: every file's bytes, and the figures to drop."""

    files: Dict[Path, bytes]
    stale: List[Path]
    report: Path


def render_report(run_dir: os.PathLike, results: Mapping, roc: Mapping) -> RenderedReport:
    """``results.csv``, the figures and ``report.md`` of ``results`` (as read back from
    ``results.json``) and ``roc``, checked and rendered in memory: nothing is written, so a
    failure leaves the directory as it was. A ValueError says what is not what `oni run`
    writes."""
    run_dir = Path(run_dir)
    try:
        _check_results(results, roc)
    except ValueError as err:
        raise ValueError(f"{err}, which is not what `oni run` writes") from None
    try:
        return _render(run_dir, results, roc)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"results.json or roc.npz is not what `oni run` writes "
                         f"({type(err).__name__}: {err})") from None


def write_rendered(rendered: RenderedReport) -> Path:
    """Writes what :func:`render_report` made (each file atomically); returns report.md."""
    for path, data in rendered.files.items():
        write_atomic(path, data)
    for path in rendered.stale:  # a figure this run has not made (LiRA not run): drop the
        path.unlink(missing_ok=True)  # one an earlier run in this directory left
    return rendered.report


def _render(run_dir: Path, results: Mapping, roc: Mapping) -> RenderedReport:
    figures_dir = run_dir / "figures"
    rendered: Dict[Path, bytes] = {run_dir / "results.csv": _csv_bytes(results_rows(results))}
    figures = {
        "accuracy": _fig_accuracy(results, figures_dir / FIGURES["accuracy"], rendered),
        "auc": _fig_auc(results, figures_dir / FIGURES["auc"], rendered),
        "gap": _fig_gap(results, figures_dir / FIGURES["gap"], rendered),
        "lira": _fig_lira(results, roc, figures_dir / FIGURES["lira"], rendered),
        "tradeoff": _fig_tradeoff(results, figures_dir / FIGURES["tradeoff"], rendered),
    }
    if figures_dir.exists() and not figures_dir.is_dir():  # found before any file is written
        raise FileExistsError(f"{figures_dir} is a file: the report's figures go in that "
                              f"directory; move the file away")
    for path in (*rendered, run_dir / "report.md"):
        if path.is_dir():
            raise FileExistsError(f"{path} is a directory, where the report writes a file; "
                                  f"move it away")
    report = run_dir / "report.md"
    rendered[report] = _markdown(results, figures).encode()  # last: written last
    stale = [figures_dir / FIGURES[key] for key, name in figures.items() if not name]
    return RenderedReport(rendered, stale, report)
