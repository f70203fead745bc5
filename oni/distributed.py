"""Data parallelism over ``torch.distributed`` ranks for the per-row solvers.

Shapley values and ONI noise are computed row by row, so N inputs split across ranks with no
communication until the end: every rank passes the same whole batch ``x``, solves the
contiguous shard of rows :func:`shard` gives it, and the shards are gathered back in order,
so every rank returns the result for the whole batch. The walks and the random starts are
drawn from hashes of the seed and each row's index in the whole batch (``row_offset``), so
one rank and N ranks give the same answer for the same seed, up to the rounding of the
model's batched matrix products (whose batches differ).

Launch with ``torchrun --nproc-per-node=G script.py`` and initialise the process group
first: ``nccl`` for CUDA tensors (one GPU per rank: ``torch.cuda.set_device(local_rank)``),
``gloo`` for CPU ones. Without an initialised process group the functions are the plain
single-process ones. The ``oni shapley`` and ``oni noise`` commands do all of this
themselves when run under ``torchrun``.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import check_int, check_row_offset
from .noise import NoiseResult, optimal_noise as _optimal_noise
from .shapley import ShapleyResult, _check_groups, _check_inputs, shapley_values as _shapley

__all__ = ["shard", "shapley_values", "optimal_noise", "world", "OtherRankFailed"]


class OtherRankFailed(RuntimeError):
    """Raised on the other ranks when one rank fails: on its rows, or on the checks of the
    whole batch that precede them (a rank with no rows gets it too)."""


def world(group=None) -> Tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialised process group."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        # checked before the early return: a wrong group must not pass on one process
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None (the world), "
                        f"got {type(group).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of "
                         f"the group it passed: only the group's ranks may call")
    return rank, dist.get_world_size(group)


def shard(n: int, rank: int, world_size: int) -> slice:
    """The rows of a batch of ``n`` that rank ``rank`` of ``world_size`` solves: contiguous
    and in rank order, sizes differing by at most one (the first ``n % world_size`` ranks
    take one more)."""
    n = check_int(n, "n", 0)  # a negative n gave slice(0, n): the rows but the last -n
    rank = check_int(rank, "rank", 0)
    world_size = check_int(world_size, "world_size", 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (rank < extra))


def shapley_values(model, x: Tensor, baseline=None, *, group=None, row_offset: int = 0,
                   **kwargs) -> ShapleyResult:
    """:func:`oni.shapley_values` with x's rows split across the ranks of ``group`` (default:
    the world); every rank passes the same ``x`` (and ``labels``, a per-row ``target``) and
    gets the whole :class:`~oni.ShapleyResult`. ``row_offset``: the index of x's first row
    in a larger batch, as for :func:`oni.shapley_values` (each rank adds its shard's)."""
    if world(group)[1] == 1:
        return _shapley(model, x, baseline, row_offset=row_offset, **kwargs)
    x, kwargs = _check_sharded_call(x, {**kwargs, "row_offset": row_offset}, "shapley_values",
                                    group, model, baseline)
    row_offset = kwargs.pop("row_offset")
    grouping = _check_groups(kwargs.get("groups"), x)
    n_players = x.shape[1] if grouping is None else grouping[1]

    def solve(rows: slice) -> ShapleyResult:
        local = _per_row_sliced(kwargs, rows, x.shape[0])
        return _shapley(model, x[rows], baseline, row_offset=row_offset + rows.start,
                        **local)

    fields = {"values": ((n_players,), x.dtype), "stderr": ((n_players,), x.dtype),
              "n_permutations": ((), torch.long), "fx": ((), x.dtype),
              "f_baseline": ((), x.dtype), "target": ((), torch.long)}
    _, gathered = _solve_sharded(x, group, solve, fields)
    return ShapleyResult(**gathered, groups=None if grouping is None else grouping[0])


def optimal_noise(model, x: Tensor, phi=None, *, group=None, row_offset: int = 0,
                  **kwargs) -> NoiseResult:
    """:func:`oni.optimal_noise` with x's rows (and ``phi``'s) split across the ranks of
    ``group`` (default: the world); every rank passes the same ``x`` and ``phi`` and gets
    the whole :class:`~oni.NoiseResult`. Each rank warns about its own infeasible rows.
    ``row_offset`` as for :func:`shapley_values`."""
    if world(group)[1] == 1:
        return _optimal_noise(model, x, phi, row_offset=row_offset, **kwargs)
    if isinstance(phi, ShapleyResult) and phi.groups is None:  # (a grouped one is refused)
        phi = phi.values
    x, kwargs = _check_sharded_call(x, {**kwargs, "phi": phi, "row_offset": row_offset},
                                    "optimal_noise", group, model)
    phi, row_offset = kwargs.pop("phi"), kwargs.pop("row_offset")
    n, d = x.shape

    def solve(rows: slice) -> NoiseResult:
        local = dict(kwargs)
        if local.get("shapley_kwargs"):
            local["shapley_kwargs"] = _per_row_sliced(local["shapley_kwargs"], rows, n)
        return _optimal_noise(model, x[rows], _row_slice(phi, rows, n),
                              row_offset=row_offset + rows.start, **local)

    fields = {"eta": ((d,), x.dtype), "entropy": ((), x.dtype), "norm": ((), x.dtype),
              "feasible": ((), torch.bool), "iterations": ((), torch.long),
              "budget": ((d,), x.dtype), "radius": ((), x.dtype)}
    part, gathered = _solve_sharded(x, group, solve, fields)
    tau = torch.tensor([part.tau if part is not None else -1.0], dtype=torch.float64,
                       device=_vote_device(group))
    dist.all_reduce(tau, op=dist.ReduceOp.MAX, group=group)  # one value: any solving rank's
    return NoiseResult(**gathered, tau=float(tau))


_PER_ROW = ("labels", "target", "phi")  # arguments with one entry per row of x


def _check_sharded_call(x, kwargs: dict, name: str, group, model,
                        baseline=None) -> Tuple[Tensor, dict]:
    """(x, kwargs) checked as the whole batch, on every rank and before any rank solves: x,
    the per-row arguments' lengths (a shard-sized one would be taken for the shard's own),
    and that every rank holds the same x, model and arguments. A rank whose check fails
    makes all raise."""
    def check():
        inner = kwargs.get("shapley_kwargs") or {}
        if "row_offset" in inner:  # the solver passes its own (x's, plus the shard's)
            raise TypeError(f"{name}: shapley_kwargs['row_offset'] is set by the solver; give "
                            f"row_offset= itself")
        checked_x = _check_inputs(x)
        n = checked_x.shape[0]
        checked = _whole_batch_rows(kwargs, n)
        checked["row_offset"] = check_row_offset(kwargs["row_offset"], n)
        phi = checked.get("phi")
        if isinstance(phi, Tensor) and tuple(phi.shape) != tuple(checked_x.shape):
            raise ValueError(f"phi must be [N, d] = {list(checked_x.shape)} like x, got "
                             f"{tuple(phi.shape)}")
        if phi is not None and not isinstance(phi, (Tensor, ShapleyResult)):
            raise ValueError(f"phi must be [N, d] = {list(checked_x.shape)} like x, got "
                             f"{type(phi).__name__}")  # as oni.optimal_noise on one rank
        if inner:
            checked["shapley_kwargs"] = _whole_batch_rows(inner, n, "shapley_kwargs[{!r}]")
        return checked_x, checked

    x, kwargs = _agreed(check, None, group)
    _check_same_x(x, kwargs["row_offset"], group)
    _check_same_arguments({"the model": model, "baseline": baseline, **kwargs}, group)
    return x, kwargs


def _check_same_arguments(arguments: dict, group) -> None:
    """Every rank must pass the same arguments: each rank's shard was solved with its own,
    so labels, seeds or a tau that differ gave rows mixed from several calls (and the
    largest tau of any rank as the result's). Compared by fingerprint; every rank gets all
    of them, so all raise the same error, naming what differs."""
    # voted on: a fingerprint failing on one rank (an odd tensor) must not leave the others
    # waiting in the gather
    mine = _agreed(lambda: {key: repr(_fingerprint(value)) for key, value in arguments.items()},
                   None, group)
    every = [None] * world(group)[1]
    dist.all_gather_object(every, mine, group=group)
    differ = [key for key in mine if any(other.get(key) != mine[key] for other in every)]
    if differ:
        raise ValueError(f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''} across "
                         f"the ranks: every rank must pass the same model and arguments")


