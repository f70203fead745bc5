"""The `oni` command: config resolution and errors, the staged run end to end, resume after
an interruption (an exception and a real kill -9), stale-stage detection, the report, and the
shapley / noise commands."""
import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from oni import cli, config as cfgmod, report as reportmod
from oni.config import ConfigError, resolve_config
from oni.models import MLP, _check_hidden

_RECORD = cli._RECORD

REPO = Path(__file__).resolve().parents[1]

# a run of seconds: 600 rows, 20 features, 5 classes, one hidden layer of 16, 2 epochs,
# 4 LiRA shadows, a small attack model and a short noise solve
TINY = """\
device: cpu
data:
  synthetic: {n: 600, d: 20, k: 5}
model: {hidden: [16]}
train: {epochs: 2, lr: 0.01}
defenses:
  oni: {n_permutations: 4, max_iter: 5, refine_iter: 1, polish_iter: 1, starts: 1}
attacks:
  lira_offline: {n_shadows: 4}
  lira_online: {n_shadows: 4}
  shadow: {attack_epochs: 2, prediction_widths: [16], label_widths: [8], combined_widths: [8]}
"""
# fewer stages for the resume and staleness tests
SMALL_SETS = ["defenses.run=[undefended, oni, dynanoise]",
              "attacks.run=[metric_loss, lira_online]"]


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY)
    return path


def _run(args):
    return cli.main(["run", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def full_run(tiny_yaml, tmp_path_factory):
    """The tiny config with every default defense and attack, run once."""
    out = tmp_path_factory.mktemp("runs") / "full"
    assert _run([tiny_yaml, "--out", out]) == 0
    return out


def _results(run_dir):
    return json.loads((Path(run_dir) / "results.json").read_text())


def _stage_status(run_dir):
    return {name: s["reused"] for name, s in _results(run_dir)["stages"].items()}


def _metrics(run_dir):
    res = _results(run_dir)
    return ({d: {k: v for k, v in f.items() if k not in ("history", "report")}
             for d, f in res["defenses"].items()},
            {d: {a: m["metrics"] for a, m in found.items()} for d, found in res["attacks"].items()})


# ----------------------------------------------------------------------------- config

def test_default_config_resolves_with_every_setting():
    config = resolve_config()
    assert config["preset"] == "default"
    assert config["data"]["path"] is None
    assert config["defenses"]["run"] == ["undefended", "uniform", "oni", "dynanoise"]
    assert "lira_online" in config["attacks"]["run"] and "shadow" in config["attacks"]["run"]
    # each defense and attack run gets its full settings, defaults filled in
    assert config["defenses"]["oni"]["kl_direction"] == "paper"
    assert config["attacks"]["lira_online"]["n_shadows"] == 4
    assert config["attacks"]["shadow"]["attack_lr"] == pytest.approx(1e-3)
    # the YAML written to config.yaml reads back as the same config
    again = cfgmod.load_yaml(cfgmod.dump_yaml(config), source="dump")
    assert again == config


def test_set_overrides_use_yaml_scalar_rules():
    config = resolve_config(sets=["train.epochs=5", "train.lr=1e-3", "attacks.adaptive=false",
                                  "model.hidden=[8, 4]", "defenses.oni.tau_fraction=0.7",
                                  "data.synthetic.n=900", "splits.target=100",
                                  "defenses.run=[undefended, oni]"])
    assert config["train"]["epochs"] == 5 and isinstance(config["train"]["epochs"], int)
    assert config["train"]["lr"] == 1e-3 and isinstance(config["train"]["lr"], float)
    assert config["attacks"]["adaptive"] is False
    assert config["model"]["hidden"] == [8, 4]
    assert config["defenses"]["oni"]["tau_fraction"] == 0.7
    assert config["defenses"]["run"] == ["undefended", "oni"]
    assert config["splits"]["target"] == 100


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 7, batch_size: 32}\n")
    config = resolve_config(path, ["train.epochs=3"])
    assert config["train"] == {"epochs": 3, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0}


def test_presets(tmp_path):
    data = tmp_path / "data.npz"
    data.write_bytes(b"")
    paper = resolve_config(sets=[f"data.path={data}"], preset="paper")
    assert paper["model"]["hidden"] == [1024, 512, 256, 128]
    assert paper["train"]["epochs"] == 100
    assert paper["attacks"]["lira_online"]["n_shadows"] == 16
    loc = resolve_config(sets=[f"data.path={data}"], preset="location30")
    assert loc["splits"]["preset"] == "proportional" and loc["preset"] == "location30"
    # a file may name its preset; --preset wins over it
    path = tmp_path / "p.yaml"
    path.write_text(f"preset: paper\ndata: {{path: {data}}}\n")
    assert resolve_config(path)["train"]["epochs"] == 100
    assert resolve_config(path, preset="default")["train"]["epochs"] == 20


@pytest.mark.parametrize("sets, key", [
    (["trian.epochs=3"], "trian"),                               # unknown top-level key
    (["train.epoch=3"], "train.epoch"),                          # unknown nested key
    (["train.epochs=ten"], "train.epochs"),                      # wrong type
    (["train.epochs=2.5"], "train.epochs"),                      # float for an int
    (["train.epochs=0"], "train.epochs"),                        # out of range
    (["train.lr=-1"], "train.lr"),
    (["attacks.adaptive=maybe"], "attacks.adaptive"),
    (["model.hidden=[8, x]"], "model.hidden[1]"),
    (["model.hidden=8"], "model.hidden"),
    (["train=5"], "train"),                                      # a section given a scalar
    (["defenses.oni.tau_fraction=high"], "defenses.oni.tau_fraction"),
    (["defenses.oni.tau_fraction=1.5"], "defenses.oni.tau_fraction"),
    (["defenses.oni.foo=1"], "defenses.oni.foo"),                # unknown defense setting
    (["defenses.shield.eps=1"], "defenses.shield"),              # unknown defense
    (["defenses.run=[undefended, shield]"], "defenses.run[1]"),
    (["defenses.run=[oni]"], "defenses.run"),                    # undefended is required
    (["attacks.lira_online.n_shadows=3"], "attacks.lira_online.n_shadows"),
    (["attacks.shadow.attack_lr=fast"], "attacks.shadow.attack_lr"),
    (["attacks.shadow.attack_lr=1e38"], "attacks.shadow.attack_lr"),  # Adam overflows float32
    (["train.weight_decay=1e308"], "train.weight_decay"),
    (["train.lr=1e38"], "train.lr"),
    (["defenses.dpsgd.lr=1e38"], "defenses.dpsgd.lr"),
    (["data.path=/no/such/file.csv"], "data.path"),              # missing data file
    (["splits.target=7"], "splits.target"),
    (["data.format=xml"], "data.format"),
    ([f"seed={2 ** 63}"], "seed"),                               # beyond a signed int64
    ([f"data.synthetic.seed={2 ** 64}"], "data.synthetic.seed"),
    # settings that cannot work together: refused here, not after every model has trained
    (["attacks.shadow.fit_on=known"], "attacks.shadow.fit_on"),   # adaptive: no shadows
    (["attacks.lira_online.shadow_precision=bf16"], "attacks.lira_online.shadow_precision"),
    (["splits.shadow_pool=2"], "splits.shadow_pool"),
    (["splits.shadow_pool=3", "attacks.run=[lira_offline, metric_loss]"], "splits.shadow_pool"),
    (["attacks.lira_online.n_shadows=100000000"], "attacks.lira_online.n_shadows"),  # ran on
    # a key with a digit was cut at it ('defenses.dynanoise.sigma')
    (["defenses.dynanoise.sigma0_sq=1e38", "defenses.dynanoise.lambda=1e38"],
     "defenses.dynanoise.sigma0_sq'"),
    # fuzz pass 7: ints past float64's range were an OverflowError traceback; sizes past
    # torch's int64 counts failed deep in torch with a C++ stack
    ([f"train.lr={10 ** 400}"], "train.lr"),
    ([f"train.weight_decay={10 ** 400}"], "train.weight_decay"),
    ([f"attacks.label_only.sigma_grid=[0.1, {10 ** 400}]"], "attacks.label_only.sigma_grid[1]"),
    ([f"data.synthetic.d={2 ** 62 + 1}"], "data.synthetic.d"),
    ([f"data.synthetic.n={10 ** 23}"], "data.synthetic.n"),
    ([f"model.hidden=[16, {2 ** 62 + 1}]"], "model.hidden[1]"),
    ([f"attacks.shadow.hidden=[{2 ** 63}]"], "attacks.shadow.hidden[0]"),
    # fuzz pass 9: more layers than an MLP takes were refused only when it was built
    (["model.hidden=[" + ", ".join(["4"] * 101) + "]"], "model.hidden"),
    (["attacks.shadow.hidden=[" + ", ".join(["4"] * 101) + "]"], "attacks.shadow.hidden"),
    # YAML 1.1's base-60 and binary ints are strings now, not 64 and 3
    (["train.batch_size=1:04"], "train.batch_size"),
    (["data.synthetic.seed=0b11"], "data.synthetic.seed"),
])
def test_bad_configs_name_the_key(sets, key):
    with pytest.raises(ConfigError) as info:
        resolve_config(sets=sets)
    assert f"'{key}" in str(info.value), str(info.value)


@pytest.mark.parametrize("make, taken", [
    (lambda: "abc", False), (lambda: b"ab", False), (lambda: {4: 4}, False),
    (lambda: {4}, False), (lambda: (w for w in [4]), False), (lambda: np.array([4]), False),
    (lambda: None, False), (lambda: [True], False), (lambda: [np.bool_(True)], False),
    (lambda: [3.0], False), (lambda: [[4]], False), (lambda: [0], False),
    (lambda: [-1], False), (lambda: [2 ** 62 + 1], False), (lambda: [4] * 101, False),
    (lambda: [], True), (lambda: (), True), (lambda: [np.int64(4)], True),
    (lambda: [2 ** 62], True), (lambda: (4,) * 100, True),
])
def test_the_config_and_the_models_share_one_width_list_rule(make, taken):
    """model.hidden's check restated oni.models._check_hidden's (sequence, at most 100
    layers, ints in [1, 2**62]); both callers keep it, and take or refuse the same lists."""
    check = cfgmod.SCHEMA["model"]["hidden"].check
    if taken:
        assert check(make(), "model.hidden") == list(_check_hidden(make()))
        return
    with pytest.raises(ConfigError, match=r"^config key 'model\.hidden(\[0\])?': ") as info:
        check(make(), "model.hidden")
    assert str(info.value).count("model.hidden") == 1, str(info.value)
    with pytest.raises((TypeError, ValueError)) as info:
        MLP(4, 2, make())
    assert not isinstance(info.value, ConfigError)
    assert re.match(r"^hidden(\[0\])? must ", str(info.value)), str(info.value)


def test_config_messages_of_fuzz_pass_7(tmp_path):
    """The key is named once, with the list index (it read "config key
    'attacks.shadow.hidden': config['hidden'][0] must be >= 1"); an unknown name built by
    aliases was printed whole (52 MB from a 446-byte file); resolve_config's own arguments
    are named."""
    with pytest.raises(ConfigError, match=r"^config key 'attacks\.shadow\.hidden\[0\]': must "
                                          r"be >= 1, got 0$"):
        resolve_config(sets=["attacks.shadow.hidden=[0]"])
    with pytest.raises(ConfigError, match=r"^config key 'attacks\.shadow\.prediction_widths': "
                                          r"needs at least one width"):
        resolve_config(sets=["attacks.shadow.prediction_widths=[]"])
    levels = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    bomb = f"[{', '.join(levels)}]"  # 10 million leaves in 300 bytes
    for item in (f"defenses.run=[{bomb}]", f"attacks.shadow.fit_on={bomb}"):
        with pytest.raises(ConfigError) as info:
            resolve_config(sets=[item])
        assert len(str(info.value)) < 1000, len(str(info.value))
    with pytest.raises(TypeError, match="sets must be a list of 'key=value' strings"):
        resolve_config(sets="train.epochs=3")  # was read as items 't', 'r', ...
    assert resolve_config(sets=None) == resolve_config()
    with pytest.raises(ConfigError, match="config_file must be the path of a YAML file, got ''"):
        resolve_config("")  # it said "config file '.' is a directory"


def test_yaml_numbers_follow_yaml_1_2_and_the_dump_reads_back():
    """PyYAML's YAML 1.1 read 010 as eight, 1:04 as 64 and 0b11 as 3 without a word, and
    -.5 as a string; a path such as '1e3' was dumped unquoted, and the dump read back as
    the float 1000.0 (fuzz pass 7)."""
    read = {"010": 10, "1_000": 1000, "0x1f": 31, "0o17": 15, "-.5": -0.5, "+.5": 0.5,
            "1e3": 1000.0, "-3": -3, "1.": 1.0, "1:04": "1:04", "0b11": "0b11", ".inf": math.inf,
            "0x_": "0x_", "!!int 0b11": 3, "!!int -0x1f": -31}
    for text, value in read.items():
        got = cfgmod.load_yaml(f"a: {text}", source="t")["a"]
        assert got == value and type(got) is type(value), (text, got)
    for text in ("!!int 1:04", "!!int --3", "!!int 0x"):  # was a bare ValueError
        with pytest.raises(ConfigError, match=r"t: not valid YAML: '.*' is not an integer"):
            cfgmod.load_yaml(f"a: {text}", source="t")
    for value in ["1e3", "010", "1:04", "-.5", "1_000", "0x1f", "yes", "null", "~", ".inf",
                  "2026-12-07", "plain", 1e-5, -0.5, 10, True, None]:
        assert cfgmod.load_yaml(cfgmod.dump_yaml({"a": value}), source="d") == {"a": value}
    config = resolve_config(sets=["data.cache_dir='1e3'", "train.epochs=010"])
    assert config["data"]["cache_dir"] == "1e3" and config["train"]["epochs"] == 10
    assert cfgmod.load_yaml(cfgmod.dump_yaml(config), source="dump") == config


def test_help_states_each_bound_as_the_check_applies_it():
    """--help showed train.lr's bound rounded (3.40282e+37) and no upper bound for seeds and
    sizes; each stated bound is now the one the check applies, to the last bit."""
    from oni._checks import MAX_ADAM_LR, MAX_SEED, MAX_SIZE
    text = " ".join(cfgmod.describe_schema(width=200).split())
    assert f"train.lr Adam learning rate (the paper: 1e-3) [number in (0.0, {MAX_ADAM_LR!r}]]" \
        in text
    assert f"[int in [0, {MAX_SEED - 1}]]" in text and f"[int in [1, {MAX_SIZE}]]" in text
    for key, bound, past in (("train.lr", repr(MAX_ADAM_LR),
                              repr(math.nextafter(MAX_ADAM_LR, math.inf))),
                             ("seed", str(MAX_SEED - 1), str(MAX_SEED)),
                             ("data.synthetic.d", str(MAX_SIZE), str(MAX_SIZE + 1))):
        resolve_config(sets=[f"{key}={bound}"], check_files=False)
        with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")):
            resolve_config(sets=[f"{key}={past}"], check_files=False)


def test_dry_run_checks_the_device_settings_as_the_run_does(capsys):
    """--dry-run printed a config with the tf32 opt-in on a CPU run that oni run refuses."""
    assert cli.main(["run", "--dry-run", "--set", "device=cpu",
                     "--set", "defenses.oni.precision=tf32"]) == 2
    captured = capsys.readouterr()
    assert "tf32 needs a CUDA device" in captured.err and not captured.out


def test_lira_alone_takes_a_small_shadow_pool():
    """LiRA offline needs a pool of 2 rows (online adds the target's): the 4-row rule of the
    other shadow attacks is not its own."""
    for attack in ("lira_offline", "lira_online"):
        resolve_config(sets=["splits.shadow_pool=2", f"attacks.run=[{attack}]"])


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*' is a directory; give a YAML file"):
        resolve_config(tmp_path)  # it said "does not exist"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        resolve_config(bad_yaml)
    # a key given twice: PyYAML kept the last one, so the user's first setting was lost
    for text, key in (("train: {epochs: 5}\ntrain: {lr: 0.01}\n", "train"),
                      ("train:\n  epochs: 5\n  epochs: 7\n", "epochs")):
        bad_yaml.write_text(text)
        with pytest.raises(ConfigError, match=f"not valid YAML: the key '{key}' is given twice"):
            resolve_config(bad_yaml)
    merged = tmp_path / "merge.yaml"  # merge keys still work
    merged.write_text("defenses:\n  oni: &o {eps: 0.2}\n  uniform:\n    <<: *o\n")
    assert resolve_config(merged)["defenses"]["uniform"]["eps"] == 0.2
    # aliases nested nine deep: 9^9 entries if printed in full; the message stays short
    lines = ["seed:", "- &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"- &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bad_yaml.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="'seed': expected an int") as info:
        resolve_config(bad_yaml)
    assert len(str(info.value)) < 1000
    bad_yaml.write_text("seed: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="bad.yaml: the YAML is nested too deeply"):
        resolve_config(bad_yaml)
    bad_yaml.write_bytes(b"train:\n  epochs: \xff\n")
    with pytest.raises(ConfigError, match="bad.yaml' is not UTF-8 text"):
        resolve_config(bad_yaml)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        resolve_config(not_mapping)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"'train\.epocs'.*typo\.yaml"):
        resolve_config(typo)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="'data.path'.*preset 'paper'"):
        resolve_config(preset="paper")


