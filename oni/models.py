"""The paper's classifier, its deterministic initialisation, and its files.

* :class:`MLP` — the paper's network (docs/DESIGN.md, "Paper setup"): ``d -> 1024 -> 512 -> 256
  -> 128 -> k`` with ReLU, widths configurable. It is a plain ``nn.Sequential`` whose first
  module is ``nn.Linear`` and which keeps ``nn.Sequential.forward``, so
  :func:`oni.shapley_values` takes its incremental first-layer path on it.
* :func:`build_model` — an :class:`MLP` from its JSON-able ``config``.
* :func:`init_parameters_` — re-initialises every ``nn.Linear`` from a local, seeded
  ``torch.Generator`` (PyTorch's default distribution), leaving the global RNG alone. This is
  the initialisation :func:`oni.train.train_model` uses, so a batched trainer that calls it on
  each model reproduces those models exactly.
* :func:`save_model` / :func:`load_model` — a model directory holding ``model.json``
  (format, architecture, checksum, user metadata) and the weights (``weights.safetensors``
  when the optional ``safetensors`` package is importable, else a ``weights.pt`` state dict
  read back with ``torch.load(weights_only=True)``). Nothing executable is pickled, saves are
  atomic, and a missing, corrupt or mismatched file is reported with its path.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
import shutil
import stat
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import (MAX_SIZE, check_finite_weights, check_int, check_seed as _check_seed,
                      mixed_dtypes, short_repr)

__all__ = ["MLP", "PAPER_HIDDEN", "build_model", "init_parameters_", "save_model",
           "load_model"]

#: hidden widths of the paper's MLP
PAPER_HIDDEN = (1024, 512, 256, 128)
#: the most hidden layers an MLP takes (the paper's has 4): a corrupt model.json's 20,000
#: layers took seconds to build before its weights could be found not to match
MAX_HIDDEN_LAYERS = 100

MODEL_FORMAT = "oni-model"
MODEL_FORMAT_VERSION = 1
CONFIG_FILE = "model.json"
SAFETENSORS_FILE = "weights.safetensors"
STATE_DICT_FILE = "weights.pt"
_MODEL_FILES = (CONFIG_FILE, SAFETENSORS_FILE, STATE_DICT_FILE)
#: the dtypes of a saved model's weights (float8 and the like fail in torch's reductions)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MODEL_KINDS = ("mlp",)
_MLP_KEYS = ("kind", "d", "k", "hidden")


# ----------------------------------------------------------------------------- checks

def _check_width(value, name: str) -> int:
    return check_int(value, name, 1, MAX_SIZE)


def _check_hidden(hidden, name: str = "hidden",
                  check_width: Callable[[Any, str], int] = _check_width) -> Tuple[int, ...]:
    """Layer widths (an MLP's hidden layers, an attack net's subnets), named ``name``: the
    one rule for a width list, the config's ``model.hidden`` included (which passes its own
    ``check_width``, raising its ConfigError, for each ``name[i]``)."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise TypeError(f"{name} must be a sequence of layer widths (e.g. "
                        f"{list(PAPER_HIDDEN)}), got {type(hidden).__name__}")
    if len(hidden) > MAX_HIDDEN_LAYERS:
        raise ValueError(f"{name} must have at most {MAX_HIDDEN_LAYERS} layers, got "
                         f"{len(hidden)}")
    return tuple(check_width(h, f"{name}[{i}]") for i, h in enumerate(hidden))


def _check_path(path) -> Path:
    """``path`` (a str or os.PathLike naming a str path) as a Path, or a TypeError/ValueError
    naming ``path`` (pathlib's own named no argument)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"path must name a str path, got a {type(text).__name__} one")
    if "\0" in text:
        raise ValueError(f"path must not contain a NUL character, got {short_repr(text)}")
    return Path(text)



def _resolve_device(device, name: str = "device") -> torch.device:
    """``"auto"`` -> cuda when available else cpu; otherwise a checked ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be 'auto', a device string or a torch.device, "
                        f"got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{name}={device!r} is not a device ('auto', 'cpu', 'cuda', "
                         f"'cuda:1', ...): {err}") from None
    if resolved.type == "meta":
        raise ValueError(f"{name}={device!r}: meta tensors hold no values to train or "
                         f"explain; use 'cpu', 'cuda' or 'auto'")
    if resolved.type not in ("cpu", "cuda"):  # mps, xpu, ...: failed deep inside torch
        raise ValueError(f"{name}={device!r}: oni runs on 'cpu' or 'cuda' devices (or "
                         f"'auto'), got device type {resolved.type!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={device!r} but CUDA is not available on this machine "
                         f"(use 'cpu' or 'auto')")
    return resolved


