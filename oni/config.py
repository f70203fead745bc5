"""The experiment's configuration: schema, presets, resolution, and stage hashes.

A configuration is a nested mapping (YAML on disk). :func:`resolve_config` builds the one an
``oni run`` uses from layers, each overriding the one before:

1. the defaults of the chosen preset (:data:`PRESETS`: ``default`` — the embedded synthetic
   run, sized for a 2-core CPU; ``paper`` — the paper's settings for a Purchase100 or
   Texas100 file; ``location30`` — a Location30 file);
2. the user's YAML file, if any;
3. ``--set key=value`` overrides (dotted keys, values read with YAML's scalar rules).

Every layer is checked against the schema (:data:`SCHEMA`, described key by key in
:func:`describe_schema`): an unknown key, a value of the wrong type or out of range, or a data
file that does not exist raises :class:`ConfigError`, whose message names the key as a dotted
path (``train.epochs``) and what was expected. The hyperparameters of each defense and attack
are checked by :func:`oni.defenses.defense_config` and the attacks' own checks, and filled in
with their defaults, so the resolved config written to ``RUN_DIR/config.yaml`` holds every
setting the run used.

:func:`stage_hash` gives each stage of a run a hash of exactly the settings it depends on
(see :data:`STAGE_KEYS`), so a changed setting invalidates the stages that use it and no
others.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence,
                    Tuple)

from ._checks import (ADAM_FITS, MAX_ADAM_LR, MAX_ADAM_WEIGHT_DECAY, MAX_SEED, MAX_SIZE,
                      bounds_text, check_int, check_number, short_repr)
from .models import MAX_HIDDEN_LAYERS, _check_hidden

__all__ = ["ConfigError", "SCHEMA", "PRESETS", "resolve_config", "parse_set", "load_yaml",
           "dump_yaml", "describe_schema", "stage_hash", "config_subset", "diff_keys",
           "GROUPS", "attack_groups"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key (a dotted path)."""


# ----------------------------------------------------------------------------- YAML

def _yaml():
    try:
        import yaml
    except ImportError as err:  # pragma: no cover - pyyaml is a dependency
        raise ImportError("oni's configuration files need PyYAML: pip install pyyaml") from err
    return yaml


# YAML 1.2's numbers: 1e-3 and -.5 are floats (YAML 1.1, PyYAML's, reads them as strings);
# 010 is ten (1.1: eight, octal), and 1:04 and 0b11 are strings (1.1: 64 and 3), so no
# setting is silently read as another number than the one written. "_" may group digits.
_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_INT_12 = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*)$")
_NUMBER_TAGS = ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")


def _resolvers(yaml) -> dict:
    """PyYAML's implicit types with YAML 1.2's ints and floats: the loader reads with
    them, and the dumper quotes every string they would read as a number."""
    resolvers = {key: [(tag, regexp) for tag, regexp in found if tag not in _NUMBER_TAGS]
                 for key, found in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for tag, regexp, first in (("tag:yaml.org,2002:float", _FLOAT_12, "-+0123456789."),
                               ("tag:yaml.org,2002:int", _INT_12, "-+0123456789")):
        for char in first:
            resolvers.setdefault(char, []).append((tag, regexp))
    return resolvers


def _construct_int(loader, node) -> int:
    """An int in YAML 1.2's forms (an explicit ``!!int`` may also be signed or ``0b``)."""
    text = loader.construct_scalar(node).replace("_", "")
    body = text[1:] if text[:1] in ("+", "-") else text
    base = {"0b": 2, "0o": 8, "0x": 16}.get(body[:2].lower(), 10)
    digits = body[2:] if base != 10 else body
    try:
        if not digits.isalnum():  # int() itself takes a sign and spaces
            raise ValueError(digits)
        value = int(digits, base)  # "010" is ten
    except ValueError:
        raise _yaml().constructor.ConstructorError(
            None, None, f"{text!r} is not an integer", node.start_mark) from None
    return -value if text.startswith("-") else value


def _loader():
    """PyYAML's safe loader with YAML 1.2's numbers (``_FLOAT_12``, ``_INT_12``), so
    learning rates can be written ``1e-3`` and ``010`` is not eight, refusing a key given
    twice in one mapping (PyYAML keeps the last without a word, so a setting the user
    wrote was lost)."""
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    if isinstance(key, (str, int, float, bool)) or key is None:
                        if key in seen:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"the key {key!r} is given twice in one mapping",
                                key_node.start_mark)
                        seen.add(key)
            return super().construct_mapping(node, deep)

    Loader.yaml_implicit_resolvers = _resolvers(yaml)
    Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
    return Loader


