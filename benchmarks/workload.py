"""The benchmark workload: a trained Purchase-shaped MLP and the inputs it explains.

* Data: seeded synthetic data with Purchase100's shape (binary features, 100 classes). Each
  class has a prototype: a random tenth of the features are "hot" (on with probability
  ``P_HOT`` = 0.3), the rest are on with probability ``P_COLD`` (~0.078), so about 10% of a
  row is ones; overlapping classes make it about as hard as Purchase100 (test accuracy
  ~0.7 at d = 600).
* Model: the paper's MLP ``d -> 1024 -> 512 -> 256 -> 128 -> 100`` (ReLU) as an
  ``nn.Sequential`` starting with ``nn.Linear``, so oni takes its incremental first-layer
  path. Trained a few epochs with Adam (lr 1e-3) so its predictions are confident: a
  random-init MLP is nearly flat (every class near p = 0.01, phi near 1e-6) and hides errors.
  The trained ``state_dict`` is cached under ``.benchmarks/`` keyed by the config.
* Explained inputs: Bernoulli(0.1) rows (seeded, independent of the training data), zero
  baseline, explained class = the model's predicted class (softmax probability): oni's
  default game ``oni.shapley_values(model, x)``.
* Reference: oni's kernel backend with many antithetic walks (20,000 at d = 600, 5,000 at
  d = 6170) and a seed disjoint from every estimate it is compared with, plus a plain-walk
  pilot that measures the per-walk variance; cached per row under ``.benchmarks/``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "CONFIGS", "WorkloadConfig", "config_for", "purchase_like", "explained_inputs",
    "build_mlp", "trained_model", "training_info", "predicted", "check_confident",
    "Reference", "reference", "relative_error", "Bench", "bench", "provenance",
    "shadow_workload",
]

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".benchmarks" / "workload"

N_CLASSES = 100
HIDDEN = (1024, 512, 256, 128)
INPUT_DENSITY = 0.1
HOT_FRACTION = 0.1
P_HOT = 0.3
P_COLD = (INPUT_DENSITY - HOT_FRACTION * P_HOT) / (1 - HOT_FRACTION)  # mean density 0.1
REFERENCE_WALKS = 20_000
PILOT_WALKS = 2_000
REFERENCE_SEED = 1_000_003  # disjoint from the seeds of the estimates (0, 1, 2, ...)


@dataclass(frozen=True)
class WorkloadConfig:
    """Everything that determines the trained model (the cache key)."""

    d: int = 600
    n_classes: int = N_CLASSES
    hidden: Tuple[int, ...] = HIDDEN
    n_train: int = 20_000
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    p_hot: float = P_HOT
    p_cold: float = P_COLD
    hot_fraction: float = HOT_FRACTION

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return f"mlp_d{self.d}_{hashlib.sha256(blob).hexdigest()[:12]}"


#: the two benchmark sizes: Purchase100's d = 600 and Texas100's d = 6170
CONFIGS = {
    600: WorkloadConfig(d=600, n_train=20_000, epochs=5),
    6170: WorkloadConfig(d=6170, n_train=10_000, epochs=3),
}


def config_for(d: int) -> WorkloadConfig:
    if d not in CONFIGS:
        raise ValueError(f"no benchmark workload for d = {d}; known sizes: {sorted(CONFIGS)}")
    return CONFIGS[d]


# ----------------------------------------------------------------------------- data

def class_prototypes(cfg: WorkloadConfig) -> Tensor:
    """``[n_classes, d]`` per-class Bernoulli probabilities (seeded by ``cfg.seed``)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n_hot = max(1, round(cfg.hot_fraction * cfg.d))
    scores = torch.rand((cfg.n_classes, cfg.d), generator=gen)
    hot = scores.argsort(dim=1)[:, :n_hot]
    probs = torch.full((cfg.n_classes, cfg.d), cfg.p_cold)
    probs.scatter_(1, hot, cfg.p_hot)
    return probs


def purchase_like(cfg: WorkloadConfig, n: int, seed: int) -> Tuple[Tensor, Tensor]:
    """``n`` labelled rows ``(x [n, d] float32 in {0, 1}, y [n] int64)`` around the prototypes."""
    probs = class_prototypes(cfg)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(cfg.n_classes, (n,), generator=gen)
    x = torch.bernoulli(probs[y], generator=gen)
    return x, y


def explained_inputs(d: int, n: int, seed: int = 12345) -> Tensor:
    """``[n, d]`` float32 Bernoulli(0.1) rows: the inputs every tool explains."""
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, d), INPUT_DENSITY), generator=gen)


# ----------------------------------------------------------------------------- model

