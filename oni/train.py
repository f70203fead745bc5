"""Training and batched prediction for oni's classifiers (the paper's setup: Adam, lr 1e-3).

* :class:`TrainConfig` / :func:`train_model` — minibatch Adam with fixed, documented
  initialisation and batch-order conventions, so the same seed gives the same model
  (bitwise on CPU) and :mod:`oni.shadows` can reproduce it in a batched trainer. A custom
  ``loss_fn`` with per-row ``extra`` tensors serves distillation (soft labels).
* :class:`History` — train loss, train and test accuracy per epoch.
* :func:`predict_logits`, :func:`predict_proba`, :func:`accuracy` — batched, no grad, eval
  mode, results on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import (ADAM_FITS, MAX_ADAM_LR, MAX_ADAM_WEIGHT_DECAY, NonFiniteLogits,
                      check_finite as _check_finite,
                      check_int as _check_int, check_logits, check_not_meta, check_number,
                      first_non_finite_row, is_integer_dtype, mixed_dtypes, non_finite_parameter)
from .models import _check_seed, _resolve_device, init_parameters_
from .shapley import _check_model_width

__all__ = ["TrainConfig", "History", "train_model", "predict_logits", "predict_proba",
           "accuracy"]

_PREDICT_BATCH = 8192
_MAX_PROGRESS_LINES = 20  # the text fallback prints at most about this many epoch lines
#: Adam moments below this are set to 0 (see flush_tiny_moments_)
TINY_MOMENT = 1e-30
#: optimiser steps between two flushes of the float32 trainers
FLUSH_EVERY = 64


def flush_tiny_moments_(optimizer: torch.optim.Optimizer) -> None:
    """Sets the Adam moments (``exp_avg``, ``exp_avg_sq``) of ``optimizer`` whose magnitude
    is below :data:`TINY_MOMENT` to 0, in place.

    Why: a parameter whose gradient turns exactly 0 and stays so (a ReLU unit that died, an
    input column that is 0 in all the rows it meets) keeps a first moment that decays by
    ``beta1 = 0.9`` a step and reaches float32's subnormal range within some hundred steps.
    Intel CPUs compute on subnormals many times slower: the float32 trainers ran 1.5x slower
    from about epoch 15 of the benchmark workload (BENCHMARKS.md). A moment below 1e-30 moves
    its parameter by less than ``1e-22 * lr`` (``eps = 1e-8`` bounds the denominator), far
    below the rounding of any weight that is not itself below about 1e-15, so the trained
    weights stay those of plain Adam (measured bitwise equal over 960 steps of the paper MLP,
    tested on a run whose moments go subnormal).
    """
    with torch.no_grad():
        for state in optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                moment = state.get(key)
                if isinstance(moment, Tensor) and moment.is_floating_point():
                    moment.masked_fill_(moment.abs() < TINY_MOMENT, 0)


@dataclass
class TrainConfig:
    """Settings of :func:`train_model` (checked on construction and again when used).

    Attributes
    ----------
    epochs : int
        Passes over the training data (>= 1). The paper trains 100.
    batch_size : int
        Rows per Adam step (>= 1); the last batch of an epoch may be smaller.
    lr : float
        Adam learning rate, in ``(0, 3.4e37]`` (above, float32's first Adam step overflows).
        The paper uses 1e-3.
    weight_decay : float
        Adam's (L2, added to the gradient) weight decay, in ``[0, float32 max]``.
    seed : int
        Seeds the initialisation and the batch order (see :func:`train_model`).
    device : str or torch.device
        ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        A malformed device string is refused here; whether the device exists and can train
        is checked when training (a config may be built on another machine).
    progress : bool
        Show a progress bar on stderr (tqdm when installed, else a line every few epochs).
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: Union[str, torch.device] = "auto"
    progress: bool = True

    def __post_init__(self):
        _check_config(self)


@dataclass
class History:
    """What :func:`train_model` recorded, one entry per epoch.

    Attributes
    ----------
    epochs : list of int
        Epoch numbers, ``1..E``.
    train_loss : list of float
        Mean loss over the epoch's training rows (each batch's loss weighted by its size),
        as the batches were trained.
    train_acc : list of float
        Accuracy on the whole training set at the end of the epoch (eval mode).
    test_acc : list of float or None
        Accuracy on the test set at the end of the epoch; None entries without test data.
    seconds : float
        Wall time of the whole training, per-epoch evaluations included.
    """

    epochs: List[int] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    train_acc: List[float] = field(default_factory=list)
    test_acc: List[Optional[float]] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- checks

def _check_config(config, name: str = "config") -> None:
    """A TrainConfig whose fields are in range; messages name it ``name`` (the argument
    that holds it: ``config``, ``train_config``)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"{name} must be a TrainConfig, got {type(config).__name__}")
    _check_int(config.epochs, f"{name}.epochs", 1)
    _check_int(config.batch_size, f"{name}.batch_size", 1)
    check_number(config.lr, f"{name}.lr", 0.0, MAX_ADAM_LR, low_open=True, why=ADAM_FITS)
    check_number(config.weight_decay, f"{name}.weight_decay", 0.0, MAX_ADAM_WEIGHT_DECAY,
                 why=ADAM_FITS)
    _check_seed(config.seed, f"{name}.seed")
    if not isinstance(config.device, (str, torch.device)):
        raise TypeError(f"{name}.device must be 'auto', a device string or a torch.device, "
                        f"got {type(config.device).__name__}")
    if config.device != "auto":
        # availability is checked when training: a config may be built on another machine
        try:
            torch.device(config.device)
        except RuntimeError:
            raise ValueError(f"{name}.device={config.device!r} is not a device ('auto', "
                             f"'cpu', 'cuda', 'cuda:1', ...)") from None
    if not isinstance(config.progress, bool):
        raise TypeError(f"{name}.progress must be a bool, got {type(config.progress).__name__}")


def _check_features(x, name: str, *, allow_empty: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, d], got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {x.layout} (convert it "
                        f"with {name}.to_dense())")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it holds no values to train on")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, d], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype} "
                        f"(convert it with {name}.float())")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (N = 0 rows)")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (d = 0)")
    _check_finite(x, name)
    return x


def _cast_checked(rows: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """``rows`` in ``dtype``: values finite in their own dtype may overflow a narrower one,
    which is a ValueError naming ``name`` (what the cast rows are)."""
    if rows.dtype == dtype:
        return rows
    cast = rows.to(dtype)
    _check_finite(cast, name)
    return cast


def _check_labels(y, name: str, n: int, x_name: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N] of class indices, "
                        f"got {type(y).__name__}")
    if y.layout != torch.strided or y.device.type == "meta":
        raise TypeError(f"{name} must be a dense tensor with values, got layout {y.layout} "
                        f"on {y.device}")
    if not is_integer_dtype(y.dtype):
        raise TypeError(f"{name} must hold integer class indices, got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be 1-D [N] with N = {n} ({x_name}'s rows), "
                         f"got shape {tuple(y.shape)}")
    return y


def _check_label_range(y: Tensor, name: str, k: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"{name} must hold class indices in [0, {k}) (the model has k = {k} "
                         f"outputs), got values in [{int(y.min())}, {int(y.max())}]")


def _check_extra(extra, n: int) -> Tuple[Tensor, ...]:
    if extra is None:
        return ()
    if isinstance(extra, Tensor):
        extra = (extra,)
    if not isinstance(extra, (tuple, list)):
        raise TypeError(f"extra must be a tensor or a tuple of tensors [N, ...], "
                        f"got {type(extra).__name__}")
    for i, t in enumerate(extra):
        if not isinstance(t, Tensor):
            raise TypeError(f"extra[{i}] must be a torch.Tensor [N, ...], got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(f"extra[{i}] must have N = {n} rows (indexed like x), got shape "
                             f"{tuple(t.shape)}")
        _check_finite(t, f"extra[{i}]")
    return tuple(extra)


def _model_device_dtype(model) -> Tuple[Optional[torch.device], Optional[torch.dtype]]:
    if not isinstance(model, nn.Module):
        return None, None
    for t in (*model.parameters(), *model.buffers()):
        return t.device, t.dtype
    return None, None


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode for the duration, then the caller's mode back."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _outputs(model, x: Tensor, name: str, row_offset: int = 0) -> Tensor:
    return check_logits(model(x), x.shape[0], name, row_offset)


def _output_width(model: nn.Module, x_row: Tensor, d: int) -> int:
    """k, from the model's output on one row (eval mode, no grad; the row in the model's
    floating dtype, as the other passes give it)."""
    _, dtype = _model_device_dtype(model)
    if dtype is not None and dtype.is_floating_point:
        x_row = x_row.to(dtype)
    with torch.no_grad(), _eval_mode(model):
        try:
            out = model(x_row)
        except RuntimeError as err:
            raise ValueError(f"the model does not accept inputs of width d = {d} "
                             f"(x's columns): {err}") from None
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model must map x [N, {d}] to logits [N, k], got {got} for "
                         f"one row")
    if not out.dtype.is_floating_point:
        raise TypeError(f"the model must return floating logits, got {out.dtype}")
    return out.shape[1]


def _check_one_dtype(model: nn.Module, name: str) -> None:
    """A TypeError naming ``name`` when its floating parameters and buffers mix dtypes (torch
    failed with "mat1 and mat2 must have the same dtype", read as a width mismatch)."""
    # any module trains: integer buffers are its own (save_model's rule, all one floating
    # dtype, holds for a plain MLP's state dict only)
    mixed = mixed_dtypes((*model.parameters(), *model.buffers()))
    if mixed:
        raise TypeError(f"{name} mixes parameter dtypes {mixed}: cast it to one "
                        f"({name}.float() or {name}.double())")


def _probe_output_width(model: nn.Module, x_row: Tensor, d: int,
                        device: torch.device) -> int:
    """:func:`_output_width` without changing ``model``: run where it is when its tensors are
    on one device (the row moved there), else on a copy moved to ``device``."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devices) == 1:
        return _output_width(model, x_row.to(devices.pop()), d)
    return _output_width(copy.deepcopy(model).to(device), x_row.to(device), d)


