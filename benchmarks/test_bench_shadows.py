"""Shadow-model training throughput, CPU: ``oni.shadows.train_mlps_batched`` vs one by one.

Workload: ``K`` (``ONI_SHADOW_MODELS``, default 16) copies of the paper's MLP
``600 -> 1024 -> 512 -> 256 -> 128 -> 100`` (``oni.models.MLP(600, 100)``), model ``j`` on
its own ``ONI_SHADOW_ROWS`` (default 5,000) rows drawn without replacement from the 20,000
Purchase-shaped training rows of ``benchmarks/workload.py`` (``purchase_like`` with the
benchmark model's training seed), seed ``j``; ``ONI_SHADOW_EPOCHS`` (default 2) epochs of
Adam (lr 1e-3, batch 128). Cases, all training the same ``K`` models:

* ``batched`` — ``train_mlps_batched``: stacked parameters, ``bmm``, hand-written
  backward, one fused Adam step for all models. The rows are 10% ones, so by default the
  first layer and its weight gradient come from the inputs' non-zeros
  (``oni::sparse_input_linear``, ``oni::sparse_input_weight_grad``).
* ``batched_dense`` — the same with ``sparse_inputs=False``: every product dense, which
  separates the gain of the sparse first layer from that of batching.
* ``one_by_one`` — ``oni.train.train_model`` on each model in turn: what a caller without
  ``oni.shadows`` runs (it also measures training accuracy after every epoch).
* ``one_by_one_plain`` — the bare minibatch loop per model (same init, batch order and
  steps, default Adam; no evaluation, no checks): separates the gain of batching from the
  per-epoch evaluation ``train_model`` adds.
* ``vmap`` — ``torch.func.vmap(functional_call)`` over the stacked parameters with autograd
  and the same fused Adam: the alternative to ``bmm`` the module's docstring compares.
* ``batched_bf16`` — ``train_mlps_batched(..., precision="bf16")``: bfloat16 products with
  float32 accumulation, float32 master weights and Adam state (default chunks: on the CPU a
  few models at a time).
* ``one_by_one_bf16`` — ``train_model`` on each model in turn inside
  ``torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)`` (no weight-cast
  cache: it would keep serving the first step's weights): the gain of batching alone at equal
  precision.

Each case trains untimed first on a few rows (warm-up), then ``ONI_SHADOW_ROUNDS`` (default
2) timed calls (``benchmark.pedantic``), each after waiting for an idle CPU when
``ONI_BENCH_WAIT_IDLE`` is set (rounds that started busy anyway are counted); the minimum
counts. Every case's models are then checked against the batched ones: mean accuracy on
2,000 held-out rows (``purchase_like`` with the workload's test seed) within 0.02, the same
predicted class on more than 75% of them (bf16 cases: accuracy only, and the agreement is
recorded, not asserted: bfloat16 rounding changes these briefly trained models' predictions
far more than float32 reordering does); the largest weight difference is recorded. For
scale, the ``one_by_one`` case also retrains its first two models with
``torch.set_num_threads(1)`` and records how far ``train_model``'s own weights move (see
``oni/shadows.py`` on why these differences are not rounding-sized on this network). After
the last case the ratios (seconds of each case / seconds of ``batched``, and of
``batched_bf16``, from the same run) are printed and everything is written with the machine
to ``.benchmarks/shadows_summary.json``. Run::

    ONI_BENCH_WAIT_IDLE=300 python -m pytest benchmarks/test_bench_shadows.py --benchmark-only \\
        -s -p no:cacheprovider --benchmark-columns=min,median,max,rounds \\
        --benchmark-json=.benchmarks/shadows.json
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from . import idle, workload

D = 600
POOL = 20_000
BATCH = 128
N_MODELS = int(os.environ.get("ONI_SHADOW_MODELS", "16"))
ROWS = int(os.environ.get("ONI_SHADOW_ROWS", "5000"))
EPOCHS = int(os.environ.get("ONI_SHADOW_EPOCHS", "2"))
ROUNDS = int(os.environ.get("ONI_SHADOW_ROUNDS", "2"))
CASES = ["batched", "batched_dense", "one_by_one", "one_by_one_plain", "vmap", "batched_bf16",
         "one_by_one_bf16"]
SUMMARY_PATH = workload.ROOT / ".benchmarks" / "shadows_summary.json"

N_TEST = 2_000
_RESULTS: dict = {}
_MODELS: dict = {}
_PREDICTIONS: dict = {}


@pytest.fixture(scope="module")
def shadow_rows():
    return workload.shadow_workload(N_MODELS, ROWS, pool=POOL, d=D)


def _config(epochs: int, seed: int = 0, device: str = "cpu"):
    from oni.train import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=BATCH, lr=1e-3, seed=seed, device=device,
                       progress=False)


def _batched(cfg, x, y, idx, seeds, epochs, device="cpu"):
    from oni.shadows import train_mlps_batched

    return train_mlps_batched(D, cfg.n_classes, cfg.hidden, idx, x, y, seeds=seeds,
                              config=_config(epochs, device=device))


def _batched_dense(cfg, x, y, idx, seeds, epochs):
    from oni.shadows import train_mlps_batched

    return train_mlps_batched(D, cfg.n_classes, cfg.hidden, idx, x, y, seeds=seeds,
                              config=_config(epochs), sparse_inputs=False)


def _batched_bf16(cfg, x, y, idx, seeds, epochs, device="cpu"):
    from oni.shadows import train_mlps_batched

    return train_mlps_batched(D, cfg.n_classes, cfg.hidden, idx, x, y, seeds=seeds,
                              config=_config(epochs, device=device), precision="bf16")


def _one_by_one_bf16(cfg, x, y, idx, seeds, epochs):
    # cache_enabled=False: autocast's cache of bfloat16 weight casts lives as long as the
    # context, which here spans every step (the cached casts would go stale)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        return _one_by_one(cfg, x, y, idx, seeds, epochs)


def _one_by_one(cfg, x, y, idx, seeds, epochs, device="cpu"):
    from oni.models import MLP
    from oni.train import train_model

    models = []
    for rows, seed in zip(idx, seeds):
        model = MLP(D, cfg.n_classes, cfg.hidden)
        train_model(model, x[rows], y[rows], config=_config(epochs, seed, device))
        models.append(model)
    return models


def _one_by_one_plain(cfg, x, y, idx, seeds, epochs):
    """The loop train_model runs (init, batch order, steps), without its evaluation."""
    from oni.models import MLP, init_parameters_

    models = []
    for rows, seed in zip(idx, seeds):
        model = init_parameters_(MLP(D, cfg.n_classes, cfg.hidden), seed).train()
        xs, ys = x[rows], y[rows]
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(rows), generator=gen)
            for lo in range(0, len(rows), BATCH):
                b = order[lo:lo + BATCH]
                loss = nn.functional.cross_entropy(model(xs[b]), ys[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        models.append(model.eval())
    return models


def _vmap(cfg, x, y, idx, seeds, epochs):
    """vmap(functional_call) over stacked parameters, autograd, the same fused Adam."""
    from torch.func import functional_call, stack_module_state, vmap

    from oni.models import MLP, init_parameters_

    models = [init_parameters_(MLP(D, cfg.n_classes, cfg.hidden), s) for s in seeds]
    params, _ = stack_module_state(models)
    template = MLP(D, cfg.n_classes, cfg.hidden).to("meta")
    opt = torch.optim.Adam(list(params.values()), lr=1e-3, fused=True)

    def mean_loss(p, xb, yb):
        return nn.functional.cross_entropy(functional_call(template, p, (xb,)), yb)

    losses = vmap(mean_loss)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n = idx.shape[1]
    for _ in range(epochs):
        order = torch.stack([rows[torch.randperm(n, generator=g)] for rows, g in zip(idx, gens)])
        for lo in range(0, n, BATCH):
            rows = order[:, lo:lo + BATCH]
            opt.zero_grad(set_to_none=True)
            losses(params, x[rows], y[rows]).sum().backward()  # sum: each model its own mean
            opt.step()
    out = []
    for j, model in enumerate(models):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name][j])
        out.append(model.eval())
    return out


RUNNERS = {"batched": _batched, "batched_dense": _batched_dense, "one_by_one": _one_by_one,
           "one_by_one_plain": _one_by_one_plain, "vmap": _vmap, "batched_bf16": _batched_bf16,
           "one_by_one_bf16": _one_by_one_bf16}


def _max_difference(models, reference) -> float:
    return max(float((p - q).abs().max()) for a, b in zip(models, reference)
               for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _thread_count_reference(cfg, x, y, idx, seeds, n: int = 2) -> float:
    """How far train_model's own models move when only the thread count changes (2 -> 1):
    the scale of the differences any reordering of float sums produces."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _one_by_one(cfg, x, y, idx[:n], seeds[:n], EPOCHS)
    finally:
        torch.set_num_threads(threads)
    return _max_difference(single, _MODELS["one_by_one"][:n])