@pytest.mark.parametrize("item", ["train.epochs", "=3", "train..epochs=3"])
def test_malformed_set_items(item):
    with pytest.raises(ConfigError, match="--set"):
        resolve_config(sets=[item])


def test_cli_reports_config_errors_without_a_traceback(capsys, tmp_path):
    code = cli.main(["run", "--set", "train.epochs=ten", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: config key 'train.epochs'" in err and "Traceback" not in err
    assert cli.main(["run", "--set", "data.path=/no/such.csv"]) == 2
    assert "'data.path'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written for a bad config
    # the tf32 opt-in needs a GPU: refused before anything is trained or written
    assert cli.main(["run", "--set", "defenses.oni.precision=tf32", "--set", "device=cpu",
                     "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "defenses.oni.precision: tf32 needs a CUDA device, the run is on cpu" in err
    assert "Traceback" not in err
    assert not (tmp_path / "t").exists()


def test_dry_run_prints_the_resolved_config(capsys):
    assert cli.main(["run", "--dry-run", "--set", "train.epochs=3"]) == 0
    printed = cfgmod.load_yaml(capsys.readouterr().out, source="stdout")
    assert printed == resolve_config(sets=["train.epochs=3"])


def test_stage_hash_depends_on_settings_and_parents():
    a = cfgmod.stage_hash("target", {"train.epochs": 2}, ["p"])
    assert a == cfgmod.stage_hash("target", {"train.epochs": 2}, ["p"])
    assert a != cfgmod.stage_hash("target", {"train.epochs": 3}, ["p"])
    assert a != cfgmod.stage_hash("target", {"train.epochs": 2}, ["q"])
    subset = cfgmod.config_subset(resolve_config(), ["train", "defenses.oni.eps"])
    assert subset["train.epochs"] == 20 and subset["defenses.oni.eps"] == 1.0
    assert cfgmod.diff_keys({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b", "c"]


# ----------------------------------------------------------------------------- end to end

def test_run_end_to_end_writes_every_result(full_run, tiny_yaml):
    out = full_run
    config = cfgmod.load_yaml((out / "config.yaml").read_text(), source="config.yaml")
    assert config == resolve_config(tiny_yaml)
    res = _results(out)
    defenses = ["undefended", "uniform", "oni", "dynanoise"]
    attacks = config["attacks"]["run"]
    assert list(res["defenses"]) == defenses
    for name in defenses:
        facts = res["defenses"][name]
        for key in ("train_acc", "test_acc", "generalization_gap", "midput",
                    "mean_balanced_attack_acc"):
            assert facts[key] is not None, (name, key)
        assert list(res["attacks"][name]) == attacks
        for attack in attacks:
            metrics = res["attacks"][name][attack]["metrics"]
            for key in ("auc", "tpr@0.1%fpr", "tpr@1%fpr", "accuracy", "balanced_accuracy",
                        "oracle_accuracy", "oracle_balanced_accuracy"):
                assert 0.0 <= metrics[key] <= 1.0, (name, attack, key)
    assert res["defenses"]["undefended"]["midput"] == 0.0
    assert res["defenses"]["oni"]["report"]["feasible_rate"] >= 0.0
    assert res["defenses"]["oni"]["history"]["epochs"] == [1, 2]
    # the CSV: one row per defense x attack, every column
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].split(",") == list(reportmod.CSV_COLUMNS)
    assert len(lines) == 1 + len(defenses) * len(attacks)
    # the report and its figures
    text = (out / "report.md").read_text()
    assert "| defense | attack | AUC |" in text and "MIDPUT" in text
    for name in reportmod.FIGURES.values():
        png = out / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}" in text
    # nothing half-written is left behind
    assert not list(out.rglob(".*.tmp-*"))


def test_rerun_reuses_every_stage(full_run, tiny_yaml, capsys):
    before = _metrics(full_run)
    assert cli.main(["run", str(tiny_yaml), "--out", str(full_run), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert all(_stage_status(full_run).values())
    assert "0 stages computed" in captured.out and str(full_run) in captured.out
    assert captured.out.count("\n") == 1  # the one-line summary
    assert "reused" in captured.err
    assert _metrics(full_run) == before


def test_report_rebuilds_from_saved_results(full_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    text = (copy / "report.md").read_text()
    csv_text = (copy / "results.csv").read_text()
    shutil.rmtree(copy / "figures")
    (copy / "report.md").unlink()
    (copy / "results.csv").unlink()
    shutil.rmtree(copy / "stages")  # the report needs only results.json and roc.npz
    assert cli.main(["report", str(copy)]) == 0
    assert "rebuilt" in capsys.readouterr().out
    assert (copy / "report.md").read_text() == text
    assert (copy / "results.csv").read_text() == csv_text
    assert sorted(p.name for p in (copy / "figures").iterdir()) == \
        sorted(reportmod.FIGURES.values())
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2


# ----------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def small_reference(tiny_yaml, tmp_path_factory):
    """An uninterrupted run of the smaller config, to compare resumed runs with."""
    out = tmp_path_factory.mktemp("runs") / "small"
    assert _run([tiny_yaml, "--out", out, *sum((["--set", s] for s in SMALL_SETS), [])]) == 0
    return out


def _small(tiny_yaml, out, *sets):
    return [tiny_yaml, "--out", out, *sum((["--set", s] for s in [*SMALL_SETS, *sets]), [])]


def test_resume_after_a_failed_stage(tiny_yaml, small_reference, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while training the ONI model")

    monkeypatch.setattr(cli, "_oni_distill", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        _run(_small(tiny_yaml, out))
    done = {p.parent.name for p in (out / "stages").glob("*/stage.json")}
    assert {"splits", "target", "oni-phi", "oni-eta"} <= done
    assert "defense-oni" not in done and not (out / "results.json").exists()
    monkeypatch.undo()
    assert _run(_small(tiny_yaml, out)) == 0
    status = _stage_status(out)
    assert status["splits"] and status["target"] and status["oni-phi"] and status["oni-eta"]
    assert not status["defense-oni"] and not status["attack-oni-lira_online"]
    assert _metrics(out) == _metrics(small_reference)


def test_report_of_an_unfinished_run_says_how_to_finish_that_run(
        tiny_yaml, small_reference, tmp_path, monkeypatch, capsys):
    """The hint was `oni run --out DIR`: it drops the run's config file and --set options, so
    following it ran the default preset into DIR and recomputed every stage. The hint now
    names the same command, or a copy of the run's resolved config.yaml, which it follows
    here literally: the finished stages are reused."""
    out = tmp_path / "run"
    monkeypatch.setattr(cli, "_oni_distill", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _run(_small(tiny_yaml, out))
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"run `oni run --out {out}`" not in err, err
    assert "its run has not finished. Finish it with the same `oni run` command that " \
           "started it" in err, err
    command = re.search(r"`(cp .*? && oni run .*?)`", err).group(1)
    assert command == f"cp {out / 'config.yaml'} CONFIG.yaml && oni run CONFIG.yaml " \
                      f"--out {out}", err
    shutil.copy(out / "config.yaml", tmp_path / "CONFIG.yaml")
    assert _run([tmp_path / "CONFIG.yaml", "--out", out]) == 0
    status = _stage_status(out)
    assert status["target"] and status["oni-eta"] and not status["defense-oni"]
    assert _metrics(out) == _metrics(small_reference)
    # a relative data.path holds only from the directory the run started in
    (out / "results.json").unlink()
    config = resolve_config(sets=["data.path=data/purchase.csv"], check_files=False)
    (out / "config.yaml").write_text(cfgmod.dump_yaml(config))
    assert "from the directory the run started in (data.path 'data/purchase.csv' is " \
           "relative)" in cli._unfinished_run_hint(out)
    # not a run's directory: no command to resume
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not an oni run directory (no results.json): give the --out " \
           f"directory of a finished `oni run`" in err, err


def test_resume_after_kill_9(tiny_yaml, small_reference, tmp_path):
    """A real `kill -9` in the middle of a run, then the same command again."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "oni.cli", "run", *map(str, _small(tiny_yaml, out)), "-q"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env)
    marker = out / "stages" / "defense-oni" / "stage.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run ended before the kill point"
    assert not (out / "results.json").exists()
    assert _run(_small(tiny_yaml, out)) == 0  # resumed in-process: no second torch import
    status = _stage_status(out)
    assert status["target"] and status["defense-oni"]
    assert _metrics(out) == _metrics(small_reference)


def test_corrupt_or_missing_stage_files_are_recomputed(small_reference, tiny_yaml, tmp_path,
                                                       capsys):
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    scores = out / "stages" / "attack-oni-lira_online" / "scores.npz"
    scores.write_bytes(scores.read_bytes()[:100])          # a torn file
    (out / "stages" / "defense-dynanoise" / "stage.json").unlink()   # a stage never finished
    (out / "stages" / "oni-phi" / "stage.json").write_text("{not json")  # a torn record
    (out / "stages" / "oni-eta" / "stage.json").write_text("[" * 100_000)  # json recurses
    weights = next((out / "stages" / "defense-oni" / "model").glob("weights.*"))
    weights.write_bytes(weights.read_bytes()[:-8])  # a model's weights, torn
    # a record edited into other valid JSON: its facts were used (a KeyError, mid-run)
    edited = out / "stages" / "target" / "stage.json"
    record = json.loads(edited.read_text())
    del record["meta"]["utility"]
    edited.write_text(json.dumps(record))
    # a torn model.json: the model's save refused the stage directory as another's files
    (out / "stages" / "target" / "model" / "model.json").write_text("{torn")
    (out / "stages" / "attack-undefended-reference" / "scores.npz").unlink()
    assert cli.main(["run", *map(str, _small(tiny_yaml, out)), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "attack-undefended-reference: its file scores.npz is missing or corrupt: " \
        "recomputing" in err, err
    status = _stage_status(out)
    assert not status["attack-oni-lira_online"] and not status["defense-dynanoise"]
    assert not status["oni-phi"] and not status["defense-oni"] and not status["target"]
    assert status["splits"]
    assert _metrics(out) == _metrics(small_reference)


def test_changed_settings_recompute_only_dependent_stages(small_reference, tiny_yaml, tmp_path,
                                                          capsys):
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    assert cli.main(["run", *map(str, _small(tiny_yaml, out, "defenses.oni.tau_fraction=0.8")),
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    # the one reason, not also "it builds on changed stages (oni-phi)": oni-phi was reused
    assert "oni-eta: settings changed (defenses.oni.tau_fraction: 0.5 -> 0.8): recomputing" \
        in err, err
    status = _stage_status(out)
    recomputed = {name for name, reused in status.items() if not reused}
    assert recomputed == {"oni-eta", "defense-oni", "attack-oni-reference",
                          "attack-oni-lira_online"}
    assert _results(out)["config"]["defenses"]["oni"]["tau_fraction"] == 0.8
    # a change upstream (the training recipe) recomputes everything after the splits
    assert cli.main(["run", *map(str, _small(tiny_yaml, out, "train.epochs=3")), "-q"]) == 0
    status = _stage_status(out)
    assert status["splits"] and not any(v for k, v in status.items() if k != "splits")


def _stage_hashes(run_dir):
    return {path.parent.name: json.loads(path.read_text())["hash"]
            for path in (Path(run_dir) / "stages").glob("*/stage.json")}


def test_settings_a_stage_does_not_use_recompute_nothing(small_reference, tiny_yaml, tmp_path):
    """attacks.adaptive recomputed the attacks on the undefended model, and the data's path
    or the (unused) synthetic settings recomputed every stage, results unchanged."""
    from oni.data import save_npz, synthetic_purchase
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    assert cli.main(["run", *map(str, _small(tiny_yaml, out, "attacks.adaptive=false")),
                     "-q"]) == 0
    recomputed = {name for name, reused in _stage_status(out).items() if not reused}
    assert recomputed == {f"attack-{d}-{g}" for d in ("oni", "dynanoise")
                          for g in ("reference", "lira_online")}
    # the same rows from a file, with synthetic settings that are now unused
    data_file = tmp_path / "same-rows.npz"
    save_npz(synthetic_purchase(600, d=20, k=5, seed=0), data_file)
    assert cli.main(["run", *map(str, _small(tiny_yaml, out, "attacks.adaptive=false",
                                             f"data.path={data_file}",
                                             "data.synthetic.n=900")), "-q"]) == 0
    assert all(_stage_status(out).values())


def _as_before_2026_12_07(run_dir, config, old_fingerprint="185454e5d34bb812"):
    """Rewrites a run's stage records as oni wrote them before 2026-12-07 (record version 2;
    the old rule, stated here on its own): the splits stage hashed data.path, data.format and
    data.synthetic beside a fingerprint of the data's bytes (the tiny data's, by default),
    and every attack stage attacks.adaptive."""
    kinds = {"splits": "splits", "target": "target", "oni-phi": "phi", "oni-eta": "eta"}
    order = ["splits", "target", "oni-phi", "oni-eta"]
    names = sorted(p.name for p in (Path(run_dir) / "stages").iterdir())
    order += [n for n in names if n.startswith("defense-")] + \
        [n for n in names if n.startswith("attack-")]
    old_hashes = {}
    for name in order:
        path = Path(run_dir) / "stages" / name / "stage.json"
        record = json.loads(path.read_text())
        del record["sha256"]
        settings = dict(record["settings"])
        if name == "splits":  # and the fingerprint was of the bytes alone
            settings.update(cfgmod.config_subset(config, ("data.path", "data.format",
                                                          "data.synthetic")),
                            data_fingerprint=old_fingerprint)
        if name.startswith("attack-"):
            del settings["adaptive_shadows"]
            settings = {"seed": settings.pop("seed"),  # the old order, which messages keep
                        "attacks.adaptive": config["attacks"]["adaptive"], **settings}
        parents = {parent: old_hashes[parent] for parent in record["parents"]}
        kind = kinds.get(name, name.split("-")[0])
        record.update(settings=settings, parents=parents, version=2,
                      hash=cfgmod.stage_hash(kind, settings, sorted(parents.values())))
        old_hashes[name] = record["hash"]
        path.write_bytes(cli._json_bytes({**record, "sha256": cli._record_digest(record)}))
    return old_hashes


def test_a_run_recorded_under_the_old_stage_hashes_is_adopted(small_reference, tiny_yaml,
                                                             tmp_path, capsys):
    new_hashes = _stage_hashes(small_reference)
    config = cfgmod.load_yaml((small_reference / "config.yaml").read_text(), source="config")
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    old_hashes = _as_before_2026_12_07(out, config)
    assert len(old_hashes) == 12 and all(old_hashes[n] != new_hashes[n] for n in old_hashes)
    # what oni wrote for this config before the change (e44ae94): the old rule is stated right
    assert (old_hashes["splits"], old_hashes["target"], old_hashes["oni-eta"]) == \
        ("e53ec969b7eb2bc0", "5526da360755552b", "e8feeca4be09ca65")
    assert cli.main(["run", *map(str, _small(tiny_yaml, out)), "-q"]) == 0
    assert all(_stage_status(out).values())  # nothing recomputed
    assert _stage_hashes(out) == new_hashes  # each record now under today's hash
    assert _metrics(out) == _metrics(small_reference)
    # adopted over two runs (the first runs only some stages: the others' records name
    # their parents' old hashes), and from a data file that has moved since
    from oni.data import save_npz, synthetic_purchase
    out = tmp_path / "moved"
    shutil.copytree(small_reference, out)
    moved = tmp_path / "new-place.npz"
    save_npz(synthetic_purchase(600, d=20, k=5, seed=0), moved)
    _as_before_2026_12_07(out, {**config, "data": {**config["data"],
                                                   "path": str(tmp_path / "old-place.npz")}})
    assert cli.main(["run", *map(str, _small(tiny_yaml, out, f"data.path={moved}",
                                             "attacks.run=[metric_loss]")), "-q"]) == 0
    assert all(_stage_status(out).values())
    assert cli.main(["run", *map(str, _small(tiny_yaml, out, f"data.path={moved}")),
                     "-q"]) == 0
    assert all(_stage_status(out).values()) and _stage_hashes(out) == new_hashes
    # the attacks on the undefended model were adopted under either attacks.adaptive
    out = tmp_path / "other"
    shutil.copytree(small_reference, out)
    _as_before_2026_12_07(out, config)
    assert cli.main(["run", *map(str, _small(tiny_yaml, out, "attacks.adaptive=false")),
                     "--no-progress"]) == 0
    recomputed = {name for name, reused in _stage_status(out).items() if not reused}
    assert recomputed == {f"attack-{d}-{g}" for d in ("oni", "dynanoise")
                          for g in ("reference", "lira_online")}
    # an old record whose settings changed says which (in today's keys), not that its
    # parents did
    err = capsys.readouterr().err
    assert "attack-oni-reference: settings changed (adaptive_shadows: True -> False, " \
        "defenses.oni.tau_fraction: 0.5 -> None" in err, err
    out = tmp_path / "changed"
    shutil.copytree(small_reference, out)
    _as_before_2026_12_07(out, config)
    assert cli.main(["run", *map(str, _small(tiny_yaml, out, "defenses.dynanoise.draws=2")),
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "defense-dynanoise: settings changed (defenses.dynanoise.draws: 1 -> 2): " \
        "recomputing" in err, err
    assert "oni-eta: done earlier, reused" in err


def test_a_second_concurrent_run_is_refused(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    with cli._run_lock(out):
        assert _run([tiny_yaml, "--out", out]) == 2
    assert "another oni run" in capsys.readouterr().err


@pytest.mark.parametrize("setting, step, named", [
    ("model.hidden=[4000000000]", "stage target", "model.hidden = [4000000000]"),
    ("data.synthetic.n=100000000000", "loading the data", "data.synthetic.n = 100000000000"),
])
def test_a_run_out_of_memory_names_the_step_and_its_size_settings(tiny_yaml, tmp_path, capsys,
                                                                  setting, step, named):
    """A size no machine holds ends in the allocator's error, which names no setting: the
    run restates it (exit 1, no traceback) with the step and the settings that size it."""
    out = tmp_path / "run"
    assert _run([tiny_yaml, "--out", out, "--set", setting]) == 1
    err = capsys.readouterr().err
    assert f"{step}" in err and "ran out of memory" in err and named in err, err
    assert "Traceback" not in err and "enforce fail" not in err
    if step == "stage target":  # the stages before it are kept
        assert (out / "stages" / "splits" / "stage.json").is_file()


def test_an_attack_out_of_memory_names_the_attacked_defense_settings(small_reference,
                                                                     tiny_yaml, tmp_path,
                                                                     monkeypatch, capsys):
    """Queries of a DynaNoise model are sized by its draws, a setting outside the attack
    stage's own: a CUDA out-of-memory error in that stage names it too."""
    import oni.attacks
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 "
                                     "has a total capacity of 79.19 GiB")

    monkeypatch.setattr(oni.attacks, "_run_attacks", out_of_memory)
    args = _small(tiny_yaml, out, "attacks.lira_online.n_shadows=6")
    assert cli.main(["run", *map(str, args), "-q"]) == 1
    err = capsys.readouterr().err
    assert "stage attack-undefended-lira_online ran out of memory: it asked for 20.00 GiB" \
        in err, err
    assert "attacks.lira_online.n_shadows = 6" in err and "model.hidden = [16]" in err
    monkeypatch.setenv("ONI_TRACEBACK", "1")  # the original error stays reachable
    with pytest.raises(cli.RunOutOfMemory) as caught:
        cli.main(["run", *map(str, args), "-q"])
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    monkeypatch.delenv("ONI_TRACEBACK")
    # against DynaNoise, the attacked defense's settings are named too
    monkeypatch.undo()
    real_run_attacks = oni.attacks._run_attacks

    def out_of_memory_against_dynanoise(attacks, target, *args, **kwargs):
        if target.name == "dynanoise":
            out_of_memory()
        return real_run_attacks(attacks, target, *args, **kwargs)

    monkeypatch.setattr(oni.attacks, "_run_attacks", out_of_memory_against_dynanoise)
    args = _small(tiny_yaml, out, "attacks.run=[lira_online]", "attacks.adaptive=false",
                  "defenses.dynanoise.draws=3")
    assert cli.main(["run", *map(str, args), "-q"]) == 1
    err = capsys.readouterr().err
    assert "stage attack-dynanoise-lira_online" in err and "defenses.dynanoise.draws = 3" \
        in err, err


def test_staged_oni_equals_defend(tmp_path):
    """`oni run` computes ONI's phi, eta and model as separate stages; together they must
    give the model oni.defend('oni') gives."""
    from oni.defenses import defend
    from oni.train import TrainConfig
    data = __import__("oni").synthetic_purchase(300, d=20, k=4)
    x, y = data.x[:200], data.y[:200]
    tc = TrainConfig(epochs=2, batch_size=32, device="cpu", progress=False)
    cfg = dict(resolve_config(sets=["defenses.oni.n_permutations=4", "defenses.oni.max_iter=5",
                                    "defenses.oni.starts=1"])["defenses"]["oni"])
    base = defend("undefended", x, y, train_config=tc, hidden=(16,)).model
    reference = defend("oni", x, y, config=cfg, train_config=tc, base_model=base, seed=3)
    phi = cli._oni_phi(base, x, cfg, 3, torch.device("cpu"))
    noise = cli._oni_eta(base, x, phi.values, cfg, 3, torch.device("cpu"))
    assert torch.equal(noise.eta, reference.artifacts["noise"].eta)
    model, history = cli._oni_distill(base, x, y, noise.eta, cfg, tc, None, None,
                                      torch.device("cpu"))
    for (name, a), b in zip(model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert history.train_loss == reference.history.train_loss


# ----------------------------------------------------------------------------- shapley, noise

@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    import oni
    from oni.models import MLP, save_model
    from oni.train import TrainConfig, train_model
    root = tmp_path_factory.mktemp("solver")
    data = oni.synthetic_purchase(120, d=12, k=3, seed=1)
    model = MLP(12, 3, (8,))
    train_model(model, data.x, data.y, config=TrainConfig(epochs=3, progress=False,
                                                          device="cpu"))
    save_model(model, root / "model")
    oni.save_npz(data, root / "data.npz")
    return root, model, data


def test_shapley_command(model_and_data, capsys):
    import oni
    root, model, data = model_and_data
    out = root / "phi.npy"
    assert cli.main(["shapley", str(root / "model"), str(root / "data.npz"), "--out", str(out),
                     "--n-permutations", "6", "--seed", "2", "--rows", "10:40",
                     "--stderr-out", str(root / "se.npy"), "--device", "cpu"]) == 0
    assert "phi written" in capsys.readouterr().out
    phi = np.load(out)
    # the rows' own walks, as in a run over the whole file (they got rows 0:30's)
    expected = oni.shapley_values(model, data.x[10:40], n_permutations=6, seed=2,
                                  row_offset=10)
    np.testing.assert_array_equal(phi, expected.values.numpy())
    whole = oni.shapley_values(model, data.x, n_permutations=6, seed=2).values[10:40]
    np.testing.assert_allclose(phi, whole.numpy(), rtol=0, atol=1e-6)  # other batches
    assert np.load(root / "se.npy").shape == (30, 12)
    np.save(root / "groups.npy", np.arange(12, dtype=np.int32) // 3)  # 4 groups of 3
    assert cli.main(["shapley", str(root / "model"), str(root / "data.npz"), "--out", str(out),
                     "--n-permutations", "6", "--seed", "2", "--rows", "10:40",
                     "--groups", str(root / "groups.npy"), "--device", "cpu"]) == 0
    assert "30 rows x 4 groups" in capsys.readouterr().out
    expected = oni.shapley_values(model, data.x[10:40], n_permutations=6, seed=2,
                                  groups=torch.arange(12) // 3, row_offset=10)
    np.testing.assert_array_equal(np.load(out), expected.values.numpy())
    # uint64 ids beyond int64 keep their order (an int64 cast would wrap them negative)
    np.save(root / "big_groups.npy", (np.arange(12, dtype=np.uint64) // 3) * np.uint64(2 ** 62))
    assert cli.main(["shapley", str(root / "model"), str(root / "data.npz"), "--out",
                     str(root / "big.npy"), "--n-permutations", "6", "--seed", "2", "--rows",
                     "10:40", "--groups", str(root / "big_groups.npy"), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(root / "big.npy"), expected.values.numpy())
    # a per-group phi is not the per-feature phi the noise needs
    assert cli.main(["noise", str(root / "model"), str(root / "data.npz"), "--out",
                     str(root / "eta.npy"), "--rows", "10:40", "--phi", str(out)]) == 2
    assert "4 values per row, but the data has d = 12" in capsys.readouterr().err
    np.save(root / "float_groups.npy", np.zeros(12))
    assert cli.main(["shapley", str(root / "model"), str(root / "data.npz"), "--out", str(out),
                     "--groups", str(root / "float_groups.npy"), "--device", "cpu"]) == 2
    assert "--groups" in capsys.readouterr().err
    for rows, message in (("50:9999", "must select rows within 0:120"),
                          ("5", "expected START:STOP"),  # row 5? 5 rows? 5:END? ask
                          ("a:b", "expected START:STOP"), ("7:7", "must select rows")):
        assert cli.main(["shapley", str(root / "model"), str(root / "data.npz"), "--out",
                         str(out), "--rows", rows]) == 2
        assert f"--rows '{rows}': {message}" in capsys.readouterr().err


def test_noise_command(model_and_data, capsys):
    import oni
    root, model, data = model_and_data
    phi_path = root / "phi_all.npy"
    assert cli.main(["shapley", str(root / "model"), str(root / "data.npz"), "--out",
                     str(phi_path), "--n-permutations", "4", "--device", "cpu"]) == 0
    out = root / "eta.npy"
    assert cli.main(["noise", str(root / "model"), str(root / "data.npz"), "--out", str(out),
                     "--phi", str(phi_path), "--tau-fraction", "0.3", "--eps", "0.8",
                     "--beta", "0.4", "--max-iter", "10", "--starts", "1", "--seed", "5",
                     "--details", str(root / "details.npz"), "--device", "cpu"]) == 0
    assert "eta written" in capsys.readouterr().out
    eta = np.load(out)
    expected = oni.optimal_noise(model, data.x, torch.from_numpy(np.load(phi_path)),
                                 tau_fraction=0.3, eps=0.8, beta=0.4, max_iter=10,
                                 refine_iter=oni.DEFAULTS["oni"]["refine_iter"],
                                 polish_iter=oni.DEFAULTS["oni"]["polish_iter"], starts=1,
                                 seed=5)
    np.testing.assert_array_equal(eta, expected.eta.numpy())
    with np.load(root / "details.npz") as details:
        np.testing.assert_array_equal(details["feasible"], expected.feasible.numpy())
    # phi computed here when not given; a phi of other rows is refused
    assert cli.main(["noise", str(root / "model"), str(root / "data.npz"), "--out", str(out),
                     "--max-iter", "3", "--device", "cpu"]) == 0
    assert np.load(out).shape == (120, 12)
    assert cli.main(["noise", str(root / "model"), str(root / "data.npz"), "--out", str(out),
                     "--phi", str(phi_path), "--rows", "0:10"]) == 2
    assert "--phi" in capsys.readouterr().err
    # --precision: the opt-in search arithmetic, as optimal_noise's precision=
    assert cli.main(["noise", str(root / "model"), str(root / "data.npz"), "--out", str(out),
                     "--phi", str(phi_path), "--tau-fraction", "0.3", "--eps", "0.8",
                     "--beta", "0.4", "--max-iter", "10", "--starts", "1", "--seed", "5",
                     "--precision", "bf16", "--device", "cpu"]) == 0
    expected = oni.optimal_noise(model, data.x, torch.from_numpy(np.load(phi_path)),
                                 tau_fraction=0.3, eps=0.8, beta=0.4, max_iter=10,
                                 refine_iter=oni.DEFAULTS["oni"]["refine_iter"],
                                 polish_iter=oni.DEFAULTS["oni"]["polish_iter"], starts=1,
                                 seed=5, precision="bf16")
    np.testing.assert_array_equal(np.load(out), expected.eta.numpy())
    capsys.readouterr()
    assert cli.main(["noise", str(root / "model"), str(root / "data.npz"), "--out", str(out),
                     "--phi", str(phi_path), "--precision", "tf32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--precision: tf32 needs a CUDA device, --device resolved to cpu" in err


def test_noise_command_counts_the_infeasible_rows_once(model_and_data, tmp_path):
    """Its summary line followed a raw `distributed.py:99: UserWarning` (and the source line)
    that said the same count; the summary now says what the warning added."""
    root, _, _ = model_and_data
    args = [sys.executable, "-m", "oni.cli", "noise", str(root / "model"),
            str(root / "data.npz"), "--out", str(tmp_path / "eta.npy"), "--tau", "1.098",
            "--eps", "0.01", "--max-iter", "5", "--n-permutations", "4", "--device", "cpu"]
    done = subprocess.run(args, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = re.search(r"oni noise: (\d+) of 120 rows reach entropy tau = 1\.0980 nats, the "
                      r"other (\d+) get their highest-entropy point inside their budget box "
                      r"and radius ball \(", done.stdout)
    assert found and int(found.group(1)) + int(found.group(2)) == 120, done.stdout
    assert int(found.group(2)) > 0
    assert "cannot reach entropy tau" not in done.stderr, done.stderr
    assert "UserWarning" not in done.stderr and ".py:" not in done.stderr, done.stderr


def test_warnings_are_short_lines_naming_the_stage_and_shadow(tiny_yaml, tmp_path, capsys):
    """`oni run` showed `cli.py:493: UserWarning: 14 of 600 rows cannot reach ...` and one
    `defenses.py:851` warning per adaptive shadow model, naming neither stage nor model,
    each followed by a line of oni's source. Now one line each, `oni run: warning: stage
    NAME: [adaptive shadow model J of K (DEFENSE defense): ]MESSAGE`; Python's display is
    restored after the command."""
    shown = warnings.showwarning
    assert _run([tiny_yaml, "--out", tmp_path / "run", "--set", "defenses.run=[undefended, oni]",
                 "--set", "attacks.run=[lira_online]", "--set", "defenses.oni.eps=0.001",
                 "--set", "defenses.oni.tau_fraction=0.999"]) == 0
    assert warnings.showwarning is shown
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and all(line.startswith("oni run: warning: stage ") for line in lines), err
    assert "UserWarning" not in err and ".py:" not in err, err
    rows = r"\d+ of 132 rows cannot reach entropy tau = 1\.6078 inside their budget box"
    assert re.fullmatch(rf"oni run: warning: stage oni-eta: {rows}.*", lines[0]), err
    shadows = [re.fullmatch(rf"oni run: warning: stage attack-oni-lira_online: adaptive "
                            rf"shadow model (\d) of 4 \(oni defense\): {rows}.*", line)
               for line in lines[1:]]
    assert all(shadows) and [int(m.group(1)) for m in shadows] == [1, 2, 3, 4], err


def test_solver_commands_findings_of_the_fuzz_pass(model_and_data, tmp_path, monkeypatch,
                                                  capsys):
    """Each part failed before: a label-remapped file explained other classes, --rows pieces
    got other walks than the whole run, a float64 baseline was compared with float32-rounded
    rows, '~' was checked expanded and written literally, output paths failed only after the
    work, a DynaNoise model was explained as its network with no word."""
    import oni
    from oni.models import save_model
    root, model, data = model_and_data
    model_dir, out = str(root / "model"), tmp_path / "out.npy"

    def run(*args):
        code = cli.main([args[0], model_dir if args[1] is None else str(args[1]),
                         *map(str, args[2:]), "--device", "cpu"])
        return code, capsys.readouterr()

    # --target label on a file lacking some classes: its labels were renumbered
    subset = data.subset(torch.nonzero(data.y > 0).squeeze(1))  # classes 1 and 2 of 3
    oni.save_npz(oni.data.Dataset(subset.x, subset.y - 1, (1, 2), "subset"),
                 tmp_path / "subset.npz")
    code, cap = run("shapley", None, tmp_path / "subset.npz", "--out", out, "--target", "label")
    assert code == 2 and "--target label: " in cap.err and "holds 2 classes (1, 2) but the " \
        "model has 3 outputs" in cap.err, cap.err
    first = data.subset(torch.nonzero(data.y < 2).squeeze(1))  # labelled 0 and 1: as is
    oni.save_npz(oni.data.Dataset(first.x, first.y, (0, 1), "first"), tmp_path / "first.npz")
    code, cap = run("shapley", None, tmp_path / "first.npz", "--out", out, "--target", "label",
                    "--n-permutations", "2")
    assert code == 0, cap.err
    code, cap = run("shapley", None, root / "data.npz", "--out", out, "--target", "3")
    assert code == 2 and "--target 3: the model has 3 classes, 0..2" in cap.err
    # --rows pieces join into the whole run (noise: its random starts are per row too)
    phi = oni.shapley_values(model, data.x, n_permutations=4, seed=0).values
    np.save(tmp_path / "phi.npy", phi.numpy())
    np.save(tmp_path / "phi_rows.npy", phi[30:50].numpy())
    flags = ["--tau-fraction", "0.5", "--max-iter", "8", "--starts", "2"]
    assert run("noise", None, root / "data.npz", "--out", tmp_path / "eta.npy",
               "--phi", tmp_path / "phi.npy", *flags)[0] == 0
    assert run("noise", None, root / "data.npz", "--out", tmp_path / "eta_rows.npy",
               "--phi", tmp_path / "phi_rows.npy", "--rows", "30:50", *flags)[0] == 0
    np.testing.assert_allclose(np.load(tmp_path / "eta_rows.npy"),
                               np.load(tmp_path / "eta.npy")[30:50], rtol=0, atol=1e-5)
    # a float64 model, rows and baseline: the features equal to the baseline get exactly 0
    save_model(model.double(), tmp_path / "model64")
    model.float()
    x = np.random.default_rng(0).random((6, 12))
    np.savez(tmp_path / "x64.npz", x=x, y=np.arange(6) % 3)
    baseline = np.where(np.arange(12) % 2 == 0, x[0], 0.0)  # row 0's even features
    np.save(tmp_path / "b64.npy", baseline)
    assert run("shapley", tmp_path / "model64", tmp_path / "x64.npz", "--out", out,
               "--baseline", tmp_path / "b64.npy", "--n-permutations", "8")[0] == 0
    assert (np.load(out)[0, ::2] == 0).all()
    np.save(tmp_path / "huge.npy", np.full(12, 1e300))  # was rounded to inf, then "NaN or Inf"
    code, cap = run("shapley", tmp_path / "model64", tmp_path / "x64.npz", "--out", out,
                    "--baseline", tmp_path / "huge.npy")
    assert code == 2 and "values beyond float32's range (the data's), up to 1e+300" in cap.err
    # '~' in an output path is the home directory, as in the checks
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    assert run("shapley", None, root / "data.npz", "--out=~/phi.npy", "--rows", "0:4",
               "--n-permutations", "2")[0] == 0
    assert (tmp_path / "home" / "phi.npy").is_file() and not (tmp_path / "~").exists()
    # output paths that cannot be written are refused before the work
    for flags, message in ((["--out", root / "data.npz" / "phi.npy"], "is not a directory"),
                           (["--out", ""], "--out: an empty path"),
                           (["--out", out, "--stderr-out", ""], "--stderr-out: an empty path")):
        code, cap = run("shapley", None, root / "data.npz", *flags)
        assert code == 2 and message in cap.err, cap.err
    # a DynaNoise model: its network is what the solvers take, and the command says so
    defended = oni.defend("dynanoise", data.x, data.y, base_model=model, seed=0)
    oni.save_defended(defended, tmp_path / "dynanoise")
    code, cap = run("shapley", tmp_path / "dynanoise", root / "data.npz", "--out", out,
                    "--rows", "0:4", "--n-permutations", "2")
    assert code == 0 and "holds a DynaNoise defense" in cap.err, cap.err


def test_solver_commands_take_a_model_in_its_own_dtype(model_and_data, tmp_path, capsys):
    """The data loads as float32; a float64 model gets float64 rows (it was refused with
    advice to cast, which the command line cannot do), a bfloat16 one a message."""
    import copy

    import oni
    from oni.models import save_model
    root, model, data = model_and_data
    model64 = copy.deepcopy(model).double()
    save_model(model64, tmp_path / "model64")
    phi_path, eta_path = tmp_path / "phi.npy", tmp_path / "eta.npy"
    np.save(tmp_path / "baseline.npy", np.full(12, 0.5, dtype=np.float32))
    assert cli.main(["shapley", str(tmp_path / "model64"), str(root / "data.npz"), "--out",
                     str(phi_path), "--n-permutations", "6", "--rows", "0:20",
                     "--baseline", str(tmp_path / "baseline.npy"), "--device", "cpu"]) == 0
    expected = oni.shapley_values(model64, data.x[:20].double(),
                                  torch.full((12,), 0.5, dtype=torch.float64), n_permutations=6)
    phi = np.load(phi_path)
    assert phi.dtype == np.float64
    np.testing.assert_array_equal(phi, expected.values.numpy())
    assert cli.main(["noise", str(tmp_path / "model64"), str(root / "data.npz"), "--out",
                     str(eta_path), "--phi", str(phi_path), "--rows", "0:20", "--max-iter", "5",
                     "--starts", "1", "--device", "cpu"]) == 0
    assert np.load(eta_path).dtype == np.float64
    save_model(copy.deepcopy(model).to(torch.bfloat16), tmp_path / "model16")
    capsys.readouterr()
    assert cli.main(["shapley", str(tmp_path / "model16"), str(root / "data.npz"), "--out",
                     str(phi_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "holds torch.bfloat16 weights; the solvers take float32 or float64 models" in err


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["run", "shapley", "noise", "report"])
def test_every_option_is_explained(command, capsys):
    parser = _subparsers(cli.build_parser())[command]
    for action in parser._actions:
        assert action.help, f"oni {command}: {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        for option in action.option_strings:
            assert option in text
    if command == "run":  # the config keys are listed too
        assert "defenses.run" in text and "train.epochs" in text and "--preset" in text


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "oni.cli", "--help"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "shapley" in proc.stdout and "report" in proc.stdout


def test_solver_commands_refuse_bad_files_and_values_without_a_traceback(model_and_data,
                                                                         capsys, tmp_path):
    """Outputs that would overwrite an input or each other, unreadable --phi/--baseline
    files and values the library refuses: a one-line error naming them, exit 2, and
    nothing written."""
    root, model, data = model_and_data
    model_dir, data_path = str(root / "model"), str(root / "data.npz")
    out = tmp_path / "o.npy"
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    (tmp_path / "torn.npy").write_bytes(b"\x93NUMPY\x01")
    np.savez(tmp_path / "two.npz", a=np.zeros(3))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block until a writer comes
    cases = [
        (["noise", model_dir, data_path, "--out", str(out), "--phi", str(fifo)],
         "--phi .*fifo: not a regular file"),
        (["shapley", model_dir, str(fifo), "--out", str(out)],
         "fifo: not a regular file or directory"),
        (["noise", model_dir, data_path, "--out", str(out), "--details", str(out)],
         "--details .* is also --out"),
        (["noise", model_dir, data_path, "--out", data_path], "--out .* is also DATA"),
        (["shapley", model_dir, data_path, "--out", str(tmp_path)], "is a directory"),
        (["noise", model_dir, data_path, "--out", str(out), "--phi",
          str(tmp_path / "text.npy")],
         "--phi .*: expected floating-point numbers, got dtype <U1"),
        (["noise", model_dir, data_path, "--out", str(out), "--phi",
          str(tmp_path / "torn.npy")], "--phi .*: not a readable .npy array"),
        (["shapley", model_dir, data_path, "--out", str(out), "--baseline",
          str(tmp_path / "two.npz")], "--baseline .*: an .npz archive"),
        (["shapley", model_dir, data_path, "--out", str(out), "--n-permutations", "0"],
         "n_permutations must be >= 1"),
        (["noise", model_dir, data_path, "--out", str(out), "--eps", "-1"],
         "eps must be a finite number"),
        (["shapley", model_dir, data_path, "--out", str(out), "--baseline",
          str(tmp_path / "two.npz").replace("two.npz", "none.npy")], "no such file"),
    ]
    for argv, message in cases:
        assert cli.main([*argv, "--device", "cpu"]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (message, err)
        assert "Traceback" not in err
    weights = next((root / "model").glob("weights.*"))
    before = weights.read_bytes()
    np.save(tmp_path / "ints.npy", np.zeros((120, 12), dtype=np.int64))
    for argv, message in [
            (["shapley", model_dir, data_path, "--out", str(weights)], "is also a file of "
                                                                        "MODEL_DIR"),
            (["noise", model_dir, data_path, "--out", str(out), "--phi",
              str(tmp_path / "ints.npy")], "--phi .*: expected floating-point numbers"),
            (["shapley", model_dir, data_path, "--out", str(out), "--device", "meta"],
             "meta tensors hold no values"),
            (["shapley", model_dir, data_path, "--out", str(out), "--device", "mps"],
             "oni runs on 'cpu' or 'cuda' devices .* got device type 'mps'")]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err, (message, err)
    assert weights.read_bytes() == before
    assert not out.exists()
    assert np.load(data_path) is not None  # the data file is intact


def test_out_of_memory_messages_of_each_allocator():
    from oni.distributed import OtherRankFailed
    numpy = MemoryError("Unable to allocate 728. TiB for an array with shape "
                        "(100000000000000,) and data type float64")  # np.empty(10 ** 14)
    assert cli._is_out_of_memory(numpy) and cli._requested(numpy) == "728 TiB"
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                       "2400 bytes.")
    assert cli._is_out_of_memory(cpu) and cli._requested(cpu) == "2.4 kB"
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.")
    assert cli._is_out_of_memory(cuda) and cli._requested(cuda) == "20.00 GiB"
    # another rank's failure quotes its error: that rank reports it, not this one
    assert not cli._is_out_of_memory(OtherRankFailed("rank 1 failed: CUDA out of memory"))
    assert not cli._is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_solver_commands_report_out_of_memory_without_a_traceback(model_and_data, capsys,
                                                                   tmp_path, monkeypatch):
    import oni.distributed
    root, _, _ = model_and_data

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 123456789012 bytes.")

    monkeypatch.setattr(oni.distributed, "shapley_values", out_of_memory)
    out = tmp_path / "o.npy"
    argv = ["shapley", str(root / "model"), str(root / "data.npz"), "--out", str(out)]
    assert cli.main([*argv, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "oni shapley: error: out of memory: it asked for 123.5 GB" in err, err
    assert "Traceback" not in err and not out.exists()
    # any other RuntimeError is a bug: its traceback is shown
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(oni.distributed, "shapley_values", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([*argv, "--device", "cpu"])


def test_run_refuses_a_directory_of_other_files(tiny_yaml, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    assert _run([tiny_yaml, "--out", mine]) == 2
    assert "holds report.md but no stages/" in capsys.readouterr().err
    assert (mine / "report.md").read_text() == "my own report"
    assert sorted(p.name for p in mine.iterdir()) == ["report.md"]  # nothing created
    (tmp_path / "file").write_text("x")
    assert _run([tiny_yaml, "--out", tmp_path / "file"]) == 2
    assert "is a file" in capsys.readouterr().err
    # a config.yaml of the user's own among other files does not make a run directory
    (mine / "config.yaml").write_text("# my notes\n")
    (mine / "notes.txt").write_text("mine")
    assert _run([tiny_yaml, "--out", mine]) == 2
    assert "holds files that no oni run wrote (e.g. notes.txt)" in capsys.readouterr().err
    assert (mine / "config.yaml").read_text() == "# my notes\n"
    # nor may the run overwrite the config file it was given
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(tiny_yaml, own / "config.yaml")
    assert _run([own / "config.yaml", "--out", own]) == 2
    assert "is where the run writes its resolved config" in capsys.readouterr().err
    assert (own / "config.yaml").read_bytes() == Path(tiny_yaml).read_bytes()


def test_run_directory_findings_of_fuzz_pass_8(small_reference, tiny_yaml, tmp_path, capsys,
                                              monkeypatch):
    """What a run directory is, and what a run may replace in it."""
    # an empty stages/ beside a user's own files made them a run's: config.yaml and
    # report.md were replaced
    mine = tmp_path / "project"
    (mine / "stages").mkdir(parents=True)
    (mine / "config.yaml").write_text("my config: keep me\n")
    (mine / "report.md").write_text("# my draft\n")
    assert _run([tiny_yaml, "--out", mine]) == 2
    assert "no stage record, results or resolved config of an oni run" in \
        capsys.readouterr().err
    assert (mine / "report.md").read_text() == "# my draft\n"
    # ...but a run killed while writing its first config.yaml is a run's
    killed = tmp_path / "killed"
    (killed / "stages").mkdir(parents=True)
    (killed / ".config.yaml.tmp-1a2b3c4d").write_text("seed: 0\n")
    assert cli._is_run_dir(killed)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert _run([tiny_yaml, "--out", dangling]) == 2
    assert "is a symbolic link to" in capsys.readouterr().err
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    (out / ".lock").unlink()
    (out / ".lock").mkdir()
    assert _run(_small(tiny_yaml, out)) == 2
    assert ".lock is a directory, where oni keeps the run's lock file" in \
        capsys.readouterr().err
    (out / ".lock").rmdir()
    # a recomputed stage removes what stages write (and a killed write's temporary names),
    # not a user's file: a run made inside a stage's directory was emptied, and so was a
    # phi.npy saved beside the target's model
    nested = out / "stages" / "target" / "mine"
    assert _run([tiny_yaml, "--out", nested, "--set", "defenses.run=[undefended]",
                 "--set", "attacks.run=[metric_loss]"]) == 0
    nested_files = _run_files(nested)
    (out / "stages" / "target" / "phi_mine.npy").write_text("keep")
    for leftover in (".model.tmp-0a1b2c3d", ".model.old-0a1b2c3d"):
        (out / "stages" / "target" / leftover).mkdir()
    (out / "stages" / "target" / ".stage.json.tmp-0a1b2c3d").write_text("{")
    assert _run(_small(tiny_yaml, out, "train.epochs=3")) == 0, capsys.readouterr().err
    target = out / "stages" / "target"
    assert sorted(p.name for p in target.iterdir()) == ["mine", "model", "phi_mine.npy",
                                                        _RECORD]
    assert _run_files(nested) == nested_files
    # oni report refuses while a run holds the directory: one finishing meanwhile left a
    # mix of two runs' files; reports share the lock
    with cli._run_lock(out):
        assert cli.main(["report", str(out)]) == 2
    assert "an oni run is writing" in capsys.readouterr().err
    with cli._run_lock(out, report=True):
        assert cli.main(["report", str(out)]) == 0
        assert _run(_small(tiny_yaml, out, "train.epochs=3")) == 2
    assert "another oni run or report is using" in capsys.readouterr().err
    # a directory where a results file goes is refused before anything is replaced; a
    # failure to write .finishing replaced nothing, and says nothing of two runs
    before = _run_files(out)
    (out / "report.md").unlink()
    (out / "report.md").mkdir()
    assert _run(_small(tiny_yaml, out, "train.epochs=3")) == 2
    assert "report.md is a directory, where the report writes a file" in \
        capsys.readouterr().err
    (out / "report.md").rmdir()
    assert not (out / reportmod.FINISHING).exists()
    write = cli.write_atomic

    def refuse_the_marker(path, data):
        if path.name == reportmod.FINISHING:
            raise PermissionError(13, "Permission denied", str(path))
        return write(path, data)

    monkeypatch.setattr(cli, "write_atomic", refuse_the_marker)
    assert _run(_small(tiny_yaml, out, "train.epochs=3")) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and "two runs" not in err, err
    after = _run_files(out)
    assert {k: v for k, v in after.items() if k != Path("report.md")} == \
        {k: v for k, v in before.items() if k != Path("report.md")}


def test_odd_stage_records_are_damage_to_recompute(small_reference, tiny_yaml, tmp_path):
    """A FIFO in place of a stage.json blocked the run for ever; a directory there, or a
    file in place of a stage's directory, ended it with a bare errno message. Each is now
    recomputed, alone (in a subprocess: a hang fails the test, not the suite)."""
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    os.remove(out / "stages" / "oni-phi" / _RECORD)
    os.mkfifo(out / "stages" / "oni-phi" / _RECORD)
    (out / "stages" / "oni-eta" / _RECORD).unlink()
    (out / "stages" / "oni-eta" / _RECORD).mkdir()
    shutil.rmtree(out / "stages" / "defense-dynanoise")
    (out / "stages" / "defense-dynanoise").write_text("not a stage")
    args = [sys.executable, "-m", "oni.cli", "run", *map(str, _small(tiny_yaml, out))]
    done = subprocess.run(args, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("its record is unreadable: recomputing") == 3, done.stderr
    recomputed = sorted(name for name, reused in _stage_status(out).items() if not reused)
    assert recomputed == ["defense-dynanoise", "oni-eta", "oni-phi"]
    assert _metrics(out) == _metrics(small_reference)


def cfgmod_load(path):
    from oni.config import load_yaml
    return load_yaml(path.read_text(), source=str(path))


def test_a_failed_run_over_a_finished_one_keeps_its_config_and_figures(small_reference,
                                                                       tiny_yaml, tmp_path,
                                                                       monkeypatch):
    """config.yaml describes results.json: a later run that fails leaves the pair as it was;
    a later run without LiRA drops the old LiRA figure instead of showing it as its own."""
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "results.json")}
    assert (out / "figures" / "lira_roc.png").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(cli, "_oni_distill", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        _run(_small(tiny_yaml, out, "defenses.oni.tau_fraction=0.8"))
    assert {name: (out / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    assert _run(_small(tiny_yaml, out, "attacks.run=[metric_loss]")) == 0
    assert (out / "config.yaml").read_bytes() != before["config.yaml"]  # the new pair
    assert _results(out)["config"] == cfgmod_load(out / "config.yaml")
    assert not (out / "figures" / "lira_roc.png").exists()


def _run_files(out):
    return {path.relative_to(out): path.read_bytes() for path in sorted(out.rglob("*"))
            if path.is_file() and "stages" not in path.parts and path.name != ".lock"}


def test_results_the_report_refuses_replace_no_file(small_reference, tiny_yaml, tmp_path,
                                                    monkeypatch, capsys):
    """results.json, roc.npz and config.yaml were written before the report's check refused
    the results (a DP-SGD epsilon of -0.002), leaving them beside the last run's report."""
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    before = _run_files(out)

    def refuse(results, roc):
        raise ValueError("defenses.undefended.train_acc must be in [0, 1], got 7.0")

    monkeypatch.setattr(reportmod, "_check_results", refuse)
    assert _run(_small(tiny_yaml, out, "attacks.run=[metric_loss]")) == 1
    err = capsys.readouterr().err
    assert "the report's checks refuse the results this run made: defenses.undefended" in err
    assert "the last run's results and report are as they were" in err
    assert _run_files(out) == before


@pytest.mark.parametrize("signal_name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupt_while_the_files_are_written_waits_for_them(
        small_reference, tiny_yaml, tmp_path, monkeypatch, capsys, signal_name, status):
    """An interrupt between results.json and the report left the two from different runs;
    it now acts once every file is written (and SIGTERM is reported as SIGINT is)."""
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    before = _run_files(out)
    write = reportmod.write_atomic

    def write_then_interrupt(path, data):
        if path.name == "results.csv":
            os.kill(os.getpid(), getattr(signal, signal_name))
        return write(path, data)

    monkeypatch.setattr(reportmod, "write_atomic", write_then_interrupt)
    assert _run(_small(tiny_yaml, out, "attacks.run=[metric_loss]")) == status
    assert f"interrupted after the run finished: its results and report are in {out}/" in \
        capsys.readouterr().err
    after = _run_files(out)
    assert after != before
    results = json.loads(after[Path("results.json")])
    assert list(results["attacks"]["undefended"]) == ["metric_loss"]  # the new run's
    assert b"metric_loss" in after[Path("results.csv")]
    assert results["config"] == cfgmod_load(out / "config.yaml")
    assert not (out / "figures" / "lira_roc.png").exists()  # the new run has no LiRA


def test_a_run_stopped_while_the_files_are_written_is_refused_by_the_report(
        small_reference, tiny_yaml, tmp_path, monkeypatch, capsys):
    """A write that fails part way (a full disk; a kill -9 there acts the same) left
    roc.npz of the new run beside results.json of the old, and oni report rebuilt a report
    from the mix. The run now leaves .finishing there, the report refuses, and the same run
    again rewrites the set (its stages reused)."""
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    write = reportmod.write_atomic

    def write_until_full(path, data):
        if path.name == "report.md":
            raise OSError(28, "No space left on device", str(path))
        return write(path, data)

    monkeypatch.setattr(reportmod, "write_atomic", write_until_full)
    args = _small(tiny_yaml, out, "attacks.run=[metric_loss]")
    assert _run(args) != 0
    err = capsys.readouterr().err
    assert "No space left on device, while replacing the results files: they may now come " \
           "from two runs (.finishing marks it); mend the cause and run the same oni run " \
           "again" in err, err
    assert (out / reportmod.FINISHING).is_file()
    assert cli.main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stopped while replacing its results files" in err and "Traceback" not in err, err
    monkeypatch.setattr(reportmod, "write_atomic", write)
    assert _run(args) == 0  # the directory is still a run's, and the run finishes the set
    assert not (out / reportmod.FINISHING).exists()
    assert all(s["reused"] for s in _results(out)["stages"].values())
    assert list(_results(out)["attacks"]["undefended"]) == ["metric_loss"]
    assert cli.main(["report", str(out)]) == 0


def test_results_json_is_strict_json(small_reference, tmp_path, capsys):
    """A threshold that calls nobody a member was written as a bare Infinity, which
    JavaScript, jq 1.6 and other strict parsers refuse; it is now the string "Infinity",
    read back as a float by the report (and an older run's bare Infinity still is)."""
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    results = _results(out)
    metrics = results["attacks"]["undefended"]["metric_loss"]["metrics"]
    metrics["threshold"], metrics["oracle_threshold"] = float("inf"), float("-inf")
    results["stages"]["target"]["note"] = {"values": (float("nan"), 1.5)}
    results["data"]["name"] = "Infinity"  # the user's strings are never read as numbers
    results["config"]["data"]["cache_dir"] = "NaN"
    data = reportmod.results_json_bytes(results)

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    strict = json.loads(data, parse_constant=refuse)
    assert strict["attacks"]["undefended"]["metric_loss"]["metrics"]["threshold"] == "Infinity"
    back = reportmod.results_from_json(data)
    back_metrics = back["attacks"]["undefended"]["metric_loss"]["metrics"]
    assert back_metrics["threshold"] == float("inf")
    assert back_metrics["oracle_threshold"] == float("-inf")
    assert np.isnan(back["stages"]["target"]["note"]["values"][0])
    assert back["stages"]["target"]["note"]["values"][1:] == [1.5]
    assert back["data"]["name"] == "Infinity" and back["config"]["data"]["cache_dir"] == "NaN"
    del results["stages"]["target"]["note"]
    for text in (reportmod.results_json_bytes(results), json.dumps(results).encode()):
        (out / "results.json").write_bytes(text)  # the second: an older run's bare Infinity
        assert cli.main(["report", str(out)]) == 0, capsys.readouterr().err
        rows = (out / "results.csv").read_text().splitlines()
        header = rows[0].split(",")
        loss = next(row.split(",") for row in rows[1:] if row.startswith("undefended,metric_loss"))
        assert loss[header.index("threshold")] == "inf"
        assert loss[header.index("oracle_threshold")] == "-inf"
    # what oni run itself writes is strict
    json.loads((small_reference / "results.json").read_text(), parse_constant=refuse)


def test_a_stage_error_names_the_stage_and_its_config_keys(tiny_yaml, tmp_path, capsys):
    """The library's message named `config.lr` for a divergence caused by
    defenses.uniform.eps (the run's own keys were nowhere)."""
    out = tmp_path / "run"
    assert _run(_small(tiny_yaml, out, "defenses.run=[undefended, uniform]",
                       "attacks.run=[metric_loss]", "defenses.uniform.eps=1e38")) == 1
    err = capsys.readouterr().err
    assert "error: stage defense-uniform: training diverged" in err, err
    assert "[the stage's settings: seed = " in err and "defenses.uniform.eps = 1e+38" in err


@pytest.mark.parametrize("setting, named", [
    ("attacks.lira_online.shadow_size=5000", "attacks.lira_online.shadow_size = 5000"),
    ("splits.shadow_pool=6", "splits.shadow_pool = 6"),  # 3 rows a side < the 100 asked for
])
def test_shadow_sizes_the_splits_cannot_hold_are_refused_before_training(
        tiny_yaml, tmp_path, capsys, setting, named):
    """They were refused by the attack stage, after the target and every defense had
    trained."""
    out = tmp_path / "run"
    sets = (setting, "attacks.metric_loss.shadow_size=100") if "pool" in setting else (setting,)
    assert _run(_small(tiny_yaml, out, *sets)) == 2
    err = capsys.readouterr().err
    assert "error: the attacks' shadow sizes on the drawn splits (train: " in err, err
    assert named in err and "shadow_pool: " in err and "Traceback" not in err
    assert (out / "stages" / "splits" / "stage.json").is_file()
    assert not (out / "stages" / "target").exists()


def test_a_read_error_without_a_file_name_names_data_path(tiny_yaml, tmp_path, monkeypatch,
                                                         capsys):
    """An EIO mid-file (/proc/self/mem) printed "[Errno 5] Input/output error" alone."""
    import errno

    import oni.data

    def failing_read(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(oni.data, "load_dataset", failing_read)
    data_file = tmp_path / "d.csv"
    data_file.write_text("0,1\n1,0\n")
    assert _run(_small(tiny_yaml, tmp_path / "run", f"data.path={data_file}")) == 2
    assert f"[Errno 5] Input/output error: '{data_file}'" in capsys.readouterr().err


def test_the_lira_figure_of_one_non_member(tmp_path):
    """One non-member made the log-log axes a point (matplotlib warned of identical limits
    and drew no curve)."""
    import warnings
    sets = ["data.synthetic.n=18", "data.synthetic.d=5", "data.synthetic.k=2",
            "model.hidden=[4]", "train.epochs=1", "defenses.run=[undefended]",
            "attacks.run=[lira_offline]", "device=cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert _run(["--out", tmp_path / "run", *sum((["--set", s] for s in sets), [])]) == 0
    assert _results(tmp_path / "run")["splits"]["target"] == 2
    assert (tmp_path / "run" / "figures" / "lira_roc.png").stat().st_size > 0


def test_the_report_says_when_the_oracle_stands_in(small_reference, tiny_yaml, tmp_path):
    """Without calibration data the mean balanced attack accuracy and MIDPUT took the oracle
    balanced accuracy, and nothing said so (the table showed "—" for those attacks)."""
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    assert _run(_small(tiny_yaml, out, "attacks.run=[metric_loss, metric_entropy]",
                       "attacks.metric_loss.calibration_fraction=0")) == 0
    report = (out / "report.md").read_text()
    assert "without calibration data (metric_loss: calibration_fraction 0) enter" in report
    oracle = _results(out)["attacks"]["undefended"]["metric_loss"]["metrics"]
    assert oracle["balanced_accuracy"] is None
    assert _run(_small(tiny_yaml, out, "attacks.run=[metric_loss]")) == 0
    assert "without calibration data" not in (out / "report.md").read_text()


@pytest.mark.parametrize("damage", ["truncated", "empty object", "list", "not utf-8", "roc",
                                    "wrong structure", "nested too deep", "roc missing"])
def test_report_of_damaged_results_is_an_error_not_a_traceback(small_reference, tmp_path,
                                                               capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    results = out / "results.json"
    report, csv = (out / "report.md").read_bytes(), (out / "results.csv").read_bytes()
    if damage == "roc":
        (out / "roc.npz").write_bytes(b"PK\x03\x04 torn")
    elif damage == "roc missing":
        (out / "roc.npz").unlink()
    else:
        wrong = {**json.loads(results.read_text()), "defenses": {"x": 1}}
        results.write_bytes({"truncated": results.read_bytes()[:50], "empty object": b"{}",
                             "list": b"[]", "not utf-8": b"\xff\xfe{",
                             "wrong structure": json.dumps(wrong).encode(),
                             "nested too deep": b"[" * 100_000 + b"]" * 100_000}[damage])
    assert cli.main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err or "not what `oni run` writes" in err, err
    assert "Traceback" not in err
    assert (out / "report.md").read_bytes() == report  # the last good report is kept
    assert (out / "results.csv").read_bytes() == csv


def _report_files(run_dir):
    return {path.relative_to(run_dir).as_posix(): path.read_bytes()
            for path in [run_dir / "report.md", run_dir / "results.csv",
                         *sorted((run_dir / "figures").iterdir())]}


def _set(tree, dotted, value):
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[last] = value


NAN = float("nan")
# (an edit of results.json: dotted key, value | of roc.npz: key, array), what the error says
REPORT_DAMAGE = [
    ("attacks.oni.lira_online.metrics.auc", NAN,
     r"attacks\.oni\.lira_online\.metrics\.auc must be a finite number in \[0, 1\], got nan"),
    ("attacks.oni.lira_online.metrics.auc", 7.0, r"metrics\.auc must be .* got 7\.0"),
    ("attacks.oni.lira_online.metrics.auc", None, r"metrics\.auc must be .* got None"),
    ("defenses.undefended.test_acc", "0.9", r"defenses\.undefended\.test_acc .* got '0\.9'"),
    ("defenses.oni.midput", float("inf"), r"defenses\.oni\.midput must be a finite number"),
    ("attacks.undefended.metric_loss.metrics.n_nonmembers", -5,
     r"n_nonmembers must be an integer in \[0, inf\], got -5"),
    ("compute_seconds", "x", r"compute_seconds must be a finite number in \[0, inf\]"),
    ("defenses.oni.report.feasible_rate", "x", r"defenses\.oni\.report\.feasible_rate"),
    ("defenses.oni.history.epochs", [1], r"defenses\.oni\.history must hold lists epochs and "
                                         r"test_acc of one length"),
    ("defenses", {}, r"defenses is empty"),
    ("attacks.dynanoise", None, r"attacks\.dynanoise must be a JSON object, got NoneType"),
    ("stages.target.seconds", NAN, r"stages\.target\.seconds must be a finite number"),
    ("roc:undefended/lira_online/fpr", np.zeros(0), r"roc\.npz: undefended/lira_online/fpr must "
                                                    r"be a non-empty 1-D array"),
    ("roc:undefended/lira_online/fpr", np.zeros((2, 2)), r"got float64 \(2, 2\)"),
    ("roc:undefended/lira_online/tpr", np.array([0.0, NAN, 1.0]), r"lira_online/tpr must be"),
    ("roc:oni/metric_loss/tpr", np.array([0.0, 1.5]), r"oni/metric_loss/tpr must be"),
    ("roc:oni/metric_loss/tpr", "drop last", r"oni/metric_loss/fpr and oni/metric_loss/tpr "
                                             r"have \d+ and \d+ points"),
    ("roc:oni/metric_loss/tpr", None, r"roc\.npz: oni/metric_loss/tpr must be .* got missing"),
]


@pytest.mark.parametrize("key, value, message", REPORT_DAMAGE,
                         ids=[f"{k}={v!r}"[:60] for k, v, _ in REPORT_DAMAGE])
def test_report_refuses_values_oni_run_never_writes(small_reference, tmp_path, capsys, key,
                                                    value, message):
    """Valid JSON and npz, wrong values: the report wrote "nan" and "7.000" cells, plotted a
    string as a category, or failed in numpy naming no field; and the results.csv and figures
    written before the failure replaced the last good ones."""
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    before = _report_files(out)
    if key.startswith("roc:"):
        with np.load(out / "roc.npz") as saved:
            roc = {name: saved[name] for name in saved.files}
        key = key[4:]
        if value is None:
            del roc[key]
        else:
            roc[key] = roc[key][:-1] if isinstance(value, str) else value
        np.savez(out / "roc.npz", **roc)
    else:
        results = json.loads((out / "results.json").read_text())
        _set(results, key, value)
        if key == "defenses":
            results["attacks"] = {}
        (out / "results.json").write_text(json.dumps(results))
    assert cli.main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "not what `oni run` writes" in err, err
    assert _report_files(out) == before


def test_a_report_that_fails_part_way_replaces_nothing(small_reference, tmp_path, capsys,
                                                       monkeypatch):
    """The files are rendered in memory, then written: a figure that fails after results.csv
    and two figures were made leaves the last report whole."""
    out = tmp_path / "run"
    shutil.copytree(small_reference, out)
    (out / "results.csv").write_bytes(b"an older table\n")  # what a rebuild would replace
    before = _report_files(out)

    def fails(*args, **kwargs):
        raise ValueError("a figure that cannot be drawn")

    monkeypatch.setattr(reportmod, "_fig_lira", fails)
    assert cli.main(["report", str(out)]) == 2
    assert "a figure that cannot be drawn" in capsys.readouterr().err
    assert _report_files(out) == before
    monkeypatch.undo()
    shutil.rmtree(out / "figures")
    (out / "figures").write_bytes(b"")  # a file where the figures go
    assert cli.main(["report", str(out)]) == 2
    assert "figures is a file" in capsys.readouterr().err
    assert (out / "results.csv").read_bytes() == b"an older table\n"



def test_the_bitflip_scan_of_the_data_runs_once_a_run(tiny_yaml, tmp_path, monkeypatch,
                                                      capsys):
    """label_only's noise='bitflip' needs 0/1 features: `oni run` scans data.x up front, and
    each defense's attack stage scanned it again (about 1 s a defense at Texas100's size).
    Once a run now; a direct run_attacks still scans, and non-binary data is still refused."""
    import dataclasses

    import oni
    scans = []
    real_check_binary = oni.attacks._check_binary

    def counted(data):
        scans.append(data)
        real_check_binary(data)

    monkeypatch.setattr(oni.attacks, "_check_binary", counted)
    bitflip = ("attacks.run=[label_only]", "attacks.label_only.noise=bitflip",
               "attacks.label_only.n_queries=4", "attacks.label_only.sigma=0.1")
    assert _run(_small(tiny_yaml, tmp_path / "run", "defenses.run=[undefended, uniform]",
                       *bitflip)) == 0
    assert len(scans) == 1
    data = scans[0]
    target = oni.defenses.load_defended(tmp_path / "run" / "stages" / "defense-uniform" /
                                        "model")
    splits = oni.data.make_splits(data, seed=0)
    with pytest.raises(ValueError, match=r"'bitflip' flips 0/1 features, but data\.x"):
        oni.attacks.run_attacks(["label_only"], target,
                                dataclasses.replace(data, x=data.x * 0.5), splits,
                                configs={"label_only": {"noise": "bitflip"}},
                                train_config=oni.train.TrainConfig(epochs=1, device="cpu"))
    assert len(scans) == 2
    # and `oni run` refuses such data up front, before any model trains
    monkeypatch.setattr(cli, "_load_data", lambda config: dataclasses.replace(
        oni.synthetic_purchase(600, d=20, k=5), x=torch.full((600, 20), 0.5)))
    assert _run(_small(tiny_yaml, tmp_path / "halved", *bitflip)) == 2
    assert "flips 0/1 features, but data.x[0, 0] is 0.5" in capsys.readouterr().err
    assert not (tmp_path / "halved" / "stages" / "target").exists()


def _strict_json(text: str):
    """json.loads refusing Python's bare NaN and Infinity, as other tools' parsers do."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: bare {constant}")
    return json.loads(text, parse_constant=refuse)


def test_every_stage_record_of_a_run_is_strict_json(full_run):
    """Attack thresholds are inf when nobody is called a member: the records held a bare
    Infinity, which strict parsers (jq, JavaScript) refuse."""
    records = sorted((full_run / "stages").glob(f"*/{_RECORD}"))
    assert records
    texts = [path.read_text() for path in records]
    for path, text in zip(records, texts):
        _strict_json(text)
    assert any('"Infinity"' in text for text in texts)  # the case is real, not hypothetical


def test_stage_records_keep_non_finite_floats_and_the_users_strings(tmp_path):
    store = cli.StageStore(tmp_path, cli._Log(quiet=True))
    store.begin("s")
    settings = {"data.path": "NaN", "seed": 0}  # a user's string, not a float
    meta = {"metrics": {"threshold": math.inf, "oracle_threshold": -math.inf},
            "radius_median": np.float32(math.inf), "stderr_max": math.nan,
            "config": {"name": "Infinity"}}
    written = store.finish("s", "abc", settings, {}, [], meta, 1.0)
    strict = _strict_json((tmp_path / "stages" / "s" / _RECORD).read_text())
    assert strict["meta"]["metrics"]["threshold"] == "Infinity"
    read = store.record("s")
    assert read["meta"]["metrics"] == {"threshold": math.inf, "oracle_threshold": -math.inf}
    assert read["meta"]["radius_median"] == math.inf and math.isnan(read["meta"]["stderr_max"])
    assert read["settings"]["data.path"] == "NaN"
    assert read["meta"]["config"]["name"] == "Infinity"
    assert json.dumps(read, sort_keys=True) == json.dumps(written, sort_keys=True)
    assert store.check("s", "abc", settings, {}) == (True, "")


def test_stage_records_written_before_strict_json_are_still_reused(tmp_path):
    """A record of an earlier oni (a bare Infinity, its sha256 over the float) is still done
    and reads the same; a record of finite values is the same bytes either way."""
    def old_json_bytes(value) -> bytes:
        return (json.dumps(value, indent=1, default=cli._json_default) + "\n").encode()

    store = cli.StageStore(tmp_path, cli._Log(quiet=True))
    store.begin("s")
    record = {"format": cli._STAGE_FORMAT, "version": cli._STAGE_VERSION, "stage": "s",
              "hash": "abc", "settings": {"seed": 0}, "parents": {}, "files": {},
              "meta": {"threshold": math.inf, "auc": 0.5}, "seconds": 1.0,
              "finished": "2026-01-01T00:00:00+0000"}
    (tmp_path / "stages" / "s" / _RECORD).write_bytes(
        old_json_bytes({**record, "sha256": cli._record_digest(record)}))
    assert store.check("s", "abc", {"seed": 0}, {}) == (True, "")
    assert store.record("s")["meta"] == {"threshold": math.inf, "auc": 0.5}
    finite = {**record, "meta": {"threshold": 0.25, "n": np.int64(3), "p": np.float32(0.5),
                                 "widths": (16, 8)}}
    assert cli._json_bytes(finite) == old_json_bytes(finite)