def _predicted_classes(model: nn.Module, x: Tensor, batch_size: int,
                       name: str = "x") -> Tensor:
    """argmax of the logits, [N] int64 on x's device (x already on the model's device)."""
    with torch.no_grad(), _eval_mode(model):
        return torch.cat([_outputs(model, x[lo:lo + batch_size], name, lo).argmax(dim=1)
                          for lo in range(0, x.shape[0], batch_size)])


def _epoch_accuracies(model: nn.Module, epoch: int, fix: str,
                      measure: Callable[[], Tuple[float, Optional[float]]]
                      ) -> Tuple[float, Optional[float]]:
    """``measure()``, the epoch's train and test accuracy, once the epoch's last step is
    known to have left finite weights and logits: the epoch's loss was taken before each
    step, so a divergence in the last one shows only here (``fix``: what to lower)."""
    bad = non_finite_parameter(model)
    if bad is not None:
        raise FloatingPointError(f"training diverged: the last step of epoch {epoch} left NaN "
                                 f"or Inf in {bad!r}; {fix}")
    try:
        return measure()
    except NonFiniteLogits as err:  # finite weights whose logits overflow
        raise FloatingPointError(f"training diverged: after epoch {epoch} {err}; {fix}") \
            from None


def _accuracy_on_device(model, x: Tensor, y: Tensor, name: str) -> float:
    return float((_predicted_classes(model, x, _PREDICT_BATCH, name) == y).double().mean())


