"""Many small MLPs trained and evaluated in one pass (shadow models for LiRA and friends).

LiRA needs tens to hundreds of shadow models of the target's architecture, each trained on
its own subset of the adversary's data, and evaluates all of them on the same records.
This module holds ``K`` MLPs of one shape as stacked parameters (``[K, out, in]`` weights,
``[K, out]`` biases) and trains them together:

* one gather of the ``K`` minibatches (``[K, B, d]``) per step;
* forward and backward with batched matrix products (``torch.baddbmm`` / ``torch.bmm``) and
  a hand-written backward pass (mean cross-entropy, ReLU), no autograd graph;
* one Adam step over the stacked parameters (``fused=True``: Adam is elementwise, so
  stacking changes nothing but the number of kernel launches and passes over memory).

Equivalence: model ``j`` of :func:`train_mlps_batched` is trained exactly as
``oni.train.train_model(MLP(d, k, hidden), x[xs_idx[j]], y[xs_idx[j]], config=replace(config,
seed=seeds[j]))`` trains it: the same initialisation (:func:`oni.models.init_parameters_`
with ``seeds[j]``), the same batch order (one CPU ``torch.Generator`` seeded with
``seeds[j]``, ``torch.randperm(n, generator=g)`` per epoch, consecutive batches, the last
partial batch kept), the same mean cross-entropy and Adam settings. What differs is the order
of the floating-point sums inside the matrix products (and the fused Adam kernel), so the
results agree to float rounding, not bit for bit. On small networks the models stay within
~1e-7 of each other (tests/test_shadows.py). On the paper's MLP, rounding-level differences
do not stay small: a pre-activation within rounding of zero flips its ReLU, and Adam's first
steps move every weight by about ``lr`` whatever the size of its gradient, so after a few
hundred steps some weights differ by ~1e-3 and more. ``train_model`` shows the same spread
against itself when only the thread count changes (BENCHMARKS.md, "Batched shadow training
(CPU)"); the models are alike in distribution (accuracy, predictions), which is what shadow
models are for.

Why ``bmm`` rather than ``torch.func.vmap(functional_call)``: vmap lowers the linear layers
to the same batched products but records an autograd graph and adds functorch's per-call
overhead; the explicit products with a hand-written backward need neither (BENCHMARKS.md
compares the two). On a CPU the products themselves run no faster batched than one model at
a time (they are near the machine's float32 peak either way): the gain is in the optimiser
(one fused pass instead of about ten per parameter) and in the per-step overhead.

Sparse inputs (float32, the CPU default for inputs at most 20% non-zero): the binary rows of
Purchase, Texas and Location are 1-12% ones, so the first layer and its weight gradient are
sums over the active features' weight rows (``oni._ops.sparse_input_linear`` and
``sparse_input_weight_grad``; the first weight is held transposed, ``[K, d, H]``, during
training). The same sums in another order, so the same models to float rounding.

Mixed precision (``precision="bf16"``, opt-in): the products take bfloat16 operands with
float32 accumulation (measured against float32 products: 5-6x faster with AMX on a Xeon, about
4x with AVX512-BF16 on an AMD EPYC; BENCHMARKS.md), while
the parameters and Adam state stay float32 (:func:`_train_step_bf16`). Then the update of
the optimiser state costs about as much as the products. It is one memory-bound pass
(``oni._ops.adam_step_bf16``: gradient cast, Adam, bfloat16 copy of the parameters), and on
the CPU the models are trained a few at a time, few enough for that state to stay in cache
between steps. On the CPU the hidden ReLUs and their backward (fused with the bias
gradients) are ``oni._ops.relu_bf16_`` and ``oni._ops.relu_backward_bf16_``, integer tests
on the bfloat16 patterns instead of aten's round trips through float32 (on a GPU, aten's
passes are fast and are used). These models are not
``train_model``'s to rounding: bfloat16 rounding (relative 2^-9 per product operand) moves the
gradients by several percent at initialisation, as ``torch.autocast`` does.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _ops, reference
from ._checks import (NonFiniteLogits, check_finite, check_int, check_logits, check_not_meta,
                      first_bad_row, first_non_finite_row, is_integer_dtype)
from .models import (MLP, SLOW_BF16_CPU, _check_seed, _first_weight_problem, _native_bf16_cpu,
                     _parameter_difference, _rebuild_difference, _resolve_device, build_model,
                     init_parameters_)
from .train import (FLUSH_EVERY, TINY_MOMENT, TrainConfig, _check_config, _check_features,
                    _check_label_range, _check_labels, _progress, flush_tiny_moments_)

__all__ = ["StackedMLP", "stack_mlps", "train_mlps_batched", "predict_logits_batched"]

#: memory a chunk of models may take while training (parameters, gradients, Adam moments)
_TRAIN_CHUNK_BYTES = 2 << 30
#: memory the activations of one prediction pass may take
_PREDICT_CHUNK_BYTES = 256 << 20
#: precision="bf16" on the CPU: memory the state of a chunk of models may take (2 paper MLPs
#: at 16 bytes per parameter; 4 were 5% faster on an idle host and 10-20% slower while
#: the host's cache was contended: BENCHMARKS.md)
_BF16_CPU_CHUNK_BYTES = 48 << 20
#: float32 on the CPU: inputs at most this dense (fraction of non-zeros) go through the
#: sparse first layer by default (measured crossover with the dense product: about 0.25)
_SPARSE_MAX_DENSITY = 0.2
#: torch.optim.Adam's defaults (train_model's optimiser)
_ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8
#: the arithmetic train_mlps_batched offers (``precision``)
PRECISIONS = ("float32", "bf16")


class StackedMLP:
    """``K`` MLPs of one architecture as stacked parameters.

    Attributes
    ----------
    weights : list of Tensor
        ``weights[i]`` is ``[K, out_i, in_i]`` (``nn.Linear`` layout), input layer first.
    biases : list of Tensor
        ``biases[i]`` is ``[K, out_i]``.
    d, k : int
        Input features and classes.
    hidden : tuple of int
        Hidden widths.
    n_models : int
        ``K``.
    device : torch.device
        Where the parameters are.
    """

    def __init__(self, weights: Sequence[Tensor], biases: Sequence[Tensor]):
        for name, tensors in (("weights", weights), ("biases", biases)):
            if not isinstance(tensors, Sequence) or isinstance(tensors, (str, bytes)):
                raise TypeError(f"{name} must be a list of tensors, got "
                                f"{type(tensors).__name__}")
            for i, t in enumerate(tensors):
                if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
                    got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                    raise TypeError(f"{name}[{i}] must be a floating torch.Tensor, got {got}")
                check_not_meta(t, f"{name}[{i}]")
                if t.numel() == 0:  # no models, or a layer of no units
                    raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}: a stack holds at "
                                     f"least one model, and every layer at least one unit")
        if len(weights) == 0 or len(weights) != len(biases):
            raise ValueError(f"weights and biases must be non-empty lists of equal length, got "
                             f"{len(weights)} and {len(biases)}")
        n_models = weights[0].shape[0]
        for i, (w, b) in enumerate(zip(weights, biases)):
            if w.dim() != 3 or b.dim() != 2 or w.shape[0] != n_models or \
                    b.shape != (n_models, w.shape[1]):
                raise ValueError(f"layer {i}: expected weights [K, out, in] and biases [K, out] "
                                 f"with K = {n_models}, got {tuple(w.shape)} and "
                                 f"{tuple(b.shape)}")
            if i > 0 and w.shape[2] != weights[i - 1].shape[1]:
                raise ValueError(f"layer {i} takes {w.shape[2]} inputs but layer {i - 1} gives "
                                 f"{weights[i - 1].shape[1]}")
            if w.device != weights[0].device or b.device != weights[0].device:
                raise ValueError(f"layer {i}'s weights and biases must be on "
                                 f"{weights[0].device}, where weights[0] is; got {w.device} "
                                 f"and {b.device}")
        self.weights, self.biases = list(weights), list(biases)

    @property
    def n_models(self) -> int:
        return self.weights[0].shape[0]

    @property
    def d(self) -> int:
        return self.weights[0].shape[2]

    @property
    def k(self) -> int:
        return self.weights[-1].shape[1]

    @property
    def hidden(self) -> Tuple[int, ...]:
        return tuple(w.shape[1] for w in self.weights[:-1])

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    def to_models(self) -> List[MLP]:
        """The ``K`` models as :class:`oni.models.MLP` on the CPU, in eval mode."""
        models = []
        for j in range(self.n_models):
            model = _empty_mlp(self.d, self.k, self.hidden)
            with torch.no_grad():
                for layer, w, b in zip(_linears(model), self.weights, self.biases):
                    layer.weight.copy_(w[j])
                    layer.bias.copy_(b[j])
            models.append(model.eval())
        return models


def _empty_mlp(d: int, k: int, hidden: Sequence[int]) -> MLP:
    """An MLP on the CPU with uninitialised parameters (skips the default init's RNG work)."""
    with torch.device("meta"):
        model = MLP(d, k, hidden)
    return model.to_empty(device="cpu")


def _linears(model: MLP):
    return [module for module in model if isinstance(module, torch.nn.Linear)]


def stack_mlps(models: Sequence[MLP], *, device=None) -> StackedMLP:
    """Stacks the parameters of MLPs of one architecture (copies, float32).

    Parameters
    ----------
    models : sequence of :class:`oni.models.MLP`
        At least one; all with the same ``d``, ``k`` and ``hidden``, and each a plain MLP,
        computing what its ``nn.Linear`` layers and ReLUs compute (what
        :func:`oni.models.save_model` takes): the stack holds those layers' weights only.
        A StackedMLP is returned as it is (moved to ``device`` when given).
    device : str or torch.device, optional
        Where the stacked parameters go; default the first model's device.

    Raises
    ------
    TypeError, ValueError
        A model is not an MLP, has another architecture than ``models[0]``, is on the meta
        device, or is not a plain MLP (a subclass, a swapped layer such as a Tanh, a
        forward set on the instance, forward hooks or pre-hooks, an ``nn.Linear`` without
        bias, weights that are not dense float16, bfloat16, float32 or float64 tensors);
        the message names ``models[j]``.
    """
    if device is not None:
        device = _resolve_device(device)
    if isinstance(models, StackedMLP):
        if device is None:
            return models
        return StackedMLP([w.to(device) for w in models.weights],
                          [b.to(device) for b in models.biases])
    if isinstance(models, torch.nn.ModuleList):  # as predict_logits_batched takes it
        models = list(models)
    if not isinstance(models, Sequence) or len(models) == 0:
        raise ValueError("models must be a non-empty sequence of oni.models.MLP")
    _check_plain_mlps(models, "models")
    return _stack(models, device)


def _check_plain_mlps(models: Sequence, name: str) -> None:
    """A TypeError/ValueError naming ``name[j]`` unless every model is a plain MLP (the
    function the stacked products compute: nothing but its Linear and ReLU layers) of
    ``models[0]``'s architecture."""
    first = models[0]
    if not isinstance(first, MLP):
        raise TypeError(f"{name}[0] must be an oni.models.MLP, got {type(first).__name__}")
    try:
        with torch.device("meta"):  # shapes and layer types only
            rebuilt = build_model(first.config)
    except (TypeError, ValueError) as err:  # d, k or hidden reassigned on the instance
        raise ValueError(f"{name}[0]: {err}") from None
    for j, model in enumerate(models):
        if not isinstance(model, MLP):
            raise TypeError(f"{name}[{j}] must be an oni.models.MLP, got "
                            f"{type(model).__name__}")
        if model.config != first.config:
            raise ValueError(f"{name}[{j}] has architecture {model.config} but {name}[0] has "
                             f"{first.config}: stacked models must share one")
        check_not_meta(model, f"{name}[{j}]")
        # the stack keeps the Linear weights only: anything else that shapes the function
        # would be dropped without a word
        why = _rebuild_difference(model, rebuilt) or _parameter_difference(model, rebuilt)
        if not why:
            why = _first_weight_problem(model.state_dict())
        if why:
            raise ValueError(f"{name}[{j}] is not a plain MLP (nn.Linear and ReLU layers "
                             f"only), the function batched models compute: {why}")


def _stack(models: Sequence[MLP], device) -> StackedMLP:
    """:func:`stack_mlps` of models checked by :func:`_check_plain_mlps`."""
    if device is None:
        device = next(models[0].parameters()).device
    layers = [_linears(model) for model in models]
    weights = [torch.stack([m[i].weight.detach() for m in layers]).to(device, torch.float32)
               for i in range(len(layers[0]))]
    biases = [torch.stack([m[i].bias.detach() for m in layers]).to(device, torch.float32)
              for i in range(len(layers[0]))]
    return StackedMLP(weights, biases)


# ----------------------------------------------------------------------------- checks

def _check_index_sets(xs_idx, n_rows: int) -> Tensor:
    """``xs_idx`` as an int64 ``[K, n]`` CPU tensor (equal sizes, indices into x)."""
    if isinstance(xs_idx, Tensor):
        if xs_idx.dim() != 2:
            raise ValueError(f"xs_idx must be [K, n] (one row of indices per model), got shape "
                             f"{tuple(xs_idx.shape)}")
        rows = list(xs_idx)
    elif isinstance(xs_idx, Sequence) and not isinstance(xs_idx, (str, bytes)):
        rows = []
        for j, r in enumerate(xs_idx):
            try:
                rows.append(torch.as_tensor(r))
            except (TypeError, ValueError, RuntimeError):  # strings, ragged nests
                raise TypeError(f"xs_idx[{j}] must be a 1-D tensor of integer row indices, "
                                f"got {type(r).__name__} {str(r)[:40]}") from None
    else:
        raise TypeError(f"xs_idx must be a [K, n] tensor or a sequence of K index tensors, got "
                        f"{type(xs_idx).__name__}")
    if len(rows) == 0:
        raise ValueError("xs_idx is empty: give at least one model's training indices")
    for j, r in enumerate(rows):
        if r.dim() != 1 or not is_integer_dtype(r.dtype):
            raise TypeError(f"xs_idx[{j}] must be a 1-D tensor of integer row indices, got "
                            f"shape {tuple(r.shape)} and dtype {r.dtype}")
        check_not_meta(r, f"xs_idx[{j}]")
        if len(r) != len(rows[0]):
            raise ValueError(f"xs_idx[{j}] has {len(r)} indices but xs_idx[0] has "
                             f"{len(rows[0])}: batched training needs equal training-set "
                             f"sizes (the models step together)")
    idx = torch.stack([r.cpu().long() for r in rows])
    if idx.shape[1] == 0:
        raise ValueError("xs_idx holds no indices: each model needs at least one row")
    if int(idx.min()) < 0 or int(idx.max()) >= n_rows:
        raise ValueError(f"xs_idx must index rows of x in [0, {n_rows}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    return idx


def _check_seeds(seeds, n_models: int) -> List[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be a sequence of {n_models} ints (one per model), got "
                        f"{type(seeds).__name__}")
    if len(seeds) != n_models:
        raise ValueError(f"seeds has {len(seeds)} entries but xs_idx describes {n_models} "
                         f"models")
    for j, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"seeds[{j}] must be an int, got {type(s).__name__}")
    # the range now, not when model j starts training (the message named "seed")
    return [_check_seed(int(s), f"seeds[{j}]") for j, s in enumerate(seeds)]


def _check_precision(precision) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _check_chunk(chunk_size, default: int) -> int:
    return default if chunk_size is None else check_int(chunk_size, "chunk_size", 1)


def _choose_sparse_first(sparse_inputs, precision: str, x: Tensor, device: torch.device) -> bool:
    """Whether the float32 trainer takes the sparse first layer (see ``sparse_inputs``)."""
    if sparse_inputs is not None and not isinstance(sparse_inputs, bool):
        raise TypeError(f"sparse_inputs must be True, False or None, got "
                        f"{type(sparse_inputs).__name__}")
    kernels = _ops.has_kernel(device.type, ("sparse_input_linear", "sparse_input_weight_grad"))
    if sparse_inputs:
        if precision != "float32":
            raise ValueError(f"sparse_inputs=True needs precision='float32', got {precision!r}")
        if not kernels:
            raise ValueError(f"sparse_inputs=True needs oni's compiled sparse first-layer "
                             f"kernels for {device.type}, and this build has none")
        return True
    if sparse_inputs is False or precision != "float32" or device.type != "cpu" or not kernels:
        return False
    return x.numel() > 0 and float(torch.count_nonzero(x)) <= _SPARSE_MAX_DENSITY * x.numel()


def _n_parameters(d: int, k: int, hidden: Sequence[int]) -> int:
    widths = [d, *hidden, k]
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))