def build_mlp(d: int, n_classes: int = N_CLASSES, hidden: Tuple[int, ...] = HIDDEN) -> nn.Sequential:
    """The paper's MLP as an ``nn.Sequential`` (first module ``nn.Linear``)."""
    layers = []
    width = d
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def _train(cfg: WorkloadConfig, verbose: bool) -> Tuple[nn.Sequential, dict]:
    torch.manual_seed(cfg.seed)
    model = build_mlp(cfg.d, cfg.n_classes, cfg.hidden)
    x, y = purchase_like(cfg, cfg.n_train, seed=cfg.seed + 1)
    x_test, y_test = purchase_like(cfg, 2_000, seed=cfg.seed + 2)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(cfg.n_train, generator=gen)
        for lo in range(0, cfg.n_train, cfg.batch_size):
            idx = order[lo:lo + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if verbose:
            print(f"[workload] d={cfg.d} epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.3f}",
                  flush=True)
    model.eval()
    with torch.no_grad():
        train_acc = (model(x).argmax(1) == y).float().mean().item()
        test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    info = {"train_seconds": time.perf_counter() - start, "train_acc": train_acc,
            "test_acc": test_acc}
    return model, info


def trained_model(d: int, verbose: bool = True) -> nn.Sequential:
    """The trained benchmark MLP for width ``d`` (eval mode), from the cache or trained now."""
    cfg = config_for(d)
    path = CACHE_DIR / f"{cfg.key()}.pt"
    model = build_mlp(cfg.d, cfg.n_classes, cfg.hidden)
    blob = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    if blob is not None and blob.get("config") == asdict(cfg):
        model.load_state_dict(blob["state_dict"])
    else:  # none yet, or saved for other settings under this key: trained (again)
        model, info = _train(cfg, verbose)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "config": asdict(cfg), "info": info}, path)
        if verbose:
            print(f"[workload] trained d={d} in {info['train_seconds']:.1f} s: train acc "
                  f"{info['train_acc']:.3f}, test acc {info['test_acc']:.3f} -> {path}",
                  flush=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def training_info(d: int) -> dict:
    """Accuracy and training time stored with the cached model (trains it if needed)."""
    cfg = config_for(d)
    trained_model(d, verbose=False)
    return torch.load(CACHE_DIR / f"{cfg.key()}.pt", map_location="cpu",
                      weights_only=True)["info"]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, dtypes, shapes, values): what a
    cached reference was computed for."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def predicted(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(predicted class [N], its softmax probability [N]): the explained class and ``v(N)``."""
    with torch.no_grad():
        p = torch.softmax(model(x).double(), dim=1)
    conf, cls = p.max(dim=1)
    return cls, conf


def check_confident(model: nn.Module, x: Tensor, floor: float = 0.1) -> None:
    """Fails loudly when the model is too flat for errors to show (median top prob <= floor)."""
    _, conf = predicted(model, x)
    median = conf.median().item()
    if not median > floor:
        raise RuntimeError(f"benchmark model is nearly flat: median max softmax probability "
                           f"{median:.4f} on the explained inputs (need > {floor}); retrain")


# ----------------------------------------------------------------------------- reference

@dataclass
class Reference:
    """High-walk oni estimate used as ground truth, plus a pilot of plain (non-antithetic)
    walks that measures the per-walk variance of plain permutation sampling."""

    values: Tensor  # [N, d] float64, antithetic walks
    stderr: Tensor  # [N, d] float64, standard error of values
    walks: int
    plain_stderr: Tensor  # [N, d] float64, standard error of a plain-walk pilot
    plain_walks: int
    seconds: float

    def relative_noise(self) -> Tensor:
        """[N] the reference's own expected relative L2 error, sqrt(sum stderr^2) / ||phi||."""
        return self.stderr.norm(dim=1) / self.values.norm(dim=1)

    def predicted_error(self, walks: int, antithetic: bool) -> Tensor:
        """[N] expected ``||phi_M - phi_ref|| / ||phi_ref||`` of an unbiased permutation
        estimate with ``walks`` walks (pairs of antithetic walks, or plain walks), measured
        against this reference: the estimate's sampling error and the reference's own,
        added in quadrature. Sampling variance scales as 1 / walks, so it is the measured
        variance of the reference (antithetic) or the pilot (plain) rescaled."""
        norm = self.values.norm(dim=1)
        if antithetic:
            own = self.stderr.norm(dim=1) * math.sqrt(self.walks / walks)
        else:
            own = self.plain_stderr.norm(dim=1) * math.sqrt(self.plain_walks / walks)
        return (own.square() + self.stderr.norm(dim=1).square()).sqrt() / norm