def load_yaml(text: str, *, source: str) -> Any:
    """Parses YAML ``text`` (safe: no Python objects); errors name ``source``."""
    yaml = _yaml()
    try:
        return yaml.load(text, Loader=_loader())
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply to read") from None


def dump_yaml(config: Mapping) -> str:
    """``config`` as YAML, keys in the schema's order; :func:`load_yaml` reads it back as
    it was (a string that reads as a number, such as a path ``1e3``, is quoted)."""
    yaml = _yaml()

    class Dumper(yaml.SafeDumper):
        yaml_implicit_resolvers = _resolvers(yaml)

    return yaml.dump(_plain(config), Dumper=Dumper, sort_keys=False, default_flow_style=None,
                     width=100)


def _plain(value):
    """Tuples as lists, recursively (for YAML and JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- leaf checks

@dataclass(frozen=True)
class Leaf:
    """A setting: its check and its meaning (defaults live in the ``default`` preset)."""

    check: Callable[[Any, str], Any]
    help: str


def _type_error(key: str, expected: str, value) -> ConfigError:
    return ConfigError(f"config key '{key}': expected {expected}, got {short_repr(value)} "
                       f"({type(value).__name__})")


def _int(minimum: int, *, optional: bool = False, maximum: float = math.inf):
    def check(value, key):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _type_error(key, f"an {expected}", value)
        return _keyed(check_int, value, key, minimum, maximum)
    expected = (f"int >= {minimum}" if math.isinf(maximum) else
                f"int in [{minimum}, {int(maximum)}]") + (" or null" if optional else "")
    check.expected = expected
    return check


def _keyed(check, value, key: str, *args, **kwargs):
    """One of oni._checks' range checks, its ValueError as a ConfigError naming ``key``."""
    try:
        return check(value, "", *args, **kwargs)
    except ValueError as err:
        raise ConfigError(f"config key '{key}': {str(err).lstrip()}") from None


def _float(low: float, high: float = math.inf, *, low_open: bool = False, why: str = ""):
    def check(value, key):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _type_error(key, "a number", value)
        return _keyed(check_number, value, key, low, high, low_open=low_open, why=why)
    check.expected = "number" + bounds_text(low, high, low_open)
    return check


def _choice(options: Sequence[str]):
    def check(value, key):
        if not isinstance(value, str) or value not in options:
            raise ConfigError(f"config key '{key}': must be one of {list(options)}, got "
                              f"{short_repr(value)}")
        return value
    check.expected = " | ".join(options)
    return check


def _bool(value, key):
    if not isinstance(value, bool):
        raise _type_error(key, "true or false", value)
    return value


_bool.expected = "true | false"


def _path_or_null(value, key):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise _type_error(key, "a file path or null", value)
    return str(value)


_path_or_null.expected = "path or null"


def _device(value, key):
    if not isinstance(value, str):
        raise _type_error(key, "'auto', 'cpu', 'cuda' or 'cuda:N'", value)
    from .models import _resolve_device
    try:
        _resolve_device(value, key)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key '{key}': {err}") from None
    return value


_device.expected = "auto | cpu | cuda | cuda:N"


_width = _int(1, maximum=MAX_SIZE)


def _widths(value, key):
    """oni.models' width-list rule, its errors as ConfigErrors naming ``key`` (``key[i]``
    for a width, checked as the config's other ints are)."""
    try:
        # "" names the list, so its messages read on from "config key '...':" as _keyed's do
        return list(_check_hidden(value, "", lambda width, at: _width(width, key + at)))
    except ConfigError:  # a width's, naming key[i]
        raise
    except TypeError:  # not a sequence: said as the config's other type errors are
        raise _type_error(key, "a list of layer widths, e.g. [1024, 512, 256, 128]",
                          value) from None
    except ValueError as err:  # too many layers: refused here, not when a model is built
        raise ConfigError(f"config key '{key}': {str(err).lstrip()}") from None


