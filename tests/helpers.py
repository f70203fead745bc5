"""Shared builders for the tests: small models and valid walk inputs."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import oni
from oni import reference
from oni.shapley import _walk_permutations


# ONI_CUDA_EMULATION=1 (tests/cuda_emu/README.md): the CPU kernels have been replaced by the
# CUDA kernels of csrc/cuda/, run under a CPU emulation.
CUDA_EMULATION = os.environ.get("ONI_CUDA_EMULATION") == "1"
only_real_cpu_kernels = pytest.mark.skipif(
    CUDA_EMULATION, reason="needs oni's own CPU kernels, which ONI_CUDA_EMULATION replaces with "
                           "the emulated CUDA ones")


def devices(names=oni._ops.SHAPLEY_OPS):
    """Every device present with kernels compiled for the ops ``names``."""
    out = ["cpu"]
    if torch.cuda.is_available() and oni._ops.has_kernel("cuda", names):
        out.append("cuda")
    return out


def small_mlp(d: int, k: int = 4, hidden=(16, 8), seed: int = 0, scale: float = 2.0,
              dtype=torch.float32) -> nn.Sequential:
    """A random MLP whose outputs are far from flat (scaled init), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    layers, width = [], d
    for h in (*hidden, k):
        lin = nn.Linear(width, h)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(h, width, generator=gen) * scale / width ** 0.5)
            lin.bias.copy_(torch.randn(h, generator=gen) * 0.5)
        layers += [lin, nn.ReLU()]
        width = h
    return nn.Sequential(*layers[:-1]).to(dtype).eval()


# an oni MLP changed so that it is no longer the plain MLP its config builds (save_model and
# the batched shadow models both refuse such a model)
def swap_in_tanh(model):
    model[1] = nn.Tanh()


def drop_first_bias(model):
    model[0].bias = None


class Wrapped(nn.Module):
    """The same network, but not an nn.Sequential: forces the generic masked-input path."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, z):
        return self.net(z)


class ZeroesItsInput(nn.Module):
    """The same outputs as ``net``, but the forward zeroes the tensor it was given once it has
    read it (as a careless in-place preprocessing step would): a caller's x must not be it."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, z):
        out = self.net(z.clone())
        with torch.no_grad():  # allowed on a leaf that requires grad, as the solver's are
            z.zero_()
        return out


def walk_inputs(n: int, d: int, n_refs: int = 1, n_walks: int = 4, *, seed: int = 0,
                density: float = 0.5, device="cpu", dtype=torch.float32, active_counts=None):
    """Random x, baseline [N, B, d], and valid perm/n_active (ragged active counts)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    base = torch.randn(n_refs, d, generator=gen, dtype=dtype)
    if active_counts is not None:
        active = torch.zeros(n, d, dtype=torch.bool)
        for i, a in enumerate(active_counts):
            active[i, torch.randperm(d, generator=gen)[:a]] = True
    else:
        active = torch.rand(n, d, generator=gen) < density
    # inactive features equal every reference
    x = torch.where(active, x, base[0])
    base = torch.where(active[:, None, :], base[None], base[0])  # [N, B, d]
    n_active = active.sum(1)
    active_index = torch.sort((~active).to(torch.uint8), dim=1, stable=True).indices
    length = int(n_active.max()) if n > 0 else 0
    perm = _walk_permutations(seed, torch.arange(n), 0, n_walks, active_index[:, :length],
                              n_active, antithetic=False)
    total = reference.interior_steps(n_active, n_walks, n_refs)
    to = dict(device=device)
    return (x.to(**to), base.to(**to), perm.to(**to), n_active.to(**to), total)