# ----------------------------------------------------------------------------- training

def _relu_backward(grad: Tensor, output: Tensor) -> Tensor:
    """``grad`` where the ReLU's output is positive, else 0 (autograd's own formula)."""
    return torch.ops.aten.threshold_backward(grad, output, 0)


def _cross_entropy_and_grad(logits: Tensor, labels: Tensor, class_dim: int):
    """Per model: the summed cross-entropy (float64, ``[K]``) and the gradient of the mean
    cross-entropy in the logits, ``(softmax - one_hot) / B`` for each model's own batch.
    ``logits`` is ``[K, B, k]`` (``class_dim=2``) or ``[K, k, B]`` (``class_dim=1``);
    ``labels`` ``[K, B]``."""
    log_p = torch.log_softmax(logits, dim=class_dim)
    target = labels.unsqueeze(class_dim)
    loss_sum = -log_p.gather(class_dim, target).squeeze(class_dim).sum(1, dtype=torch.float64)
    inv_batch = 1.0 / labels.shape[1]
    grad = log_p.exp_().mul_(inv_batch)
    grad.scatter_add_(class_dim, target, torch.full(target.shape, -inv_batch, dtype=grad.dtype,
                                                    device=grad.device))
    return loss_sum, grad


def _train_step(weights: List[Tensor], biases: List[Tensor], inputs: Tensor,
                labels: Tensor, sparse_first: bool = False) -> Tensor:
    """One Adam step's gradients for every model; returns the summed loss per model [K].

    ``inputs`` [K, B, d], ``labels`` [K, B]. Gradients of the mean cross-entropy of each
    model's batch are written into ``.grad`` of the stacked parameters. With
    ``sparse_first`` the first weight is held transposed, ``[K, d, H]``, and the first layer
    and its weight gradient are computed from the non-zeros of ``inputs`` only
    (``oni::sparse_input_linear``, ``oni::sparse_input_weight_grad``).
    """
    last = len(weights) - 1
    activations = [inputs]  # input of each layer; ReLU outputs double as its backward mask
    h = inputs
    for i, (w, b) in enumerate(zip(weights, biases)):
        if i == 0 and sparse_first:
            h = _ops.sparse_input_linear(inputs, w, b)
        else:
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        if i < last:
            h = h.relu_()
            activations.append(h)
    loss_sum, grad = _cross_entropy_and_grad(h, labels, class_dim=2)
    for i in range(last, -1, -1):
        if i == 0 and sparse_first:
            _ops.sparse_input_weight_grad(inputs, grad, weights[0].grad)
        else:
            torch.bmm(grad.transpose(1, 2), activations[i], out=weights[i].grad)
        torch.sum(grad, dim=1, out=biases[i].grad)
        if i > 0:
            grad = _relu_backward(torch.bmm(grad, weights[i]), activations[i])
    return loss_sum