_widths.expected = f"list of at most {MAX_HIDDEN_LAYERS} ints in [1, {MAX_SIZE}]"


def _names(known: Sequence[str]):
    def check(value, key):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, Sequence) or not value:
            raise _type_error(key, f"a non-empty list of names from {list(known)}", value)
        names = []
        for i, name in enumerate(value):
            if name not in known:
                raise ConfigError(f"config key '{key}[{i}]': unknown name {short_repr(name)}; "
                                  f"known: {list(known)}")
            if name in names:
                raise ConfigError(f"config key '{key}': {short_repr(name)} is listed twice")
            names.append(name)
        return names
    check.expected = "list of names"
    return check


# ----------------------------------------------------------------------------- schema

def _defense_names() -> Tuple[str, ...]:
    from .defenses import DEFENSES
    return DEFENSES


def _attack_names() -> Tuple[str, ...]:
    from .attacks import ATTACKS
    return ATTACKS


#: where the schema's sections come from: each leaf is a Leaf; ``defenses.<name>`` and
#: ``attacks.<name>`` are checked by the defense's and attack's own checks (see
#: _check_method)
SCHEMA: Dict[str, Any] = {
    "preset": Leaf(_choice(("default", "paper", "location30")),
                   "which defaults this config starts from (informational once resolved)"),
    "seed": Leaf(_int(0, maximum=MAX_SEED - 1),
                 "seeds everything random: splits, training, defenses, attacks"),
    "device": Leaf(_device, "where models train and attacks run: auto (cuda when "
                            "available), cpu, cuda, cuda:N"),
    "data": {
        "path": Leaf(_path_or_null, "the data file (Shokri CSV, e.g. dataset_purchase or "
                                    "dataset_location.tgz; Texas100 directory or archive; "
                                    ".npz); null: the synthetic data below"),
        "format": Leaf(_choice(("auto", "shokri", "texas", "npz")),
                       "how to read data.path (auto: from the path)"),
        "cache_dir": Leaf(_path_or_null, "where parsed text files are cached as .npz "
                                         "(null: beside data.path when that directory is "
                                         "writable, else $XDG_CACHE_HOME/oni or "
                                         "~/.cache/oni)"),
        "synthetic": {
            "n": Leaf(_int(18, maximum=MAX_SIZE),
                      "rows of oni.synthetic_purchase (when data.path is null)"),
            "d": Leaf(_int(1, maximum=MAX_SIZE), "features (600 as Purchase100)"),
            "k": Leaf(_int(2, maximum=MAX_SIZE), "classes (100 as Purchase100)"),
            "seed": Leaf(_int(0, maximum=MAX_SEED - 1), "the generator's seed"),
        },
    },
    "splits": {
        "preset": Leaf(_choice(("auto", "proportional", "purchase100", "texas100")),
                       "size rule of oni.make_splits (auto: the paper's Table 1 sizes for "
                       "Purchase100/Texas100-shaped data, else proportional 2:2:1:1)"),
        "train": Leaf(_int(1, optional=True), "target training rows (null: from the preset)"),
        "test": Leaf(_int(0, optional=True), "test rows (null: from the preset)"),
        "known": Leaf(_int(0, optional=True), "training rows the adversary holds"),
        "target": Leaf(_int(2, optional=True), "rows the attacks are scored on (even: half "
                                               "members)"),
        "shadow_pool": Leaf(_int(2, optional=True), "the adversary's population rows "
                                                    "(null: all the rest)"),
    },
    "model": {
        "hidden": Leaf(_widths, "hidden widths of the MLP (the paper: [1024, 512, 256, 128])"),
    },
    "train": {
        "epochs": Leaf(_int(1), "training epochs of every model (the paper: 100)"),
        "batch_size": Leaf(_int(1), "Adam minibatch size"),
        "lr": Leaf(_float(0.0, MAX_ADAM_LR, low_open=True, why=ADAM_FITS),
                   "Adam learning rate (the paper: 1e-3)"),
        "weight_decay": Leaf(_float(0.0, MAX_ADAM_WEIGHT_DECAY, why=ADAM_FITS),
                             "Adam weight decay"),
    },
    "defenses": {
        "run": Leaf(None, "the defenses to evaluate, in order; must include undefended (the "
                          "base model of the others and MIDPUT's reference)"),
        # + one mapping per defense name: its hyperparameters (oni.defenses.DEFAULTS)
    },
    "attacks": {
        "run": Leaf(None, "the attacks to run against every defense"),
        "adaptive": Leaf(_bool, "true: the attacker knows the defense and trains its shadow "
                                "models with it (the paper's threat model); false: "
                                "undefended shadows"),
        # + one mapping per attack name: its settings (oni.attacks.DEFAULTS)
    },
}

