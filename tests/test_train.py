"""oni.train: the training loop (its init and batch-order conventions, determinism per seed,
history, distillation through loss_fn/extra, divergence, bad input, progress output, CUDA
when present) and batched prediction."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from oni import train as train_module
from oni.models import MLP, init_parameters_
from oni.train import (
    History,
    TrainConfig,
    accuracy,
    predict_logits,
    predict_proba,
    train_model,
)

D, K, HIDDEN = 10, 3, (16, 8)
QUIET = dict(progress=False, device="cpu")


def _data(n: int, seed: int):
    """Learnable data: the label is the argmax of three noisy linear scores."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(D, K, generator=torch.Generator().manual_seed(123))
    x = torch.randn(n, D, generator=gen)
    y = (x @ w + 0.3 * torch.randn(n, K, generator=gen)).argmax(1)
    return x, y


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.py)


@pytest.fixture(scope="module")
def data():
    x, y = _data(203, 0)  # 203 rows: a partial last batch at every batch size used
    x_test, y_test = _data(100, 1)
    return x, y, x_test, y_test


def _train(data, epochs=3, seed=0, batch_size=32, model=None, lr=1e-3, **kwargs):
    x, y, _, _ = data
    model = MLP(D, K, HIDDEN) if model is None else model
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, **QUIET)
    history = train_model(model, x, y, config=config, **kwargs)
    return model, history


def _params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# ============================================================================ conventions

def test_same_seed_gives_bitwise_identical_models(data):
    a, ha = _train(data, seed=5)
    b, hb = _train(data, seed=5, model=init_parameters_(MLP(D, K, HIDDEN), 77))  # other start
    assert _params_equal(a, b)
    assert (ha.train_loss, ha.train_acc) == (hb.train_loss, hb.train_acc)