def reference(model: nn.Module, d: int, x: Tensor, input_seed: int, walks: int = REFERENCE_WALKS,
              plain_walks: int = PILOT_WALKS, verbose: bool = True) -> Reference:
    """oni's kernel backend with ``walks`` antithetic walks per row (and a plain-walk pilot of
    ``plain_walks``), cached one file per row keyed by model, input seed, row and walks, so
    asking for more rows later reuses the ones already computed."""
    import oni

    cfg = config_for(d)
    # what each cached row was computed for besides its file name's keys: a model retrained
    # under the same key, or another reference seed, makes it stale
    made_for = {"model": model_fingerprint(model), "reference_seed": REFERENCE_SEED}
    values, errs, plain, secs = [], [], [], 0.0
    for i in range(x.shape[0]):
        path = CACHE_DIR / f"ref_{cfg.key()}_in{input_seed}_row{i}_w{walks}_p{plain_walks}.pt"
        blob = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
        if blob is not None and not torch.equal(blob["x"], x[i]):
            raise RuntimeError(f"cached reference {path} was computed for another input")
        if blob is not None and blob.get("made_for") != made_for:
            if verbose:
                print(f"[reference] {path.name} was computed for another model or seed: "
                      f"recomputing", flush=True)
            blob = None
        if blob is None:
            start = time.perf_counter()
            res = oni.shapley_values(model, x[i:i + 1], n_permutations=walks,
                                     seed=REFERENCE_SEED, backend="kernel")
            pilot = oni.shapley_values(model, x[i:i + 1], n_permutations=plain_walks,
                                       antithetic=False, seed=REFERENCE_SEED + 1,
                                       backend="kernel")
            blob = {"x": x[i].clone(), "values": res.values[0].double(),
                    "stderr": res.stderr[0].double(), "plain_stderr": pilot.stderr[0].double(),
                    "seconds": time.perf_counter() - start, "made_for": made_for}
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            torch.save(blob, path)
            if verbose:
                print(f"[reference] d={d} row {i}: {walks} + {plain_walks} walks in "
                      f"{blob['seconds']:.1f} s", flush=True)
        values.append(blob["values"])
        errs.append(blob["stderr"])
        plain.append(blob["plain_stderr"])
        secs += blob["seconds"]
    return Reference(torch.stack(values), torch.stack(errs), walks, torch.stack(plain),
                     plain_walks, secs)


def relative_error(phi: Tensor, ref: Tensor) -> Tensor:
    """[N] ``||phi - ref||_2 / ||ref||_2`` per row."""
    phi = torch.as_tensor(phi, dtype=torch.float64)
    return (phi - ref).norm(dim=1) / ref.norm(dim=1)


# ----------------------------------------------------------------------------- one size

INPUT_SEED = 12345
#: reference walks per size (20,000 at d = 600; fewer at d = 6170, where a walk is 10x
#: longer: its own relative noise is printed with every table)
REFERENCE_WALKS_BY_D = {600: REFERENCE_WALKS, 6170: 5_000}
PILOT_WALKS_BY_D = {600: PILOT_WALKS, 6170: 1_000}


@dataclass
class Bench:
    """Everything a benchmark at one size needs: model, inputs, game and reference."""

    d: int
    model: nn.Sequential
    x: Tensor  # [N, d] float32 explained inputs
    classes: Tensor  # [N] explained (predicted) classes
    fx: Tensor  # [N] v(N): probability of the explained class at x
    game_gap: Tensor  # [N] v(N) - v(empty)
    ref: Reference

    @property
    def n_active(self) -> Tensor:
        return (self.x != 0).sum(1)


def bench(d: int, n_inputs: int, verbose: bool = True) -> Bench:
    """The trained model, the first ``n_inputs`` explained inputs and their reference."""
    model = trained_model(d, verbose=verbose)
    x = explained_inputs(d, n_inputs, seed=INPUT_SEED)
    check_confident(model, x)
    classes, fx = predicted(model, x)
    with torch.no_grad():
        f0 = torch.softmax(model(torch.zeros(1, d)).double(), dim=1)[0, classes]
    ref = reference(model, d, x, INPUT_SEED, walks=REFERENCE_WALKS_BY_D[d],
                    plain_walks=PILOT_WALKS_BY_D[d], verbose=verbose)
    return Bench(d, model, x, classes, fx, fx - f0, ref)


def shadow_workload(n_models: int, rows: int, pool: int = 20_000, d: int = 600):
    """The shadow-training workload (benchmarks/test_bench_shadows.py, and its GPU case in
    test_bench_gpu.py): ``pool`` Purchase-shaped training rows and ``n_models`` index sets of
    ``rows`` rows each, drawn without replacement (seed 2024); model ``j`` gets seed ``j``.

    Returns ``(cfg, x, y, idx [n_models, rows], seeds)``, on the CPU.
    """
    cfg = config_for(d)
    x, y = purchase_like(cfg, pool, seed=cfg.seed + 1)
    gen = torch.Generator().manual_seed(2024)
    idx = torch.stack([torch.randperm(pool, generator=gen)[:rows] for _ in range(n_models)])
    return cfg, x, y, idx, list(range(n_models))


def provenance() -> dict:
    """Machine, versions and the oni source state a measurement was taken with."""
    import datetime
    import os
    import platform
    import subprocess

    def run(*cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu = next((line.split(":", 1)[1].strip() for line in run("lscpu").splitlines()
                if line.startswith("Model name")), platform.processor())
    import oni
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "oni_build": oni.build_info(),
        "git_head": run("git", "rev-parse", "--short", "HEAD"),
        "oni_uncommitted": run("git", "status", "--porcelain", "oni", "csrc", "setup.py"),
    }