_METHOD_SECTIONS = ("defenses", "attacks")

#: stages that share shadow models run together (oni.attacks.run_attacks trains the shadow
#: models of the shadow and metric attacks once); each LiRA variant is a group of its own
GROUPS = ("reference", "lira_offline", "lira_online")


def attack_groups(attacks: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """The run's attack stages: ``[(group, [attack, ...]), ...]`` in :data:`GROUPS` order."""
    groups = []
    reference = [a for a in attacks if not a.startswith("lira")]
    if reference:
        groups.append(("reference", reference))
    for lira in ("lira_offline", "lira_online"):
        if lira in attacks:
            groups.append((lira, [lira]))
    return groups


def _method_defaults(section: str) -> Dict[str, Dict[str, Any]]:
    if section == "defenses":
        from .defenses import DEFAULTS
    else:
        from .attacks import DEFAULTS
    return DEFAULTS


def _check_method(section: str, name: str, values: Mapping, key: str) -> Dict[str, Any]:
    """One defense's hyperparameters or one attack's settings, checked and completed."""
    defaults = _method_defaults(section)[name]
    unknown = [k for k in values if k not in defaults]
    if unknown:
        raise ConfigError(f"config key '{key}.{unknown[0]}': unknown setting of "
                          f"{section[:-1]} {name!r}; its settings are: "
                          f"{', '.join(defaults) or 'none'}")
    try:
        if section == "defenses":
            from .defenses import defense_config
            resolved = defense_config(name, values)
        else:
            from .attacks import _resolve_config
            resolved = _resolve_config(name, values)
    except (TypeError, ValueError) as err:
        # name the key: the checks name it as config['key'] of the method
        found = re.search(r"config\[['\"]?([A-Za-z_][A-Za-z0-9_]*)['\"]?\]((?:\[\d+\])*)",
                          str(err))
        where = f"{key}.{found.group(1)}{found.group(2)}" if found else key
        # the key is named once, as a dotted path (a rule of several keys keeps their names)
        message = re.sub(r"^config\[['\"]?[A-Za-z_][A-Za-z0-9_]*['\"]?\](?:\[\d+\])*"
                         r"( of '[a-z_]+')? (?=must |needs )", "", str(err))
        raise ConfigError(f"config key '{where}': {message}") from None
    return _plain(resolved)


# ----------------------------------------------------------------------------- presets

_DEFAULT_ATTACKS = ["shadow", "metric_correctness", "metric_confidence", "metric_entropy",
                    "metric_modified_entropy", "metric_loss", "lira_offline", "lira_online"]

#: the default preset's values: the embedded run, sized for a 2-core CPU (README, "Running the
#: experiment"): the paper's MLP and data shape, but 4,500 synthetic rows (1,000 training
#: rows), 20 epochs and 4 LiRA shadows; about 4 minutes on a 2-core CPU
_BASE: Dict[str, Any] = {
    "preset": "default",
    "seed": 0,
    "device": "auto",
    "data": {"path": None, "format": "auto", "cache_dir": None,
             "synthetic": {"n": 4_500, "d": 600, "k": 100, "seed": 0}},
    "splits": {"preset": "auto", "train": None, "test": None, "known": None, "target": None,
               "shadow_pool": None},
    "model": {"hidden": [1024, 512, 256, 128]},
    "train": {"epochs": 20, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.0},
    "defenses": {"run": ["undefended", "uniform", "oni", "dynanoise"]},
    "attacks": {"run": list(_DEFAULT_ATTACKS), "adaptive": True,
                "lira_offline": {"n_shadows": 4}, "lira_online": {"n_shadows": 4}},
}

#: preset name -> overrides of the default preset
PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {},
    # the paper's Table 1 splits (chosen by shape), its MLP, 100 epochs, the noise solver's
    # full settings, LiRA with 16 shadows; needs data.path; a GPU is recommended
    "paper": {
        "preset": "paper",
        "train": {"epochs": 100},
        "defenses": {"oni": {"n_permutations": 100, "max_iter": 100, "refine_iter": 8,
                             "polish_iter": 64, "starts": 4}},
        "attacks": {"lira_offline": {"n_shadows": 16}, "lira_online": {"n_shadows": 16}},
    },
    # Location30 (5,010 rows, 446 binary features, 30 classes): the proportional split
    # (1,112 training rows), the paper's MLP and recipe; needs data.path
    "location30": {
        "preset": "location30",
        "splits": {"preset": "proportional"},
        "train": {"epochs": 100},
        "attacks": {"lira_offline": {"n_shadows": 8}, "lira_online": {"n_shadows": 8}},
    },
}