def test_different_seeds_give_different_models(data):
    a, _ = _train(data, seed=1)
    b, _ = _train(data, seed=2)
    assert not any(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_training_follows_the_documented_conventions(data):
    """init_parameters_(model, seed); one generator seeded with the seed; randperm per epoch;
    consecutive batches, last partial one kept; Adam(lr, weight_decay); mean cross-entropy.
    A batched trainer (oni.shadows) relies on exactly this."""
    x, y, _, _ = data
    seed, epochs, bs, lr, wd = 3, 2, 40, 2e-3, 1e-4
    trained = MLP(D, K, HIDDEN)
    train_model(trained, x, y, config=TrainConfig(epochs=epochs, batch_size=bs, lr=lr,
                                                  weight_decay=wd, seed=seed, **QUIET))

    manual = init_parameters_(MLP(D, K, HIDDEN), seed)
    opt = torch.optim.Adam(manual.parameters(), lr=lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        for lo in range(0, x.shape[0], bs):
            idx = order[lo:lo + bs]
            loss = F.cross_entropy(manual(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    assert _params_equal(trained, manual)


def test_flush_tiny_moments_zeroes_only_the_tiny_ones():
    param = nn.Parameter(torch.zeros(5))
    opt = torch.optim.Adam([param])
    param.grad = torch.ones(5)
    opt.step()
    state = opt.state[param]
    state["exp_avg"].copy_(torch.tensor([1e-35, -1e-35, 1e-20, -0.5, 0.0]))
    state["exp_avg_sq"].copy_(torch.tensor([1e-40, 1e-29, 1e-31, 0.25, 0.0]))
    train_module.flush_tiny_moments_(opt)
    assert torch.equal(state["exp_avg"], torch.tensor([0.0, 0.0, 1e-20, -0.5, 0.0]))
    assert torch.equal(state["exp_avg_sq"], torch.tensor([0.0, 1e-29, 0.0, 0.25, 0.0]))
    sgd = torch.optim.SGD([param], lr=0.1, momentum=0.9)  # no Adam moments: left alone
    sgd.step()
    buf = sgd.state[param]["momentum_buffer"].clone()
    train_module.flush_tiny_moments_(sgd)
    assert torch.equal(sgd.state[param]["momentum_buffer"], buf)


def test_flushing_tiny_moments_keeps_plain_adams_weights():
    """Column 0 is non-zero in one row only, so its first-layer weights get a zero gradient
    for hundreds of steps and their first moments fall below TINY_MOMENT (the way to float32
    subnormals): train_model flushes them, and still ends bitwise where plain Adam does."""
    gen = torch.Generator().manual_seed(7)
    n, d = 700, 3
    x = torch.randn(n, d, generator=gen)
    x[:, 0] = 0.0
    x[350, 0] = 1.0
    y = (x[:, 1] > 0).long()
    seed, epochs, lr = 2, 2, 1e-3
    hidden = (4,)
    trained = MLP(d, 2, hidden)
    train_model(trained, x, y, config=TrainConfig(epochs=epochs, batch_size=1, lr=lr,
                                                  seed=seed, **QUIET))

    manual = init_parameters_(MLP(d, 2, hidden), seed)
    opt = torch.optim.Adam(manual.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    smallest_moment = math.inf
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for lo in range(n):
            idx = order[lo:lo + 1]
            loss = F.cross_entropy(manual(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            m = opt.state[manual[0].weight]["exp_avg"][:, 0].abs()
            smallest_moment = min(smallest_moment, float(m[m > 0].min()) if (m > 0).any()
                                  else math.inf)
    assert smallest_moment < train_module.TINY_MOMENT  # the flush had work to do
    assert _params_equal(trained, manual)


def test_dropout_models_are_deterministic_and_the_global_rng_is_restored(data):
    def net():
        return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, K))

    state = torch.get_rng_state()
    a, _ = _train(data, seed=4, model=net())
    after_a = torch.get_rng_state()
    b, _ = _train(data, seed=4, model=net())
    assert _params_equal(a, b)
    # net() drew from the global RNG; training itself did not
    torch.set_rng_state(state)
    net()
    assert torch.equal(torch.get_rng_state(), after_a)


# ============================================================================ history

def test_history_lengths_ranges_and_learning(data):
    x, y, x_test, y_test = data
    model, h = _train(data, epochs=8, batch_size=16, x_test=x_test, y_test=y_test, lr=1e-2)
    assert isinstance(h, History)
    assert h.epochs == list(range(1, 9))
    assert len(h.train_loss) == len(h.train_acc) == len(h.test_acc) == 8
    assert all(math.isfinite(v) and v >= 0 for v in h.train_loss)
    assert all(0 <= v <= 1 for v in h.train_acc + h.test_acc)
    assert h.seconds > 0
    assert h.train_loss[-1] < h.train_loss[0]
    assert h.train_acc[-1] > 0.9 and h.test_acc[-1] > 0.75  # chance is ~1/3
    # recorded at the end of each epoch, on the whole sets, in eval mode
    assert h.train_acc[-1] == accuracy(model, x, y)
    assert h.test_acc[-1] == accuracy(model, x_test, y_test)
    assert not model.training


def test_epoch_loss_is_the_row_weighted_mean_of_the_batch_losses(data):
    """History.train_loss is the mean loss over the epoch's rows: each batch's mean loss
    weighted by its own size (203 rows in batches of 32: a last batch of 11), over 203,
    recomputed from the losses and batch sizes loss_fn saw (the mutation audit weighted the
    last batch by 32, or divided by 204, and the suite passed)."""
    seen = []

    def loss_fn(logits, y_batch):
        loss = F.cross_entropy(logits, y_batch)
        seen.append((float(loss.detach()), len(y_batch)))
        return loss

    _, h = _train(data, epochs=2, loss_fn=loss_fn)
    n = data[0].shape[0]
    per_epoch = len(seen) // 2
    assert [size for _, size in seen[:per_epoch]] == [32] * 6 + [11]
    for epoch in range(2):
        batches = seen[epoch * per_epoch:(epoch + 1) * per_epoch]
        expected = math.fsum(loss * size for loss, size in batches) / n
        assert h.train_loss[epoch] == pytest.approx(expected, rel=1e-12)


class _ModeRecorder(nn.Module):
    """A Dropout MLP recording, for each forward pass with grad enabled, its training flag."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, K))
        self.modes = []

    def forward(self, x):
        if torch.is_grad_enabled():
            self.modes.append(self.training)
        return self.net(x)


def test_training_steps_run_in_train_mode(data):
    """Every training step runs the model in train mode (Dropout active), and the model is
    left in eval mode (the mutation audit trained in eval mode, Dropout off, and the suite
    passed): 7 steps per epoch, all with training=True."""
    model = _ModeRecorder()
    _train(data, epochs=2, model=model)
    assert model.modes == [True] * 14
    assert not model.training


def test_history_without_test_data_has_none(data):
    _, h = _train(data, epochs=2)
    assert h.test_acc == [None, None]


def test_weight_decay_shrinks_the_weights(data):
    a, _ = _train(data, epochs=4)
    x, y, _, _ = data
    b = MLP(D, K, HIDDEN)
    train_model(b, x, y, config=TrainConfig(epochs=4, batch_size=32, weight_decay=0.5, **QUIET))
    norm = lambda m: sum(p.square().sum() for p in m.parameters())  # noqa: E731
    assert norm(b) < norm(a)


# ============================================================================ loss_fn / extra

def _soft_kl(logits, y, soft):
    return F.kl_div(F.log_softmax(logits, dim=1), soft, reduction="batchmean")


def test_distillation_with_soft_labels(data):
    x, y, x_test, _ = data
    teacher, _ = _train(data, epochs=10, batch_size=16, seed=1, lr=1e-2)
    soft = predict_proba(teacher, x)
    student = MLP(D, K, (12,))
    h = train_model(student, x, y, loss_fn=_soft_kl, extra=(soft,),
                    config=TrainConfig(epochs=15, batch_size=16, lr=1e-2, seed=2, **QUIET))
    assert h.train_loss[-1] < 0.1 * h.train_loss[0]
    agree = (predict_logits(student, x_test).argmax(1) ==
             predict_logits(teacher, x_test).argmax(1)).double().mean()
    assert agree > 0.85


def test_extra_rows_follow_x_and_a_single_tensor_is_accepted(data):
    x, y, _, _ = data
    row_ids = torch.arange(x.shape[0])
    seen = []

    def loss_fn(logits, y_batch, ids):
        # the extra tensor is indexed like x and y: ids name the rows of this batch
        assert torch.equal(y_batch, y[ids])
        seen.append(ids.clone())
        return F.cross_entropy(logits, y_batch)

    train_model(MLP(D, K, HIDDEN), x, y, config=TrainConfig(epochs=2, batch_size=64, **QUIET),
                loss_fn=loss_fn, extra=row_ids)
    epoch1 = torch.cat(seen[:4])
    assert [len(s) for s in seen[:4]] == [64, 64, 64, 11]
    assert torch.equal(epoch1.sort().values, row_ids)


def test_custom_loss_without_extra(data):
    _, h = _train(data, loss_fn=lambda logits, y: F.cross_entropy(logits, y, label_smoothing=0.1))
    assert len(h.train_loss) == 3


# ============================================================================ divergence

def test_nan_loss_raises_naming_the_epoch(data):
    x, y, _, _ = data
    calls = []

    def goes_nan_in_epoch_2(logits, y_batch):
        calls.append(1)
        loss = F.cross_entropy(logits, y_batch)
        return loss * float("nan") if len(calls) > 7 else loss  # 7 batches per epoch

    with pytest.raises(FloatingPointError, match="mean training loss of epoch 2 is nan"):
        train_model(MLP(D, K, HIDDEN), x, y,
                    config=TrainConfig(epochs=5, batch_size=32, **QUIET),
                    loss_fn=goes_nan_in_epoch_2)
    assert len(calls) == 14  # stopped after epoch 2, not trained on


def test_a_divergence_in_an_epochs_last_step_is_a_divergence(data):
    """Each batch's loss is taken before its step: the last step of an epoch can leave NaN
    weights (or finite ones whose logits overflow) behind a finite epoch loss. The accuracy
    that followed blamed the model (a ValueError, exit 2 in `oni run`)."""
    x, y, _, _ = data

    def infinite_gradient(logits, y_batch):  # value: the cross-entropy; gradient: inf
        return F.cross_entropy(logits, y_batch) + (logits - logits.detach()).abs().sqrt().sum()

    with pytest.raises(FloatingPointError, match=r"the last step of epoch 1 left NaN or Inf in "
                                                 r"'\d\.(weight|bias)'"):
        train_model(MLP(D, K, HIDDEN), x, y, loss_fn=infinite_gradient,
                    config=TrainConfig(epochs=3, batch_size=len(x), **QUIET))
    with pytest.raises(FloatingPointError, match=r"after epoch 1 the model's logits at row \d+ "
                                                 r"of x are NaN or beyond float32's range"):
        train_model(MLP(D, K, HIDDEN), x, y,
                    config=TrainConfig(epochs=3, batch_size=len(x), lr=1e30, **QUIET))


def test_exploding_lr_raises(data):
    x, y, _, _ = data
    with pytest.raises(FloatingPointError, match=r"epoch \d+ is (nan|inf)"):
        train_model(MLP(D, K, HIDDEN), x * 1e18, y,
                    config=TrainConfig(epochs=20, batch_size=32, lr=1e6, **QUIET))


# ============================================================================ bad input

@pytest.mark.parametrize("field, value, error", [
    ("epochs", 0, ValueError), ("epochs", 2.0, TypeError),
    ("batch_size", 0, ValueError), ("batch_size", True, TypeError),
    ("lr", 0.0, ValueError), ("lr", -1e-3, ValueError), ("lr", float("nan"), ValueError),
    ("lr", "1e-3", TypeError), ("weight_decay", -0.1, ValueError),
    ("lr", 1e38, ValueError), ("weight_decay", 1e308, ValueError),  # Adam overflows float32
    ("seed", -1, ValueError), ("seed", 0.5, TypeError),
    ("device", 3, TypeError), ("device", "nonsense", ValueError),
    ("progress", "yes", TypeError),
])
def test_config_rejects_bad_values(field, value, error):
    with pytest.raises(error, match=f"config.{field}"):
        TrainConfig(**{field: value})


def test_config_is_checked_again_when_used(data):
    x, y, _, _ = data
    config = TrainConfig(**QUIET)
    config.epochs = -3
    with pytest.raises(ValueError, match="config.epochs must be >= 1"):
        train_model(MLP(D, K, HIDDEN), x, y, config=config)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train_model(MLP(D, K, HIDDEN), x, y, config={"epochs": 1})


def test_rows_that_overflow_the_models_dtype_are_named(data):
    """float64 rows past float32's range were reported as a divergence ("lower config.lr"),
    and x_test's overflowing logits were blamed on x."""
    x, y, x_test, y_test = data
    big = x.double()
    big[3, 1] = 1e300
    with pytest.raises(ValueError, match="x cast to the model's torch.float32 contains NaN"):
        train_model(MLP(D, K, HIDDEN), big, y, config=TrainConfig(**QUIET))
    with pytest.raises(ValueError, match="x_test cast to the model's torch.float32"):
        train_model(MLP(D, K, HIDDEN), x, y, x_test=big[:len(x_test)],
                    y_test=y_test[:len(x_test)], config=TrainConfig(**QUIET))
    loud = x_test.clone()
    loud[0] = 3e38  # finite in float32, but the logits overflow
    model = MLP(D, K, HIDDEN)
    with pytest.raises(FloatingPointError, match="logits at row 0 of x_test"):
        train_model(model, x, y, x_test=loud, y_test=y_test, config=TrainConfig(**QUIET))
    assert not model.training  # eval mode afterwards, also after an error


def test_a_float16_model_is_refused_not_called_diverged(data):
    """Adam in float16 gave an infinite loss at any lr, reported as a divergence."""
    x, y, _, _ = data
    with pytest.raises(TypeError, match="parameters are float16, in which Adam's eps"):
        train_model(MLP(D, K, HIDDEN).half(), x, y, config=TrainConfig(**QUIET))


def _bad_inputs():
    x, y = _data(20, 0)
    bad_x_nan = x.clone()
    bad_x_nan[3, 4] = float("nan")
    bad_x_inf = x.clone()
    bad_x_inf[0, 0] = float("inf")
    bad_x_ninf = x.clone()
    bad_x_ninf[19, 1] = -float("inf")
    return [
        (dict(x=x.numpy()), TypeError, "x must be a torch.Tensor"),
        (dict(x=x[0]), ValueError, r"x must be 2-D \[N, d\]"),
        (dict(x=x.long()), TypeError, "x must be a floating tensor"),
        (dict(x=bad_x_nan), ValueError, r"x contains NaN or Inf \(first at index \[3, 4\]\)"),
        (dict(x=bad_x_inf), ValueError, "x contains NaN or Inf"),
        (dict(x=bad_x_ninf), ValueError, r"x contains NaN or Inf \(first at index \[19, 1\]\)"),
        (dict(x=x[:0], y=y[:0]), ValueError, r"x is empty \(N = 0 rows\)"),
        (dict(x=x[:, :0]), ValueError, "x has no features"),
        (dict(x=x[:, :4]), ValueError, "the model does not accept inputs of width d = 4"),
        (dict(y=y.float()), TypeError, "y must hold integer class indices"),
        (dict(y=y.bool()), TypeError, "y must hold integer class indices"),
        (dict(y=[0] * 20), TypeError, "y must be a torch.Tensor"),
        (dict(y=y[:-1]), ValueError, r"y must be 1-D \[N\] with N = 20"),
        (dict(y=y.clone().fill_(K)), ValueError, rf"y must hold class indices in \[0, {K}\)"),
        (dict(y=y.clone().fill_(-1)), ValueError, r"y must hold class indices in \[0, 3\)"),
        (dict(x_test=x), ValueError, "give both x_test and y_test"),
        (dict(x_test=x[:, :5], y_test=y), ValueError, "x_test must have d = 10 columns"),
        (dict(x_test=x, y_test=y[:3]), ValueError, "y_test must be 1-D"),
        (dict(x_test=x, y_test=y + K), ValueError, r"y_test must hold class indices in \[0, 3\)"),
        (dict(x_test=bad_x_nan, y_test=y), ValueError, "x_test contains NaN"),
        (dict(extra=(torch.ones(20, 2),)), ValueError, "extra is passed to loss_fn only"),
        (dict(extra=(torch.ones(19, 2),), loss_fn=_soft_kl), ValueError,
         r"extra\[0\] must have N = 20 rows"),
        (dict(extra=(torch.ones(20, 2), "soft"), loss_fn=_soft_kl), TypeError,
         r"extra\[1\] must be a torch.Tensor"),
        (dict(extra=torch.full((20, 3), float("nan")), loss_fn=_soft_kl), ValueError,
         r"extra\[0\] contains NaN"),
        (dict(extra={"soft": 1}, loss_fn=_soft_kl), TypeError, "extra must be a tensor or a tuple"),
        (dict(loss_fn="ce"), TypeError, "loss_fn must be callable"),
        (dict(loss_fn=lambda logits, y: F.cross_entropy(logits, y, reduction="none")),
         ValueError, r"loss_fn must return a scalar tensor, got \(\d+,\)"),
        (dict(loss_fn=lambda logits, y: torch.tensor(1.0)), ValueError, "no grad"),
        (dict(model=lambda z: z), TypeError, "model must be an nn.Module"),
        (dict(model=nn.ReLU()), ValueError, "model has no parameters"),
        (dict(model=nn.Sequential(nn.Linear(D, K), nn.BatchNorm1d(K))), TypeError,
         "initialises nn.Linear layers only"),
        (dict(x=x.to_sparse()), TypeError, "x must be a dense tensor, got layout "
                                           "torch.sparse_coo"),
        (dict(x=x.to("meta")), ValueError, "x is on the meta device"),
        (dict(y=y.to("meta")), TypeError, "y must be a dense tensor with values"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_train_rejects_bad_inputs_naming_the_argument(case):
    changes, error, match = _bad_inputs()[case]
    x, y = _data(20, 0)
    kwargs = dict(model=MLP(D, K, HIDDEN), x=x, y=y, config=TrainConfig(epochs=1, **QUIET))
    kwargs.update(changes)
    with pytest.raises(error, match=match):
        train_model(kwargs.pop("model"), kwargs.pop("x"), kwargs.pop("y"), **kwargs)


def test_float64_model_trains_on_float32_inputs(data):
    model = MLP(D, K, HIDDEN).double()
    _, h = _train(data, model=model, epochs=2)
    assert model[0].weight.dtype == torch.float64 and len(h.epochs) == 2


# ============================================================================ progress

def test_progress_bar_with_tqdm(data, capsys):
    pytest.importorskip("tqdm")
    x, y, _, _ = data
    train_model(MLP(D, K, HIDDEN), x, y, config=TrainConfig(epochs=2, device="cpu"))
    err = capsys.readouterr().err
    assert "train" in err and "2/2" in err and "loss=" in err


def test_progress_fallback_without_tqdm(data, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "_tqdm_class", lambda: None)
    x, y, x_test, y_test = data
    train_model(MLP(D, K, HIDDEN), x, y, config=TrainConfig(epochs=45, device="cpu"),
                x_test=x_test, y_test=y_test)
    lines = capsys.readouterr().err.strip().splitlines()
    assert 15 <= len(lines) <= 25  # every few epochs, not every epoch
    assert lines[-1].startswith("train: epoch 45/45 loss ") and "test_acc" in lines[-1]


def test_no_output_when_progress_is_off(data, capsys):
    _train(data, epochs=2)
    assert capsys.readouterr() == ("", "")


# ============================================================================ devices

def test_auto_device(data):
    model = MLP(D, K, HIDDEN)
    x, y, _, _ = data
    train_model(model, x, y, config=TrainConfig(epochs=1, device="auto", progress=False))
    assert model[0].weight.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_requested_without_cuda(data):
    x, y, _, _ = data
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_model(MLP(D, K, HIDDEN), x, y, config=TrainConfig(device="cuda", progress=False))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda(data):
    x, y, x_test, y_test = data
    config = TrainConfig(epochs=6, batch_size=16, seed=3, device="cuda", progress=False)
    gpu = MLP(D, K, HIDDEN)
    h = train_model(gpu, x, y, config=config, x_test=x_test, y_test=y_test)
    assert gpu[0].weight.is_cuda and h.train_acc[-1] > 0.7
    again = MLP(D, K, HIDDEN)
    train_model(again, x, y, config=config)
    for p, q in zip(gpu.parameters(), again.parameters()):
        torch.testing.assert_close(p, q)  # reproducible per seed
    cpu = MLP(D, K, HIDDEN)
    train_model(cpu, x, y, config=TrainConfig(epochs=6, batch_size=16, seed=3, **QUIET))
    for p, q in zip(gpu.parameters(), cpu.parameters()):  # same init and batch order
        torch.testing.assert_close(p.cpu(), q, atol=1e-3, rtol=1e-3)
    out = predict_proba(gpu, x_test)  # CPU inputs, model on the GPU
    assert out.device.type == "cpu" and out.dtype == torch.float32


# ============================================================================ prediction

@pytest.fixture(scope="module")
def trained(data):
    model, _ = _train(data, epochs=4)
    return model


def test_predict_logits_and_proba(trained, data):
    _, _, x_test, _ = data
    logits = predict_logits(trained, x_test)
    with torch.no_grad():
        expected = trained(x_test)
    assert logits.shape == (100, K) and logits.dtype == torch.float32
    assert logits.device.type == "cpu" and not logits.requires_grad
    assert torch.equal(logits, expected)
    small_batches = predict_logits(trained, x_test, batch_size=7)
    torch.testing.assert_close(small_batches, logits)
    proba = predict_proba(trained, x_test, batch_size=33)
    torch.testing.assert_close(proba, torch.softmax(expected, 1))
    torch.testing.assert_close(proba.sum(1), torch.ones(100))
    with pytest.raises(ValueError, match=f"the model's first layer takes {D} features, x has "
                                         f"d = {D - 1}"):
        predict_logits(trained, x_test[:, 1:])


def test_predict_uses_eval_mode_and_restores_the_mode(data):
    x, _, _, _ = data
    model = nn.Sequential(nn.Linear(D, 32), nn.Dropout(0.9), nn.Linear(32, K)).train()
    a = predict_logits(model, x)
    b = predict_logits(model, x)
    assert torch.equal(a, b)  # no dropout
    assert model.training


def test_predict_float64_model_returns_float32_and_empty_input(data):
    _, _, x_test, _ = data
    model = MLP(D, K, HIDDEN).double().eval()
    out = predict_proba(model, x_test)
    assert out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, torch.softmax(model(x_test.double()), 1).float())
    assert predict_logits(model, x_test[:0]).shape == (0, K)


def test_predict_accepts_functions(data):
    _, _, x_test, _ = data
    w = torch.randn(D, K)
    out = predict_logits(lambda z: z @ w, x_test, batch_size=10)
    torch.testing.assert_close(out, x_test @ w)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x="rows"), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(3)), ValueError, "x must be 2-D"),
    (dict(x=torch.ones(3, D, dtype=torch.int32)), TypeError, "x must be a floating tensor"),
    (dict(x=torch.full((3, D), float("nan"))), ValueError, "x contains NaN"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(model="model"), TypeError, "model must be an nn.Module or a function"),
    (dict(model=lambda z: z[:, 0]), ValueError, r"logits \[n, k\], got \(5,\)"),
    (dict(model=torch.nn.Linear), TypeError, "got the class Linear"),
    (dict(model=torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(D + 1, 3))),
     RuntimeError, r"the model failed on x of shape \(5, \d+\) \(rows 0 to 4\)"),
    (dict(model=lambda z: z[:, :len(z)], batch_size=3), ValueError,
     "the model returned 2 logit columns for x's rows from 3 but 3 for the rows before"),
])
def test_predict_rejects_bad_inputs(trained, kwargs, error, match):
    args = dict(model=trained, x=torch.zeros(5, D))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        predict_logits(args.pop("model"), args.pop("x"), **args)