# ----------------------------------------------------------------------------- progress

def _tqdm_class():
    """tqdm's progress bar class, or None when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class _TextProgress:
    """The fallback without tqdm: a line on stderr every few epochs and at the end."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.every = max(1, math.ceil(total / _MAX_PROGRESS_LINES))
        self.start = time.perf_counter()

    def update(self, stats: dict) -> None:
        self.done += 1
        if self.done % self.every == 0 or self.done == self.total:
            text = " ".join(f"{key} {value}" for key, value in stats.items())
            print(f"train: epoch {self.done}/{self.total} {text} "
                  f"({time.perf_counter() - self.start:.1f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _TqdmProgress:
    def __init__(self, tqdm, total: int):
        self.bar = tqdm(total=total, desc="train", unit="epoch", file=sys.stderr)

    def update(self, stats: dict) -> None:
        self.bar.set_postfix(stats, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _NoProgress:
    def update(self, stats: dict) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    tqdm = _tqdm_class() if enabled else None
    bar = (_TqdmProgress(tqdm, total) if tqdm is not None else
           _TextProgress(total) if enabled else _NoProgress())
    try:
        yield bar
    finally:
        bar.close()


# ----------------------------------------------------------------------------- training

def _derived_seed(seed: int, purpose: str) -> int:
    """A seed for another stream than the batch order's (so they are not the same numbers)."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def _kept_global_rng(device: torch.device):
    """Restores the global RNG of the CPU (and of the CUDA device) afterwards; yields the
    CUDA device indices it covers."""
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        yield cuda


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """Seeds the global RNG of the CPU (and the CUDA device) for the duration and restores it
    afterwards: layers that draw from it (dropout) become deterministic per seed, and the
    caller's random state is left as it was."""
    with _kept_global_rng(device) as cuda:
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _check_first_logits(logits, idx: Tensor) -> None:
    """Before any step a NaN or Inf logit is the model's (or x's) doing, not the learning
    rate's: it was reported as a divergence ("Lower config.lr")."""
    if isinstance(logits, Tensor) and logits.is_floating_point() and logits.dim() == 2:
        # in the logits' own dtype, which the loss is computed in (check_logits' float32 rule
        # is for the outputs oni reads); the message says what a first step's NaN means
        row = first_non_finite_row(logits)
        if row is not None:
            raise ValueError(f"the model's outputs at row {int(idx[row])} of x are NaN or Inf "
                             f"before any training step (freshly initialised): check the "
                             f"model's forward and x; config.lr has not acted yet")


def _cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, y)


def train_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    config: Optional[TrainConfig] = None,
    x_test: Optional[Tensor] = None,
    y_test: Optional[Tensor] = None,
    loss_fn: Optional[Callable[..., Tensor]] = None,
    extra: Union[None, Tensor, Sequence[Tensor]] = None,
) -> History:
    """Trains ``model`` from a fresh seeded initialisation with minibatch Adam.

    Conventions (a batched trainer such as :mod:`oni.shadows` follows them to give the same
    model for the same seed):

    1. **Init**: once every argument is checked (the model is left as it was when one is
       refused), the parameters are re-initialised with ``init_parameters_(model,
       config.seed)`` (:func:`oni.models.init_parameters_`: drawn on the CPU, so the same on
       every device) and the model is moved to the device.
    2. **Batch order**: ONE CPU ``torch.Generator`` seeded with ``config.seed``; epoch ``e``
       (in order) draws ``order = torch.randperm(N, generator=g)``, and its batches are
       ``order[i : i + batch_size]`` for ``i = 0, batch_size, 2 * batch_size, ...`` (the last,
       partial batch is kept).
    3. **Step**: ``loss = loss_fn(model(x[idx]), y[idx], *(e[idx] for e in extra))``, default
       ``torch.nn.functional.cross_entropy`` (the batch mean); ``zero_grad``, ``backward``,
       ``torch.optim.Adam(model.parameters(), lr, weight_decay=weight_decay)`` with its
       defaults otherwise (betas (0.9, 0.999), eps 1e-8), created once before epoch 1.
       Every :data:`FLUSH_EVERY` steps its moments below :data:`TINY_MOMENT` are set to 0
       (:func:`flush_tiny_moments_`: keeps float32 off subnormals, same weights).
    4. **Records**: after each epoch, the mean loss of its batches (weighted by batch size),
       and the accuracy on the whole training set and on the test set, in eval mode (the
       training-set pass costs about a quarter of an epoch for the paper's MLP; see
       BENCHMARKS.md).
    5. The model is in train mode during the epochs and in eval mode afterwards (also after
       an error). The global
       RNG (used only by layers such as dropout; the MLP has none) is seeded from a seed
       derived from ``config.seed`` for the duration and restored afterwards.

    The same seed gives bitwise identical weights on CPU (same machine, same thread count);
    on CUDA the results are reproducible up to cuBLAS's own guarantees. After each epoch the
    mean training loss is checked, then the weights the epoch's last step left and the
    logits on the training (and test) rows: a NaN or Inf raises ``FloatingPointError`` naming
    the epoch rather than training on. Data are moved to the device once, whole.

    Parameters
    ----------
    model : nn.Module
        Maps ``[n, d]`` to ``[n, k]`` logits; its parameters are ``nn.Linear`` weights
        (e.g. :class:`oni.models.MLP`). Trained in place.
    x : Tensor
        ``[N, d]`` floating training inputs (cast to the model's dtype).
    y : Tensor
        ``[N]`` integer class labels in ``[0, k)``.
    config : TrainConfig, optional
        Epochs, batch size, lr, weight decay, seed, device, progress bar.
    x_test, y_test : Tensor, optional
        Test data (both or neither), evaluated after every epoch.
    loss_fn : callable, optional
        ``loss_fn(logits [b, k], y_batch [b], *extra_batch) -> scalar tensor``; default mean
        cross-entropy.
    extra : Tensor or sequence of Tensor, optional
        Tensors ``[N, ...]`` indexed like ``x`` and passed to ``loss_fn`` batch by batch
        (e.g. soft labels ``[N, k]`` for distillation), moved to the device with their dtype
        kept. Needs ``loss_fn``.

    ``x``, ``x_test`` and ``extra`` are used detached: the caller's tensors get no
    ``.grad`` and no graph through them, whatever their ``requires_grad``.

    Returns
    -------
    History

    Raises
    ------
    TypeError, ValueError
        Bad arguments (the message names the argument), x or x_test not finite in the
        model's dtype, a model on the meta device or mixing parameter dtypes, a float16
        model (Adam underflows in float16), or NaN or Inf logits on the first batch, before
        any step (the message names the row of x).
    FloatingPointError
        Training diverged: an epoch's mean loss, the weights after its last step, or the
        logits on its rows became NaN or Inf.
    """
    config = TrainConfig() if config is None else config
    _check_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError("model has no parameters to train")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    device = _resolve_device(config.device, "config.device")
    check_not_meta(model, "model")
    _, dtype = _model_device_dtype(model)
    if not dtype.is_floating_point:
        raise TypeError(f"the model's parameters must be floating, got {dtype}")
    _check_one_dtype(model, "model")
    if dtype == torch.float16:  # it was reported as a divergence, at any lr
        raise TypeError("the model's parameters are float16, in which Adam's eps (1e-8) and "
                        "its squared gradients underflow: train it in float32 (model.float()) "
                        "or bfloat16, and cast it afterwards")

    # detached: a caller's x with requires_grad kept a graph through it and got x.grad
    x = _check_features(x, "x").detach()
    n, d = x.shape
    y = _check_labels(y, "y", n, "x")
    if (x_test is None) != (y_test is None):
        raise ValueError("give both x_test and y_test, or neither")
    has_test = x_test is not None
    if has_test:
        x_test = _check_features(x_test, "x_test").detach()
        if x_test.shape[1] != d:
            raise ValueError(f"x_test must have d = {d} columns (like x), got shape "
                             f"{tuple(x_test.shape)}")
        y_test = _check_labels(y_test, "y_test", x_test.shape[0], "x_test")
    extra = tuple(t.detach() for t in _check_extra(extra, n))
    if extra and loss_fn is None:
        raise ValueError("extra is passed to loss_fn only: give loss_fn too")
    criterion = _cross_entropy if loss_fn is None else loss_fn

    # finite in x's dtype, maybe not in the model's (it was reported as a divergence)
    x = _cast_checked(x, dtype, f"x cast to the model's {dtype}")
    if has_test:
        x_test = _cast_checked(x_test, dtype, f"x_test cast to the model's {dtype}")
    # every check before the caller's model is changed (it was re-initialised and moved,
    # then refused for its labels): k from a probe of the model as it is
    k = _probe_output_width(model, x[:1], d, device)
    _check_label_range(y, "y", k)
    if has_test:
        _check_label_range(y_test, "y_test", k)
    init_parameters_(model, config.seed)  # it raises before changing anything
    model.to(device)
    x = x.to(device, dtype).contiguous()
    y = y.to(device, torch.long)
    extra = tuple(t.to(device) for t in extra)
    if has_test:
        x_test = x_test.to(device, dtype).contiguous()
        y_test = y_test.to(device, torch.long)

    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    order_gen = torch.Generator().manual_seed(config.seed)
    bs = config.batch_size
    n_steps = 0
    history = History()
    start = time.perf_counter()
    try:
        with _progress(config.progress, config.epochs) as bar, \
                _seeded_global_rng(_derived_seed(config.seed, "global"), device):
            for epoch in range(1, config.epochs + 1):
                model.train()
                order = torch.randperm(n, generator=order_gen).to(device)
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                for lo in range(0, n, bs):
                    idx = order[lo:lo + bs]
                    logits = model(x[idx])
                    if n_steps == 0:
                        _check_first_logits(logits, idx)
                    loss = criterion(logits, y[idx], *(t[idx] for t in extra))
                    if not isinstance(loss, Tensor) or loss.dim() != 0:
                        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                        raise ValueError(f"loss_fn must return a scalar tensor, got {got}")
                    if not loss.requires_grad:
                        raise ValueError("loss_fn's result does not depend on the model's "
                                         "parameters (no grad): it cannot be trained on")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    n_steps += 1
                    if n_steps % FLUSH_EVERY == 0:
                        flush_tiny_moments_(optimizer)
                    loss_sum += loss.detach().double() * idx.shape[0]
                train_loss = float(loss_sum) / n  # one sync per epoch
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"training diverged: the mean training loss of epoch {epoch} is "
                        f"{train_loss} (lr = {config.lr}); the model keeps that epoch's weights. "
                        f"Lower config.lr or check x, y and loss_fn")
                train_acc, test_acc = _epoch_accuracies(
                    model, epoch, f"lr = {config.lr}; the model keeps those weights. Lower "
                                  f"config.lr or check x, y and loss_fn",
                    lambda: (_accuracy_on_device(model, x, y, "x"),
                             _accuracy_on_device(model, x_test, y_test, "x_test")
                             if has_test else None))
                history.epochs.append(epoch)
                history.train_loss.append(train_loss)
                history.train_acc.append(train_acc)
                history.test_acc.append(test_acc)
                stats = {"loss": f"{train_loss:.4f}", "train_acc": f"{train_acc:.3f}"}
                if has_test:
                    stats["test_acc"] = f"{test_acc:.3f}"
                bar.update(stats)
    finally:  # eval mode afterwards, also when training stops with an error
        model.eval()
    history.seconds = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------- prediction

