"""The ``oni`` command: the experiment end to end, and the Shapley and noise solvers alone.

``oni run [CONFIG.yaml] [--set key=value ...] [--out RUN_DIR] [--preset NAME]`` runs

    data -> splits -> target model (undefended) -> each defense -> each attack on each
    defense -> metrics -> report

as a chain of **stages**, each saved in ``RUN_DIR/stages/<stage>/`` when it finishes:

* every file of a stage is written atomically (a temporary file, then ``os.replace``), and the
  stage's record ``stage.json`` (its hash, settings, checksums of its files and what it
  found) is written last, so a stage without a valid record is simply not done: a run killed
  at any point (``kill -9`` included) loses at most the stage it was in;
* a stage's hash covers exactly the settings it depends on (:data:`oni.config.STAGE_KEYS`,
  the defense's and attacks' own settings) and the hashes of the stages it builds on;
* re-running skips every stage whose record matches its hash and whose files check out;
  a stage whose settings changed is recomputed, and the run says which keys changed;
* a stage recorded before 2026-12-07 (record version 2, whose hashes covered the data's
  source and ``attacks.adaptive``, which the splits and the undefended model's attacks do
  not use) is read in today's terms and, where it matches, adopted: its record is rewritten
  with today's hash, and nothing is recomputed.

``oni shapley`` and ``oni noise`` compute Shapley values and ONI noise for a saved model and
a data file; ``oni report`` rebuilds a run's report from its saved results. Every command
has ``--help``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import config as cfgmod
from ._checks import short_repr, warning_context, warning_labels
from .config import ConfigError
from .models import _fsync_dir
from .report import (FINISHING, build_report, nonfinite_restored, render_report,
                     results_from_json, results_json_bytes, write_atomic, write_rendered)

__all__ = ["main", "run_experiment", "StageStore", "RunOutOfMemory", "ResultsRefused",
           "RunDirectoryBusy"]

_STAGE_FORMAT = "oni-stage"
_RESULTS_FORMAT = "oni-results"
# 3: hashes without settings a stage does not use (2026-12-07); 2: records carry their own
# SHA-256. A record of version 2 is read in today's terms and adopted where it matches
# (_Experiment._as_today); older ones are recomputed.
_STAGE_VERSION = 3
_ADOPTED_VERSION = 2
_RECORD = "stage.json"
# every entry a stage writes in its directory, and the temporary names of write_atomic and
# save_model for them (left by a kill)
_STAGE_OUTPUTS = frozenset({_RECORD, "splits.npz", "model", "phi.npz", "eta.npz",
                            "scores.npz"})
_TEMPORARY = re.compile(r"\.(.+)\.(?:tmp|old)-[0-9a-f]+")


# ----------------------------------------------------------------------------- messages

class _Log:
    """Progress lines on stderr (``quiet`` keeps only warnings)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[oni] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"[oni] warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _elapsed_bar(description: str, enabled: bool):
    """A bar that shows the elapsed time of a step with no progress hook of its own (the
    Shapley values, the noise solve), refreshed once a second; nothing without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if not enabled or tqdm is None:
        yield
        return
    import threading
    bar = tqdm(total=None, desc=description, bar_format="{desc}: {elapsed}", file=sys.stderr)
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


# ----------------------------------------------------------------------------- stage store

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{key: np.asarray(value) for key, value in arrays.items()})
    return buffer.getvalue()


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _json_bytes(value) -> bytes:
    """Strict JSON, as results.json: attack thresholds (inf when nobody is called a member)
    and noise radii (inf at a zero gradient) reach stage records, and other tools' parsers
    refuse Python's bare Infinity and NaN. Such floats are written as the strings
    "Infinity", "-Infinity", "NaN"; a record of finite values is the same bytes as before."""
    return results_json_bytes(value, default=_json_default)


# the parts of a stage record that hold the user's strings (a data path named "NaN"), read
# verbatim; their numbers are finite (the config refuses others)
_RECORD_VERBATIM = frozenset({"settings", "config"})


def _record_as_read(record: dict) -> dict:
    """A stage record's fields as the run uses them: non-finite floats as floats again."""
    return nonfinite_restored(record, _RECORD_VERBATIM)