_NEEDS_DATA_PATH = {"paper": "a Purchase100 file (dataset_purchase) or a Texas100 directory",
                    "location30": "Location30's dataset_location.tgz (or bangkok)"}


# ----------------------------------------------------------------------------- resolution

def parse_set(item: str) -> Tuple[List[str], Any]:
    """``"a.b=value"`` -> ``(["a", "b"], value)``, the value read as a YAML scalar or flow
    collection (``3`` int, ``1e-3`` float, ``true`` bool, ``null``, ``[1, 2]`` list,
    ``abc`` string)."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=5")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"--set {item!r}: the key must be a dotted path such as "
                          f"train.epochs")
    value = load_yaml(text, source=f"--set {item!r}") if text.strip() else ""
    return parts, value


def _nest(parts: Sequence[str], value) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _merge(base: dict, update: Mapping) -> dict:
    """``update`` over ``base``, recursively for mappings; lists and scalars replace."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_layer(layer, schema: Mapping, prefix: str, source: str) -> None:
    """Unknown keys and non-mappings where sections belong, in a user layer."""
    if not isinstance(layer, Mapping):
        where = f"config key '{prefix}'" if prefix else source
        raise ConfigError(f"{where}: expected a mapping of settings, got {short_repr(layer)} "
                          f"({type(layer).__name__})")
    for key, value in layer.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if not isinstance(key, str):
            raise ConfigError(f"{source}: config key {short_repr(path)} is not a string")
        if key in schema:
            if isinstance(schema[key], Mapping):
                _check_layer(value, schema[key], path, source)
            continue
        if prefix in _METHOD_SECTIONS:
            known = _defense_names() if prefix == "defenses" else _attack_names()
            if key in known:
                if not isinstance(value, Mapping):
                    raise ConfigError(f"config key '{path}': expected a mapping of the "
                                      f"{prefix[:-1]}'s settings, got {short_repr(value)}")
                continue  # its keys are checked with the method
            raise ConfigError(f"config key '{path}': unknown {prefix[:-1]} {key!r} "
                              f"({source}); known keys here: run"
                              + (", adaptive" if prefix == "attacks" else "")
                              + f", {', '.join(known)}")
        known_keys = ", ".join(schema)
        raise ConfigError(f"config key '{path}': unknown key ({source}); known keys"
                          f"{' under ' + repr(prefix) if prefix else ''}: {known_keys}")


