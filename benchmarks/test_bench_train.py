"""Training throughput (epochs per second) of ``oni.train.train_model``, CPU.

Workload: the paper's MLP ``oni.models.MLP(600, 100)`` (``600 -> 1024 -> 512 -> 256 -> 128
-> 100``, ReLU) trained with the paper's settings (Adam, lr 1e-3, batch 128) on
Purchase-shaped synthetic data: the 20,000 training rows of ``benchmarks/workload.py``
(``purchase_like`` with the benchmark model's training seed; binary, ~10% ones, 100 classes).
Cases:

* ``train_only`` — ``train_model`` without test data: the Adam steps (157 batches per epoch)
  plus the per-epoch training-accuracy pass over the 20,000 rows.
* ``with_test`` — also evaluates a 20,000-row test set (Purchase100's test split size,
  ``purchase_like`` with the workload's test seed) after every epoch.
* ``plain_loop`` — the bare minibatch loop (the same Adam steps, no evaluation, no checks):
  what ``train_model`` adds on top of it is its overhead.

Each case first trains one epoch untimed (warm-up) and checks it learned (training accuracy
well above the 1% chance level), then times ``ONI_TRAIN_ROUNDS`` (default 3) calls of
``ONI_TRAIN_EPOCHS`` (default 2) epochs each; epochs/s = epochs / the minimum over rounds.
Results also go to ``.benchmarks/train_summary.json`` with the machine and versions. Run::

    ONI_BENCH_WAIT_IDLE=300 python -m pytest benchmarks/test_bench_train.py --benchmark-only \\
        -s -p no:cacheprovider --benchmark-columns=min,median,max,rounds \\
        --benchmark-json=.benchmarks/train.json
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from . import idle, workload

D = 600
N_TRAIN = 20_000
N_TEST = 20_000
BATCH = 128
EPOCHS = int(os.environ.get("ONI_TRAIN_EPOCHS", "2"))
ROUNDS = int(os.environ.get("ONI_TRAIN_ROUNDS", "3"))
SUMMARY_PATH = workload.ROOT / ".benchmarks" / "train_summary.json"

_RESULTS: dict = {}


@pytest.fixture(scope="module")
def purchase_rows():
    cfg = workload.config_for(D)
    x, y = workload.purchase_like(cfg, N_TRAIN, seed=cfg.seed + 1)
    x_test, y_test = workload.purchase_like(cfg, N_TEST, seed=cfg.seed + 2)
    return cfg, x, y, x_test, y_test


def _plain_loop(model: nn.Module, x, y, epochs: int, seed: int = 0) -> None:
    """The minimal loop train_model runs (same init, batch order and steps), nothing else."""
    from oni.models import init_parameters_

    init_parameters_(model, seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for lo in range(0, x.shape[0], BATCH):
            idx = order[lo:lo + BATCH]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@pytest.mark.parametrize("case", ["train_only", "with_test", "plain_loop"])
def test_train_epochs_per_second(benchmark, purchase_rows, case):
    from oni.models import MLP
    from oni.train import TrainConfig, accuracy, train_model

    cfg, x, y, x_test, y_test = purchase_rows
    model = MLP(D, cfg.n_classes)
    test = dict(x_test=x_test, y_test=y_test) if case == "with_test" else {}

    def run(epochs: int):
        if case == "plain_loop":
            _plain_loop(model, x, y, epochs)
            return None
        config = TrainConfig(epochs=epochs, batch_size=BATCH, lr=1e-3, seed=0, device="cpu",
                             progress=False)
        return train_model(model, x, y, config=config, **test)

    # untimed warm-up, and a check that it trains: one epoch is far above 1% chance
    run(1)
    warm_acc = accuracy(model, x, y)
    assert warm_acc > 0.1, f"one epoch reached only {warm_acc:.3f} training accuracy"

    benchmark.group = f"train_model d={D} k={cfg.n_classes} N={N_TRAIN} batch={BATCH} (CPU)"
    benchmark.extra_info.update({"case": case, "epochs_per_call": EPOCHS, "n_train": N_TRAIN,
                                 "n_test": N_TEST if test else 0, "batch_size": BATCH})
    idle.wait_for_idle()  # only with ONI_BENCH_WAIT_IDLE=<seconds> set
    history = benchmark.pedantic(run, args=(EPOCHS,), rounds=ROUNDS, iterations=1)

    info = {"case": case, "epochs_per_call": EPOCHS, "rounds": ROUNDS,
            "train_acc_after_warmup_epoch": warm_acc}
    if history is not None:
        assert history.epochs == list(range(1, EPOCHS + 1))
        info.update(train_acc=history.train_acc[-1], test_acc=history.test_acc[-1],
                    train_loss=history.train_loss[-1])
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        info.update(seconds_min=stats.min, seconds_median=stats.median,
                    epochs_per_second=EPOCHS / stats.min,
                    seconds_per_epoch=stats.min / EPOCHS)
    benchmark.extra_info.update(info)
    _RESULTS[case] = info
    print(f"\n[train] {case}: " + ", ".join(
        f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in info.items()),
        flush=True)
    SUMMARY_PATH.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_PATH.write_text(json.dumps({"provenance": workload.provenance(), "d": D,
                                        "k": cfg.n_classes, "hidden": list(cfg.hidden),
                                        "cases": _RESULTS}, indent=1))