@pytest.mark.parametrize("case", CASES)
def test_shadow_training_seconds(benchmark, shadow_rows, case):
    from oni.shadows import predict_logits_batched

    cfg, x, y, idx, seeds = shadow_rows
    run = RUNNERS[case]
    run(cfg, x, y, idx[:2, :256], seeds[:2], 1)  # untimed warm-up (allocator, BLAS threads)

    benchmark.group = (f"{N_MODELS} shadow MLPs d={D} k={cfg.n_classes}, {ROWS} rows each, "
                       f"{EPOCHS} epochs, batch {BATCH} (CPU)")
    benchmark.extra_info.update({"case": case, "n_models": N_MODELS, "rows_per_model": ROWS,
                                 "epochs": EPOCHS, "batch_size": BATCH,
                                 "torch_threads": torch.get_num_threads()})
    busy_rounds = []

    def before_each_round():
        # every round waits for a quiet machine (with ONI_BENCH_WAIT_IDLE=<seconds> set)
        busy_rounds.append(not idle.wait_for_idle())
        return (cfg, x, y, idx, seeds, EPOCHS), {}

    models = benchmark.pedantic(run, setup=before_each_round, rounds=ROUNDS, iterations=1)
    assert len(models) == N_MODELS
    _MODELS[case] = models

    info = {"case": case, "rounds": ROUNDS}
    if os.environ.get("ONI_BENCH_WAIT_IDLE"):
        info["rounds_started_on_a_busy_machine"] = sum(busy_rounds)
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        info.update(seconds_min=stats.min, seconds_median=stats.median,
                    seconds_per_model_epoch=stats.min / (N_MODELS * EPOCHS))
    # the models are trained alike: held-out accuracy, and agreement with the batched ones
    x_test, y_test = workload.purchase_like(cfg, N_TEST, seed=cfg.seed + 2)
    predicted = predict_logits_batched(models, x_test).argmax(2)  # [K, N_TEST]
    info["mean_test_acc"] = float((predicted == y_test).double().mean())
    _PREDICTIONS[case] = predicted
    if case != "batched" and "batched" in _MODELS:
        info["max_abs_weight_difference_from_batched"] = _max_difference(models,
                                                                         _MODELS["batched"])
        info["same_prediction_as_batched"] = float(
            (predicted == _PREDICTIONS["batched"]).double().mean())
        assert abs(info["mean_test_acc"] - _RESULTS["batched"]["mean_test_acc"]) < 0.02
        if not case.endswith("bf16"):
            assert info["same_prediction_as_batched"] > 0.75
    if case == "one_by_one_bf16" and "batched_bf16" in _PREDICTIONS:
        info["same_prediction_as_batched_bf16"] = float(
            (predicted == _PREDICTIONS["batched_bf16"]).double().mean())
    if case == "one_by_one":
        info["train_model_threads_2_vs_1_max_abs_weight_difference"] = \
            _thread_count_reference(cfg, x, y, idx, seeds)
    benchmark.extra_info.update(info)
    _RESULTS[case] = info
    print(f"\n[shadows] {case}: " + ", ".join(
        f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in info.items()),
        flush=True)

    ratios = {}
    for reference in ("batched", "batched_bf16"):
        base = _RESULTS.get(reference, {}).get("seconds_min")
        ratios.update({f"{c}_over_{reference}": r["seconds_min"] / base
                       for c, r in _RESULTS.items()
                       if base and c != reference and "seconds_min" in r})
    if case == CASES[-1] and ratios:
        print("[shadows] seconds / batched (or batched_bf16) seconds: " + ", ".join(
            f"{c} {v:.2f}x" for c, v in ratios.items()), flush=True)
    SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_PATH.write_text(json.dumps({
        "provenance": workload.provenance(), "d": D, "k": cfg.n_classes,
        "hidden": list(cfg.hidden), "n_models": N_MODELS, "rows_per_model": ROWS,
        "epochs": EPOCHS, "batch_size": BATCH, "cases": _RESULTS, "ratios": ratios}, indent=1))