def _record_digest(record: Mapping) -> str:
    """SHA-256 of a stage record's fields (a record edited by hand, or half-corrupted into
    other valid JSON, would otherwise feed missing or mistyped facts into the run). Taken
    over the fields as written (non-finite floats as strings; an older record's bare NaN or
    Infinity as floats, as it was then), so earlier records still match."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class StageStore:
    """The finished stages of one run directory.

    A stage ``name`` lives in ``RUN_DIR/stages/<name>/``. Its record ``stage.json`` holds the
    format tag, the stage's hash, the settings it depends on (to say which changed), its
    parents' hashes, the SHA-256 of each file it wrote, ``meta`` (JSON-able facts) and the
    compute seconds. The record is written last and atomically: a stage is done exactly when
    its record exists, its hash matches, and its files match their checksums.
    """

    def __init__(self, run_dir: Path, log: _Log):
        self.root = Path(run_dir) / "stages"
        self.log = log

    def path(self, name: str) -> Path:
        return self.root / name

    def record(self, name: str) -> Optional[dict]:
        """The stage's record, or None when absent or unreadable."""
        path = self.path(name) / _RECORD
        if not path.is_file():  # a FIFO would block the read
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep
            return None
        if not isinstance(record, dict) or record.get("format") != _STAGE_FORMAT:
            return None
        if record.get("version") in (_ADOPTED_VERSION, _STAGE_VERSION) and \
                record.pop("sha256", None) != _record_digest(record):
            return None  # edited or corrupt: its fields cannot be trusted (recomputed)
        return _record_as_read(record)

    def check(self, name: str, digest: str, settings: Mapping, parents: Mapping[str, str],
              as_today: Optional[Callable[[dict], Tuple[dict, dict, str]]] = None
              ) -> Tuple[bool, str]:
        """``(done, why not)``: whether the stage is finished with this hash. ``as_today``
        reads a record of ``_ADOPTED_VERSION`` as (settings, parents, hash) of today's
        hashing; without it such a record is not done."""
        record = self.record(name)
        if record is None:
            if os.path.lexists(self.path(name) / _RECORD) or \
                    os.path.lexists(self.path(name)) and not self.path(name).is_dir():
                return False, "its record is unreadable: recomputing"
            return False, ""
        old, old_parents, old_digest = (record.get("settings", {}), record.get("parents", {}),
                                        record.get("hash"))
        if record.get("version") == _ADOPTED_VERSION and as_today is not None:
            old, old_parents, old_digest = as_today(record)
        elif record.get("version") != _STAGE_VERSION:
            return False, "it was saved by another version of oni: recomputing"
        if old_digest != digest:
            # values that changed first, then keys that came or went with them (a defense's
            # settings when attacks.adaptive is toggled)
            changed = sorted(cfgmod.diff_keys(old, dict(settings)),
                             key=lambda key: key not in old or key not in settings)
            parents_changed = [p for p, h in parents.items() if old_parents.get(p) != h]
            why = []
            if changed:
                new = dict(settings)
                shown = ", ".join(f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                                  for key in changed[:4])
                more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
                why.append(f"settings changed ({shown}{more})")
            if parents_changed:
                why.append(f"it builds on changed stages ({', '.join(parents_changed)})")
            return False, ("; ".join(why) or "its hash changed") + ": recomputing"
        for rel, checksum in record.get("files", {}).items():
            path = self.path(name) / rel
            if not path.is_file() or _sha256_file(path) != checksum:
                return False, f"its file {rel} is missing or corrupt: recomputing"
        return True, ""

    def begin(self, name: str) -> Path:
        """Marks the stage not done (removes its record), removes what an earlier try of it
        wrote (a damaged file, e.g. a torn ``model.json``, made the model's save refuse the
        directory) and returns its directory. Entries a stage never writes (a user's file)
        are left; so is a symbolic link's target."""
        directory = self.path(name)
        if os.path.lexists(directory) and not directory.is_dir():
            os.remove(directory)  # a file where the stage's directory belongs
        if directory.is_dir():
            for entry in directory.iterdir():
                temporary = _TEMPORARY.fullmatch(entry.name)
                if (temporary.group(1) if temporary else entry.name) in _STAGE_OUTPUTS:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def finish(self, name: str, digest: str, settings: Mapping, parents: Mapping[str, str],
               files: Sequence[str], meta: Mapping, seconds: float) -> dict:
        """Writes the record (last, atomically) once every file of the stage is in place."""
        directory = self.path(name)
        record = {"format": _STAGE_FORMAT, "version": _STAGE_VERSION, "stage": name,
                  "hash": digest, "settings": dict(settings), "parents": dict(parents),
                  "files": {rel: _sha256_file(directory / rel) for rel in files},
                  "meta": dict(meta), "seconds": seconds,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        record = json.loads(_json_bytes(record))  # as written
        write_atomic(directory / _RECORD, _json_bytes({**record,
                                                       "sha256": _record_digest(record)}))
        return _record_as_read(record)  # as a reader will see it

    def adopt(self, name: str, digest: str, settings: Mapping, parents: Mapping[str, str]
              ) -> dict:
        """Rewrites a finished stage's record of ``_ADOPTED_VERSION`` as today's (its files,
        facts and times kept; its old hash kept as ``adopted_from``, which the records of
        its children name until they are adopted too) and returns it, as a reader sees it."""
        record = self.record(name)
        record.update(version=_STAGE_VERSION, hash=digest, settings=dict(settings),
                      parents=dict(parents),
                      adopted_from={"version": record["version"], "hash": record["hash"]})
        record = json.loads(_json_bytes(record))
        write_atomic(self.path(name) / _RECORD, _json_bytes({**record,
                                                           "sha256": _record_digest(record)}))
        return _record_as_read(record)

    def write_npz(self, name: str, rel: str, arrays: Mapping[str, np.ndarray]) -> str:
        write_atomic(self.path(name) / rel, _npz_bytes(arrays))
        return rel

    def read_npz(self, name: str, rel: str) -> Dict[str, np.ndarray]:
        with np.load(self.path(name) / rel, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}


class RunDirectoryBusy(RuntimeError):
    """Another ``oni run`` (or, for a run, an ``oni report``) holds the run directory."""


@contextlib.contextmanager
def _run_lock(run_dir: Path, *, report: bool = False):
    """One ``oni run`` per run directory at a time, and no ``oni report`` while it runs
    (reports share the lock; the OS releases it if the holder is killed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, where oni keeps the run's lock file; "
                          f"remove it")
    try:  # a report only reads the lock file: it need not own it
        handle = open(path, "r" if report else "a+")
    except FileNotFoundError:
        handle = open(path, "a+")
    try:
        try:
            import fcntl
            fcntl.flock(handle.fileno(),
                        (fcntl.LOCK_SH if report else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no locking
            pass
        except OSError:
            if report:
                raise RunDirectoryBusy(f"an oni run is writing {run_dir}; wait for it: it "
                                       f"rewrites the report when it finishes") from None
            raise RunDirectoryBusy(f"another oni run or report is using {run_dir}; wait for "
                                   f"it or use --out with another directory") from None
        yield
    finally:
        handle.close()


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class _Stage:
    """One stage of a run: what it is, the settings it depends on, its parents' hashes."""

    name: str
    kind: str
    describe: str
    settings: Dict[str, Any]
    parents: Dict[str, str]
    hash: str = ""
    # settings outside the hash that still size the stage's memory (named when it runs out)
    sizes: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # a record of _ADOPTED_VERSION's settings -> the same settings in today's keys
    settings_as_today: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None


class ResultsRefused(RuntimeError):
    """``oni run`` made results that its report's checks refuse (nothing is written)."""


class RunOutOfMemory(MemoryError):
    """A step of ``oni run`` needed more memory than the machine has: the message names the
    step, what it asked for and the settings that size it (the allocator's own message names
    none of them)."""


# what torch's and numpy's allocators say when a request cannot be met (the CPU allocator
# raises a plain RuntimeError; a size beyond int64 fails before allocating)
_OUT_OF_MEMORY_MARKERS = ("can't allocate memory", "out of memory", "not enough memory",
                          "size calculation overflowed")


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    from .distributed import OtherRankFailed
    if isinstance(err, OtherRankFailed):  # it quotes another rank's error: that rank reports
        return False
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and \
        any(marker in str(err).lower() for marker in _OUT_OF_MEMORY_MARKERS)


def _requested(err: BaseException) -> str:
    """What the failed allocation asked for, as the allocator said it."""
    message = str(err)
    found = re.search(r"allocate (\d+) bytes", message)  # torch's CPU allocator
    if found:
        size = float(found.group(1))
        for unit in ("bytes", "kB", "MB", "GB", "TB"):
            if size < 1000 or unit == "TB":
                return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
            size /= 1000
    # CUDA's caching allocator ("Tried to allocate 20.00 GiB"), numpy ("Unable to allocate
    # 72.8 TiB")
    found = re.search(r"allocate ([\d.]+ ?[KMGTPE]i?B)", message)
    if found:
        return found.group(1).replace(". ", " ")  # numpy writes "728. TiB"
    return "more than the machine has"


@contextlib.contextmanager
def _out_of_memory_named(step: str, settings: Mapping[str, Any]):
    """An out-of-memory error inside restated for the user as a RunOutOfMemory: the step,
    the request and the integer settings of ``settings``, largest first (seeds and epoch
    counts size no memory)."""
    try:
        yield
    except Exception as err:
        if not _is_out_of_memory(err):
            raise
        sizes = [(key, value) for key, value in settings.items()
                 if _is_size(value) and not any(
                     word in key.rsplit(".", 1)[-1] for word in ("seed", "epochs"))]
        sizes.sort(key=lambda item: -max(item[1]) if isinstance(item[1], list) else -item[1])
        shown = ", ".join(f"{key} = {value}" for key, value in sizes[:8]) or "none"
        raise RunOutOfMemory(
            f"{step} ran out of memory: it asked for {_requested(err)} "
            f"({type(err).__name__}). The settings that size it: {shown}. Lower them or use a "
            f"machine with more memory; finished stages are saved, and the same command "
            f"resumes after them.") from err


@contextlib.contextmanager
def _settings_named(step: str, settings: Mapping[str, Any],
                    label: str = "the stage's settings"):
    """The library's errors name its own arguments (``config.lr``, ``config['eps'] of
    'uniform'``); inside a stage they are restated with the stage and its settings under
    their config keys, which is what a user of `oni run` can change."""
    try:
        yield
    except (ValueError, TypeError, FloatingPointError) as err:
        if isinstance(err, ConfigError):
            raise
        shown = ", ".join(f"{key} = {short_repr(value)}" for key, value in settings.items())
        try:
            restated = type(err)(f"{step}: {err} [{label}: {shown}]")
        except Exception:  # an exception class with other arguments: as it is
            raise err from err.__cause__
        raise restated from err


def _is_size(value) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_is_size(item) for item in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _data_fingerprint(dataset, version: int = _STAGE_VERSION) -> str:
    """The data by content: rows, labels, class names, and (since version 3) the arrays'
    shapes and dtypes, without which two datasets of other shapes could share one."""
    digest = hashlib.sha256()
    if version >= 3:
        digest.update(json.dumps([[list(t.shape), str(t.dtype)] for t in (dataset.x, dataset.y)]
                                 ).encode())
    digest.update(dataset.x.numpy().tobytes())
    digest.update(dataset.y.numpy().tobytes())
    digest.update(json.dumps([str(c) for c in dataset.classes]).encode())
    return digest.hexdigest()[:16]


def _load_data(config: Mapping):
    from .data import load_dataset, synthetic_purchase
    data = config["data"]
    if data["path"] is None:
        s = data["synthetic"]
        return synthetic_purchase(s["n"], d=s["d"], k=s["k"], seed=s["seed"])
    try:
        return load_dataset(Path(data["path"]).expanduser(), format=data["format"],
                            cache_dir=data["cache_dir"])
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        # a read that fails mid-file (EIO) carries no file name: give it data.path's
        raise OSError(err.errno, err.strerror, str(data["path"])) from err


def _utility(defended, data, splits) -> dict:
    """Train and test accuracy of what the attacker queries (the defended predictions)."""
    from .metrics import generalization_gap, prediction_accuracy
    train_acc = prediction_accuracy(defended.predict_proba(data.x[splits.train]),
                                    data.y[splits.train])
    test_acc = (prediction_accuracy(defended.predict_proba(data.x[splits.test]),
                                    data.y[splits.test]) if len(splits.test) else None)
    gap = generalization_gap(train_acc, test_acc) if test_acc is not None else None
    return {"train_acc": train_acc, "test_acc": test_acc, "generalization_gap": gap}


def _history_dict(history) -> Optional[dict]:
    return None if history is None else dataclasses.asdict(history)


def _jsonable(value) -> bool:
    try:
        json.dumps(value, default=_json_default)
    except (TypeError, ValueError):
        return False
    return True


def _oni_phi(base, x, cfg: Mapping, seed: int, device):
    """Shapley values of the base model on the training rows, as :func:`oni.defend` computes
    them for ``"oni"`` (same seed derivation: tests/test_cli.py checks the equality)."""
    from .shapley import shapley_values
    from .train import _derived_seed
    return shapley_values(base, x.to(device), n_permutations=cfg["n_permutations"],
                          seed=_derived_seed(seed, "oni:shapley"), backend=cfg["backend"],
                          precision=cfg["precision"])


def _oni_eta(base, x, phi, cfg: Mapping, seed: int, device):
    from .noise import optimal_noise
    from .train import _derived_seed
    return optimal_noise(base, x.to(device), phi.to(device), tau_fraction=cfg["tau_fraction"],
                         eps=cfg["eps"], beta=cfg["beta"], importance=cfg["importance"],
                         max_iter=cfg["max_iter"], refine_iter=cfg["refine_iter"],
                         polish_iter=cfg["polish_iter"], starts=cfg["starts"],
                         seed=_derived_seed(seed, "oni:noise"),
                         backend=cfg["backend"], precision=cfg["precision"])


def _oni_distill(base, x, y, eta, cfg: Mapping, train_config, x_test, y_test, device):
    """The ONI defense model from a computed ``eta`` (what :func:`oni.defend` does after
    the noise): soft labels of ``base`` at ``x + eta``, a fresh model distilled on them."""
    import copy

    import torch

    from .defenses import _distillation_loss
    from .train import predict_logits, train_model
    x_noisy = x + eta.to(x.dtype)
    base = copy.deepcopy(base).to(device).eval()
    log_soft = torch.log_softmax(predict_logits(base, x_noisy), dim=1)
    loss_fn = functools.partial(_distillation_loss, alpha=cfg["alpha"],
                                kl_direction=cfg["kl_direction"])
    model = copy.deepcopy(base)
    history = train_model(model, x_noisy, y, config=train_config, loss_fn=loss_fn,
                          extra=log_soft, x_test=x_test, y_test=y_test)
    return model.cpu().eval(), history


def _noise_facts(noise, seconds: float) -> dict:
    norms = noise.norm.double()
    return {"n_rows": int(len(noise.feasible)), "n_feasible": int(noise.feasible.sum()),
            "feasible_rate": float(noise.feasible.double().mean()), "tau": float(noise.tau),
            "entropy_mean": float(noise.entropy.double().mean()),
            "norm_mean": float(norms.mean()), "norm_median": float(norms.median()),
            "norm_max": float(norms.max()),
            "iterations_mean": float(noise.iterations.double().mean()),
            "radius_median": float(noise.radius.double().median()),
            "noise_seconds": seconds}


class _Experiment:
    """The stages of one configuration in one run directory, run or reused in order."""

    def __init__(self, config: Mapping, run_dir: Path, log: _Log, progress: bool):
        from .models import _resolve_device
        self.config = config
        self.store = StageStore(run_dir, log)
        self.log = log
        self.progress = progress
        self.seed = config["seed"]
        self.device = _resolve_device(config["device"])
        self.defenses = list(config["defenses"]["run"])
        self.groups = cfgmod.attack_groups(config["attacks"]["run"])
        self.adaptive = config["attacks"]["adaptive"]
        self.records: Dict[str, dict] = {}
        self.reused: Dict[str, bool] = {}
        self.hashes: Dict[str, str] = {}
        self.adopted_from: Dict[str, str] = {}  # stage -> the hash it had before adoption
        self.n_stages = (2 + (2 if "oni" in self.defenses else 0) + len(self.defenses) - 1
                         + len(self.defenses) * len(self.groups))
        self.counter = 0

    # -- the stage mechanics

    def _stage(self, name: str, kind: str, describe: str, keys: Sequence[str],
               parents: Sequence[str], extra: Optional[Mapping] = None,
               size_keys: Sequence[str] = (),
               settings_as_today: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
               ) -> _Stage:
        """``settings_as_today``: reads the settings of a record of ``_ADOPTED_VERSION``
        where they were hashed under other keys than ``keys`` and ``extra``."""
        settings = cfgmod.config_subset(self.config, keys)
        settings.update(extra or {})
        parent_hashes = {parent: self.hashes[parent] for parent in parents}
        # every stage's models have the target's widths (shadows too, unless set apart)
        sizes = cfgmod.config_subset(self.config, ("model.hidden", *size_keys))
        st = _Stage(name, kind, describe, settings, parent_hashes, sizes=sizes)
        st.hash = cfgmod.stage_hash(kind, settings, parent_hashes.values())
        st.settings_as_today = settings_as_today
        return st

    def _as_today(self, st: _Stage) -> Callable[[dict], Tuple[dict, dict, str]]:
        """Reads a record of ``_ADOPTED_VERSION`` in today's terms: its settings in today's
        keys, and each parent that was adopted under the hash the record names as that
        parent's hash today (a parent recomputed since keeps the old one: changed)."""
        def read(record: dict) -> Tuple[dict, dict, str]:
            settings = dict(record.get("settings", {}))
            if st.settings_as_today is not None:
                settings = st.settings_as_today(settings)
            parents = {parent: self.hashes[parent]
                       if digest == self.adopted_from.get(parent) else digest
                       for parent, digest in record.get("parents", {}).items()}
            return settings, parents, cfgmod.stage_hash(st.kind, settings, parents.values())
        return read

    def _run(self, st: _Stage, compute: Callable[[Path], Tuple[List[str], dict]]) -> dict:
        """Reuses ``st`` when done, else runs ``compute(stage_dir) -> (files, meta)``."""
        self.counter += 1
        where = f"{self.counter}/{self.n_stages} {st.name}"
        done, why = self.store.check(st.name, st.hash, st.settings, st.parents,
                                     self._as_today(st))
        if done:
            record = self.store.record(st.name)
            if record["version"] == _ADOPTED_VERSION:
                record = self.store.adopt(st.name, st.hash, st.settings, st.parents)
            self.log(f"{where}: done earlier, reused")
            if "adopted_from" in record:
                self.adopted_from[st.name] = record["adopted_from"]["hash"]
        else:
            if why:
                self.log(f"{where}: {why}")
            self.log(f"{where}: {st.describe}")
            directory = self.store.begin(st.name)
            start = time.perf_counter()
            with _settings_named(f"stage {st.name}", st.settings), \
                    _out_of_memory_named(f"stage {st.name}", {**st.sizes, **st.settings}), \
                    warning_context(f"stage {st.name}"):
                files, meta = compute(directory)
            seconds = time.perf_counter() - start
            record = self.store.finish(st.name, st.hash, st.settings, st.parents, files, meta,
                                       seconds)
            self.log(f"{where}: finished in {seconds:.1f} s")
        self.reused[st.name] = done
        self.records[st.name] = record
        self.hashes[st.name] = st.hash
        return record

    def _train_config(self):
        from .train import TrainConfig
        t = self.config["train"]
        return TrainConfig(epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"],
                           weight_decay=t["weight_decay"], seed=self.seed,
                           device=self.config["device"], progress=self.progress)

    @staticmethod
    def _defense_stage(name: str) -> str:
        return "target" if name == "undefended" else f"defense-{name}"

    def _model_dir(self, name: str) -> Path:
        return self.store.path(self._defense_stage(name)) / "model"

    # -- the run

    def run(self) -> Tuple[dict, Dict[str, np.ndarray]]:
        """Every stage in order; returns (what results.json holds, the ROC curves)."""
        from .metrics import midput
        source = self.config["data"]["path"] or "synthetic Purchase-shaped data"
        self.log(f"loading data ({source})")
        with _out_of_memory_named(f"loading the data ({source})",
                                  cfgmod.config_subset(self.config, ("data",))):
            self.data = _load_data(self.config)
        self.fingerprint = _data_fingerprint(self.data)
        data = self.data
        self.log(f"data: {data.name}, {data.n} rows, {data.d} features, {data.k} classes "
                 f"(fingerprint {self.fingerprint})")
        self.train_config = self._train_config()
        self.hidden = tuple(self.config["model"]["hidden"])
        self._splits()
        self._check_attack_sizes()
        self._target()
        if "oni" in self.defenses:
            self._oni_noise()
        for name in self.defenses:
            if name != "undefended":
                self._defense(name)
        attack_results = {name: {} for name in self.defenses}
        roc: Dict[str, np.ndarray] = {}
        for name in self.defenses:
            for group, attacks in self.groups:
                record, arrays = self._attacks(name, group, attacks)
                for attack in attacks:
                    attack_results[name][attack] = record["meta"][attack]
                    for part in ("fpr", "tpr"):
                        roc[f"{name}/{attack}/{part}"] = arrays[f"{attack}/{part}"]
        results = _assemble(self.config, self.data, self.splits, self, self.defenses,
                            attack_results, self.fingerprint, midput)
        return results, roc

    def _splits(self) -> None:
        import torch

        from .data import Splits, make_splits
        keys = ("train", "test", "known", "target", "target_member", "shadow_pool")
        st = self._stage("splits", "splits", "drawing the splits", cfgmod.STAGE_KEYS["splits"],
                         (), {"data_fingerprint": self.fingerprint},
                         settings_as_today=self._splits_settings_as_today)

        def compute(directory):
            config = self.config["splits"]
            sizes = {key: config[key] for key in ("train", "test", "known", "target",
                                                   "shadow_pool") if config[key] is not None}
            splits = make_splits(self.data, preset=config["preset"], sizes=sizes or None,
                                 seed=self.seed)
            arrays = {key: getattr(splits, key).numpy() for key in keys}
            files = [self.store.write_npz("splits", "splits.npz", arrays)]
            return files, {"preset": splits.preset, "sizes": splits.sizes()}

        record = self._run(st, compute)
        arrays = self.store.read_npz("splits", "splits.npz")
        self.splits = Splits(**{key: torch.from_numpy(arrays[key]) for key in keys},
                             preset=record["meta"]["preset"], seed=self.seed)
        data, splits = self.data, self.splits
        self.x_train, self.y_train = data.x[splits.train], data.y[splits.train]
        self.x_test, self.y_test = (data.x[splits.test], data.y[splits.test]) \
            if len(splits.test) else (None, None)

    def _splits_settings_as_today(self, old: Dict[str, Any]) -> Dict[str, Any]:
        """Version 2 hashed the data's source (data.path, data.format, data.synthetic) and a
        fingerprint of its bytes alone; today only the fingerprint, of bytes and shapes."""
        old = {key: value for key, value in old.items() if not key.startswith("data.")}
        if old.get("data_fingerprint") == _data_fingerprint(self.data, version=2):
            old["data_fingerprint"] = self.fingerprint
        return old

    def _check_attack_sizes(self) -> None:
        """Shadow sizes that the drawn splits cannot hold: refused now, not by an attack stage
        after every model has trained."""
        from .attacks import check_attack_sizes
        names = [attack for _, attacks in self.groups for attack in attacks]
        keys = ("splits", *(f"attacks.{attack}.shadow_size" for attack in names),
                *(["attacks.label_only.noise"] if "label_only" in names else []))
        sizes = {key: len(getattr(self.splits, key)) for key in ("train", "known", "target",
                                                                 "shadow_pool")}
        with _settings_named(f"the attacks' shadow sizes on the drawn splits "
                             f"({', '.join(f'{k}: {v} rows' for k, v in sizes.items())})",
                             cfgmod.config_subset(self.config, keys), "the settings"):
            check_attack_sizes(names, self.splits,
                               {attack: self.config["attacks"][attack] for attack in names},
                               data=self.data)

    def _save_defense(self, directory: Path, defended) -> Tuple[List[str], dict]:
        from .defenses import load_defended, save_defended
        save_defended(defended, directory / "model")
        reloaded = load_defended(directory / "model")  # what the attacks will query
        meta = {"utility": _utility(reloaded, self.data, self.splits),
                "history": _history_dict(defended.history),
                "config": defended.config,
                "report": {k: v for k, v in defended.report.items() if _jsonable(v)}}
        # every file of the model (its weights too): a damaged one is found and recomputed
        files = sorted(path.relative_to(directory).as_posix()
                       for path in (directory / "model").rglob("*") if path.is_file())
        return files, meta

    def _target(self) -> None:
        from .defenses import defend, load_defended
        data, config = self.data, self.config
        st = self._stage("target", "target", f"training the undefended target model (MLP "
                         f"{data.d}-{'-'.join(map(str, self.hidden))}-{data.k}, "
                         f"{config['train']['epochs']} epochs, {len(self.splits.train)} rows)",
                         cfgmod.STAGE_KEYS["target"], ("splits",))
        self._run(st, lambda directory: self._save_defense(directory, defend(
            "undefended", self.x_train, self.y_train, train_config=self.train_config,
            x_test=self.x_test, y_test=self.y_test, hidden=self.hidden, seed=self.seed,
            n_classes=data.k)))
        self.base = load_defended(self._model_dir("undefended")).model

    def _oni_noise(self) -> None:
        """ONI's Shapley values and noise: stages of their own (the costly part of ONI)."""
        import torch
        cfg = self.config["defenses"]["oni"]
        st = self._stage("oni-phi", "phi", f"Shapley values of the target model on its "
                         f"{len(self.splits.train)} training rows ({cfg['n_permutations']} "
                         f"permutations per row)", cfgmod.STAGE_KEYS["phi"], ("target",))

        def compute_phi(directory):
            with _elapsed_bar("shapley", self.progress):
                res = _oni_phi(self.base, self.x_train, cfg, self.seed, self.device)
            files = [self.store.write_npz("oni-phi", "phi.npz", {
                "values": res.values.cpu().numpy(), "stderr": res.stderr.cpu().numpy(),
                "fx": res.fx.cpu().numpy(), "f_baseline": res.f_baseline.cpu().numpy()})]
            return files, {"stderr_max": float(res.stderr.max())}

        self._run(st, compute_phi)
        st = self._stage("oni-eta", "eta", "ONI noise for the training rows (eqs. 5-8)",
                         cfgmod.STAGE_KEYS["eta"], ("oni-phi",))

        def compute_eta(directory):
            phi = torch.from_numpy(self.store.read_npz("oni-phi", "phi.npz")["values"])
            start = time.perf_counter()
            with _elapsed_bar("noise", self.progress):
                noise = _oni_eta(self.base, self.x_train, phi, cfg, self.seed, self.device)
            seconds = time.perf_counter() - start
            arrays = {f.name: getattr(noise, f.name).cpu().numpy()
                      for f in dataclasses.fields(noise) if f.name not in ("budget", "tau")}
            files = [self.store.write_npz("oni-eta", "eta.npz", arrays)]
            return files, _noise_facts(noise, seconds)

        self._run(st, compute_eta)

    def _defense(self, name: str) -> None:
        import torch

        from .defenses import DefendedModel, defend
        from .train import predict_proba
        parents = ("target", "oni-eta") if name == "oni" else ("target",)
        st = self._stage(f"defense-{name}", "defense", f"training the {name} defense",
                         ("seed", "model", "train", f"defenses.{name}"), parents)
        cfg = self.config["defenses"][name]

        def compute(directory):
            if name == "oni":  # distilled from the saved noise (oni.defend's last step)
                eta = torch.from_numpy(self.store.read_npz("oni-eta", "eta.npz")["eta"])
                model, history = _oni_distill(self.base, self.x_train, self.y_train, eta, cfg,
                                              self.train_config, self.x_test, self.y_test,
                                              self.device)
                report = {"base_model": "given", **self.records["oni-eta"]["meta"]}
                defended = DefendedModel("oni", model, functools.partial(predict_proba, model),
                                         history, dict(cfg), report)
            else:
                defended = defend(name, self.x_train, self.y_train, config=cfg,
                                  train_config=self.train_config, x_test=self.x_test,
                                  y_test=self.y_test, hidden=self.hidden, base_model=self.base,
                                  seed=self.seed, n_classes=self.data.k)
            return self._save_defense(directory, defended)

        self._run(st, compute)

    def _attacks(self, name: str, group: str, attacks: Sequence[str]):
        """One attack group against one defense; returns its record and saved arrays."""
        from .attacks import _run_attacks
        from .defenses import load_defended
        from .metrics import attack_report
        adaptive = self.adaptive and name != "undefended"
        keys = ("seed", *(f"attacks.{a}" for a in attacks))
        if adaptive:
            keys += (f"defenses.{name}",)
        stage = f"attack-{name}-{group}"

        def settings_as_today(old: Dict[str, Any]) -> Dict[str, Any]:
            # version 2 hashed attacks.adaptive, which does not change the undefended
            # model's attacks
            old = dict(old)
            old["adaptive_shadows"] = bool(old.pop("attacks.adaptive", None)) and \
                name != "undefended"
            return old

        # hashed: whether the shadows are trained with the defense, not attacks.adaptive
        st = self._stage(stage, "attack", f"{', '.join(attacks)} against {name} "
                         f"({'adaptive' if adaptive else 'plain'} shadows)", keys,
                         (self._defense_stage(name),),
                         {"attacks": list(attacks), "adaptive_shadows": adaptive},
                         size_keys=(f"defenses.{name}",), settings_as_today=settings_as_today)

        def compute(directory):
            target = load_defended(self._model_dir(name))  # a fresh noise stream (DynaNoise)
            knows = (name, self.config["defenses"][name]) if adaptive else None
            # self.data was scanned for label-only's bitflip once, by _check_attack_sizes
            results = _run_attacks(list(attacks), target, self.data, self.splits,
                                   configs={a: self.config["attacks"][a] for a in attacks},
                                   train_config=self.train_config, defense=knows,
                                   seed=self.seed, data_checked=True)
            arrays, meta = {}, {}
            for attack, res in results.items():
                rep = attack_report(res.scores, self.splits.target_member,
                                    calibration=res.calibration)
                arrays[f"{attack}/fpr"], arrays[f"{attack}/tpr"] = rep.pop("roc")
                arrays[f"{attack}/scores"] = res.scores.numpy()
                if res.calibration is not None:
                    arrays[f"{attack}/calibration_scores"] = res.calibration[0].numpy()
                    arrays[f"{attack}/calibration_member"] = res.calibration[1].numpy()
                facts = {k: v for k, v in res.extra.items()
                         if k not in ("config", "defense") and _jsonable(v)}
                meta[attack] = {"metrics": rep, "facts": facts}
            return [self.store.write_npz(stage, "scores.npz", arrays)], meta

        record = self._run(st, compute)
        return record, self.store.read_npz(stage, "scores.npz")


def _check_device_settings(config: Mapping) -> None:
    """Settings that need the device the run resolves to: refused before anything is written
    or trained (the tf32 opt-in is a mode of NVIDIA tensor cores)."""
    from .models import _resolve_device
    device = _resolve_device(config["device"])
    precision = (config["defenses"].get("oni") or {}).get("precision")
    if "oni" in config["defenses"]["run"]:
        _check_tf32_device(precision, device, "defenses.oni.precision",
                           f"the run is on {device} (device: {config['device']})")


def _check_tf32_device(precision, device, name: str, where: str) -> None:
    """tf32 is a mode of NVIDIA tensor cores: refused up front off CUDA, naming the setting."""
    if precision == "tf32" and device.type != "cuda":
        raise ConfigError(f"{name}: tf32 needs a CUDA device, {where}; use float32 or bf16")


def run_experiment(config: Mapping, run_dir: os.PathLike, *, quiet: bool = False,
                   progress: bool = True) -> dict:
    """Runs (or resumes) the experiment ``config`` in ``run_dir``; returns the results.

    Parameters
    ----------
    config : mapping
        A resolved configuration (:func:`oni.config.resolve_config`).
    run_dir : path
        The run directory: ``config.yaml``, ``stages/``, ``results.json``, ``results.csv``,
        ``roc.npz``, ``report.md`` and ``figures/`` are written there.
    quiet : bool
        No progress lines.
    progress : bool
        Progress bars while training.

    Returns
    -------
    dict
        What ``results.json`` holds.
    """
    _check_device_settings(config)
    log = _Log(quiet)
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    wall_start = time.perf_counter()
    config_bytes = cfgmod.dump_yaml(config).encode()
    with _run_lock(run_dir):
        # stages/ first: it marks the directory as a run's, for a resume after a kill
        (run_dir / "stages").mkdir(exist_ok=True)
        # config.yaml describes results.json: over a finished run it is replaced only with
        # the new results, so a run that fails leaves the old pair as it was
        if not (run_dir / "results.json").exists():
            write_atomic(run_dir / "config.yaml", config_bytes)
        results, roc = _Experiment(config, run_dir, log, progress and not quiet).run()
        results["wall_seconds"] = time.perf_counter() - wall_start
        results_bytes = results_json_bytes(results, default=_json_default)
        roc_bytes = _npz_bytes(roc)
        # the report is checked and rendered from the results as a reader will see them,
        # before any file is replaced: a refusal leaves the last run's files as they were
        try:
            rendered = render_report(run_dir, results_from_json(results_bytes), roc)
        except ValueError as err:
            raise ResultsRefused(f"the report's checks refuse the results this run made: "
                                 f"{err}. The stages are saved and the last run's results "
                                 f"and report are as they were. This is a bug in oni or a "
                                 f"setting it does not check: please report it") from None
        for name in (FINISHING, "roc.npz", "results.json", "config.yaml"):  # the report's
            if (run_dir / name).is_dir():  # own files are checked by render_report
                raise FileExistsError(f"{run_dir / name} is a directory, where oni run "
                                      f"writes a file; move it away (the stages are saved)")
        # a kill, power loss or I/O error part way through the writes leaves FINISHING, and
        # oni report refuses the mix; an interrupt waits for them, so the files stay one run's
        try:
            with _interrupts_deferred():
                _write_results(run_dir, roc_bytes, rendered, results_bytes, config_bytes)
        except KeyboardInterrupt as err:
            err.results_written = run_dir  # the run is complete: main says so
            raise
    return results


def _write_results(run_dir: Path, roc_bytes: bytes, rendered, results_bytes: bytes,
                   config_bytes: bytes) -> None:
    write_atomic(run_dir / FINISHING, b"oni run is replacing this directory's results "
                 b"files; if it is still here, run it again\n")
    try:
        write_atomic(run_dir / "roc.npz", roc_bytes)
        write_rendered(rendered)
        write_atomic(run_dir / "results.json", results_bytes)
        write_atomic(run_dir / "config.yaml", config_bytes)  # last: it names them
    except OSError as err:  # a full disk: say what it left, as oni report will
        raise OSError(err.errno, f"{err.strerror}, while replacing the results files: they "
                      f"may now come from two runs ({FINISHING} marks it); mend the cause "
                      f"and run the same oni run again (its stages are saved)",
                      err.filename) from err
    (run_dir / FINISHING).unlink()
    _fsync_dir(run_dir)


@contextlib.contextmanager
def _interrupts_deferred():
    """SIGINT and SIGTERM wait until the block is done (in the main thread; elsewhere the
    block runs as it is), then act: the files a block writes stay a matching set."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous: Dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda number, frame: received.append(number))
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, left as it is
                signal.signal(sig, handler)
    for number in received[:1]:  # as the signal would have acted, now the files are whole
        signal.raise_signal(number)


# what `oni run` writes in its directory; any other entry means the directory is not a run's
_RUN_ENTRIES = {".lock", "config.yaml", "stages", "results.json", "results.csv", "roc.npz",
                "report.md", "figures", FINISHING}


def _check_run_dir(run_dir: Path) -> None:
    """A run goes to a new or empty directory, or one an earlier run wrote (to resume or
    update it); a directory of other files is refused before anything in it is replaced."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise ConfigError(f"--out {run_dir} is a symbolic link to {os.readlink(run_dir)}, "
                          f"which does not exist; create that directory or give another")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a directory for the run")
    if not run_dir.is_dir():
        return
    entries = {entry.name for entry in run_dir.iterdir()} - {".lock"}
    if entries and not _is_run_dir(run_dir):
        foreign = sorted(name for name in entries - _RUN_ENTRIES if not _oni_temporary(name))
        missing = ("no stages/" if "stages" not in entries else
                   "no stage record, results or resolved config of an oni run")
        shown = (f"files that no oni run wrote (e.g. {', '.join(foreign[:3])})" if foreign
                 else f"{', '.join(sorted(entries)[:3])} but {missing}, so it is not "
                      f"recognisable as a run's")
        raise ConfigError(f"--out {run_dir} holds {shown}, and a run would replace its "
                          f"config.yaml, report.md, results.csv and figures/: use a new or "
                          f"empty directory")