def _batched(model, x, batch_size, device, transform, name: str = "x") -> Tuple[Tensor, int]:
    """(``transform(logits)`` of every batch concatenated on the CPU, k); ``name``: what the
    rows are, for the messages."""
    if not callable(model) or isinstance(model, type):  # a class is callable: it builds one
        got = f"the class {model.__name__}" if isinstance(model, type) else type(model).__name__
        raise TypeError(f"model must be an nn.Module or a function, got {got}")
    batch_size = _check_int(batch_size, "batch_size", 1)
    x = _check_features(x, name, allow_empty=True)
    model_device, dtype = _model_device_dtype(model)
    if model_device is not None and model_device.type == "meta":
        raise ValueError("model is on the meta device: meta tensors hold no values")
    if device is None:
        device = model_device if model_device is not None else x.device
    else:
        device = _resolve_device(device)
        if model_device is not None and model_device != device and not (
                model_device.type == device.type == "cuda" and device.index is None):
            raise ValueError(f"device={str(device)!r} but the model is on {model_device}; "
                             f"move it with model.to(...) or leave device=None")
    dtype = dtype if dtype is not None and dtype.is_floating_point else x.dtype
    _check_model_width(model, x.shape[1])  # x is cast to the model's dtype and device below
    outs, k = [], 0
    with torch.no_grad(), _eval_mode(model):
        # one pass even when N = 0, so the result has the model's k columns
        for lo in range(0, max(x.shape[0], 1), batch_size):
            rows = x[lo:lo + batch_size].to(device, dtype)
            if rows.dtype != x.dtype:  # finite in x's dtype, maybe not in the model's
                _check_finite(rows, f"{name} cast to the model's {dtype}")
            try:
                logits = _outputs(model, rows, name, lo)
            except torch.OutOfMemoryError:
                raise  # as it is: a caller may retry with a smaller batch_size
            except RuntimeError as err:  # e.g. a width the model does not take: name x
                raise RuntimeError(f"the model failed on {name} of shape {tuple(x.shape)} "
                                   f"(rows {lo} to {lo + len(rows) - 1}): {err}") from err
            if outs and logits.shape[1] != k:
                raise ValueError(f"the model returned {logits.shape[1]} logit columns for "
                                 f"{name}'s rows from {lo} but {k} for the rows before: one "
                                 f"model has one number of classes")
            k = logits.shape[1]
            outs.append(transform(logits).cpu())
    return torch.cat(outs), k