@pytest.mark.parametrize("broken, error, match", [
    (lambda out, z: out * float("nan"), ValueError, "logits at row 0 of x are NaN"),
    (lambda out, z: torch.where(z[:, :1] == 6, float("inf"), out), ValueError,
     "logits at row 6 of x are NaN or beyond float32's range"),  # in the second batch
    (lambda out, z: out.double() * 1e300, ValueError, "beyond float32's range"),
    (lambda out, z: out[:, :0], ValueError, "k = 0 columns"),
    (lambda out, z: out > 0, TypeError, "real floating logits, got torch.bool"),
    (lambda out, z: out.to(torch.complex64), TypeError, "got torch.complex64"),
])
def test_predict_and_accuracy_refuse_what_no_classifier_returns(trained, broken, error, match):
    """A NaN row's argmax is class 0 and its softmax NaN: a broken model was scored 100%
    accurate on class-0 rows, and its probabilities came back NaN without a word."""
    x = torch.zeros(9, D)
    x[:, 0] = torch.arange(9.0)  # the row's index, for the model that breaks on one row

    def model(z):
        return broken(trained(z), z)

    for call in (lambda: predict_logits(model, x, batch_size=4),
                 lambda: predict_proba(model, x, batch_size=4),
                 lambda: accuracy(model, x, torch.zeros(9).long(), batch_size=4)):
        with pytest.raises(error, match=match):
            call()


