"""Shapley values of a torch classifier's prediction: the public API.

The game (docs/DESIGN.md, "The method" 1): ``v(S) = f_c(z_S)`` where ``z_S`` takes ``x`` on the
coalition ``S`` and a reference ``r`` elsewhere, averaged over a background set of references
when one is given, and ``f_c`` is the softmax probability of the explained class ``c``.

Estimators:

* :func:`shapley_values`: the mean marginal contribution over sampled permutation walks of
  the *active* features (``x_i != r_i``; the others are dummies with value exactly 0), with a
  standard error per feature. Walks come as antithetic (forward, reverse) pairs by default,
  which makes the estimate exact for any game with interactions of order <= 2. Efficiency
  (``sum_i phi_i = v(N) - v(empty)``) holds exactly on every walk.
* :func:`exact_shapley`: enumeration of all ``2^d`` coalitions, ``d <= 20``.
* :class:`ShapleyValueSampling`: a drop-in for captum's class of the same name.

Permutations come from a counter-based hash of ``(seed, row index, sample index)``, so the
result for a row does not depend on chunking, batch composition, backend or device.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from . import _ops, reference
from ._checks import check_finite as _check_finite, check_int as _check_int
from ._checks import (check_class_indices, check_not_meta, check_row_offset, check_seed,
                      first_bad_row, is_integer_dtype, short_repr)

__all__ = ["ShapleyResult", "shapley_values", "exact_shapley", "ShapleyValueSampling"]

MAX_EXACT_FEATURES = 20
_TARGET_KEYWORDS = ("pred", "label")
_BACKENDS = ("auto", "kernel", "torch")
_LINKS = ("softmax", "identity")
_TAIL_BATCH = 4096  # rows per pass through the rest of the network (cache-sized on CPU)
# rows per pass on CUDA: the whole chunk. Swept on an H100 (BENCHMARKS.md, "GPU"): 8k-row
# passes were launch-bound (0.73 s for 8192 inputs at d = 600, tf32), 64k rows 0.43 s, the
# whole chunk 0.41 s; L2-sized passes never paid for their launches.
_CUDA_TAIL_BATCH = 1 << 30
PRECISIONS = ("float32", "tf32", "bf16")


@dataclass(frozen=True)
class ShapleyResult:
    """Shapley values of N inputs over d features.

    Attributes:
        values: ``[N, d]`` estimated Shapley values (x's dtype).
        stderr: ``[N, d]`` standard error of each value (0 where exact: dummy features,
            rows with at most one active feature, :func:`exact_shapley`; NaN where fewer than
            two samples were drawn).
        n_permutations: ``[N]`` int64 permutation walks used per row (an antithetic pair
            counts as two; rows stopped early by ``tol`` have fewer; 0 for exact).
        fx: ``[N]`` explained-class value at x (``v(N)``).
        f_baseline: ``[N]`` explained-class value at the baseline (``v(empty)``, the mean
            over references for a background set).
        target: ``[N]`` int64 explained class of each row.
        groups: None when every feature is a player; with feature groups, the ``[d]`` int64
            player (column of ``values``) of each feature, and ``values``/``stderr`` are
            ``[N, G]``.
    """

    values: Tensor
    stderr: Tensor
    n_permutations: Tensor
    fx: Tensor
    f_baseline: Tensor
    target: Tensor
    groups: Optional[Tensor] = None

    def to_shap(self, x: Tensor, feature_names: Optional[Sequence[str]] = None):
        """This result as a ``shap.Explanation`` (needs the optional ``shap`` package).

        Args:
            x: ``[N, d]`` the explained inputs (shown as the explanation's data).
            feature_names: optional d names.
        """
        try:
            import shap
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("ShapleyResult.to_shap needs the optional package 'shap' "
                              "(pip install shap)") from err
        if tuple(x.shape) != tuple(self.values.shape):
            grouped = "" if self.groups is None else (
                " (the values are per group: pass x as [N, G] group-level data, e.g. "
                "x[:, first feature of each group], and the G group names)")
            raise ValueError(f"x must have the shape of the values {tuple(self.values.shape)}, "
                             f"got {tuple(x.shape)}{grouped}")
        if feature_names is not None and len(feature_names) != x.shape[1]:
            raise ValueError(f"feature_names must have d = {x.shape[1]} names, "
                             f"got {len(feature_names)}")
        return shap.Explanation(
            values=self.values.detach().cpu().numpy(),
            base_values=self.f_baseline.detach().cpu().numpy(),
            data=x.detach().cpu().numpy(),
            feature_names=list(feature_names) if feature_names is not None else None,
        )


# ----------------------------------------------------------------------------- validation

def _check_inputs(x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor [N, d], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, d], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (N = 0): nothing to explain")
    if x.shape[1] == 0:
        raise ValueError("x has no features (d = 0)")
    check_not_meta(x, "x")
    _check_finite(x, "x")
    return x


def _check_baseline(baseline, x: Tensor, per_row: bool = False) -> Tensor:
    """Returns the references as [B, d] (shared) or [N, d] (per row when per_row)."""
    d = x.shape[1]
    if baseline is None:
        return x.new_zeros((1, d))
    if isinstance(baseline, numbers.Real) and not isinstance(baseline, bool):
        try:
            value = float(baseline)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value) or abs(value) > torch.finfo(x.dtype).max:
            raise ValueError(f"baseline must be a finite number in x's dtype {x.dtype}, got "
                             f"{baseline!r:.40}")
        return x.new_full((1, d), value)
    if not isinstance(baseline, Tensor):
        raise TypeError(f"baseline must be None, a number or a tensor, got "
                        f"{type(baseline).__name__}")
    if baseline.device != x.device:
        raise ValueError(f"baseline must be on x's device {x.device}, got {baseline.device}")
    if baseline.dtype != x.dtype:
        raise TypeError(f"baseline must have x's dtype {x.dtype}, got {baseline.dtype}")
    if baseline.dim() == 1:
        baseline = baseline[None]
    if baseline.dim() != 2 or baseline.shape[1] != d:
        raise ValueError(f"baseline must be [d] or [B, d] with d = {d} (x's width), "
                         f"got shape {tuple(baseline.shape)}")
    if baseline.shape[0] == 0:
        raise ValueError("baseline is an empty background set (B = 0)")
    if per_row and baseline.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"baselines must be [d], [1, d] or [N, d] with N = {x.shape[0]}, "
                         f"got shape {tuple(baseline.shape)}")
    _check_finite(baseline, "baseline")
    return baseline


def _check_groups(groups, x: Tensor) -> Optional[Tuple[Tensor, int]]:
    """(player of each feature [d] int64 on x's device, number of players G), the players
    being the distinct group ids in increasing order; None for no groups."""
    if groups is None:
        return None
    _check_group_ids(groups, "groups", x, "x's")
    d = x.shape[1]
    if groups.dim() != 1 or groups.shape[0] != d:
        raise ValueError(f"groups must be [d] with d = {d} (x's width), got shape "
                         f"{tuple(groups.shape)}")
    ids, player = torch.unique(groups, return_inverse=True)
    return player.to(torch.long), ids.numel()


def _check_group_ids(ids, name: str, x: Tensor, x_name: str) -> None:
    """Type, dtype, layout and device of a tensor of integer group ids (oni's groups,
    captum's feature_mask); the caller checks its shape."""
    if not isinstance(ids, Tensor) or ids.layout != torch.strided:
        raise TypeError(f"{name} must be None or a dense integer tensor, got {_describe(ids)}")
    if not is_integer_dtype(ids.dtype):
        raise TypeError(f"{name} must hold integer group ids, got {ids.dtype}")
    if ids.device != x.device:
        raise ValueError(f"{name} must be on {x_name} device {x.device}, got {ids.device}")


# Device types whose kernels "auto" picks: CPU, and CUDA since scripts/gpu_check.sh passed on
# an H100 (2026-11-23: every test, compute-sanitizer memcheck and racecheck clean).
_AUTO_KERNEL_DEVICES = ("cpu", "cuda")


def _check_backend(backend: str, device: torch.device, names=_ops.SHAPLEY_OPS) -> bool:
    """Returns True to use the C++/CUDA kernels of the ops ``names``, False for the twins."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    compiled = _ops.has_kernel(device.type, names)
    if backend == "kernel" and not compiled:
        raise RuntimeError(f"backend='kernel' but oni was built without kernels for "
                           f"{device.type} (oni.build_info(): {build_info()}); use "
                           f"backend='torch' or rebuild")
    return backend == "kernel" or (
        backend == "auto" and compiled and device.type in _AUTO_KERNEL_DEVICES)


def build_info() -> dict:
    """Which backends the compiled extension provides, and what it was built with:
    ``cpu``/``cuda`` say whether every op has a kernel there, ``cuda_ops`` lists the ops
    that have a CUDA kernel."""
    return {
        "cpu": _ops.has_kernel("cpu"),
        "cuda": _ops.has_kernel("cuda"),
        "cuda_ops": [name for name in _ops.OP_NAMES if _ops.has_kernel("cuda", (name,))],
        "cuda_version": _ops.cuda_version(),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------- the game

class _Game:
    """A model, how to evaluate it in chunks, and the explained value of its output."""

    def __init__(self, model: Callable[[Tensor], Tensor], link: str):
        if link not in _LINKS:
            raise ValueError(f"link must be one of {_LINKS}, got {link!r}")
        _check_model(model, stacklevel=4)
        self.model = model
        self.softmax = link == "softmax"
        split = _split_first_linear(model) if isinstance(model, nn.Module) else None
        self.first_linear, self.tail = split if split is not None else (None, None)
        # A plain ReLU right after the first layer is fused into the walk kernel, and a tail
        # of plain Linear/ReLU layers runs as addmm chains with the bias and ReLU in the GEMM
        # epilogue on CUDA: each fusion saves a pass over the largest tensors of the call.
        self.fuse_first_relu = bool(self.tail is not None and len(self.tail) > 0
                                    and _is_plain(self.tail[0], nn.ReLU))
        self.tail_modules = (list(self.tail)[1:] if self.fuse_first_relu
                             else list(self.tail or []))
        self.plain_layers = _plain_layers(self.tail_modules) if self.first_linear else None
        self._bf16_layers = None
        if self.first_linear is not None:
            # column-major [H, d]: the walk reads columns of W as rows, and with this layout
            # the kernels' transpose is free instead of a copy per chunk
            self.first_weight = self.first_linear.weight.detach().t().contiguous().t()
            bias = self.first_linear.bias
            self.first_bias = bias.detach() if bias is not None else None

    def __call__(self, z: Tensor, what: str = "model output") -> Tensor:
        out = self.model(z)
        return self._check_output(out, z.shape[0], what)

    def at_kept(self, z: Tensor, what: str) -> Tensor:
        """The model at a tensor that must survive the call (the caller's x or baseline, or
        references the walks still read): on a copy, as a forward may write into its input
        (``z[:, 0] = 0``); a plain first nn.Linear, the only module that sees it, does not."""
        return self(z if self.first_linear is not None else z.clone(), what)

    def tail_outputs(self, pre: Tensor, batch: int, precision: str = "float32") -> Tensor:
        """The rest of the network on the first layer's outputs ``pre`` (which this call owns
        and may overwrite; already through the first ReLU when ``fuse_first_relu``),
        ``batch`` rows at a time so intermediates stay in cache."""
        fused = self.plain_layers is not None and pre.is_cuda
        if fused and precision == "bf16" and self._bf16_layers is None:
            self._bf16_layers = [(w.to(torch.bfloat16), None if b is None else
                                  b.to(torch.bfloat16), relu)
                                 for w, b, relu in self.plain_layers]
        out = None
        for lo in range(0, pre.shape[0], batch):
            h = pre[lo:lo + batch]
            if fused:
                h = _run_plain_layers(h, self._bf16_layers if precision == "bf16"
                                      else self.plain_layers, precision == "bf16")
            for module in [] if fused else self.tail_modules:
                if _is_plain(module, nn.ReLU):
                    h = torch.relu_(h)  # h is an intermediate of ours: no copy needed
                else:
                    h = module(h)
            h = self._check_output(h, min(batch, pre.shape[0] - lo), "model output")
            if out is None:
                out = h.new_empty((pre.shape[0], h.shape[1]))
            out[lo:lo + batch] = h
        return out

    def _check_output(self, out, n: int, what: str) -> Tensor:
        hint = " (use link='identity' to explain a raw output)" if self.softmax else ""
        return _check_logits(out, n, what, 2 if self.softmax else 1, hint)


def _check_precision(precision: str, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "float32" and dtype == torch.float64:  # (it was a silent no-op)
        raise ValueError(f"precision={precision!r} trades float32 arithmetic for speed; x "
                         f"and the model are float64, which neither TF32 nor bfloat16 "
                         f"autocast touches: use 'float32' (or cast both to float32)")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision='tf32' needs x on a CUDA device (TF32 is a mode of "
                         f"NVIDIA tensor cores), x is on {device.type}; use 'float32' or "
                         f"'bf16'")
    return precision


# Where torch may run a float32 matmul, convolution or RNN in TF32 or bfloat16:
# torch.set_float32_matmul_precision("high") and ("medium") reach the CPU's oneDNN as well
# as cuBLAS, and cuDNN convolutions are TF32 by default
_FP32_BACKENDS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"),
                  ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


def _fp32_backends() -> list:
    """The per-backend ``fp32_precision`` settings of this torch (2.9 on); [] before."""
    found = []
    for package, op in _FP32_BACKENDS:
        backend = getattr(getattr(torch.backends, package, None), op, None)
        if backend is not None and hasattr(backend, "fp32_precision"):
            found.append((package, backend))
    return found


@contextlib.contextmanager
def _float32_math(tf32: bool):
    """float32 matmuls, convolutions and RNNs in IEEE float32 on every backend, or with
    ``tf32`` in TF32 on the CUDA ones; the caller's settings are restored after. Through
    the per-backend API where torch has it: mixing it with the legacy flags makes torch's
    own getters raise."""
    backends = _fp32_backends()
    if backends:
        saved = [backend.fp32_precision for _, backend in backends]
        try:
            for package, backend in backends:
                backend.fp32_precision = "tf32" if tf32 and package in ("cuda", "cudnn") \
                    else "ieee"
            yield
        finally:
            for (_, backend), value in zip(backends, saved):
                backend.fp32_precision = value
        return
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def _walk_precision(precision: str, device: torch.device, autocast: bool = True):
    """The arithmetic of the batched model evaluation along the walks. ``float32`` is
    strict: TF32 (and oneDNN's bfloat16 float32 mode) is switched off for the duration even
    if the user enabled it globally, and so is a caller's enclosing autocast (it made a
    float32 verdict and radius bf16 ones), so the default never trades accuracy silently.
    The previous settings are restored."""
    with _float32_math(tf32=precision == "tf32"):
        if precision == "bf16" and autocast:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            with torch.autocast(device_type=device.type, enabled=False):
                yield


# the forwards the fast paths compute themselves, as they were when oni was imported: a class
# patched later (nn.Linear.forward = ...) must run as patched
_TORCH_FORWARDS = {kind: kind.forward for kind in (nn.Linear, nn.ReLU, nn.Sequential)}


def _is_plain(module: nn.Module, kind: type) -> bool:
    """``module`` is exactly ``kind`` (not a subclass), its forward not replaced on the
    instance or the class, with no hooks of its own or global ones: safe to compute without
    calling it."""
    return (type(module) is kind and "forward" not in module.__dict__
            and kind.forward is _TORCH_FORWARDS.get(kind, kind.forward)
            and not (module._forward_hooks or module._forward_pre_hooks)
            and not (torch_module._global_forward_hooks
                     or torch_module._global_forward_pre_hooks))


def _plain_layers(modules) -> Optional[list]:
    """[(weight, bias, relu_after)] when ``modules`` are only plain Linear layers, each
    optionally followed by one ReLU; None otherwise (then the modules run as they are)."""
    layers = []
    for module in modules:
        if _is_plain(module, nn.Linear):
            bias = module.bias.detach() if module.bias is not None else None
            layers.append([module.weight.detach(), bias, False])
        elif _is_plain(module, nn.ReLU) and layers and not layers[-1][2]:
            layers[-1][2] = True
        else:
            return None
    return [tuple(layer) for layer in layers] or None


def _run_plain_layers(h: Tensor, layers, bf16: bool) -> Tensor:
    """Linear (+ ReLU) layers as addmm with the bias and ReLU in cuBLAS's epilogue."""
    if bf16:
        h = h.to(torch.bfloat16)
    for weight, bias, relu in layers:
        if bias is None:
            h = h @ weight.t()
            h = torch.relu_(h) if relu else h
        elif relu:
            h = torch._addmm_activation(bias, h, weight.t())
        else:
            h = torch.addmm(bias, h, weight.t())
    return h


#: samples (antithetic pairs, or single walks) a row needs before ``tol`` may stop it: the
#: chance that 16 samples of a 3-player row agree while its value is not exact is 3^-15
_MIN_TOL_SAMPLES = 16


def _check_model(model, stacklevel: int = 3) -> None:
    """A model must be callable; one in training mode gets a warning (dropout makes its
    outputs random), or a ValueError when it has normalisation layers tracking running
    statistics (each forward would change them: the caller's model, and mix rows)."""
    if not callable(model):
        raise TypeError(f"model must be callable (an nn.Module or function), got "
                        f"{type(model).__name__}")
    if isinstance(model, nn.Module) and model.training:
        # running statistics would be updated by every forward: the caller's model changed
        tracked = [name for name, m in model.named_modules()
                   if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
                   and m.track_running_stats]
        if tracked:
            raise ValueError(f"model is in training mode with normalisation layers that track "
                             f"running statistics ({short_repr(tracked)}): every forward "
                             f"would update them and mix rows; call model.eval()")
        warnings.warn("model is in training mode: dropout or batch-norm make its outputs "
                      "random and mix rows; call model.eval()", stacklevel=stacklevel)


def _check_model_width(model, d: int) -> Optional[nn.Linear]:
    """A model whose first layer is a plain nn.Linear (an nn.Sequential, e.g.
    oni.models.MLP, or the layer itself) must take x's width ``d``: said here, naming both,
    instead of torch's "mat1 and mat2 shapes cannot be multiplied" from inside the model.
    Returns that layer (None for other models)."""
    if not isinstance(model, nn.Module):
        return None
    if _is_plain(model, nn.Linear):
        first = model
    else:
        split = _split_first_linear(model)
        if split is None:
            return None
        first = split[0]
    if first.in_features != d:
        raise ValueError(f"the model's first layer takes {first.in_features} features, x "
                         f"has d = {d}")
    return first


def _check_model_input(model, x: Tensor) -> None:
    """As :func:`_check_model_width`, and the first layer's device and dtype must be x's."""
    first = _check_model_width(model, x.shape[1])
    if first is None:
        return
    weight = first.weight
    if weight.device != x.device:
        raise ValueError(f"the model is on {weight.device}, x on {x.device}: move one to the "
                         f"other's device")
    if weight.dtype != x.dtype:
        raise TypeError(f"the model's weights are {weight.dtype}, x is {x.dtype}: cast one "
                        f"to the other (model.to({x.dtype}) or x.to({weight.dtype}))")


def _check_logits(out, n: int, what: str, min_classes: int = 2, hint: str = "") -> Tensor:
    """A model output must be ``[n, k]`` class scores, ``k >= min_classes``; float16/bfloat16
    outputs are widened to float32."""
    if not isinstance(out, Tensor):
        raise TypeError(f"{what} must be a tensor [N, k], got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != n:
        raise ValueError(f"{what} must be [N, k] = [{n}, k] (one row of class scores per "
                         f"input), got shape {tuple(out.shape)}")
    if out.shape[1] < min_classes:
        raise ValueError(f"{what} has k = {out.shape[1]} column(s): needs k >= {min_classes} "
                         f"class logits{hint}")
    if not out.dtype.is_floating_point:  # int logits were cast (and had no gradient),
        # complex ones lost their imaginary part
        raise TypeError(f"{what} must be real floating class scores, got {out.dtype}")
    return out if out.dtype in (torch.float32, torch.float64) else out.float()


# for shapley_values: probabilities are a game too, with no softmax on top
_EXPLAIN_AS_THEY_ARE = ", or explain the outputs as they are with link='identity'"


# rows that must all look like probabilities before a call is refused (fewer: a warning)
_PROBABILITY_ROWS = 4


def _refuse_probabilities(logits: Tensor, what: str, remedy: str,
                          stacklevel: int = 4) -> None:
    """A model ending in a softmax (every output row >= 0, summing to 1) gets a second
    softmax here: near uniform, so the explained probability is wrong, and the entropy reads
    tau as met with no noise at all. Real logits pass the test by chance in a rare row (about
    1 in 12,000 for a sharp 2-class model), so a few rows only warn."""
    if logits.shape[0] == 0 or logits.shape[1] < 2:
        return
    sums = logits.double().sum(1)
    if not (bool((logits >= 0).all()) and bool(((sums - 1).abs() <= 1e-3).all())):
        return
    message = (f"{what} look like probabilities (every row non-negative, summing to 1), and "
               f"oni applies a softmax to the model's outputs: it would be applied twice. "
               f"Give a model that returns logits (drop its final Softmax, or return "
               f"log-probabilities){remedy}")
    if logits.shape[0] < _PROBABILITY_ROWS:
        warnings.warn(message, stacklevel=stacklevel)
    else:
        raise ValueError(message)


def _split_first_linear(model: nn.Module) -> Optional[Tuple[nn.Linear, nn.Module]]:
    """(first nn.Linear, rest of the network) for an nn.Sequential starting with nn.Linear.
    Only plain modules qualify (no hooks, no subclass with its own forward): the walk kernel
    computes the first layer itself, and would skip what a hook or an override does."""
    if (type(model).forward is not _TORCH_FORWARDS[nn.Sequential] or len(model) == 0
            or not _is_plain(model, type(model))):
        return None
    first = model[0]
    if _is_plain(first, nn.Linear):
        return first, model[1:]
    if isinstance(first, nn.Linear):
        return None
    inner = _split_first_linear(first) if isinstance(first, nn.Module) else None
    if inner is None:
        return None
    return inner[0], nn.Sequential(inner[1], *model[1:])


def _resolve_target(target, labels, logits_x: Tensor) -> Tensor:
    n, k = logits_x.shape
    device = logits_x.device
    if isinstance(target, str):
        if target == "pred":
            return logits_x.argmax(dim=1)
        if target == "label":
            if labels is None:
                raise ValueError("target='label' needs labels= (a tensor [N] of class indices)")
            target = labels
            name = "labels"
        else:
            raise ValueError(f"target must be 'pred', 'label', an int or a tensor of classes, "
                             f"got {target!r}")
    else:
        name = "target"
    if isinstance(target, bool):
        raise TypeError(f"{name} must be a class index, got a bool")
    if isinstance(target, numbers.Integral):
        if not 0 <= target < k:  # here: an int beyond int64 cannot reach the tensor below
            raise ValueError(f"{name}[0] = {target} is not a class index in [0, {k}) (the "
                             f"model has k = {k} outputs)")
        classes = torch.full((n,), int(target), dtype=torch.long, device=device)
    elif isinstance(target, Tensor):
        if not is_integer_dtype(target.dtype):
            raise TypeError(f"{name} must hold integer class indices, got {target.dtype}")
        if target.dim() == 0:
            target = target.expand(n)
        if target.shape != (n,):
            raise ValueError(f"{name} must be [N] = [{n}], got shape {tuple(target.shape)}")
        classes = target.to(device=device, dtype=torch.long)
    elif isinstance(target, (list, tuple)):
        return _resolve_target(torch.as_tensor(target), None, logits_x)
    else:
        raise ValueError(f"target must be 'pred', 'label', an int or a tensor of classes, "
                         f"got {type(target).__name__}")
    check_class_indices(classes, name, k, why=f" (the model has k = {k} outputs)")
    return classes


# ----------------------------------------------------------------------------- sampling

def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic)."""
    z = z ^ _shr(z, 30)
    z = z * -4658895280553007687  # 0xbf58476d1ce4e5b9
    z = z ^ _shr(z, 27)
    z = z * -7723592293110705685  # 0x94d049bb133111eb
    return z ^ _shr(z, 31)


def _seed_term(seed: int) -> int:
    """The seed mixed into the counter-based hashes, as a signed int64 (any Python int)."""
    term = (seed * 0x5851F42D4C957F2D + 0x2545F4914F6CDD1D) % (1 << 64)
    return term - (1 << 64) if term >= (1 << 63) else term


def _walk_permutations(seed: int, rows: Tensor, first_sample: int, n_samples: int,
                       active_index: Tensor, n_active: Tensor, antithetic: bool) -> Tensor:
    """Permutations of each row's active features, ``[R, n_samples * wps, L]`` int64.

    Sample ``s`` of global row ``i`` is a uniformly random permutation drawn from a hash of
    ``(seed, i, s)`` alone, so it is the same whatever the chunking, backend or device. With
    ``antithetic`` each sample is a forward walk followed by its reverse.
    """
    n_rows, length = active_index.shape
    device = rows.device
    samples = torch.arange(first_sample, first_sample + n_samples, device=device)
    key = _mix64(_mix64(rows * 0x3C6EF372 + _seed_term(seed))[:, None]
                 + samples[None, :] * 0x14057B7EF767814F)  # [R, S]
    pos = torch.arange(length, device=device)
    keys = _mix64(key[:, :, None] + pos * 0x2545F4914F6CDD1D)  # [R, S, L]
    on_walk = pos[None, :] < n_active[:, None]
    keys = torch.where(on_walk[:, None, :], keys >> 1, torch.iinfo(torch.long).max)
    order = torch.argsort(keys, dim=2, stable=True)  # padding sorts last
    forward = active_index.gather(1, order.reshape(n_rows, -1)).reshape(n_rows, n_samples, length)
    if not antithetic:
        return forward
    last = (n_active - 1)[:, None]
    reverse_pos = torch.where(pos[None, :] < n_active[:, None], last - pos, pos)  # [R, L]
    reverse = forward.gather(2, reverse_pos[:, None, :].expand(n_rows, n_samples, length))
    return torch.stack([forward, reverse], dim=2).reshape(n_rows, 2 * n_samples, length)


def _default_max_batch_evals(width: int, n_classes: int, device: torch.device,
                             itemsize: int) -> int:
    """Interior steps per chunk so step tensors stay near a memory budget: on CUDA a quarter
    of the device's memory, at most 8 GiB (each chunk ends in a host sync in the ops'
    validation, so fewer, larger chunks keep the GPU busy: measured on an H100, 2 GiB chunks
    left ~25% of the time idle at d = 600); 16 MiB on CPU, where glibc reuses freed blocks
    below its mmap threshold (32 MiB) while larger ones are mapped and page-faulted afresh
    for every chunk (measured ~10% slower)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = min(8 << 30, total // 4)
    else:
        budget = 16 << 20
    return max(256, min(1 << 22, budget // (itemsize * (width + n_classes))))


def _merge(count_a: Tensor, mean_a: Tensor, m2_a: Tensor, count_b: int, mean_b: Tensor,
           m2_b: Tensor):
    """Chan et al. pairwise merge of (count, mean, m2) statistics, per row."""
    total = count_a + count_b
    delta = mean_b - mean_a
    n_a, n_total = count_a.to(mean_a.dtype)[:, None], total.clamp(min=1).to(mean_a.dtype)[:, None]
    mean = mean_a + delta * (count_b / n_total)
    m2 = m2_a + m2_b + delta.square() * (n_a * count_b / n_total)
    return total, mean, m2


# ----------------------------------------------------------------------------- estimator

def shapley_values(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    baseline: Union[None, float, Tensor] = None,
    *,
    target: Union[str, int, Tensor] = "pred",
    labels: Optional[Tensor] = None,
    n_permutations: int = 100,
    antithetic: bool = True,
    tol: Optional[float] = None,
    seed: int = 0,
    backend: str = "auto",
    max_batch_evals: Optional[int] = None,
    link: str = "softmax",
    precision: str = "float32",
    groups: Optional[Tensor] = None,
    row_offset: int = 0,
) -> ShapleyResult:
    """Sampled-permutation Shapley values of a classifier's explained-class probability.

    Args:
        model: maps ``[n, d]`` inputs to ``[n, k]`` logits (an ``nn.Module`` or function).
            An ``nn.Sequential`` whose first module is ``nn.Linear`` takes the incremental
            first-layer path (cumulative sums of weight columns); anything else is evaluated
            on masked inputs. Put it in eval mode.
        x: ``[N, d]`` float inputs on the model's device.
        baseline: the reference ``r``: None (zeros), a number, a vector ``[d]``, or a
            background set ``[B, d]`` (the game is the mean over the B references).
        target: the explained class: ``"pred"`` (argmax of the model at x), ``"label"``
            (needs ``labels``), an int, or a tensor ``[N]`` of classes.
        labels: ``[N]`` class indices, for ``target="label"``.
        n_permutations: permutation walks per row (>= 1). With ``antithetic`` they come as
            (forward, reverse) pairs and an odd count is rounded up to the next even one.
        antithetic: pair every walk with its reverse (exact for interactions of order <= 2,
            and a much lower variance for neural networks).
        tol: stop a row once its largest standard error is below ``tol`` (checked after
            every eighth of the budget, and only once the row has 16 samples: with fewer, a
            spread of 0 can be chance, e.g. 3 active players whose antithetic pairs all put
            one player in the middle); None runs all walks.
        seed: seed of the walks; the same seed gives the same result on any backend,
            chunking or device.
        backend: ``"kernel"`` (C++/CUDA ops), ``"torch"`` (the pure-PyTorch twin in
            :mod:`oni.reference`), ``"auto"`` (kernel when compiled for x's device).
        max_batch_evals: model evaluations (interior walk steps) per chunk; the default keeps
            the step tensors near 16 MiB on CPU and a quarter of the GPU's memory (at most
            8 GiB) on CUDA. A chunk's rows are capped too, so that its dense ``[rows, d]``
            statistics take at most ~4x that. Beyond the inputs and the result, memory stays
            flat in N.
        link: ``"softmax"`` explains the class probability (the paper's ``f_c``),
            ``"identity"`` the raw model output of the class.
        precision: arithmetic of the batched model evaluation along the walks (the bulk of
            the work), an explicit opt-in: ``"float32"`` (default; strict: TF32, oneDNN's
            bfloat16 mode for float32 matmuls and a caller's autocast are off, the caller's
            settings restored after), ``"tf32"`` (CUDA tensor cores' TF32 matmuls and
            convolutions, ~1e-3 relative error per layer) or ``"bf16"`` (autocast to
            bfloat16, ~1e-2). The model's outputs at x and at the
            baseline stay in float32, so efficiency still holds exactly per walk; the error
            each mode costs is measured in BENCHMARKS.md ("GPU").
        groups: ``[d]`` integer group id of each feature (e.g. the columns of one one-hot
            encoded attribute): the players are then the groups, a coalition takes all the
            features of its groups from x, and ``values``/``stderr`` are ``[N, G]``, one
            column per distinct id in increasing order (``ShapleyResult.groups`` maps features
            to columns). None: every feature is a player.
        row_offset: the index of x's first row in a larger batch, which the walks are
            drawn for: a shard ``x[lo:hi]`` with ``row_offset=lo`` gets the walks (and so
            the values) its rows get in the whole batch (:mod:`oni.distributed`).

    Returns:
        :class:`ShapleyResult`.
    """
    x = _check_inputs(x)
    refs = _check_baseline(baseline, x)
    return _sampled_shapley(model, x, refs, False, target=target, labels=labels,
                            n_permutations=n_permutations, antithetic=antithetic, tol=tol,
                            seed=seed, backend=backend, max_batch_evals=max_batch_evals,
                            link=link, precision=precision, groups=groups,
                            row_offset=row_offset)


def _sampled_shapley(model, x: Tensor, refs: Tensor, refs_per_row: bool, *, target, labels,
                     n_permutations, antithetic, tol, seed, backend, max_batch_evals,
                     link, precision="float32", groups=None,
                     row_offset: int = 0) -> ShapleyResult:
    n, d = x.shape
    grouping = _check_groups(groups, x)
    row_offset = check_row_offset(row_offset, n)
    n_permutations = _check_int(n_permutations, "n_permutations", 1)
    if not isinstance(antithetic, bool):
        raise TypeError(f"antithetic must be a bool, got {type(antithetic).__name__} "
                        f"{antithetic!r}")
    seed = check_seed(seed)
    if max_batch_evals is not None:
        max_batch_evals = _check_int(max_batch_evals, "max_batch_evals", 1)
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0:
            raise ValueError(f"tol must be None or a positive number, got {tol!r}")
    use_kernel = _check_backend(backend, x.device)
    precision = _check_precision(precision, x.device, x.dtype)
    _check_model_input(model, x)
    game = _Game(model, link)
    ops = _ops if use_kernel else reference

    # strict float32 everywhere but the walks' batched evaluation (its own opt-in): the
    # endpoints and the first layer's origin too, under a caller's autocast or TF32
    with torch.no_grad(), _walk_precision("float32", x.device):
        logits_x = game.at_kept(x, "model output at x")
        _check_finite(logits_x, "model output at x")
        if game.softmax:
            _refuse_probabilities(logits_x, "the model's outputs at x", _EXPLAIN_AS_THEY_ARE)
        logits_r = game.at_kept(refs, "model output at the baseline")
        _check_finite(logits_r, "model output at the baseline")
        classes = _resolve_target(target, labels, logits_x)
        fx = reference.class_value(logits_x, classes, game.softmax)
        if refs_per_row:
            f_base = reference.class_value(logits_r[:, None], classes[:, None], game.softmax)[:, 0]
        else:
            f_base = reference.class_value(logits_r[None], classes[:, None], game.softmax).mean(1)

        if refs_per_row:
            active = x != refs
        else:  # active where x differs from any reference, one reference at a time
            active = torch.zeros((n, d), dtype=torch.bool, device=x.device)
            for r in refs:
                active |= x != r
        walk = _Walks(active, grouping)

        walks_per_sample = 2 if antithetic else 1
        total_samples = math.ceil(n_permutations / walks_per_sample)
        round_samples = total_samples if tol is None else max(2, math.ceil(total_samples / 8))
        n_refs = 1 if refs_per_row else refs.shape[0]
        width = game.first_linear.out_features if game.first_linear is not None else d
        budget = max_batch_evals or _default_max_batch_evals(
            width, logits_x.shape[1], x.device, x.element_size())
        # and rows per chunk: a chunk also holds a few dense [rows, d] float64 tensors (its
        # statistics and their merge), which for short walks at large d outgrow the steps;
        # they get about 4x the steps' bytes
        max_rows = max(1, budget * x.element_size() * (width + logits_x.shape[1]) // (16 * d))

        count = torch.zeros(n, dtype=torch.long, device=x.device)
        mean = torch.zeros((n, walk.n_players), dtype=torch.float64, device=x.device)
        m2 = torch.zeros_like(mean)
        # the plan counts feature steps: with groups, the walk ops still make one per feature
        n_active = walk.n_features_active
        alive = torch.argsort(n_active, stable=True)  # similar lengths share chunks
        done = 0
        while done < total_samples and alive.numel() > 0:
            todo = min(round_samples, total_samples - done)
            for rows, first, n_samples in _plan_chunks(alive, n_active, todo, walks_per_sample,
                                                       n_refs, budget, max_rows):
                chunk_mean, chunk_m2 = _run_chunk(
                    ops, game, x, refs, refs_per_row, logits_x, logits_r, classes, walk,
                    rows, seed, done + first, n_samples, antithetic, walks_per_sample,
                    precision, row_offset)
                count_rows, mean_rows, m2_rows = _merge(
                    count[rows], mean[rows], m2[rows], n_samples, chunk_mean, chunk_m2)
                count[rows], mean[rows], m2[rows] = count_rows, mean_rows, m2_rows
            done += todo
            if tol is not None:
                stderr_max = _stderr(m2[alive], count[alive]).nan_to_num(nan=math.inf).amax(1)
                # a few samples can agree by chance (with 3 active players, every antithetic
                # pair with the same middle player gives the same sample): their spread, 0,
                # says nothing, so a row stops only once it has _MIN_TOL_SAMPLES of them
                # (rows of one active player, or two with antithetic pairs, are exact)
                trusted = (count[alive] >= _MIN_TOL_SAMPLES) | \
                    (walk.n_active[alive] <= walks_per_sample)
                alive = alive[~((stderr_max <= tol) & trusted)]

        _check_game_finite(mean)
        stderr = _stderr(m2, count)
        # exact rows: one active player or none (the walk is forced)
        stderr[walk.n_active <= 1] = 0.0
        stderr[~walk.active] = 0.0
        return ShapleyResult(
            values=mean.to(x.dtype),
            stderr=stderr.to(x.dtype),
            n_permutations=count * walks_per_sample,
            fx=fx.to(x.dtype),
            f_baseline=f_base.to(x.dtype),
            target=classes,
            groups=None if grouping is None else grouping[0],
        )


class _Walks:
    """The players of every row and how their walks become feature walks for the ops.

    Without groups the players are the active features (x_i != r_i for some reference) and
    a walk is a permutation of them. With groups a player is a group holding an active
    feature; a group walk is run as the feature walk taking each group's active features
    together, and only the steps at group boundaries are evaluated."""

    def __init__(self, active: Tensor, grouping: Optional[Tuple[Tensor, int]]):
        self.n_features_active = active.sum(dim=1)
        if grouping is None:
            self.player, self.n_players, self.active = None, active.shape[1], active
        else:
            self.player, self.n_players = grouping
            n = active.shape[0]
            per_group = torch.zeros((n, self.n_players), dtype=torch.long, device=active.device)
            per_group.index_add_(1, self.player, active.long())
            self.features_in = per_group  # [N, G] active features of each group
            self.active = per_group > 0
        self.n_active = self.active.sum(dim=1)
        # active players first, in increasing order
        self.index = torch.sort((~self.active).to(torch.uint8), dim=1, stable=True).indices
        if grouping is not None:  # and the same for the features
            self.feature_index = torch.sort((~active).to(torch.uint8), dim=1,
                                            stable=True).indices

    def feature_walks(self, rows: Tensor, perm: Tensor, n_refs: int):
        """(feature walks [R, P, L], their lengths [R], the indices of the group-boundary
        steps among the feature walks' steps, in the ops' [row][walk][reference][step]
        order) for the group walks ``perm`` of ``rows``; None for the indices when the
        players are the features (every step is a boundary)."""
        if self.player is None:
            return perm, self.n_active[rows], None
        n_rows, n_walks, length = perm.shape
        a_groups, a_features = self.n_active[rows], self.n_features_active[rows]
        device = perm.device
        steps = torch.arange(length, device=device)
        # Everything is sized by the walks' lengths, never by d or G (a chunk of short walks
        # has many of them). Groups get row-local ids (the active ones 0..a - 1), so that
        # each walk's inverse permutation gives every group its position on the walk.
        local = torch.empty((n_rows, self.n_players), dtype=torch.long, device=device)
        local.scatter_(1, self.index[rows], torch.arange(self.n_players, device=device)
                       .expand(n_rows, -1).contiguous())
        local_perm = local.gather(1, perm.reshape(n_rows, -1)).reshape(perm.shape)
        position = torch.empty_like(local_perm)
        position.scatter_(2, local_perm, steps.expand(n_rows, n_walks, length).contiguous())
        # every active feature sorted by its group's position on the walk (ties: by index)
        f_length = int(a_features.max())
        feature_index = self.feature_index[rows, :f_length]  # active first, increasing
        on_feature_walk = torch.arange(f_length, device=device) < a_features[:, None]
        group_of = torch.where(on_feature_walk, local.gather(1, self.player[feature_index]), 0)
        key = position.gather(2, group_of[:, None, :].expand(n_rows, n_walks, f_length)) \
            * f_length + torch.arange(f_length, device=device)
        key = torch.where(on_feature_walk[:, None, :], key, torch.iinfo(key.dtype).max)
        features = feature_index[:, None, :].expand(n_rows, n_walks, f_length).gather(
            2, torch.argsort(key, dim=2, stable=True))
        # group j's last feature step is at (features in the first j + 1 groups) - 1
        sizes = self.features_in[rows].gather(1, perm.reshape(n_rows, -1)).reshape(perm.shape)
        last = sizes.cumsum(dim=2) - 1  # [R, P, Lg]
        row_steps = n_walks * n_refs * (a_features - 1).clamp(min=0)
        row_first = row_steps.cumsum(0) - row_steps
        walk_first = row_first[:, None, None] + (
            torch.arange(n_walks, device=device)[:, None] * n_refs
            + torch.arange(n_refs, device=device)[None, :]) * (a_features - 1)[:, None, None]
        index = walk_first[..., None] + last[:, :, None, :length - 1]  # [R, P, B, Lg - 1]
        interior = reference._interior_mask(a_groups, length - 1)  # [R, Lg - 1]
        return features, a_features, index[interior[:, None, None, :].expand_as(index)]


def _check_game_finite(values: Tensor) -> None:
    """The outputs at x and at the baseline are checked up front; the coalitions in between
    are not (a pass over every walk step's logits), but a NaN or Inf there reaches the values:
    one check of the result, not of each step."""
    row = first_bad_row(~torch.isfinite(values))
    if row is not None:
        raise ValueError(f"the Shapley values of row {row} are not finite: the model's output "
                         f"on some coalition (x with the other features at the baseline) "
                         f"contains NaN or Inf")


def _stderr(m2: Tensor, count: Tensor) -> Tensor:
    c = count.to(m2.dtype)[:, None]
    return torch.sqrt(m2 / (c - 1) / c)


def _plan_chunks(rows: Tensor, n_active: Tensor, n_samples: int, walks_per_sample: int,
                 n_refs: int, budget: int, max_rows: int):
    """Yields (rows, first sample, n samples) so each chunk has about <= budget steps and
    at most max_rows rows."""
    per_sample = (walks_per_sample * n_refs * (n_active[rows] - 1).clamp(min=1)).tolist()
    start = 0
    while start < len(per_sample):
        cost = per_sample[start]
        if cost * n_samples > budget:
            # a single row is too big for one round: split its samples
            step = max(1, budget // cost)
            for first in range(0, n_samples, step):
                yield rows[start:start + 1], first, min(step, n_samples - first)
            start += 1
            continue
        stop, total = start, 0
        while stop < len(per_sample) and stop - start < max_rows \
                and total + per_sample[stop] * n_samples <= budget:
            total += per_sample[stop] * n_samples
            stop += 1
        yield rows[start:stop], 0, n_samples
        start = stop


def _run_chunk(ops, game: _Game, x, refs, refs_per_row, logits_x, logits_r, classes,
               walk: _Walks, rows, seed, first_sample, n_samples, antithetic,
               walks_per_sample, precision="float32", row_offset: int = 0):
    """Mean and m2 over ``n_samples`` samples for the given rows."""
    a = walk.n_active[rows]
    length = int(a.max())
    perm = _walk_permutations(seed, rows + row_offset, first_sample, n_samples,
                              walk.index[rows, :length], a, antithetic)
    xs = x[rows]
    if refs_per_row:
        base = refs[rows][:, None, :]
        start_logits = logits_r[rows][:, None, :]
    else:
        base = refs[None].expand(len(rows), -1, -1)
        start_logits = logits_r[None].expand(len(rows), -1, -1)
    n_walks, n_refs = perm.shape[1], base.shape[1]
    feature_perm, a_features, boundaries = walk.feature_walks(rows, perm, n_refs)
    total = reference.interior_steps(a_features, n_walks, n_refs)
    if total == 0 or (boundaries is not None and boundaries.numel() == 0):
        steps = logits_x.new_empty((0, logits_x.shape[1]))
    elif game.first_linear is not None:
        # a bfloat16 run of a plain Linear/ReLU tail starts by rounding the first layer's
        # output to bfloat16: the walk writes it so (the same bits, half the bytes, no pass)
        walk_dtype = torch.bfloat16 if (precision == "bf16" and game.plain_layers is not None
                                        and x.dtype == torch.float32) else None
        pre = ops.permutation_walk_linear(xs, base, feature_perm, a_features, game.first_weight,
                                          game.first_bias, total, game.fuse_first_relu,
                                          walk_dtype)
        if boundaries is not None:
            pre = pre.index_select(0, boundaries)
        tail_batch = _TAIL_BATCH if pre.device.type == "cpu" else _CUDA_TAIL_BATCH
        with _walk_precision(precision, x.device, autocast=game.plain_layers is None
                             or not pre.is_cuda):
            steps = game.tail_outputs(pre, tail_batch, precision)
    else:
        walk_inputs = ops.permutation_walk_masked(xs, base, feature_perm, a_features, total)
        if boundaries is not None:
            walk_inputs = walk_inputs.index_select(0, boundaries)
        with _walk_precision(precision, x.device):
            steps = game(walk_inputs)
    steps = steps.to(logits_x.dtype)
    return ops.shapley_accumulate(steps, start_logits.contiguous(), logits_x[rows], classes[rows],
                                  perm, a, walk.n_players, walks_per_sample, game.softmax)


# ----------------------------------------------------------------------------- exact

def exact_shapley(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    baseline: Union[None, float, Tensor] = None,
    *,
    target: Union[str, int, Tensor] = "pred",
    labels: Optional[Tensor] = None,
    link: str = "softmax",
    groups: Optional[Tensor] = None,
) -> ShapleyResult:
    """Exact Shapley values by subset enumeration, for ``d <= 20`` players.

    The game of :func:`shapley_values`, and its arguments that define the game:
    ``baseline``, ``target``, ``labels``, ``link`` and ``groups`` (with ``groups``, the
    players are the groups and ``d`` may be larger as long as there are at most 20 groups);
    the sampler's arguments (``n_permutations``, ``antithetic``, ``tol``, ``seed``,
    ``backend``, ``max_batch_evals``, ``precision``, ``row_offset``) do not apply. Each row
    enumerates the ``2^a`` coalitions of its ``a`` active players (dummies are exactly 0);
    values are computed in float64 from the model's outputs. ``stderr`` is 0 and
    ``n_permutations`` 0.
    """
    x = _check_inputs(x)
    n, d = x.shape
    grouping = _check_groups(groups, x)
    player, n_players = grouping if grouping is not None else (
        torch.arange(d, device=x.device), d)
    if n_players > MAX_EXACT_FEATURES:
        what = f"G = {n_players} groups" if grouping is not None else f"d = {d}"
        raise ValueError(f"exact_shapley enumerates 2^d coalitions and supports d <= "
                         f"{MAX_EXACT_FEATURES} players, got {what}; use shapley_values")
    refs = _check_baseline(baseline, x)
    _check_model_input(model, x)
    game = _Game(model, link)
    with torch.no_grad(), _walk_precision("float32", x.device):  # the exact reference: strict
        logits_x = game.at_kept(x, "model output at x")
        _check_finite(logits_x, "model output at x")
        if game.softmax:
            _refuse_probabilities(logits_x, "the model's outputs at x", _EXPLAIN_AS_THEY_ARE,
                                  stacklevel=3)
        classes = _resolve_target(target, labels, logits_x)
        values = torch.zeros((n, n_players), dtype=torch.float64, device=x.device)
        f_base = torch.empty(n, dtype=torch.float64, device=x.device)
        members = player[None, :] == torch.arange(n_players, device=x.device)[:, None]  # [G, d]
        for row in range(n):
            # only players holding an active feature play; the others are dummies (value 0)
            active = (x[row] != refs).any(0)
            players = (members & active).any(1).nonzero()[:, 0]
            values[row, players], f_base[row] = _exact_row(
                game, x[row], refs, members[players], classes[row])
        fx = reference.class_value(logits_x, classes, game.softmax)
    _check_game_finite(values)
    return ShapleyResult(
        values=values.to(x.dtype),
        stderr=torch.zeros_like(values, dtype=x.dtype),
        n_permutations=torch.zeros(n, dtype=torch.long, device=x.device),
        fx=fx.to(x.dtype),
        f_baseline=f_base.to(x.dtype),
        target=classes,
        groups=None if grouping is None else player,
    )


def _exact_row(game: "_Game", x_row: Tensor, refs: Tensor, members: Tensor, target: Tensor):
    """Exact values of one row's players (``members [a, d]``: the features each one takes
    from x) by enumerating their 2^a coalitions, and v(empty)."""
    a, device = members.shape[0], x_row.device
    n_coalitions = 1 << a
    bits = torch.arange(a, device=device)
    masks = ((torch.arange(n_coalitions, device=device)[:, None] >> bits) & 1).bool()
    size = masks.sum(1)
    # weight of a coalition S (not containing i) in phi_i: |S|! (a - |S| - 1)! / a!
    weights = torch.tensor([math.factorial(s) * math.factorial(a - s - 1) / math.factorial(a)
                            for s in range(a)], dtype=torch.float64, device=device)
    value_of = torch.empty(n_coalitions, dtype=torch.float64, device=device)
    # coalitions per model call: [batch, B, d] inputs of at most ~4M values (d is large only
    # with groups, up to 2^20 coalitions of them)
    n_refs = refs.shape[0]
    batch = max(1, min((1 << 16) // n_refs, (1 << 22) // (n_refs * x_row.numel())))
    for lo in range(0, n_coalitions, batch):
        m = masks[lo:lo + batch]
        # [b, d] the features taken from x (a GEMM of 0/1: exact; CUDA has no integer one)
        taken = (m.float() @ members.float()) > 0
        z = torch.where(taken[:, None, :], x_row, refs[None])  # [b, B, d]
        out = game(z.reshape(-1, x_row.numel()), "model output")
        value_of[lo:lo + batch] = reference.class_value(out, target, game.softmax).reshape(
            len(m), -1).mean(1)
    phi = torch.empty(a, dtype=torch.float64, device=device)
    for i in range(a):
        without = ~masks[:, i]
        gain = value_of[masks[:, i]] - value_of[without]  # S + i vs S, in the same order
        phi[i] = (weights[size[without]] * gain).sum()
    return phi, value_of[0]


# ----------------------------------------------------------------------------- drop-in

class ShapleyValueSampling:
    """Drop-in for ``captum.attr.ShapleyValueSampling`` on 2-D tabular inputs.

    Explains ``forward_func``'s raw output (as captum does, no softmax) with oni's antithetic
    permutation sampler and kernels. ``n_samples`` counts permutation walks (odd counts are
    rounded up to even for antithetic pairs).

    As captum (0.9): a tuple of one input gives a tuple of one result; ``target=None`` on a
    ``[N, k]`` output gives ``[N, k, d]``, one attribution per output; an int target may be
    negative (``output[:, -1]``); a one-entry tuple target or a one-element tensor names one
    column for every input. Where it differs, on purpose:

    * the values are sampled from ``seed`` (default 0): repeated calls give the same values,
      and averaging calls does not reduce the variance (use more ``n_samples``);
    * float64 inputs give float64 attributions (captum returns float32);
    * ``additional_forward_args`` holding per-example tensors (first dimension N) are refused:
      oni evaluates rows of many inputs in one batch, so captum's expansion along the batch
      does not apply; shared tensors and plain values are passed to every call;
    * negative ``feature_mask`` ids are refused (captum keeps such features at the baseline
      in every coalition, which changes the game);
    * ``perturbations_per_eval`` and ``show_progress`` are checked and otherwise ignored:
      oni batches the evaluations to a memory budget by itself;
    * ``target`` on an ``[N]`` output may be 0 (its one column), where captum refuses it.

    A ``forward_func`` that returns one value for the whole batch (a number, a 0-d tensor, or
    one element for N > 1, e.g. a summed loss) is explained as captum does: the players are
    the features, shared by every input, a coalition is the batch with those features taken
    from the inputs and the rest from the baseline, and the result is ``[1, d]`` (the
    output's shape followed by d). Each of its evaluations is one call on the N inputs, so
    per-example ``additional_forward_args`` are fine there. Unlike captum, a target is
    refused there (captum takes ``target=0`` on a ``[1, 1]`` output), and so is a ``[1, k]``
    output for N > 1 (captum gives ``[1, k, d]``); with one input, a forward that reduces
    over its batch must return a 0-d tensor (oni calls it on many perturbed rows at once).
    """

    def __init__(self, forward_func: Callable[..., Tensor]):
        if not callable(forward_func):
            raise TypeError("forward_func must be callable")
        self.forward_func = forward_func

    def attribute(self, inputs: Tensor, baselines=None, target=None,
                  additional_forward_args=None, feature_mask=None, n_samples: int = 25,
                  perturbations_per_eval: int = 1, show_progress: bool = False,
                  *, seed: int = 0, backend: str = "auto"):
        """Shapley values shaped like ``inputs [N, d]`` (``[N, k, d]`` for ``target=None`` on a
        ``[N, k]`` output; ``[1, d]`` for one value per batch, see the class notes; a
        one-tuple when ``inputs`` is one).

        Args:
            inputs: ``[N, d]`` float tensor, or a tuple holding one.
            baselines: None (zeros), a number, ``[d]``/``[1, d]`` (shared) or ``[N, d]``
                (one per input), or a tuple holding one of these.
            target: None (every output column: ``[N]``/``[N, 1]``/``[N, k]`` outputs), an int
                (negative counts from the last column), a one-entry tuple, a list of ints or
                one-entry tuples, or a tensor ``[N]`` (or one element) of output columns.
            additional_forward_args: extra arguments passed to every call of forward_func
                (per-example tensors only with one value per batch: see the class notes).
            feature_mask: None (every feature is a player) or integer group ids >= 0 ``[d]``,
                ``[1, d]``, or ``[N, d]`` with identical rows: the players are the groups and,
                as in captum, every feature of a group gets the group's value.
            n_samples: permutation walks per input.
            perturbations_per_eval: an int >= 1, as captum requires; otherwise unused.
            show_progress: accepted for compatibility.
            seed: oni only: the walks' seed (the same seed gives the same values).
            backend: oni only: ``"auto"``, ``"kernel"`` or ``"torch"``, as in
                :func:`shapley_values`.
        """
        n_samples = _check_int(n_samples, "n_samples", 1)
        _check_int(perturbations_per_eval, "perturbations_per_eval", 1)
        as_tuple = isinstance(inputs, tuple)
        if as_tuple:
            if len(inputs) != 1:
                raise ValueError("oni.ShapleyValueSampling supports a single 2-D input tensor")
            inputs = inputs[0]
        if isinstance(feature_mask, tuple):
            if len(feature_mask) != 1:
                raise ValueError(f"feature_mask as a tuple must hold one entry (one input), "
                                 f"got {len(feature_mask)}")
            feature_mask = feature_mask[0]
        extra = () if additional_forward_args is None else (
            additional_forward_args if isinstance(additional_forward_args, tuple)
            else (additional_forward_args,))
        x = _check_inputs(inputs)
        _check_model(self.forward_func, stacklevel=3)
        if isinstance(baselines, tuple):
            if len(baselines) != 1:
                raise ValueError(f"baselines as a tuple must hold one entry (one input), got "
                                 f"{len(baselines)}")
            baselines = baselines[0]
        refs = _check_baseline(baselines, x, per_row=True)
        per_row = refs.shape[0] == x.shape[0] and x.shape[0] > 1
        groups = _shared_feature_mask(feature_mask, x)
        _check_model_input(self.forward_func, x)  # a plain first nn.Linear: width, dtype
        per_example = any(isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == x.shape[0] > 1
                          for a in extra)
        try:
            with torch.no_grad():  # the output's form, on every input as captum's first call
                out = self.forward_func(x.clone(), *extra)  # (it may write into its input)
        except Exception as err:
            if per_example:  # likely why, and the refusal it would meet next
                raise NotImplementedError(_PER_EXAMPLE_ARGS) from err
            raise
        if _one_value_for_batch(out, x.shape[0]):
            attributions = self._explain_batch_output(out, x, refs, extra, groups, target,
                                                      n_samples, seed, backend)
            return (attributions,) if as_tuple else attributions
        if per_example:
            raise NotImplementedError(_PER_EXAMPLE_ARGS)

        def game(z: Tensor) -> Tensor:
            out = self.forward_func(z, *extra)
            if isinstance(out, Tensor) and out.dim() and out.shape[0] != len(z):
                why = ("additional_forward_args must not hold per-example values (oni "
                       "evaluates rows of many inputs in one batch); close over them in "
                       "forward_func instead") if extra else (
                       "oni evaluates many perturbed inputs in one call, so forward_func must "
                       "return one output row per input row; a forward that reduces over its "
                       "batch (a sum, say) must return a 0-d tensor to be explained as one "
                       "value for the batch")
                raise ValueError(f"forward_func returned {out.shape[0]} rows for {len(z)} "
                                 f"input rows: {why}")
            return out[:, None] if isinstance(out, Tensor) and out.dim() == 1 else out

        def explain(column) -> Tensor:
            result = _sampled_shapley(game, x, refs, per_row, target=column, labels=None,
                                      n_permutations=n_samples, antithetic=True, tol=None,
                                      seed=seed, backend=backend, max_batch_evals=None,
                                      link="identity", groups=groups)
            if result.groups is None:
                return result.values
            return result.values[:, result.groups]  # each feature: its group's value

        target = _captum_target(target, x.shape[0])
        if target is None or (isinstance(target, int) and target < 0):
            if not isinstance(out, Tensor) or out.dim() not in (1, 2):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"forward_func must return [N] or [N, k] outputs, got {got}")
            k = 1 if out.dim() == 1 else out.shape[1]
            if target is None:
                attributions = explain(0) if out.dim() == 1 else \
                    torch.stack([explain(c) for c in range(k)], dim=1)  # [N, k, d], as captum
                return (attributions,) if as_tuple else attributions
            if target < -k:
                raise ValueError(f"target = {target} counts from the last of the output's {k} "
                                 f"columns: it must be in [-{k}, {k})")
            target += k
        attributions = explain(target)
        return (attributions,) if as_tuple else attributions

    def _explain_batch_output(self, out, x: Tensor, refs: Tensor, extra: tuple,
                              groups: Optional[Tensor], target, n_samples: int, seed: int,
                              backend: str) -> Tensor:
        """captum's aggregate mode: a game over the d features of the whole batch, played
        by oni's sampler on 0/1 masks (1 takes the inputs' column, 0 the baseline's)."""
        if target is not None:
            raise ValueError(f"target = {target!r}: forward_func returns one value for the "
                             f"whole batch (shape {_output_shape(out)}), so there is no "
                             f"column to choose; pass target=None")
        n = x.shape[0]

        def batch_game(masks: Tensor) -> Tensor:
            values = torch.empty((masks.shape[0], 1), dtype=x.dtype, device=x.device)
            for b, mask in enumerate(masks):
                value = self.forward_func(torch.where(mask != 0, x, refs), *extra)
                if not _one_value_for_batch(value, n):
                    raise ValueError(f"forward_func returned one value for the batch at "
                                     f"first, then shape {_output_shape(value)}: it must "
                                     f"return one value for every batch of {n} inputs")
                values[b, 0] = torch.as_tensor(value).reshape(())
            return values

        ones = x.new_ones((1, x.shape[1]))
        result = _sampled_shapley(batch_game, ones, torch.zeros_like(ones), True, target=0,
                                  labels=None, n_permutations=n_samples, antithetic=True,
                                  tol=None, seed=seed, backend=backend, max_batch_evals=None,
                                  link="identity", groups=groups)
        values = result.values if result.groups is None else result.values[:, result.groups]
        shape = tuple(out.shape) if isinstance(out, Tensor) and out.dim() else (1,)
        return values.reshape(shape + (x.shape[1],))


_PER_EXAMPLE_ARGS = (
    "additional_forward_args holds a tensor with one row per input: captum expands such "
    "tensors with the inputs, but oni evaluates rows of many inputs in one batch; close over "
    "them in forward_func instead (or return one value for the batch: see the class notes)")


def _one_value_for_batch(out, n: int) -> bool:
    """captum's aggregate output: a number, a 0-d tensor, or one element for N > 1 inputs."""
    if isinstance(out, Tensor):
        return out.dim() == 0 or (n > 1 and out.numel() == 1)
    return isinstance(out, numbers.Real) and not isinstance(out, bool)


def _output_shape(out) -> str:
    return str(tuple(out.shape)) if isinstance(out, Tensor) else type(out).__name__


def _captum_target(target, n: int):
    """captum's target forms as oni's: a one-entry tuple (and lists of them) as its index, a
    one-element tensor as that column for every input."""
    if isinstance(target, tuple):
        if len(target) != 1:
            raise ValueError(f"target {target!r}: a tuple indexes the dimensions of each "
                             f"output after the batch one, and a [N, k] output has one; pass "
                             f"a list or tensor for one column per input")
        return target[0]
    if isinstance(target, list) and any(isinstance(t, tuple) for t in target):
        return [_captum_target(t, n) if isinstance(t, tuple) else t for t in target]
    if isinstance(target, Tensor) and target.numel() == 1 and target.dim() > 0 and n > 1:
        return target.reshape(()).expand(n)
    return target


def _shared_feature_mask(feature_mask, x: Tensor) -> Optional[Tensor]:
    """captum's feature_mask as oni's groups ``[d]``: one grouping for every input."""
    if feature_mask is None:
        return None
    n, d = x.shape
    _check_group_ids(feature_mask, "feature_mask", x, "the inputs'")
    if feature_mask.numel() and int(feature_mask.min()) < 0:
        raise ValueError(f"feature_mask holds the negative id {int(feature_mask.min())}: "
                         f"captum keeps such features at the baseline in every coalition, "
                         f"which changes the game; give every group an id >= 0 (or set those "
                         f"features equal to the baseline)")
    if feature_mask.shape not in ((d,), (1, d), (n, d)):
        raise ValueError(f"feature_mask must be [d], [1, d] or [N, d] with N = {n}, d = {d}, "
                         f"got shape {tuple(feature_mask.shape)}")
    if feature_mask.dim() == 2:
        if (feature_mask != feature_mask[:1]).any():
            raise NotImplementedError(
                f"feature_mask {tuple(feature_mask.shape)}: oni groups the features of every "
                f"input alike; pass one mask [d] or [1, d] (per-input masks differ here)")
        feature_mask = feature_mask[0]
    return feature_mask


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.layout} tensor"
    return type(value).__name__