def predict_logits(model: Callable[[Tensor], Tensor], x: Tensor, *,
                   batch_size: int = _PREDICT_BATCH,
                   device: Union[None, str, torch.device] = None) -> Tensor:
    """The model's logits on ``x``, ``batch_size`` rows at a time, without grad, in eval mode
    (the model's previous mode is restored afterwards).

    Parameters
    ----------
    model : nn.Module or callable
        Maps ``[n, d]`` to ``[n, k]`` logits.
    x : Tensor
        ``[N, d]`` floating inputs, on any device (cast to the model's dtype); may be empty.
    batch_size : int
        Rows per forward pass.
    device : str or torch.device, optional
        Where to compute; default the model's device (x's for a parameterless callable).
        It must be where the model is.

    Returns
    -------
    Tensor
        ``[N, k]`` float32 on the CPU.

    Raises
    ------
    TypeError, ValueError
        Bad ``x`` or ``batch_size``; ``x`` beyond the range of the model's dtype; or model
        outputs that no classifier returns: not real floating ``[n, k >= 1]``, or NaN/Inf in
        float32 (the error names the first such row). :func:`predict_proba` and
        :func:`accuracy` check the same.
    """
    return _batched(model, x, batch_size, device, lambda z: z.float())[0]


def predict_proba(model: Callable[[Tensor], Tensor], x: Tensor, *,
                  batch_size: int = _PREDICT_BATCH,
                  device: Union[None, str, torch.device] = None) -> Tensor:
    """Softmax probabilities of the model on ``x``: like :func:`predict_logits` (the same
    arguments, checks and errors), with the softmax taken (in float32, on the device) batch
    by batch.

    Returns
    -------
    Tensor
        ``[N, k]`` float32 on the CPU; rows sum to 1.
    """
    return _batched(model, x, batch_size, device, lambda z: torch.softmax(z.float(), dim=1))[0]


def accuracy(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, *,
             batch_size: int = _PREDICT_BATCH,
             device: Union[None, str, torch.device] = None) -> float:
    """Fraction of rows whose argmax logit is the label (batched like :func:`predict_logits`).

    Parameters
    ----------
    model : nn.Module or callable
    x : Tensor
        ``[N, d]`` floating inputs, ``N >= 1`` (cast to the model's dtype and device).
    y : Tensor
        ``[N]`` integer labels in ``[0, k)``.
    batch_size, device :
        As in :func:`predict_logits`.

    Returns
    -------
    float
        In ``[0, 1]``.
    """
    x = _check_features(x, "x")
    y = _check_labels(y, "y", x.shape[0], "x")
    predicted, k = _batched(model, x, batch_size, device, lambda z: z.argmax(dim=1))
    _check_label_range(y, "y", k)
    return float((predicted == y.cpu().long()).double().mean())