def _train_step_bf16(low_weights: List[Tensor], grad_weights: List[Tensor],
                     grad_biases: List[Tensor], inputs_t: Tensor, labels: Tensor,
                     relu_, relu_backward_, views) -> Tensor:
    """:func:`_train_step` in mixed precision (``precision="bf16"``).

    ``low_weights`` are bfloat16 copies of the float32 weights (refreshed after every
    update; the biases come in ``views``), ``grad_weights`` / ``grad_biases`` bfloat16
    buffers shaped like the parameters (the gradients land there), ``inputs_t`` the bfloat16 inputs as ``[K, d, B]`` (the
    transposed view of ``[K, B, d]`` rows). The activations are kept transposed too
    (``[K, width, B]``, products ``W @ h`` rather than ``h @ W.T``): on the CPU the bfloat16
    products run about 20% faster that way. The products take bfloat16 operands and
    accumulate in float32 inside the kernel; their results are rounded to bfloat16, as under
    ``torch.autocast``. The logits get the float32 bias and stay float32 through
    log-softmax, loss and the gradient of the logits. ``relu_`` and ``relu_backward_`` are
    ``oni::relu_bf16_`` and ``oni::relu_backward_bf16_`` (or their twins): the hidden ReLUs,
    and each ReLU's backward fused with the bias gradient of the layer before it. ``views``
    (:func:`_step_views`) holds the views of the parameters the step takes, made once per
    trainer rather than in every step.
    """
    last = len(low_weights) - 1
    bias_columns, output_bias, low_weights_t = views
    activations = [inputs_t]
    h = inputs_t
    for i in range(last):
        h = torch.baddbmm(bias_columns[i], low_weights[i], h)
        relu_(h)
        activations.append(h)
    logits = torch.add(torch.bmm(low_weights[last], h), output_bias)  # float32
    loss_sum, grad = _cross_entropy_and_grad(logits, labels, class_dim=1)  # [K, k, B]
    grad = grad.to(torch.bfloat16)
    # a bfloat16 sum accumulates in float32; 3x faster than sum(dtype=float32) here
    torch.sum(grad, dim=2, out=grad_biases[last])
    for i in range(last, -1, -1):
        torch.bmm(grad, activations[i].transpose(1, 2), out=grad_weights[i])
        if i > 0:
            grad = torch.bmm(low_weights_t[i], grad)
            relu_backward_(grad, activations[i], grad_biases[i - 1])
    return loss_sum