def _is_run_dir(directory: Path) -> bool:
    """Whether ``oni run`` wrote ``directory``: it has ``stages/`` and a stage record, oni's
    results or oni's resolved config in it, or nothing else (a run stopped before its
    first stage finished). An empty ``stages/`` beside a user's own files is not enough."""
    stages = directory / "stages"
    if not stages.is_dir():
        return False
    with contextlib.suppress(OSError):
        for entry in stages.iterdir():
            if _json_format(entry / _RECORD) == _STAGE_FORMAT:
                return True
    if _json_format(directory / "results.json") == _RESULTS_FORMAT:
        return True
    config = directory / "config.yaml"
    if config.is_file():
        try:
            loaded = cfgmod.load_yaml(config.read_text(encoding="utf-8"), source=str(config))
        except (ConfigError, OSError, UnicodeDecodeError):
            return False
        # oni writes the resolved config: every section of the schema (a hand-written
        # config names a few)
        return isinstance(loaded, dict) and set(cfgmod.SCHEMA) <= set(loaded)
    # (write_atomic's temporary file of the first config.yaml, left by a kill, is oni's)
    return all(name in (".lock", "stages") or _oni_temporary(name)
               for name in (entry.name for entry in directory.iterdir()))


def _oni_temporary(name: str) -> bool:
    """Whether ``name`` is write_atomic's temporary name for a file a run writes."""
    temporary = _TEMPORARY.fullmatch(name)
    return bool(temporary) and temporary.group(1) in _RUN_ENTRIES