#: the warning of every bf16 opt-in run on a CPU where _native_bf16_cpu() is False
SLOW_BF16_CPU = ("precision='bf16' on a CPU without native bfloat16 products (no AMX or "
                 "AVX512-BF16 flag in /proc/cpuinfo): the products run far slower than in "
                 "float32 there (67x measured on a 2-core AVX2 AMD EPYC); "
                 "precision='float32' is the faster choice on this CPU")


def _native_bf16_cpu(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16), from the flags in
    ``/proc/cpuinfo``; None where that file cannot be read (not Linux): unknown."""
    try:
        with open(cpuinfo) as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return None
    return bool(flags & {"amx_bf16", "avx512_bf16"})


# ----------------------------------------------------------------------------- model

class MLP(nn.Sequential):
    """The paper's classifier: ``nn.Linear`` + ReLU blocks, then a last ``nn.Linear`` to
    ``k`` logits (no softmax).

    It stays a plain ``nn.Sequential`` (modules ``0, 1, 2, ...``, no ``forward`` override)
    whose first module is ``nn.Linear(d, hidden[0])``: :func:`oni.shapley_values` detects
    exactly that to use its incremental first layer. Slicing it (``model[1:]``) gives a plain
    ``nn.Sequential``, since a slice is no longer a ``d -> k`` classifier.

    Parameters
    ----------
    d : int
        Input features.
    k : int
        Classes (output logits).
    hidden : sequence of int
        Hidden layer widths, input side first; ``()`` gives a linear model, and at most
        ``MAX_HIDDEN_LAYERS`` (100) layers. Default: the paper's ``(1024, 512, 256, 128)``.

    Attributes
    ----------
    d, k : int
    hidden : tuple of int
    config : dict
        ``{"kind": "mlp", "d": d, "k": k, "hidden": [...]}``, JSON-able;
        ``build_model(model.config)`` builds the same architecture.
    """

    def __init__(self, d: int, k: int, hidden: Sequence[int] = PAPER_HIDDEN):
        d = _check_width(d, "d")
        k = _check_width(k, "k")
        hidden = _check_hidden(hidden)
        layers = []
        width = d
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, k))
        super().__init__(*layers)
        self.d, self.k, self.hidden = d, k, hidden

    @property
    def config(self) -> Dict[str, Any]:
        return {"kind": "mlp", "d": self.d, "k": self.k, "hidden": list(self.hidden)}

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            # nn.Sequential would call MLP(OrderedDict(...)), which is not our signature
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """The model a ``config`` describes (fresh PyTorch-default weights).

    Parameters
    ----------
    config : mapping
        ``{"kind": "mlp", "d": int, "k": int, "hidden": [int, ...]}``, as ``MLP.config``
        gives it.

    Returns
    -------
    MLP

    Raises
    ------
    TypeError, ValueError
        When ``config`` is not a mapping, names an unknown kind, misses or adds keys, or
        holds invalid widths.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    kind = config.get("kind")
    if kind not in _MODEL_KINDS:
        raise ValueError(f"config['kind'] must be one of {_MODEL_KINDS}, got {kind!r}")
    missing = [key for key in _MLP_KEYS if key not in config]
    unknown = sorted(str(key) for key in config if key not in _MLP_KEYS)
    if missing or unknown:
        raise ValueError(f"config for kind 'mlp' must have exactly the keys {list(_MLP_KEYS)}; "
                         f"missing {missing}, unknown {unknown}")
    try:
        return MLP(config["d"], config["k"], config["hidden"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"invalid model config {short_repr(dict(config))}: {err}") from None


def init_parameters_(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialises every ``nn.Linear`` of ``model`` in place, deterministically.

    The convention (other trainers, e.g. :mod:`oni.shadows`, reproduce models by calling this
    function on each of them): one CPU ``torch.Generator`` seeded with ``seed``; the
    ``nn.Linear`` modules in ``model.named_modules()`` order; for each, the weight
    ``[out, in]`` and then the bias ``[out]`` are drawn with
    ``torch.empty(shape, dtype=param.dtype).uniform_(-b, b, generator=g)``,
    ``b = 1 / sqrt(in_features)``, and copied into the parameter (on whatever device it is).
    That is PyTorch's default ``nn.Linear`` distribution, from a local generator: the global
    RNG is untouched and the values do not depend on the device.

    Parameters
    ----------
    model : nn.Module
        A model whose only parameters are those of ``nn.Linear`` layers (e.g. :class:`MLP`).
    seed : int
        In ``[0, 2**63)``.

    Returns
    -------
    nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        When ``model`` is not an ``nn.Module`` or has parameters outside ``nn.Linear`` layers
        (their initialisation would be undefined here), or ``seed`` is not an int.
    ValueError
        When ``seed`` is outside ``[0, 2**63)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    seed = _check_seed(seed)
    for name, module in model.named_modules():
        own = [pname for pname, _ in module.named_parameters(recurse=False)]
        if own and not (isinstance(module, nn.Linear) and set(own) <= {"weight", "bias"}):
            raise TypeError(f"init_parameters_ initialises nn.Linear layers only, but module "
                            f"{name or '<root>'!r} ({type(module).__name__}) has parameters "
                            f"{own}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            bound = 1.0 / math.sqrt(module.in_features) if module.in_features > 0 else 0.0
            for param in (module.weight, module.bias):
                if param is None:
                    continue
                values = torch.empty(param.shape, dtype=param.dtype).uniform_(
                    -bound, bound, generator=gen)
                param.copy_(values)
    return model


# ----------------------------------------------------------------------------- files

def _safetensors():
    """The ``safetensors.torch`` module, or None when the optional package is missing."""
    try:
        import safetensors.torch
    except ImportError:
        return None
    return safetensors.torch


def _model_config(model) -> Dict[str, Any]:
    config = getattr(model, "config", None) if isinstance(model, nn.Module) else None
    if not isinstance(config, Mapping):
        raise TypeError(f"save_model saves models that oni.models can rebuild (an MLP, with "
                        f".config), got {type(model).__name__}")
    config = dict(config)
    with torch.device("meta"):  # shapes only: no memory, no RNG
        rebuilt = build_model(config)
    # what is saved is the config and the weights: anything else that shapes the function
    # (a subclass or wrapper, a swapped layer, a patched forward, a hook) is not saved
    why = _rebuild_difference(model, rebuilt)
    if why:
        raise ValueError(f"save_model saves a model as its config {short_repr(config)} and "
                         f"its weights only, so this one may not reload as the same function: "
                         f"{why}")
    why = _parameter_difference(model, rebuilt)
    if why:
        raise ValueError(f"model's parameters do not match its config {short_repr(config)} "
                         f"(was it modified after construction?): {why}")
    return config


def _shape_differences(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]):
    """(missing, unexpected, wrong) between two state dicts, in their order: the names of
    ``expected`` that ``got`` lacks, those of ``got`` that ``expected`` lacks, and
    ``(name, got shape, expected shape)`` where the shapes differ."""
    missing = [name for name in expected if name not in got]
    unexpected = [name for name in got if name not in expected]
    wrong = [(name, tuple(got[name].shape), tuple(t.shape)) for name, t in expected.items()
             if name in got and tuple(got[name].shape) != tuple(t.shape)]
    return missing, unexpected, wrong


def _parameter_difference(model: nn.Module, rebuilt: nn.Module) -> str:
    """How the parameters and buffers of ``model`` differ in names or shapes from those of
    ``rebuilt`` (its config's model), or ''."""
    missing, unexpected, wrong = _shape_differences(model.state_dict(), rebuilt.state_dict())
    if missing:  # e.g. an nn.Linear whose bias was set to None
        return f"it lacks {_some(missing)}"
    if unexpected:
        return f"it has {_some(unexpected)}, which its config's model has not"
    if wrong:
        name, shape, want = wrong[0]
        return f"{name!r} has shape {shape}, its config's model {want}"
    return ""


def _rebuild_difference(model: nn.Module, rebuilt: nn.Module) -> str:
    """How ``model`` computes something ``rebuilt`` (its config's model) does not, or ''."""
    if type(model) is not type(rebuilt):
        return (f"it is a {type(model).__qualname__}, not a plain "
                f"{type(rebuilt).__qualname__}")
    layers = [(name, type(module)) for name, module in model.named_modules()]
    expected = [(name, type(module)) for name, module in rebuilt.named_modules()]
    if layers != expected:
        for (name, kind), (want_name, want) in zip(layers, expected):
            if name != want_name:
                return f"it has a layer {name!r} where its config's model has {want_name!r}"
            if kind is not want:
                return f"layer {name!r} is a {kind.__name__}, not a {want.__name__}"
        return f"it has {len(layers)} modules, its config's model {len(expected)}"
    for name, module in model.named_modules():
        where = f"layer {name!r}" if name else "the model"
        if "forward" in vars(module):
            return f"{where} has its own forward (set on the instance)"
        if module._forward_hooks or module._forward_pre_hooks:
            return (f"{where} has forward hooks, which its config and weights do not hold "
                    f"(remove them with handle.remove(), or use a copy without them)")
    return ""


def _check_extra(extra) -> Optional[dict]:
    if extra is None:
        return None
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict of JSON-able metadata or None, "
                        f"got {type(extra).__name__}")
    bad = [key for key in extra if not isinstance(key, str)]
    if bad:
        raise TypeError(f"extra's keys must be strings, got {bad!r}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as err:
        raise TypeError(f"extra must hold only JSON-able values (dicts, lists, strings, "
                        f"numbers, bools, None): {err}") from None
    return dict(extra)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _check_save_target(path: Path) -> None:
    """Overwrite only an oni model directory (or an empty one): never a user's files."""
    if not os.path.lexists(path):
        for parent in path.parents:  # mkdir(parents=True) said only "[Errno 17] File exists"
            if os.path.lexists(parent):
                if not parent.is_dir():
                    raise FileExistsError(f"cannot save a model to {path}: {parent} is a file, "
                                          f"not a directory")
                break
        return
    cwd = Path.cwd().resolve()
    if path.resolve() in (cwd, *cwd.parents):
        raise FileExistsError(f"cannot save a model to {path}: it is the working directory "
                              f"(or holds it), which a save would replace by renames, leaving "
                              f"the process in a deleted directory; give another path")
    if path.is_symlink():
        raise FileExistsError(f"cannot save a model to {path}: it is a symbolic link (a save "
                              f"replaces the directory by renames, which would replace the "
                              f"link, not fill its target); give the target's path")
    if not path.is_dir():
        raise FileExistsError(f"cannot save a model to {path}: it exists and is not a "
                              f"directory")
    names = sorted(p.name for p in path.iterdir())
    others = [name for name in names if name not in _MODEL_FILES]
    if others:
        raise FileExistsError(f"refusing to overwrite {path}: it holds files that are not "
                              f"part of a saved oni model ({others[:5]})")
    if not names:
        return
    # save_model writes regular files only: a directory there is the user's (and reading a
    # FIFO named model.json would block)
    for name in names:
        kind = _non_file_kind(path / name)
        if kind:
            raise FileExistsError(f"refusing to overwrite {path}: its {name} is {kind}, not a "
                                  f"file save_model wrote")
    meta = _oni_meta(path / CONFIG_FILE)
    if meta is None:  # a user's own model.json, say
        raise FileExistsError(f"refusing to overwrite {path}: its {names} are not a saved "
                              f"oni model's ({CONFIG_FILE} is missing or was not written by "
                              f"save_model)")
    # one weights file per save: the other name is a user's file (e.g. their own weights.pt
    # beside a safetensors model)
    unnamed = [name for name in names if name not in (CONFIG_FILE, meta.get("weights"))]
    if unnamed:
        raise FileExistsError(f"refusing to overwrite {path}: it holds {unnamed}, which its "
                              f"{CONFIG_FILE} does not name as its weights (it names "
                              f"{short_repr(meta.get('weights'))}): not the saved model's; "
                              f"move it away or give another path")


def _parse_meta(meta_path: Path):
    """``model.json``'s JSON value, or a ValueError saying why it is not readable JSON."""
    try:
        return json.loads(_read_file(meta_path).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{meta_path} is not UTF-8 text (corrupt?): {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}, line {err.lineno}: not valid JSON (corrupt or "
                         f"truncated?): {err.msg}") from None
    except RecursionError:
        raise ValueError(f"{meta_path} is nested too deeply to be a saved model's "
                         f"(damaged?)") from None


def _read_file(path: Path) -> bytes:
    """The bytes of the regular file ``path``, or a ValueError saying what it is instead
    (opened non-blocking and checked before reading: a FIFO would block the read)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        kind = _non_file_kind(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if kind:
        os.close(fd)
        raise ValueError(f"{path} is {kind}, not a regular file: save_model writes "
                         f"{path.name} as one")
    with open(fd, "rb") as f:
        return f.read()


def _oni_meta(meta_path: Path) -> Optional[dict]:
    """``model.json``'s contents if save_model wrote it, else None."""
    try:
        meta = _parse_meta(meta_path)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == MODEL_FORMAT else None


def _non_file_kind(path: Path, mode: Optional[int] = None) -> str:
    """What ``path`` (of st_mode ``mode``, when known) is when it is not a regular file ("a
    directory", "a FIFO", ...), else '' (a symbolic link is judged by what it points to)."""
    try:
        mode = path.stat().st_mode if mode is None else mode
    except OSError as err:  # a dangling or looping symbolic link
        return f"not readable ({err.strerror})"
    if stat.S_ISREG(mode):
        return ""
    return "a directory" if stat.S_ISDIR(mode) else \
        "a FIFO" if stat.S_ISFIFO(mode) else "a special file"


def _new_sibling(path: Path, tag: str) -> Path:
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{tag}-{secrets.token_hex(4)}"
        if not os.path.lexists(candidate):
            return candidate
    raise FileExistsError(f"could not find a free temporary name next to {path}")  # pragma: no cover


def save_model(model: nn.Module, path: Union[str, os.PathLike], *,
               extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Saves ``model`` as a directory ``path`` holding ``model.json`` and its weights.

    ``model.json`` holds the format tag and version, the architecture (``model.config``),
    the weights' file name and SHA-256, and ``extra``. The weights are
    ``weights.safetensors`` when ``safetensors`` is importable, else ``weights.pt`` (a state
    dict of CPU tensors; :func:`load_model` reads it with ``torch.load(weights_only=True)``).
    No module or code is pickled.

    The save is atomic: everything is written (and fsynced) into a hidden sibling directory,
    which then replaces ``path`` by renames, so a killed save leaves either the previous
    model or the new one at ``path``, never a mix. If it is killed between the two renames
    of an overwrite, ``path`` is briefly absent and the previous model waits in
    ``.<name>.old-*`` next to it (:func:`load_model` says so). One writer per path at a
    time.

    Parameters
    ----------
    model : nn.Module
        A model with a ``config`` :func:`build_model` accepts (an :class:`MLP`).
    path : str or PathLike
        The model directory. Parent directories are created. An existing ``path`` is
        replaced only if it is a saved model holding nothing but its ``model.json`` and
        the weights file that names (or an empty directory).
    extra : dict, optional
        JSON-able metadata (string keys) stored in ``model.json`` and returned by
        :func:`load_model` (tuples come back as lists).

    Returns
    -------
    pathlib.Path
        ``path`` (made absolute when it ends in ``..``).

    Raises
    ------
    TypeError
        ``model`` has no ``config`` :func:`build_model` accepts, ``extra`` is not JSON-able,
        or ``path`` is not a str or PathLike (bytes paths are refused).
    ValueError
        ``model`` would not reload as the same function (a subclass, a swapped or added
        layer, a forward set on the instance, forward hooks, weights of other shapes), or it
        holds weights :func:`load_model` refuses: NaN or Inf, mixed dtypes (one layer
        ``.double()``), or not dense float16, bfloat16, float32 or float64 tensors.
    FileExistsError
        ``path`` is a file, a symbolic link, a directory of other files (a weights file
        its ``model.json`` does not name, a directory or FIFO in place of a model file
        included), or the working directory (or holds it); or a parent of ``path`` is a
        file.
    """
    config = _model_config(model)
    # what load_model would refuse is refused before an older save is replaced
    why = _weights_problem(dict(model.state_dict()))
    if why:
        raise ValueError(f"model's weights must be {_WEIGHTS_RULE}, which load_model reads: "
                         f"{why} (convert the model with model.float() or model.double())")
    extra = _check_extra(extra)
    path = _check_path(path)
    if path.name in ("", ".", ".."):  # "." cannot be renamed: the directory it names can
        path = Path(os.path.abspath(path))
    _check_save_target(path)
    check_finite_weights(model, "model", "load_model would refuse the saved file")
    state = {name: t.detach().to("cpu", copy=True).contiguous()
             for name, t in model.state_dict().items()}
    st = _safetensors()
    if st is not None:
        weights_name, blob = SAFETENSORS_FILE, st.save(state)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        weights_name, blob = STATE_DICT_FILE, buffer.getvalue()
    meta = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "config": config,
            "weights": weights_name, "sha256": _sha256(blob), "extra": extra}

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(path, "tmp")
    os.mkdir(tmp)
    try:
        _write_durably(tmp / weights_name, blob)
        _write_durably(tmp / CONFIG_FILE, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
        _fsync_dir(tmp)
        if os.path.lexists(path):
            old = _new_sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _interrupted_hint(path: Path) -> str:
    prefix = f".{path.name}.old-"
    olds = sorted(p for p in path.parent.iterdir()
                  if p.name.startswith(prefix) and p.is_dir()) if path.parent.is_dir() else []
    if olds:
        return (f"; an interrupted save_model left the previous model at {olds[-1]} "
                f"(rename it to {path} to use it)")
    return ""


def _read_meta(path: Path) -> dict:
    meta_path = path / CONFIG_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing: {path} is not a saved oni model")
    meta = _parse_meta(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{meta_path} is not an oni model file (expected "
                         f"\"format\": \"{MODEL_FORMAT}\")")
    version = meta.get("version")
    if version != MODEL_FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format version {version!r}; this oni reads "
                         f"version {MODEL_FORMAT_VERSION}")
    missing = [key for key in ("config", "weights", "sha256", "extra") if key not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks the fields {missing}")
    if meta["weights"] not in (SAFETENSORS_FILE, STATE_DICT_FILE):
        raise ValueError(f"{meta_path}: \"weights\" must be {SAFETENSORS_FILE!r} or "
                         f"{STATE_DICT_FILE!r}, got {meta['weights']!r}")
    if meta["extra"] is not None and not isinstance(meta["extra"], dict):
        raise ValueError(f"{meta_path}: \"extra\" must be an object or null")
    return meta


def _read_state(weights_path: Path, blob: bytes) -> dict:
    if weights_path.name == SAFETENSORS_FILE:
        st = _safetensors()
        if st is None:
            raise ImportError(f"{weights_path} is a safetensors file, but the optional "
                              f"package 'safetensors' is not installed (pip install "
                              f"safetensors)")
        try:
            return st.load(blob)
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{weights_path} is not a readable safetensors file: "
                             f"{err}") from err
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for bad or unsafe files
        raise ValueError(f"{weights_path} is not a readable state dict (torch.load with "
                         f"weights_only=True refused it): {err}") from err
    if not isinstance(state, dict) or not all(
            isinstance(key, str) and isinstance(t, torch.Tensor) for key, t in state.items()):
        raise ValueError(f"{weights_path} does not hold a state dict (names -> tensors)")
    return state


def _weight_problem(name: str, t: torch.Tensor) -> str:
    """Why the tensor ``name`` cannot be a model's weights (dense, values, a WEIGHT_DTYPES
    dtype), or ''."""
    if t.layout != torch.strided:
        return f"{name!r} is a {t.layout} tensor, not a dense one"
    if t.is_meta:
        return f"{name!r} is on the meta device (it holds no values)"
    if t.dtype not in WEIGHT_DTYPES:
        return f"{name!r} is {t.dtype}"
    return ""


def _first_weight_problem(state: Mapping[str, torch.Tensor]) -> str:
    """:func:`_weight_problem` of the first tensor of ``state`` that has one, or ''."""
    return next(filter(None, (_weight_problem(name, t) for name, t in state.items())), "")


def _weights_problem(state: Mapping[str, torch.Tensor]) -> str:
    """Why ``state`` is not what load_model reads (dense tensors of one of WEIGHT_DTYPES),
    or ''."""
    # integer tensors refused too, unlike train's check: a plain MLP's state dict has none
    why = _first_weight_problem(state)
    if why:
        return why
    mixed = mixed_dtypes(state.values())
    return f"it mixes {mixed}" if mixed else ""


#: what _weights_problem requires, as messages say it
_WEIGHTS_RULE = ("dense tensors of one floating dtype (float16, bfloat16, float32 or "
                 "float64)")


def _some(names: list) -> str:
    """``names`` for a message: the list when short, else its length and first few."""
    return repr(names) if len(names) <= 4 else f"{len(names)} ({short_repr(names)})"


def _check_state(state: dict, model: nn.Module, weights_path: Path, meta_path: Path) -> None:
    missing, unexpected, wrong = _shape_differences(state, model.state_dict())
    missing, unexpected = sorted(missing), sorted(unexpected)
    wrong = [f"{name}: {shape} (expected {want})" for name, shape, want in wrong]
    if missing or unexpected or wrong:
        raise ValueError(f"{weights_path} does not match the architecture in {meta_path}: "
                         f"missing {_some(missing)}, unexpected {_some(unexpected)}, wrong "
                         f"shapes {_some(wrong)}")
    why = _weights_problem(state)
    if why:
        raise ValueError(f"{weights_path} must hold {_WEIGHTS_RULE}: {why}")


def load_model(path: Union[str, os.PathLike], *,
               device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, dict]:
    """Loads a model directory written by :func:`save_model`.

    Parameters
    ----------
    path : str or PathLike
        The model directory.
    device : str or torch.device
        Where to put the model (``"auto"``: cuda when available).

    Returns
    -------
    (nn.Module, dict)
        The model in eval mode, in the dtype it was saved in, and the ``extra`` metadata it
        was saved with (``{}`` when none).

    Raises
    ------
    TypeError
        ``path`` is not a str or PathLike (bytes paths are refused).
    FileNotFoundError
        ``path``, its ``model.json`` or its weights file is missing.
    ValueError
        ``model.json`` or the weights is not a regular file (a directory; a FIFO is never
        read, so never waited on); a file is corrupt (bad JSON, checksum mismatch,
        unreadable weights); or the weights do not match the architecture or are not dense
        tensors of one of float16, bfloat16, float32 and float64. The message names the
        file.
    ImportError
        The weights are safetensors and the package is not installed.
    """
    path = _check_path(path)
    device = _resolve_device(device)
    if not path.exists():
        raise FileNotFoundError(f"no saved model at {path}{_interrupted_hint(path)}")
    if not path.is_dir():
        raise ValueError(f"{path} is not a saved model: save_model writes a directory "
                         f"holding {CONFIG_FILE} and the weights")
    meta = _read_meta(path)
    meta_path = path / CONFIG_FILE
    weights_path = path / meta["weights"]
    if not weights_path.exists():
        raise FileNotFoundError(f"{weights_path} is missing (named by {meta_path})")
    blob = _read_file(weights_path)
    if _sha256(blob) != meta["sha256"]:
        raise ValueError(f"{weights_path} is corrupt or does not belong to {meta_path}: its "
                         f"SHA-256 differs from the one recorded there")
    try:
        # shapes only (no memory): a corrupt config's sizes must meet the weights' shapes
        # before anything of that size is allocated
        with torch.device("meta"):
            skeleton = build_model(meta["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{meta_path}: bad \"config\": {err}") from None
    state = _read_state(weights_path, blob)
    _check_state(state, skeleton, weights_path, meta_path)
    model = skeleton.to_empty(device="cpu")  # every parameter is loaded just below
    model.to(next(iter(state.values())).dtype)
    model.load_state_dict(state)
    check_finite_weights(model, str(weights_path), "a model with it predicts NaN (was it "
                         "saved after its training diverged?)")
    model.to(device).eval()
    return model, dict(meta["extra"] or {})