def test_predict_refuses_a_model_on_the_meta_device(data):
    with torch.device("meta"):
        skeleton = MLP(D, K, (4,))
    with pytest.raises(ValueError, match="model is on the meta device"):
        predict_proba(skeleton, torch.zeros(2, D))


def test_predict_refuses_x_that_overflows_the_models_dtype(trained):
    x = torch.zeros(3, D, dtype=torch.float64)
    x[1, 2] = 1e300  # finite in float64, inf in the float32 model
    with pytest.raises(ValueError, match=r"x cast to the model's torch\.float32 contains NaN or "
                                         r"Inf \(first at index \[1, 2\]\)"):
        predict_logits(trained, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_predict_rejects_a_device_the_model_is_not_on(trained):
    with pytest.raises(ValueError, match="the model is on cpu"):
        predict_logits(trained, torch.zeros(2, D), device="cuda")


def test_accuracy(trained, data):
    _, _, x_test, y_test = data
    with torch.no_grad():
        expected = (trained(x_test).argmax(1) == y_test).double().mean().item()
    assert accuracy(trained, x_test, y_test) == expected
    assert accuracy(trained, x_test, y_test, batch_size=9) == expected
    assert accuracy(lambda z: torch.eye(K)[y_test], x_test, y_test) == 1.0
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 3\)"):
        accuracy(trained, x_test, y_test + 1)
    with pytest.raises(ValueError, match="x is empty"):
        accuracy(trained, x_test[:0], y_test[:0])
    with pytest.raises(ValueError, match=r"y must be 1-D \[N\] with N = 100"):
        accuracy(trained, x_test, y_test[:5])