def _check_leaves(config: Mapping, schema: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, spec in schema.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(spec, Mapping):
            out[key] = _check_leaves(config.get(key, {}), spec, path)
        elif spec.check is not None:
            out[key] = spec.check(config.get(key), path)
    return out


def resolve_config(config_file: Optional[os.PathLike] = None, sets: Sequence[str] = (), *,
                   preset: Optional[str] = None, check_files: bool = True) -> Dict[str, Any]:
    """The configuration of a run: preset defaults <- the YAML file <- ``--set`` items.

    Parameters
    ----------
    config_file : path, optional
        A YAML file holding any part of the schema.
    sets : sequence of str, optional
        ``"dotted.key=value"`` overrides, applied in order.
    preset : str, optional
        ``"default"``, ``"paper"`` or ``"location30"``; None: the file's ``preset`` key, else
        ``"default"``.
    check_files : bool
        Check that ``data.path`` exists.

    Returns
    -------
    dict
        Every setting, checked and completed (defense and attack settings included), in the
        schema's order; JSON- and YAML-able.

    Raises
    ------
    ConfigError
        Bad YAML, an unknown key, a wrong type or value, a missing data file (the message
        names the key).
    """
    layers: List[Tuple[str, Mapping]] = []
    sets = () if sets is None else sets
    if isinstance(sets, (str, bytes)) or not isinstance(sets, Sequence):
        raise TypeError(f"sets must be a list of 'key=value' strings, e.g. "
                        f"['train.epochs=5'], got {type(sets).__name__}")
    if config_file is not None:
        if not isinstance(config_file, (str, os.PathLike)) or not str(config_file):
            raise ConfigError(f"config_file must be the path of a YAML file, got "
                              f"{short_repr(config_file)}")
        path = Path(config_file)
        if not path.is_file():
            what = ("is a directory" if path.is_dir() else
                    "is not a regular file" if path.exists() else "does not exist")
            raise ConfigError(f"config file {str(path)!r} {what}; give a YAML file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: {err}") from None
        loaded = load_yaml(text, source=str(path))
        loaded = {} if loaded is None else loaded
        _check_layer(loaded, SCHEMA, "", str(path))
        layers.append((str(path), loaded))
    for item in sets:
        parts, value = parse_set(item)
        layer = _nest(parts, value)
        _check_layer(layer, SCHEMA, "", f"--set {item}")
        layers.append((f"--set {item}", layer))

    if preset is None:
        preset = "default"
        for _, layer in layers:
            preset = layer.get("preset", preset)
    preset = _choice(tuple(PRESETS))(preset, "preset")
    merged = _merge(_BASE, PRESETS[preset])
    for _, layer in layers:
        merged = _merge(merged, layer)
    merged["preset"] = preset

    resolved = _check_leaves(merged, SCHEMA)
    for section, known in (("defenses", _defense_names()), ("attacks", _attack_names())):
        names = _names(known)(merged[section].get("run"), f"{section}.run")
        resolved[section] = {"run": names, **resolved[section]}
        # every method run, and every section the user wrote, checked and filled in
        for name in known:
            if name in names or name in merged[section]:
                resolved[section][name] = _check_method(
                    section, name, merged[section].get(name) or {}, f"{section}.{name}")
    if "undefended" not in resolved["defenses"]["run"]:
        raise ConfigError("config key 'defenses.run': must include 'undefended' (the base "
                          "model of the other defenses and MIDPUT's reference)")
    _check_cross(resolved, preset, check_files)
    return resolved


def _check_cross(config: Mapping, preset: str, check_files: bool) -> None:
    """Rules that tie several keys together."""
    data = config["data"]
    if data["path"] is None:
        if preset in _NEEDS_DATA_PATH:
            raise ConfigError(f"config key 'data.path': preset {preset!r} needs "
                              f"{_NEEDS_DATA_PATH[preset]}; give it with --set data.path=FILE")
    elif check_files and not Path(data["path"]).expanduser().exists():
        raise ConfigError(f"config key 'data.path': {data['path']!r} does not exist (oni never "
                          f"downloads data: point it at a local file)")
    target = config["splits"]["target"]
    if target is not None and target % 2:
        raise ConfigError(f"config key 'splits.target': must be even (half members, half "
                          f"non-members), got {target}")
    _check_attack_plan(config)


def _check_attack_plan(config: Mapping) -> None:
    """Attack settings that cannot work together with the others: refused here, not by the
    attack stage after every model has trained."""
    attacks = config["attacks"]
    # adaptive attacks train their shadows with each defense other than undefended
    adaptive = attacks["adaptive"] and any(name != "undefended"
                                           for name in config["defenses"]["run"])
    with_shadows = []
    for name in attacks["run"]:
        settings = attacks.get(name) or {}
        if settings.get("fit_on") == "known":
            if adaptive:
                raise ConfigError(f"config key 'attacks.{name}.fit_on': 'known' fits on the "
                                  f"target's own outputs and trains no shadow model, so the "
                                  f"adaptive attack (attacks.adaptive: true) has none to train "
                                  f"with the defense; set attacks.adaptive: false, or fit_on: "
                                  f"shadow")
            continue
        if not name.startswith("lira"):  # LiRA's pool rules are its own (offline: 2 rows)
            with_shadows.append(name)
        if adaptive and settings.get("shadow_precision", "float32") != "float32":
            raise ConfigError(f"config key 'attacks.{name}.shadow_precision': "
                              f"{settings['shadow_precision']!r} applies to undefended shadows; "
                              f"adaptive attacks (attacks.adaptive: true) train theirs with "
                              f"the defense, in float32: set attacks.adaptive: false, or "
                              f"shadow_precision: float32")
    pool = config["splits"]["shadow_pool"]
    if with_shadows and pool is not None and pool < 4:
        raise ConfigError(f"config key 'splits.shadow_pool': the attack {with_shadows[0]!r} "
                          f"trains shadow models on a pool of at least 4 rows (2 members and "
                          f"2 non-members per shadow), got {pool}")


# ----------------------------------------------------------------------------- description

def describe_schema(width: int = 92) -> str:
    """The schema as text: each key with its meaning and type (for ``--help``)."""
    import textwrap
    entries = []

    def walk(schema, prefix):
        for key, spec in schema.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(spec, Mapping):
                walk(spec, path)
                continue
            entries.append((path, spec.help,
                            f"[{getattr(spec.check, 'expected', 'list of names')}]"))
    walk(SCHEMA, "")
    entries.append(("defenses.<name>.<key>", "a defense's hyperparameters "
                    "(oni.defenses.DEFAULTS; e.g. defenses.oni.tau_fraction)", ""))
    entries.append(("attacks.<name>.<key>", "an attack's settings (oni.attacks.DEFAULTS; "
                    "e.g. attacks.lira_online.n_shadows)", ""))
    lines = []
    indent = " " * 26
    for path, text, expected in entries:
        wrapped = textwrap.wrap(text, width, initial_indent=f"  {path:<23} ",
                                subsequent_indent=indent)
        if expected and len(wrapped[-1]) + 1 + len(expected) <= width:
            wrapped[-1] += " " + expected  # the type stays in one piece
        elif expected:
            wrapped.append(indent + expected)
        lines += wrapped
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stage hashes

#: stage kind -> the config keys it depends on directly (dotted paths; its parent stages'
#: hashes are folded in by the caller). Runtime-only keys (device) are in none of them: a
#: result computed on another device is the same result.
STAGE_KEYS: Dict[str, Tuple[str, ...]] = {
    # the data by its content (the run adds its fingerprint), not by where it came from;
    # device and defenses.oni.backend are left out: the same walks and starts give the same
    # phi and eta on every device and backend, to rounding (precision is in: tf32 is not)
    "splits": ("seed", "splits"),
    "target": ("seed", "model", "train"),
    "phi": ("seed", "defenses.oni.n_permutations", "defenses.oni.precision"),
    "eta": ("seed", "defenses.oni.tau_fraction", "defenses.oni.eps", "defenses.oni.beta",
            "defenses.oni.importance", "defenses.oni.max_iter", "defenses.oni.refine_iter",
            "defenses.oni.polish_iter", "defenses.oni.starts", "defenses.oni.precision"),
}


def _get(config: Mapping, dotted: str):
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def config_subset(config: Mapping, keys: Sequence[str]) -> Dict[str, Any]:
    """``{dotted leaf key: value}`` for the settings under ``keys`` (sections are flattened
    to their leaves, so a change is reported as ``defenses.oni.eps``; None for an absent
    key)."""
    out: Dict[str, Any] = {}

    def flatten(prefix: str, value) -> None:
        if isinstance(value, Mapping) and value:
            for key, item in value.items():
                flatten(f"{prefix}.{key}", item)
        else:
            out[prefix] = _plain(value)

    for key in keys:
        flatten(key, _get(config, key))
    return out


def stage_hash(kind: str, subset: Mapping[str, Any], parents: Iterable[str] = ()) -> str:
    """A short hash of a stage's kind, the settings it depends on and its parents' hashes
    (a set: taken in sorted order)."""
    blob = json.dumps({"kind": kind, "settings": _plain(subset), "parents": sorted(parents)},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """The keys whose values differ between two subsets (for "config changed" messages)."""
    keys = list(dict.fromkeys([*old, *new]))
    return [key for key in keys if old.get(key) != new.get(key)]