def _step_views(biases: List[Tensor], low_biases: List[Tensor], low_weights: List[Tensor]):
    """The views of the parameters :func:`_train_step_bf16` takes: the hidden layers'
    bfloat16 biases as columns ``[K, out, 1]``, the float32 output bias as one, and the
    bfloat16 weights transposed. The parameters are updated in place, so the views stay
    valid for the whole training."""
    return ([b.unsqueeze(2) for b in low_biases[:-1]], biases[-1].unsqueeze(2),
            [w.transpose(1, 2) for w in low_weights])


class _Bf16Trainer:
    """The mixed-precision state of one chunk of models, in flat buffers.

    The float32 master parameters (``stacked``'s tensors become views of one buffer) with
    their float32 Adam moments, a bfloat16 copy of the parameters and a bfloat16 buffer the
    gradients are written into (slices of ``workspace``'s buffers, which the chunks of one
    call share; a fresh workspace when none is given). Each step ends with one pass over
    the buffers,
    ``oni._ops.adam_step_bf16``: the bfloat16 gradient cast to float32, the update
    ``torch.optim.Adam`` makes (the one ``train_model`` makes; same defaults), Adam's moments
    below ``TINY_MOMENT`` set to 0, and the new parameters written to bfloat16.

    Why the moments are flushed: a parameter whose gradient stays 0 (a dead ReLU unit, an
    input that is always 0 in its rows) has a first moment that decays by ``beta1 = 0.9`` a
    step, into float32's subnormal range within some hundred steps, and x86 arithmetic on
    subnormals is several times slower (measured: the update 5x slower by epoch 18 of the
    benchmark workload, 17% of the moments subnormal). Below ``1e-30`` a moment moves the
    parameter by less than ``1e-22 * lr`` (``eps = 1e-8`` bounds the denominator).
    """

    def __init__(self, stacked: StackedMLP, config: TrainConfig, device: torch.device,
                 workspace: Optional["_Bf16Workspace"] = None):
        params = stacked.weights + stacked.biases
        shapes = [p.shape for p in params]
        n = sum(p.numel() for p in params)
        workspace = _Bf16Workspace(device) if workspace is None else workspace
        self.master, self.exp_avg, self.exp_avg_sq, self.low, self.grad_low = \
            workspace.buffers(n)
        views = _flat_views(self.master, shapes)
        for view, p in zip(views, params):
            view.copy_(p)
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self.low.copy_(self.master)
        # every element of grad_low is written by the step before the update reads it
        n_layers = len(stacked.weights)
        stacked.weights[:], stacked.biases[:] = views[:n_layers], views[n_layers:]
        self.stacked = stacked
        low, grads = _flat_views(self.low, shapes), _flat_views(self.grad_low, shapes)
        self.low_weights, self.low_biases = low[:n_layers], low[n_layers:]
        self.grad_weights, self.grad_biases = grads[:n_layers], grads[n_layers:]
        self.lr, self.weight_decay = float(config.lr), float(config.weight_decay)
        # the compiled kernels where there are, else their pure-PyTorch twins. The ReLU ops
        # only on the CPU, where aten's bfloat16 passes are slow; on a GPU aten's are fast,
        # and the ReLU ops' CUDA kernels have not run on one yet
        has_adam = _ops.has_kernel(device.type, ("adam_step_bf16",))
        self.update = _ops.adam_step_bf16 if has_adam else reference.adam_step_bf16
        relu_ops = device.type == "cpu" and \
            _ops.has_kernel("cpu", ("relu_bf16_", "relu_backward_bf16_"))
        module = _ops if relu_ops else reference
        self.relu_, self.relu_backward_ = module.relu_bf16_, module.relu_backward_bf16_
        self.step_views = _step_views(stacked.biases, self.low_biases, self.low_weights)
        self.n_steps = 0

    def step(self, inputs_t: Tensor, labels: Tensor) -> Tensor:
        """One training step of every model; returns the summed loss per model [K]."""
        loss_sum = _train_step_bf16(self.low_weights, self.grad_weights, self.grad_biases,
                                    inputs_t, labels, self.relu_, self.relu_backward_,
                                    self.step_views)
        self.n_steps += 1
        self.update(self.master, self.exp_avg, self.exp_avg_sq, self.low, self.grad_low,
                    self.n_steps, self.lr, _ADAM_BETA1, _ADAM_BETA2, _ADAM_EPS,
                    self.weight_decay, TINY_MOMENT)
        return loss_sum