# ============================================================================ robustness

def test_inputs_with_requires_grad_are_left_untouched(data):
    """x, x_test and extra with requires_grad got a .grad (and a graph through them) from
    training; they are now used detached, with the same result."""
    x, y, x_test, y_test = data
    soft = torch.softmax(torch.randn(len(x), K, generator=torch.Generator().manual_seed(0)), 1)
    kwargs = dict(loss_fn=_soft_kl, x_test=x_test, y_test=y_test)
    plain, _ = _train(data, extra=soft, **kwargs)
    xg, xg_test, soft_g = (t.clone().requires_grad_() for t in (x, x_test, soft))
    model = MLP(D, K, HIDDEN)
    train_model(model, xg, y, config=TrainConfig(epochs=3, batch_size=32, **QUIET),
                extra=soft_g, loss_fn=_soft_kl, x_test=xg_test, y_test=y_test)
    assert xg.grad is None and xg_test.grad is None and soft_g.grad is None
    assert _params_equal(model, plain)


@pytest.mark.parametrize("case", ["y", "y_test", "mixed dtypes", "meta"])
def test_a_refused_call_leaves_the_model_as_it_was(case, data):
    """The model was re-initialised (and moved) before the label checks refused the call;
    a model mixing float32 and float64 layers was said not to accept x's width."""
    x, y, x_test, y_test = data
    model = MLP(D, K, HIDDEN)
    kwargs = dict(x_test=x_test, y_test=y_test)
    if case == "y":
        y = y + K
        error, match = ValueError, rf"^y must hold class indices in \[0, {K}\)"
    elif case == "y_test":
        kwargs["y_test"] = y_test + K
        error, match = ValueError, rf"^y_test must hold class indices in \[0, {K}\)"
    elif case == "mixed dtypes":
        model[2].double()
        error, match = TypeError, (r"^model mixes parameter dtypes "
                                   r"\['torch.float32', 'torch.float64'\]")
    else:
        model.to("meta")
        error, match = ValueError, "^model is on the meta device"
    before = [(p.device, p.dtype, p.detach().clone()) for p in model.parameters()]
    with pytest.raises(error, match=match):
        train_model(model, x, y, config=TrainConfig(epochs=1, **QUIET), **kwargs)
    after = [(p.device, p.dtype, p.detach()) for p in model.parameters()]
    assert [b[:2] for b in before] == [a[:2] for a in after]
    if case != "meta":
        assert all(torch.equal(b[2], a[2]) for b, a in zip(before, after))


class _NaNWhereNegative(nn.Module):
    """Logits NaN on the rows whose first feature is negative, from the start."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(D, K)

    def forward(self, x):
        return self.linear(x) * torch.sqrt(x[:, :1])


def test_nan_logits_before_any_step_are_the_models_not_a_divergence(data):
    """They were reported as "training diverged ... Lower config.lr"."""
    x, y, _, _ = data
    with pytest.raises(ValueError, match=r"^the model's outputs at row (\d+) of x are NaN or "
                                         r"Inf before any training step") as caught:
        train_model(_NaNWhereNegative(), x, y, config=TrainConfig(epochs=2, **QUIET))
    row = int(re.search(r"row (\d+) of x", str(caught.value)).group(1))
    assert x[row, 0] < 0