def _fingerprint(value):
    """What two ranks' copies of an argument must share: a tensor's shape, dtype and two
    wrapping sums of its bytes (plain and position-weighted, as x's check); a module's
    state; containers entry by entry; other values by repr (floats: exactly). An object
    with no value semantics (a function) by its type only: its repr holds an address."""
    if isinstance(value, Tensor):
        if value.layout != torch.strided or value.is_meta:  # (refused by the solvers)
            return ("tensor", tuple(value.shape), str(value.dtype), str(value.layout))
        flat = value.detach().contiguous().view(-1)
        wide = {8: torch.int64, 4: torch.int32, 2: torch.int16}.get(flat.element_size(),
                                                                    torch.uint8)
        bits = flat.view(wide).long()
        weights = torch.arange(1, bits.numel() + 1, device=bits.device) % 1_000_003
        return ("tensor", tuple(value.shape), str(value.dtype), int(bits.sum()),
                int((bits * weights).sum()))
    if isinstance(value, torch.nn.Module):
        return ("module", type(value).__name__, _fingerprint(value.state_dict()))
    if isinstance(value, ShapleyResult):  # (not dataclasses.asdict: it copies the tensors)
        return ("ShapleyResult", tuple(_fingerprint(getattr(value, field.name))
                                       for field in dataclasses.fields(value)))
    if isinstance(value, Mapping):  # in key order: a dict built in another order is the same
        return ("map", tuple(sorted((repr(k), _fingerprint(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_fingerprint(v) for v in value))
    if value is None or isinstance(value, (numbers.Number, str, bytes)):
        return repr(value)
    return ("object", type(value).__qualname__)


def _whole_batch_rows(kwargs: dict, n: int, label: str = "{}") -> dict:
    """``kwargs`` with each per-row argument checked to be a tensor or sequence of n entries
    (sequences become tensors, to be sliced); a str or int target, None: as it is. ``label``
    formats a key into the name the error gives."""
    checked = dict(kwargs)
    for key in _PER_ROW:
        value = checked.get(key)
        # (not phi: oni.optimal_noise refuses a list, and so must N ranks, as one does)
        if isinstance(value, (list, tuple)) and key != "phi":
            value = checked[key] = torch.as_tensor(value)
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] != n:
            raise ValueError(f"{label.format(key)} must have one entry per row of x (N = {n}), "
                             f"got shape {tuple(value.shape)}")
    return checked


def _check_same_x(x: Tensor, row_offset: int, group) -> None:
    """Every rank must pass the same x and row_offset: x's shape, two wrapping integer sums
    of its bits (plain and position-weighted) and the offset must agree on all ranks, or
    every rank raises."""
    bits = x.detach().contiguous().view(-1)
    bits = bits.view(torch.int64 if bits.element_size() == 8 else torch.int32).long()
    weights = torch.arange(1, bits.numel() + 1, device=x.device) % 1_000_003
    meta = torch.stack([torch.tensor(x.shape[0], device=x.device),
                        torch.tensor(x.shape[1], device=x.device),
                        bits.sum(), (bits * weights).sum(),
                        torch.tensor(row_offset, device=x.device)]).to(_vote_device(group))
    low, high = meta.clone(), meta.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if low[4] != high[4]:
        raise ValueError(f"row_offset differs across the ranks ({int(low[4])} to "
                         f"{int(high[4])}): every rank must pass the same whole batch")
    if not torch.equal(low, high):
        raise ValueError(f"x differs across the ranks (shapes from [{int(low[0])}, "
                         f"{int(low[1])}] to [{int(high[0])}, {int(high[1])}], or the values): "
                         f"every rank must pass the same whole batch")


def _solve_sharded(x: Tensor, group, solve, fields: dict):
    """``solve(rows)`` on this rank's shard (agreed on by every rank), and each field of its
    result, ``[rows, *shape]`` of a dtype, gathered over the ranks into ``[N, *shape]``."""
    rank, size = world(group)
    n = x.shape[0]
    rows = shard(n, rank, size)
    part = _agreed(lambda: solve(rows) if rows.stop > rows.start else None, rows, group)
    gathered = {name: _gather_rows(getattr(part, name) if part is not None else None, shape,
                                   dtype, x.device, n, size, group)
                for name, (shape, dtype) in fields.items()}
    return part, gathered


def _vote_device(group) -> torch.device:
    """Where the small control tensors go: NCCL takes only CUDA tensors, gloo CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agreed(solve, rows: Optional[slice], group):
    """``solve()`` on this rank, then a vote: if any rank failed, every rank raises (the
    failed ones their own error, saying which rows it had; the others
    :class:`OtherRankFailed` quoting the first failed rank) instead of the others waiting
    forever in the gather."""
    error = None
    try:
        part = solve()
    except Exception as err:  # re-raised below, after the vote
        error, part = err, None
    failed = torch.tensor([int(error is not None)], device=_vote_device(group))
    dist.all_reduce(failed, group=group)
    if not int(failed):
        return part
    located = None  # this rank's error, saying which rows it had
    if error is not None and rows is not None:
        where = (f"rank {dist.get_rank(group)}, rows {rows.start}:{rows.stop} of the batch "
                 f"(row indices below count from {rows.start}): ")
        try:
            located = type(error)(where + str(error))
        except Exception:  # an exception type that does not take one message
            if hasattr(error, "add_note"):
                error.add_note(where.rstrip(": "))
    shown = located if located is not None else error
    # every rank learns what the first failed one said: a rank with no rows never ran the
    # checks that failed on the others
    reports = [None] * world(group)[1]
    dist.all_gather_object(reports, None if shown is None else f"{type(shown).__name__}: {shown}",
                           group=group)
    if located is not None:
        raise located from error
    if error is not None:
        raise error
    first = next(report for report in reports if report is not None)
    raise OtherRankFailed(f"{int(failed)} other rank(s) failed; the first said: {first}")


def _per_row_sliced(kwargs: dict, rows: slice, n: int) -> dict:
    """Keyword arguments with the per-row ones (labels, a tensor target) cut to the shard."""
    return {key: _row_slice(value, rows, n) if key in _PER_ROW else value
            for key, value in kwargs.items()}


def _row_slice(value, rows: slice, n: int):
    """A per-row argument's shard (tensors of n rows); anything else as it is."""
    if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n:
        return value[rows]
    return value


def _gather_rows(part: Optional[Tensor], shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device, n: int, world_size: int, group) -> Tensor:
    """The ranks' row shards, concatenated in rank order: all_gather needs one size, so each
    shard is padded to the largest; bools travel as uint8 (gloo has no bool)."""
    biggest = -(-n // world_size)
    wire = torch.uint8 if dtype == torch.bool else dtype
    padded = torch.zeros((biggest, *shape), dtype=wire, device=device)
    if part is not None and len(part):
        padded[:len(part)] = part.to(wire)
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded, group=group)
    rows = [shard(n, r, world_size) for r in range(world_size)]
    return torch.cat([p[:s.stop - s.start] for p, s in zip(pieces, rows)]).to(dtype)