class _Bf16Workspace:
    """The flat buffers of :class:`_Bf16Trainer`, allocated once per call and reused by
    every chunk: fresh buffers cost a page fault per 4 KiB on first touch (about 3 ms per
    21 MB buffer on the CPU, measured), which every chunk would otherwise pay again. The
    models are copied out of the master buffer (``StackedMLP.to_models``) before the next
    chunk overwrites it."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: Optional[Tuple[Tensor, ...]] = None

    def buffers(self, n: int) -> Tuple[Tensor, ...]:
        """Master parameters, two moments (float32), bfloat16 copy and gradient: ``n`` each."""
        if self._buffers is None or self._buffers[0].numel() < n:
            self._buffers = None  # free the old ones first
            self._buffers = tuple(torch.zeros(n, dtype=dtype, device=self.device)
                                  for dtype in (torch.float32,) * 3 + (torch.bfloat16,) * 2)
        return tuple(b[:n] for b in self._buffers)


def _flat_views(flat: Tensor, shapes) -> List[Tensor]:
    """Consecutive views of the 1-D ``flat`` with the given shapes."""
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[offset:offset + size].view(shape))
        offset += size
    return views


def _initial_parameters(d, k, hidden, seeds, device) -> StackedMLP:
    models = []
    for seed in seeds:
        # the initialisation train_model uses (built empty: its default init is overwritten)
        models.append(init_parameters_(_empty_mlp(d, k, hidden), seed))
    return stack_mlps(models, device=device)


def _train_chunk(d, k, hidden, idx: Tensor, x: Tensor, y: Tensor, seeds: List[int],
                 config: TrainConfig, device: torch.device, bar, first: int,
                 n_total: int, precision: str = "float32",
                 sparse_first: bool = False,
                 workspace: Optional[_Bf16Workspace] = None) -> StackedMLP:
    stacked = _initial_parameters(d, k, hidden, seeds, device)
    if precision == "bf16":
        trainer = _Bf16Trainer(stacked, config, device, workspace)

        def step(rows):
            # the rows of every model as [K, d, B] (see _train_step_bf16): a transposed view,
            # which the products take as it is (cheaper than a contiguous copy, measured)
            inputs = x.index_select(0, rows.flatten()).view(*rows.shape, x.shape[1])
            return trainer.step(inputs.transpose(1, 2), y[rows])
    else:
        if sparse_first:  # the first weight held transposed, [K, d, H] (see _train_step)
            stacked.weights[0] = stacked.weights[0].transpose(1, 2).contiguous()
        params = stacked.weights + stacked.biases
        for p in params:
            p.grad = torch.zeros_like(p)
        # fused: one pass over the stacked tensors per step (the per-model for-loop Adam
        # makes about ten); same update formula, elementwise
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                                     fused=device.type in ("cpu", "cuda") or None)

        n_steps = 0

        def step(rows):
            nonlocal n_steps
            loss_sum = _train_step(stacked.weights, stacked.biases, x[rows], y[rows],
                                   sparse_first)
            optimizer.step()
            n_steps += 1
            if n_steps % FLUSH_EVERY == 0:  # as train_model does (same weights, no subnormals)
                flush_tiny_moments_(optimizer)
            return loss_sum
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    n = idx.shape[1]
    bs = config.batch_size
    for epoch in range(1, config.epochs + 1):
        # each model's rows in its own order (same generator convention as train_model)
        order = torch.stack([idx[j][torch.randperm(n, generator=g)]
                             for j, g in enumerate(generators)]).to(device)
        loss_sum = torch.zeros(len(seeds), dtype=torch.float64, device=device)
        for lo in range(0, n, bs):
            loss_sum += step(order[:, lo:lo + bs])
        mean_loss = (loss_sum / n).cpu()
        j = first_bad_row(~torch.isfinite(mean_loss))
        if j is not None:
            raise FloatingPointError(
                f"training diverged: model {first + j} (seed {seeds[j]}) has mean training "
                f"loss {float(mean_loss[j])} in epoch {epoch} (lr = {config.lr}); lower "
                f"config.lr or check x and y")
        # the losses were taken before each step: the epoch's last step is checked here
        finite = torch.stack([torch.isfinite(t).flatten(1).all(1)
                              for t in (*stacked.weights, *stacked.biases)]).all(0).cpu()
        j = first_bad_row(~finite)
        if j is not None:
            raise FloatingPointError(
                f"training diverged: the last step of epoch {epoch} left NaN or Inf in the "
                f"weights of model {first + j} (seed {seeds[j]}) (lr = {config.lr}); lower "
                f"config.lr or check x and y")
        bar.update({"models": f"{first + 1}-{first + len(seeds)}/{n_total}",
                    "mean loss": f"{float(mean_loss.mean()):.4f}"})
    if sparse_first:  # back to nn.Linear's [K, H, d]
        stacked.weights[0] = stacked.weights[0].detach().transpose(1, 2).contiguous()
    return stacked


def train_mlps_batched(d: int, k: int, hidden: Sequence[int], xs_idx, x: Tensor, y: Tensor, *,
                       seeds: Sequence[int], config: Optional[TrainConfig] = None,
                       chunk_size: Optional[int] = None,
                       precision: str = "float32",
                       sparse_inputs: Optional[bool] = None) -> List[MLP]:
    """Trains ``K`` MLPs ``d -> hidden -> k`` together, model ``j`` on ``x[xs_idx[j]]``.

    Gives the models :func:`oni.train.train_model` gives one by one (same initialisation,
    batch order, loss and Adam; see the module docstring), to float rounding.

    Parameters
    ----------
    d, k : int
        Input features and classes.
    hidden : sequence of int
        Hidden widths (the paper's ``(1024, 512, 256, 128)``).
    xs_idx : Tensor ``[K, n]`` or sequence of ``K`` index tensors of one length ``n``
        The training rows of each model (indices into ``x``; repeats allowed).
    x : Tensor
        ``[N, d]`` floating pool of rows (moved to the device once, as float32; as
        bfloat16 with ``precision="bf16"``).
    y : Tensor
        ``[N]`` integer labels in ``[0, k)``.
    seeds : sequence of ``K`` ints
        Model ``j``'s seed (initialisation and batch order); ``config.seed`` is not used.
    config : TrainConfig, optional
        Epochs, batch size, lr, weight decay, device (``"auto"``: CUDA when available),
        progress (one bar entry per epoch of each chunk of models).
    chunk_size : int, optional
        Models trained at a time; default as many as fit in about 2 GiB of parameters,
        gradients and Adam moments (``precision="bf16"`` on the CPU: 48 MiB, 2 paper MLPs,
        which keeps that state in cache between steps). Chunks do not change the results.
    precision : ``"float32"`` (default) or ``"bf16"``
        ``"float32"`` gives :func:`oni.train.train_model`'s models (to float rounding).
        ``"bf16"`` (opt-in) is mixed precision: float32 master parameters and Adam state
        (Adam's update, on the float32 cast of the gradients), but the three products of each
        layer (forward, gradient of the input, gradient of the weight) take bfloat16
        operands (``x`` and the activations rounded to bfloat16, and a bfloat16 copy of the
        parameters refreshed after every step) and accumulate in float32; their results
        (activations, gradients) are rounded to bfloat16, as under ``torch.autocast``. The
        logits (with the float32 output bias), log-softmax and loss stay float32. It trains
        faster where bfloat16 products are fast (CPUs with AMX or AVX512-BF16, GPUs; on a
        CPU without native bfloat16 products it is far slower and warns), but the models are
        not ``train_model``'s to rounding: alike in accuracy, not in every prediction
        (BENCHMARKS.md, "Batched shadow training (CPU)"). The models returned are float32
        either way.
    sparse_inputs : bool, optional
        ``precision="float32"`` only. Whether the first layer and its weight gradient are
        computed from the non-zeros of the inputs (``oni::sparse_input_linear`` and
        ``oni::sparse_input_weight_grad``) instead of by dense products: the same sums in
        another order (so the models are the dense path's to float rounding), faster on
        the binary tabular rows of the field (Purchase, Texas, Location: 1-12% ones;
        measured in BENCHMARKS.md). Default (None): on the CPU when at most
        ``_SPARSE_MAX_DENSITY`` (0.2) of ``x``'s entries are non-zero; never on a GPU,
        where cuBLAS's dense products are used. True needs the compiled kernels for the
        device.

    Returns
    -------
    list of :class:`oni.models.MLP`
        ``K`` models on the CPU, in eval mode, in the order of ``xs_idx``.

    Raises
    ------
    TypeError, ValueError
        Bad arguments (the message names the argument).
    FloatingPointError
        A model's mean training loss over an epoch, or its weights after an epoch's last
        step, became NaN or Inf.
    """
    config = TrainConfig() if config is None else config
    _check_config(config)
    precision = _check_precision(precision)
    with torch.device("meta"):
        MLP(d, k, hidden)  # validates d, k and hidden with MLP's own messages
    hidden = tuple(int(h) for h in hidden)
    # detached, as train_model takes it: with requires_grad it failed inside bmm(out=...)
    x = _check_features(x, "x").detach()
    if x.shape[1] != d:
        raise ValueError(f"x must have d = {d} columns, got shape {tuple(x.shape)}")
    y = _check_labels(y, "y", x.shape[0], "x")
    _check_label_range(y, "y", k)
    idx = _check_index_sets(xs_idx, x.shape[0])
    seeds = _check_seeds(seeds, idx.shape[0])
    device = _resolve_device(config.device, "config.device")
    if precision == "bf16" and device.type == "cpu" and _native_bf16_cpu() is False:
        warnings.warn(SLOW_BF16_CPU, stacklevel=2)
    if precision == "float32":
        # parameter, gradient, two Adam moments
        state_bytes = 4 * 4 * _n_parameters(d, k, hidden)
        budget = _TRAIN_CHUNK_BYTES
    else:
        # float32 parameter and two Adam moments; bfloat16 copy and gradient. On the
        # CPU the passes over this state are memory-bound: a chunk whose state stays in
        # cache between steps trains faster (BENCHMARKS.md)
        state_bytes = (3 * 4 + 2 * 2) * _n_parameters(d, k, hidden)
        budget = _BF16_CPU_CHUNK_BYTES if device.type == "cpu" else _TRAIN_CHUNK_BYTES
    chunk = _check_chunk(chunk_size, max(1, budget // state_bytes))

    sparse_first = _choose_sparse_first(sparse_inputs, precision, x, device)
    narrow = torch.float32 if precision == "float32" else torch.bfloat16
    cast = x.to(device, narrow).contiguous()
    if x.dtype != narrow:  # finite in x's dtype, maybe not in the one training runs in
        check_finite(cast, f"x cast to {narrow}")
    x = cast
    y = y.to(device, torch.long)
    n_models = idx.shape[0]
    models: List[MLP] = []
    n_chunks = -(-n_models // chunk)
    workspace = _Bf16Workspace(device) if precision == "bf16" else None
    with _progress(config.progress, config.epochs * n_chunks) as bar:
        for first in range(0, n_models, chunk):
            last = min(first + chunk, n_models)
            stacked = _train_chunk(d, k, hidden, idx[first:last], x, y, seeds[first:last],
                                   config, device, bar, first, n_models, precision,
                                   sparse_first, workspace=workspace)
            models += stacked.to_models()
    return models


# ----------------------------------------------------------------------------- prediction

@torch.no_grad()
def _stacked_logits(stacked: StackedMLP, x: Tensor) -> Tensor:
    """``[K, B, k]`` logits of every model on the shared rows ``x`` [B, d]."""
    n_models, batch = stacked.n_models, x.shape[0]
    w0, b0 = stacked.weights[0], stacked.biases[0]
    # the first layer sees the same rows in every model: one large product [B, K * out]
    h = torch.addmm(b0.reshape(-1), x, w0.reshape(-1, w0.shape[2]).t())
    h = h.view(batch, n_models, -1).transpose(0, 1)
    last = len(stacked.weights) - 1
    for i in range(1, last + 1):
        h = h.relu_() if h.is_contiguous() else h.relu()
        h = torch.baddbmm(stacked.biases[i].unsqueeze(1), h, stacked.weights[i].transpose(1, 2))
    return h.contiguous()


def predict_logits_batched(models_or_stacked: Union[Sequence[MLP], StackedMLP], x: Tensor, *,
                           batch_size: Optional[int] = None,
                           chunk_size: Optional[int] = None,
                           device=None) -> Tensor:
    """Logits of ``K`` MLPs on the same rows: ``[K, N, k]`` float32 on the CPU.

    Parameters
    ----------
    models_or_stacked : sequence of :class:`oni.models.MLP` (one architecture) or StackedMLP
    x : Tensor
        ``[N, d]`` floating rows, shared by all models; may be empty.
    batch_size : int, optional
        Rows per pass; default as many as keep the activations of a pass near 256 MiB.
    chunk_size : int, optional
        Models per pass (default all); lower it when ``K`` times the parameters do not fit.
    device : str or torch.device, optional
        Where to compute; default where the models are. Models given as a list are stacked
        there one chunk at a time.

    Returns
    -------
    Tensor
        ``[K, N, k]`` float32 on the CPU; entry ``[j]`` equals ``oni.train.predict_logits(
        models[j], x)`` to float rounding.

    Raises
    ------
    TypeError, ValueError
        Bad arguments, or a model that is not a plain MLP of ``models[0]``'s architecture
        (see :func:`stack_mlps`; its function is not what the stacked products compute);
        the message names ``models_or_stacked[j]``.
    ValueError
        ``NonFiniteLogits`` (:func:`oni.train.predict_logits`'s error) when a model's logits
        are NaN or beyond float32's range (NaN weights, float64 weights too large for
        float32); the message names the model and the row.
    """
    if isinstance(models_or_stacked, StackedMLP):
        source, n_models = models_or_stacked, models_or_stacked.n_models
        d, k, widths = source.d, source.k, source.hidden
        home = source.device
    else:
        if isinstance(models_or_stacked, torch.nn.ModuleList):  # a container of MLPs too
            models_or_stacked = list(models_or_stacked)
        if isinstance(models_or_stacked, (str, bytes)) or \
                not isinstance(models_or_stacked, Sequence) or len(models_or_stacked) == 0:
            raise TypeError("models_or_stacked must be a non-empty sequence of oni.models.MLP "
                            "or a StackedMLP")
        source, n_models = list(models_or_stacked), len(models_or_stacked)
        if not isinstance(source[0], MLP):
            raise TypeError(f"models_or_stacked[0] must be an oni.models.MLP, got "
                            f"{type(source[0]).__name__}")
        d, k, widths = source[0].d, source[0].k, source[0].hidden
        home = next(source[0].parameters()).device
    if home.type == "meta":
        raise ValueError("models_or_stacked is on the meta device: meta tensors hold no values")
    if not isinstance(source, StackedMLP):  # all of them before any work
        _check_plain_mlps(source, "models_or_stacked")
    device = home if device is None else _resolve_device(device)
    x = _check_features(x, "x", allow_empty=True).detach()
    if x.shape[1] != d:
        raise ValueError(f"x must have d = {d} columns (the models' input width), got shape "
                         f"{tuple(x.shape)}")
    chunk = _check_chunk(chunk_size, n_models)
    per_row = 4 * chunk * (sum(widths) + k)  # activation bytes of one row in one pass
    if batch_size is None:
        batch_size = max(1, min(max(x.shape[0], 1), _PREDICT_CHUNK_BYTES // per_row))
    else:
        batch_size = check_int(batch_size, "batch_size", 1)

    out = torch.empty((n_models, x.shape[0], k), dtype=torch.float32)
    for first in range(0, n_models, chunk):
        last = min(first + chunk, n_models)
        if isinstance(source, StackedMLP):
            part = StackedMLP([w[first:last].to(device, torch.float32) for w in source.weights],
                              [b[first:last].to(device, torch.float32) for b in source.biases])
        else:
            part = _stack(source[first:last], device)
        for lo in range(0, x.shape[0], batch_size):
            rows = x[lo:lo + batch_size].to(device, torch.float32)
            if first == 0 and x.dtype != torch.float32:
                check_finite(rows, "x cast to float32")  # finite in float64, maybe not here
            logits = _stacked_logits(part, rows)
            _check_stacked_logits(logits, first, lo)
            out[first:last, lo:lo + batch_size] = logits.cpu()
    return out


def _check_stacked_logits(logits: Tensor, first: int, row_offset: int) -> None:
    """predict_logits's NonFiniteLogits for the first model of ``logits`` [K, B, k] (model
    ``first`` onwards) with a NaN or Inf logit, naming it: NaN weights, or float64 weights
    beyond float32's range, gave NaN logits without a word."""
    j = first_non_finite_row(logits)
    if j is None:
        return
    try:
        check_logits(logits[j], logits.shape[1], "x", row_offset)
    except NonFiniteLogits as err:
        raise NonFiniteLogits(f"models_or_stacked[{first + j}]: {err}") from None