def _json_format(path: Path) -> Optional[str]:
    """The ``format`` tag of the JSON file ``path``, or None (absent, not a regular file,
    not JSON of an object)."""
    if not path.is_file():  # a FIFO would block the read
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return found.get("format") if isinstance(found, dict) else None


def _balanced(metrics: Mapping) -> float:
    """The attack's balanced accuracy at the adversary's threshold (the oracle's when no
    calibration data exists)."""
    value = metrics.get("balanced_accuracy")
    return metrics["oracle_balanced_accuracy"] if value is None else value


def _assemble(config, data, splits, runner: "_Experiment", defenses, attack_results,
              fingerprint, midput) -> dict:
    defense_results = {}
    for name in defenses:
        stage = "target" if name == "undefended" else f"defense-{name}"
        meta = runner.records[stage]["meta"]
        attacks = attack_results[name]
        defense_results[name] = {
            **meta["utility"],
            "mean_balanced_attack_acc": (float(np.mean([_balanced(a["metrics"]) for a in
                                                        attacks.values()]))
                                         if attacks else None),
            "history": meta["history"], "config": meta["config"], "report": meta["report"]}
    def outcome(name: str) -> dict:  # what oni.metrics.midput compares
        return {"test_acc": defense_results[name]["test_acc"],
                "balanced_attack_acc": {a: _balanced(m["metrics"])
                                        for a, m in attack_results[name].items()}}

    for name in defenses:
        has = defense_results["undefended"]["test_acc"] is not None and attack_results[name]
        defense_results[name]["midput"] = (midput(outcome("undefended"), outcome(name))
                                           if has else None)
    import torch
    machine = {"platform": platform.platform(), "processor": platform.processor() or
               platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                machine["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return {
        "format": _RESULTS_FORMAT, "version": 1,
        "config": config,
        "data": {"name": data.name, "n": data.n, "d": data.d, "k": data.k,
                 "fingerprint": fingerprint},
        "splits": {"preset": splits.preset, **splits.sizes()},
        "defenses": defense_results,
        "attacks": attack_results,
        "attack_order": list(config["attacks"]["run"]),
        "stages": {name: {"hash": rec["hash"], "seconds": rec["seconds"],
                          "reused": runner.reused.get(name, False)}
                   for name, rec in runner.records.items()},
        "compute_seconds": float(sum(rec["seconds"] for rec in runner.records.values())),
        "machine": machine,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ----------------------------------------------------------------------------- commands

def _cmd_run(args) -> int:
    config = cfgmod.resolve_config(args.config, args.set or (), preset=args.preset)
    if args.out is not None:
        run_dir = Path(args.out).expanduser()
    else:
        name = Path(args.config).stem if args.config else config["preset"]
        run_dir = Path("runs") / name
    if args.dry_run:
        _check_device_settings(config)  # as the run would, before printing the config
        sys.stdout.write(cfgmod.dump_yaml(config))
        return 0
    if args.config and Path(args.config).expanduser().resolve() == \
            (run_dir / "config.yaml").expanduser().resolve():
        raise ConfigError(f"the config file {args.config} is where the run writes its resolved "
                          f"config; keep it elsewhere or use another --out")
    start = time.perf_counter()
    results = run_experiment(config, run_dir, quiet=args.quiet,
                             progress=not args.no_progress)
    seconds = time.perf_counter() - start
    reused = sum(1 for s in results["stages"].values() if s["reused"])
    computed = len(results["stages"]) - reused
    print(f"oni run: done in {seconds:.1f} s ({computed} stages computed, {reused} reused); "
          f"results in {run_dir}/ (report.md, results.json, results.csv, figures/)")
    return 0


def _load_rows(path: str, rows: Optional[str], data_format: str):
    """(the data's selected rows, the index of the first): the walks and random starts are
    drawn by row index in the file, so a --rows piece gets the rows' own."""
    from .data import load_dataset
    data = load_dataset(Path(path).expanduser(), format=data_format)
    if rows is None:
        return data, 0
    try:
        start, colon, stop = rows.partition(":")
        if not colon:  # "5" could mean row 5, the first 5 rows or 5:END: ask
            raise ValueError
        lo = int(start) if start else 0
        hi = int(stop) if stop else data.n
    except ValueError:
        raise ConfigError(f"--rows {rows!r}: expected START:STOP (e.g. 0:1000, :1000 for the "
                          f"first 1000 rows, 1000: for the rest)") from None
    if not 0 <= lo < hi <= data.n:
        raise ConfigError(f"--rows {rows!r}: must select rows within 0:{data.n} ({path} has "
                          f"{data.n} rows)")
    import torch
    return data.subset(torch.arange(lo, hi)), lo


def _load_model_dir(path: str, device, command: str, rank: int = 0):
    from .models import load_model
    model, extra = load_model(Path(path).expanduser(), device=device)
    defense = extra.get("defense") if isinstance(extra, dict) else None
    if isinstance(defense, dict) and defense.get("name") == "dynanoise" and rank == 0:
        print(f"oni {command}: note: {path} holds a DynaNoise defense, whose answers add "
              f"random noise and a temperature to its network's at each query; the solvers "
              f"take the network alone (the undefended model it wraps)", file=sys.stderr)
    return model.eval()


def _check_width(model, data, path: str) -> None:
    d = getattr(model, "d", data.d)
    if d != data.d:
        raise ConfigError(f"the model in {path} takes {d} features but the data has {data.d}")


def _join_ranks(args) -> int:
    """Under torchrun (WORLD_SIZE > 1): joins the process group (nccl with one GPU per rank,
    cuda:LOCAL_RANK, when the device is CUDA; gloo on CPUs) and returns this rank; 0 alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch
    import torch.distributed as dist

    from .models import _resolve_device
    if not dist.is_initialized():
        device = _resolve_device(args.device, "--device")
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank()


def _model_and_rows(args, command: str, rank: int = 0):
    """(device, model, data, x on the device, the index of x's first row in DATA) for
    `oni shapley` and `oni noise`."""
    import torch

    from .models import _resolve_device
    from .train import _model_device_dtype
    device = _resolve_device(args.device, "--device")
    _check_tf32_device(args.precision, device, "--precision",
                       f"--device resolved to {device}")
    model = _load_model_dir(args.model_dir, device, command, rank)
    data, row_offset = _load_rows(args.data, args.rows, args.format)
    _check_width(model, data, args.model_dir)
    # data files load as float32; a model saved in another floating dtype (float64) gets its
    # own, since the command line has no way to cast either
    _, dtype = _model_device_dtype(model)
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"the model in {args.model_dir} holds {dtype} weights; the solvers "
                          f"take float32 or float64 models (save it after model.float(); "
                          f"--precision bf16 runs their batched passes in bfloat16)")
    if dtype == torch.float64 and args.precision != "float32":
        raise ConfigError(f"--precision {args.precision}: the model in {args.model_dir} is "
                          f"float64, whose arithmetic neither TF32 nor bfloat16 autocast "
                          f"touches; use --precision float32 (or save the model in float32)")
    return device, model, data, data.x.to(device, dtype), row_offset


def _model_labels(data, model, path: str):
    """DATA's labels as the model's class indices, for --target label. A file's labels are
    renumbered 0..k-1 by sorting those it holds, which names the model's classes only when
    it holds all of them, names them in a ``classes`` array, or was labelled 0..m-1."""
    width = getattr(model, "k", None)  # load_model's models are oni MLPs
    # a file labelled 0..m-1 keeps its labels (the renumbering is the identity)
    if width is not None and data.k != width and data.classes != tuple(range(data.k)):
        raise ConfigError(f"--target label: {path} holds {data.k} classes ({_few(data.classes)})"
                          f" but the model has {width} outputs, so its labels, renumbered "
                          f"0..{data.k - 1}, do not name the model's classes; give --target "
                          f"pred or a class index, or save the data as .npz with a 'classes' "
                          f"array of all {width} labels")
    return data.y


def _few(values, limit: int = 6) -> str:
    shown = ", ".join(map(repr, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _check_output_paths(outputs: Mapping[str, Optional[str]],
                        inputs: Mapping[str, Optional[str]]) -> None:
    """Before any work: every output goes to its own file, none overwrites an input (the
    data, --phi, --baseline) or is a directory."""
    seen: Dict[Path, str] = {}
    for flag, path in inputs.items():
        if not path:
            continue
        path = Path(path).expanduser().resolve()
        seen[path] = flag
        if path.is_dir():  # MODEL_DIR: each of its files
            seen.update({entry: f"a file of {flag}" for entry in path.iterdir()})
    for flag, path in outputs.items():
        if path is None:
            continue
        if not path:  # (an empty --stderr-out or --details was skipped, silently)
            raise ConfigError(f"{flag}: an empty path; give a file name")
        resolved = Path(path).expanduser().resolve()
        if resolved in seen:
            raise ConfigError(f"{flag} {path} is also {seen[resolved]}: it would be "
                              f"overwritten; write to another file")
        if resolved.is_dir():
            raise ConfigError(f"{flag} {path} is a directory; give a file name")
        for parent in resolved.parents:  # the first that exists must be a directory
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError(f"{flag} {path}: {parent} is not a directory")
                break
        seen[resolved] = flag


def _load_array(path: str, flag: str, kinds: str = "biuf") -> np.ndarray:
    """A .npy array of numbers (numpy kinds ``kinds``), or a ConfigError naming the flag."""
    import zipfile
    source = Path(path).expanduser()
    if source.exists() and not source.is_file():  # a FIFO would block np.load
        raise ConfigError(f"{flag} {path}: not a regular file; expected a .npy array")
    try:
        array = np.load(source, allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{flag} {path}: not a readable .npy array ({err})") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ConfigError(f"{flag} {path}: an .npz archive; expected one .npy array")
    if array.dtype.kind not in kinds:
        what = {"f": "floating-point numbers", "iu": "integers"}.get(kinds, "numbers")
        raise ConfigError(f"{flag} {path}: expected {what}, got dtype {array.dtype}")
    return array


def _cmd_shapley(args) -> int:
    import torch

    from .distributed import shapley_values  # one rank: the plain oni.shapley_values
    baseline_file = args.baseline if args.baseline not in ("zero", "mean", None) else None
    _check_output_paths({"--out": args.out, "--stderr-out": args.stderr_out},
                        {"DATA": args.data, "MODEL_DIR": args.model_dir,
                         "--baseline": baseline_file, "--groups": args.groups})
    rank = _join_ranks(args)
    device, model, data, x, row_offset = _model_and_rows(args, "shapley", rank)
    groups = None
    if args.groups:
        # the ids' ranks: uint64 ids beyond int64 would wrap (and reorder) in an int64 cast
        ids = _load_array(args.groups, "--groups", "iu")
        groups = torch.from_numpy(np.unique(ids, return_inverse=True)[1].reshape(ids.shape)
                                  .astype(np.int64)).to(device)
    baseline = None
    if args.baseline == "mean":
        baseline = x.mean(dim=0)
    elif baseline_file:
        # rounded as the rows are (data files load as float32), so that a feature equal to
        # the baseline in the files is equal here too, and gets exactly 0
        values = _load_array(baseline_file, "--baseline")
        if values.dtype.kind == "f" and np.isfinite(values).all() and \
                np.abs(values).max(initial=0) > np.finfo(np.float32).max:
            raise ConfigError(f"--baseline {baseline_file}: values beyond float32's range "
                              f"(the data's), up to {np.abs(values).max():g}")
        baseline = torch.from_numpy(values).float().to(device, x.dtype)
    target = args.target
    labels = None
    if target == "label":
        labels = _model_labels(data, model, args.data).to(device)
    elif target != "pred":
        try:
            target = int(target)
        except ValueError:
            raise ConfigError(f"--target {target!r}: expected pred, label or a class "
                              f"index") from None
        width = getattr(model, "k", None)
        if width is not None and not 0 <= target < width:
            raise ConfigError(f"--target {target}: the model has {width} classes, "
                              f"0..{width - 1}")
    start = time.perf_counter()
    res = shapley_values(model, x, baseline, target=target, labels=labels,
                         n_permutations=args.n_permutations, tol=args.tol, seed=args.seed,
                         backend=args.backend, precision=args.precision, groups=groups,
                         row_offset=row_offset)
    seconds = time.perf_counter() - start
    if rank != 0:  # every rank holds the whole result; rank 0 writes it
        return 0
    buffer = io.BytesIO()
    np.save(buffer, res.values.cpu().numpy())
    write_atomic(Path(args.out).expanduser(), buffer.getvalue())
    if args.stderr_out:
        buffer = io.BytesIO()
        np.save(buffer, res.stderr.cpu().numpy())
        write_atomic(Path(args.stderr_out).expanduser(), buffer.getvalue())
    players = f"{res.values.shape[1]} groups" if groups is not None else f"{data.d} features"
    print(f"oni shapley: {data.n} rows x {players} in {seconds:.1f} s "
          f"(largest standard error {float(res.stderr.max()):.2e}); phi written to {args.out}")
    return 0


# oni.optimal_noise's warning of the rows that do not reach tau (`oni noise` counts them)
_INFEASIBLE_ROWS = r"\d+ of \d+ rows cannot reach entropy tau "


def _cmd_noise(args) -> int:
    import torch

    from .distributed import optimal_noise  # one rank: the plain oni.optimal_noise
    _check_output_paths({"--out": args.out, "--details": args.details},
                        {"DATA": args.data, "MODEL_DIR": args.model_dir, "--phi": args.phi})
    rank = _join_ranks(args)
    device, model, data, x, row_offset = _model_and_rows(args, "noise", rank)
    phi = None
    if args.phi:
        phi = torch.from_numpy(_load_array(args.phi, "--phi", "f")).to(device, x.dtype)
        if phi.dim() == 2 and phi.shape[0] == x.shape[0] and phi.shape[1] != x.shape[1]:
            raise ConfigError(f"--phi {args.phi}: {phi.shape[1]} values per row, but the data "
                              f"has d = {x.shape[1]} features; the noise needs one value per "
                              f"feature (not the per-group phi of `oni shapley --groups`)")
        if tuple(phi.shape) != tuple(x.shape):
            raise ConfigError(f"--phi {args.phi}: shape {tuple(phi.shape)} does not match the "
                              f"selected data rows {tuple(x.shape)} (use the same --rows)")
    if args.tau is not None and args.tau_fraction is not None:
        raise ConfigError("give --tau or --tau-fraction, not both")
    tau_fraction = args.tau_fraction
    if tau_fraction is None and args.tau is None:
        tau_fraction = args.tau_fraction_default
    start = time.perf_counter()
    with warnings.catch_warnings():
        # the summary line below counts them (every rank's, where each warns of its own)
        warnings.filterwarnings("ignore", message=_INFEASIBLE_ROWS, category=UserWarning)
        res = optimal_noise(model, x, phi, tau=args.tau, tau_fraction=tau_fraction,
                            eps=args.eps, beta=args.beta, importance=args.importance,
                            max_iter=args.max_iter, refine_iter=args.refine_iter,
                            polish_iter=args.polish_iter, starts=args.starts, seed=args.seed,
                            row_offset=row_offset, backend=args.backend,
                            precision=args.precision,
                            shapley_kwargs={"n_permutations": args.n_permutations,
                                            "precision": args.precision})
    seconds = time.perf_counter() - start
    if rank != 0:
        return 0
    buffer = io.BytesIO()
    np.save(buffer, res.eta.cpu().numpy())
    write_atomic(Path(args.out).expanduser(), buffer.getvalue())
    if args.details:
        write_atomic(Path(args.details).expanduser(), _npz_bytes({
            "entropy": res.entropy.cpu().numpy(), "norm": res.norm.cpu().numpy(),
            "feasible": res.feasible.cpu().numpy(), "iterations": res.iterations.cpu().numpy(),
            "radius": res.radius.cpu().numpy(), "tau": np.float64(res.tau)}))
    n_ok = int(res.feasible.sum())
    others = (f", the other {data.n - n_ok} get their highest-entropy point inside their "
              f"budget box and radius ball" if n_ok < data.n else "")
    print(f"oni noise: {n_ok} of {data.n} rows reach entropy tau = {res.tau:.4f} nats{others} "
          f"(mean noise norm {float(res.norm.double().mean()):.4f}) in {seconds:.1f} s; "
          f"eta written to {args.out}")
    return 0


def _cmd_report(args) -> int:
    run_dir = Path(args.run_dir).expanduser()
    if not (run_dir / "results.json").is_file():
        raise ConfigError(_unfinished_run_hint(run_dir))
    # a run finishing meanwhile would leave a mix of two runs' files
    with _run_lock(run_dir, report=True):
        path = build_report(run_dir)
    print(f"oni report: {path} rebuilt (results.csv and figures/ too)")
    return 0


def _unfinished_run_hint(run_dir: Path) -> str:
    """Why ``run_dir`` has no report, and how to finish its run. Not `oni run --out DIR`:
    that drops the run's config file, --preset and --set, so it would run the default
    preset there and recompute every stage."""
    if not run_dir.is_dir() or not _is_run_dir(run_dir):
        what = "does not exist" if not run_dir.exists() else "is not an oni run directory"
        return (f"{run_dir} {what} (no results.json): give the --out directory of a "
                f"finished `oni run`")
    out = shlex.quote(str(run_dir))
    hint = (f"{run_dir} holds no results.json: its run has not finished. Finish it with the "
            f"same `oni run` command that started it (the same config file, --preset and "
            f"--set options, --out {out}): its finished stages are reused")
    config = run_dir / "config.yaml"  # written when the run started: its resolved settings
    try:
        loaded = cfgmod.load_yaml(config.read_text(encoding="utf-8"), source=str(config))
    except (ConfigError, OSError, UnicodeDecodeError):
        return hint
    if not isinstance(loaded, dict) or not set(cfgmod.SCHEMA) <= set(loaded):
        return hint
    # it reproduces the run, but a run refuses its own config.yaml as its config file (it
    # rewrites it): hence a copy
    hint += (f". Its resolved settings are in {config}: `cp {shlex.quote(str(config))} "
             f"CONFIG.yaml && oni run CONFIG.yaml --out {out}` does the same")
    data_path = loaded["data"].get("path") if isinstance(loaded["data"], dict) else None
    if isinstance(data_path, str) and not Path(data_path).expanduser().is_absolute():
        hint += (f", from the directory the run started in (data.path {data_path!r} is "
                 f"relative)")
    return hint


# ----------------------------------------------------------------------------- arguments

_RUN_EPILOG = """\
configuration keys (YAML file and --set; dotted paths):
{schema}

presets:
  default     synthetic Purchase-shaped data (oni.synthetic_purchase, 4,500 rows), the
              paper's MLP for 20 epochs, the undefended, uniform, ONI and DynaNoise models,
              the shadow-model, metric and LiRA (4 shadows) attacks; about 4 minutes on a
              2-core CPU
  paper       the paper's settings (Table 1 splits, MLP 1024-512-256-128, 100 epochs, the
              noise solver's full settings, 16 LiRA shadows) for a Purchase100 or Texas100
              file: --set data.path=FILE; a GPU is recommended
  location30  Location30 (dataset_location.tgz): a proportional split, the paper's MLP,
              100 epochs, 8 LiRA shadows: --set data.path=.../dataset_location.tgz

examples:
  oni run                                   # the embedded default, into runs/default
  oni run --set train.epochs=5 --set defenses.oni.tau_fraction=0.7 --out runs/try
  oni run --preset paper --set data.path=data/dataset_purchase --out runs/purchase
  oni run my.yaml --dry-run                 # print the resolved config and stop

Re-running a command resumes it: finished stages whose settings did not change are reused
(a stage whose settings changed is recomputed, and the run says which keys changed).
"""


def build_parser() -> argparse.ArgumentParser:
    from .defenses import DEFAULTS as DEFENSE_DEFAULTS
    from .shapley import PRECISIONS
    oni_defaults = DEFENSE_DEFAULTS["oni"]
    parser = argparse.ArgumentParser(
        prog="oni", description="Optimal Noise Injection against membership inference: run "
        "the experiment, or compute Shapley values and ONI noise for a saved model.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run", help="data -> splits -> target -> defenses -> attacks -> metrics -> report",
        description="Run (or resume) the experiment: data, splits, the undefended target "
        "model, each configured defense, each configured attack on each defense, the metrics "
        "and the report, saving every finished stage in the run directory.",
        epilog=_RUN_EPILOG.format(schema=cfgmod.describe_schema()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                     help="a YAML file with any of the configuration keys below (default: "
                          "the preset alone)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override one key, e.g. --set train.epochs=5 (the value is read "
                          "as YAML, numbers as YAML 1.2: 5 int, 010 ten, 1e-3 float, true, "
                          "null, [a, b]); repeatable, applied after the config file")
    run.add_argument("--out", metavar="RUN_DIR",
                     help="run directory (default: runs/<config file name>, or runs/<preset> "
                          "without a file); re-running into it resumes")
    run.add_argument("--preset", choices=tuple(cfgmod.PRESETS),
                     help="the defaults to start from (default: the file's 'preset' key, "
                          "else 'default')")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved configuration and exit without running")
    run.add_argument("--quiet", "-q", action="store_true",
                     help="no progress output (the final summary line is still printed)")
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bars (stage lines are still printed)")
    run.set_defaults(handler=_cmd_run)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a saved model directory (oni.models.save_model or "
                             "oni.save_defended; e.g. RUN_DIR/stages/target/model)")
    common.add_argument("data", metavar="DATA",
                        help="the data file whose rows are processed (Shokri CSV, Texas100 "
                             "directory or archive, .npz; a text file's parse is cached "
                             "beside it when that directory is writable, else in "
                             "$XDG_CACHE_HOME/oni or ~/.cache/oni)")
    common.add_argument("--out", required=True, metavar="FILE.npy",
                        help="where to write the [N, d] result (numpy .npy; [N, G] for `shapley "
                             "--groups`), in the model's dtype: float32 unless it was saved "
                             "in another")
    common.add_argument("--format", default="auto", choices=("auto", "shokri", "texas", "npz"),
                        help="how to read DATA (default: from the path)")
    common.add_argument("--rows", metavar="START:STOP",
                        help="process only these rows of DATA, e.g. 0:1000, :1000 or 1000: "
                             "(default: all); each row gets the walks and starts it gets in "
                             "a run over all rows, so pieces join into that run's result "
                             "(not with --baseline mean: the mean of the selected rows)")
    common.add_argument("--seed", type=int, default=0,
                        help="seed of the permutation walks (and of the noise solver's "
                             "random starts); default 0")
    common.add_argument("--backend", default="auto", choices=("auto", "kernel", "torch"),
                        help="kernel: the C++/CUDA ops; torch: their pure-PyTorch twins; "
                             "auto (default): the kernels when compiled for the device")
    common.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="arithmetic of the batched model evaluations (the Shapley walks, "
                             "the noise solver's search passes): float32 (default, strict), "
                             "tf32 (CUDA only) or bf16; an opt-in that trades accuracy for "
                             "speed (BENCHMARKS.md)")
    common.add_argument("--device", default="auto",
                        help="auto (cuda when available, default), cpu, cuda, cuda:N")

    shap = sub.add_parser(
        "shapley", parents=[common],
        help="Shapley values of a saved model on a data file, to .npy",
        description="Sampled-permutation Shapley values phi [N, d] of the model's "
        "explained-class probability (oni.shapley_values) for the rows of DATA.")
    shap.add_argument("--n-permutations", type=int, default=100,
                      help="permutation walks per row (antithetic pairs; default 100)")
    shap.add_argument("--target", default="pred",
                      help="the explained class: pred (the model's prediction, default), "
                           "label (DATA's label; DATA must hold all the model's classes, be "
                           "labelled 0..m-1, or name them in an .npz 'classes' array) or a "
                           "class index")
    shap.add_argument("--baseline", default="zero",
                      help="the reference input: zero (default), mean (the mean of the "
                           "selected rows) or a .npy file holding a [d] vector or a [B, d] "
                           "background set")
    shap.add_argument("--tol", type=float, default=None,
                      help="stop a row once its largest standard error is below TOL "
                           "(default: run all walks)")
    shap.add_argument("--stderr-out", metavar="FILE.npy",
                      help="also write the standard errors there (the shape of --out; NaN "
                           "for active features of a row with fewer than 2 samples, i.e. "
                           "--n-permutations 2)")
    shap.add_argument("--groups", metavar="GROUPS.npy",
                      help="a .npy of d integer group ids (e.g. one id per one-hot encoded "
                           "attribute): the groups are the players, and phi is [N, G], one "
                           "column per distinct id in increasing order")
    shap.set_defaults(handler=_cmd_shapley)

    noise = sub.add_parser(
        "noise", parents=[common],
        help="ONI noise eta for a saved model and a data file, to .npy",
        description="The minimum-norm noise eta [N, d] with H(f(x + eta)) >= tau, "
        "|eta_i| <= u_i (eq. 7) and ||eta|| <= rho(x) (eq. 8) for the rows of DATA "
        "(oni.optimal_noise). Defaults are those of the oni defense (oni.DEFAULTS['oni']).")
    noise.add_argument("--phi", metavar="PHI.npy",
                       help="Shapley values from `oni shapley` for the same rows (default: "
                            "computed here with --n-permutations and --seed)")
    noise.add_argument("--n-permutations", type=int, default=oni_defaults["n_permutations"],
                       help=f"walks per row when phi is computed here (default "
                            f"{oni_defaults['n_permutations']})")
    noise.add_argument("--tau", type=float, default=None,
                       help="entropy threshold in nats, in [0, log k]")
    noise.add_argument("--tau-fraction", type=float, default=None,
                       help=f"the threshold as a fraction of log k (default "
                            f"{oni_defaults['tau_fraction']} when --tau is not given)")
    noise.add_argument("--eps", type=float, default=oni_defaults["eps"],
                       help=f"per-feature budget scale of eq. 7 (default {oni_defaults['eps']})")
    noise.add_argument("--beta", type=float, default=oni_defaults["beta"],
                       help=f"how much Shapley importance shrinks a feature's budget, in "
                            f"[0, 1] (default {oni_defaults['beta']})")
    noise.add_argument("--importance", default=oni_defaults["importance"],
                       choices=("signed", "abs"),
                       help="phi as signed (the paper) or abs(phi) in eq. 7")
    noise.add_argument("--max-iter", type=int, default=oni_defaults["max_iter"],
                       help=f"ascent iterations per start (default {oni_defaults['max_iter']})")
    noise.add_argument("--refine-iter", type=int, default=oni_defaults["refine_iter"],
                       help=f"norm-reduction rounds (default {oni_defaults['refine_iter']})")
    noise.add_argument("--polish-iter", type=int, default=oni_defaults["polish_iter"],
                       help=f"polish iterations after them (default "
                            f"{oni_defaults['polish_iter']})")
    noise.add_argument("--starts", type=int, default=oni_defaults["starts"],
                       help=f"starting points per row (default {oni_defaults['starts']})")
    noise.add_argument("--details", metavar="FILE.npz",
                       help="also write the entropy, norm, feasible, iterations and radius of "
                            "each row, and the scalar tau, there (.npz)")
    noise.set_defaults(handler=_cmd_noise, tau_fraction_default=oni_defaults["tau_fraction"])

    report = sub.add_parser(
        "report", help="rebuild a run's report from its saved results",
        description="Rebuild RUN_DIR/report.md, results.csv and figures/ from "
        "RUN_DIR/results.json and roc.npz (no model is trained or queried).")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a directory `oni run` wrote")
    report.set_defaults(handler=_cmd_report)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``oni`` command; returns the exit status (2 for a usage or configuration error,
    1 for a failure while running)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .data import DataError
    from .distributed import OtherRankFailed
    try:
        with _terminate_as_interrupt(args.command == "run"), _warnings_as_lines(args.command):
            return args.handler(args)
    except ResultsRefused as err:
        print(f"oni {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OtherRankFailed as err:  # the failed rank printed its own error
        print(f"oni {args.command}: error: {err}", file=sys.stderr)
        return 1
    except RunOutOfMemory as err:
        if os.environ.get("ONI_TRACEBACK"):
            raise
        print(f"oni {args.command}: error: {err} (ONI_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 1
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"oni {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:
        if isinstance(err, RunDirectoryBusy):
            print(f"oni {args.command}: error: {err}", file=sys.stderr)
            return 2
        if not _is_out_of_memory(err) or os.environ.get("ONI_TRACEBACK"):
            raise
        print(f"oni {args.command}: error: out of memory: it asked for {_requested(err)} "
              f"({type(err).__name__}; ONI_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, FloatingPointError) as err:
        # the library's own checks name the argument and what was expected: a message, not a
        # traceback (ONI_TRACEBACK=1 shows it); a bad value is a usage error (2), a run that
        # failed on its numbers (diverged training) a failure (1)
        if os.environ.get("ONI_TRACEBACK"):
            raise
        kind = type(err).__name__
        print(f"oni {args.command}: error: {err} ({kind}; ONI_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 1 if isinstance(err, FloatingPointError) else 2
    except KeyboardInterrupt as err:
        written = getattr(err, "results_written", None)
        if written is not None:
            print(f"oni run: interrupted after the run finished: its results and report are "
                  f"in {written}/", file=sys.stderr)
        elif args.command == "run":
            print("oni run: interrupted; the finished stages are saved: run the same command "
                  "again to resume", file=sys.stderr)
        return 143 if isinstance(err, _Terminated) else 130
    finally:
        _leave_ranks()


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """Python's warnings shown as the command's own lines, `oni COMMAND: warning: MESSAGE` on
    stderr (the category named when not a UserWarning), not as the file path and source line
    of the library code that issued them; within the command only (the library's users keep
    Python's display)."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        kind = "" if category is UserWarning else f" ({category.__name__})"
        source = "".join(f"{label}: " for label in warning_labels())  # stage, shadow model
        with contextlib.suppress(OSError):  # as Python's own display: a closed stderr
            print(f"oni {command}: warning: {source}{message}{kind}",
                  file=sys.stderr if file is None else file, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`): handled as an interrupt, so it is reported."""


@contextlib.contextmanager
def _terminate_as_interrupt(enabled: bool):
    """`oni run` only (single-process: under torchrun the agent stops the ranks), in the main
    thread, and only over the default action (a parent's SIG_IGN is kept)."""
    import signal
    import threading
    if not enabled or threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminated(number, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _leave_ranks() -> None:
    """Leaves the process group `_join_ranks` joined (torchrun's ranks exit cleanly)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
