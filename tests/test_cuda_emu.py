"""The CPU emulation of the CUDA kernels (tests/cuda_emu) checked on kernels whose answers or
faults are known (tests/cuda_emu/selftest.cu): warp and block collectives give the right
values, and what a GPU rejects or leaves undefined is reported, not run. Only under
ONI_CUDA_EMULATION=1, where the emulation library is loaded (it replaces the CPU kernels, so
it is never loaded into an ordinary test run)."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import CUDA_EMULATION

pytestmark = pytest.mark.skipif(not CUDA_EMULATION, reason="needs ONI_CUDA_EMULATION=1")


def run(name, blocks=1, threads=32):
    return torch.ops.oni_emu_selftest.run(name, blocks, threads)


@pytest.mark.parametrize("blocks, threads", [(1, 32), (3, 64), (2, 1024)])
def test_collectives_give_the_right_values(blocks, threads):
    out = run("collectives", blocks, threads).view(blocks, 4, threads)
    t = torch.arange(threads)
    warp_sums = (t // 32 * 32 * 32 + 31 * 32 // 2)  # sum of the lane's warp's thread ids
    for b in range(blocks):
        assert torch.equal(out[b, 0], warp_sums), "xor butterfly"
        lane0 = t % 32 == 0
        assert torch.equal(out[b, 1][lane0], warp_sums[lane0]), "shfl_down sum in lane 0"
        assert (out[b, 2] == int(b < threads)).all(), "__syncthreads_or"
        assert torch.equal(out[b, 3], threads - 1 - t), "shared memory across a barrier"


def test_only_the_warps_order_sees_a_warp_run_ahead():
    """A shared buffer reused by two block sums with no __syncthreads between them (the
    CUDA mutation audit's survivor in the projection's block_sum): every thread reads the
    first sum's partials before any warp gets past a shuffle in the forward and reverse
    orders, so the answer is right there; under ONI_CUDA_EMU_ORDER=warps the last warp runs
    ahead and its second partial lands in the first warp's first sum."""
    warps = os.environ.get("ONI_CUDA_EMU_ORDER") == "warps"
    out = run("reused_partials", 1, 64).view(4, 64)
    if warps:  # after the first barrier warp 0 goes first, reads, and runs into round 2
        assert (out[0, :32] == 64).all() and (out[0, 32:] == 3200 + 32).all()
    else:
        assert (out[0] == 64).all()
    assert (out[1] == 6400).all()
    # the other way round: warp 0 overwrites a broadcast that warp 1 has yet to read
    out = run("overwritten_broadcast", 1, 64).view(4, 64)
    if warps:
        assert (out[0, :32] == 32).all() and (out[0, 32:] == 3200).all()
    else:
        assert (out[0] == 32).all()
    assert (out[1] == 3200).all()


def test_dynamic_shared_memory_starts_poisoned():
    assert (run("dynamic_shared", 2, 64)[:64] == -1).all()  # every block writes the same 64


@pytest.mark.parametrize("name, blocks, threads, message", [
    ("divergent_barrier", 1, 32, "different lines"),
    ("missing_lane", 1, 32, "names lane 31 of warp 0 in its mask, but that lane has exited"),
    ("collectives", 1, 48, "names lane 16 of warp 1 in its mask, but that lane does not exist"),
    ("deadlock", 1, 32, "deadlock: 16 threads at __syncthreads, 16 at a warp shuffle"),
    ("bounded", 1, 128, r"128 threads exceed __launch_bounds__\(64\)"),
    ("collectives", 0, 32, "has a zero dimension"),
    ("collectives", 1, 2048, "must hold 1..1024 threads"),
    ("too_much_shared", 1, 32, "exceed 48 KiB"),
])
def test_faults_are_reported_and_the_next_launch_runs(name, blocks, threads, message):
    with pytest.raises(RuntimeError, match=message):
        run(name, blocks, threads)
    assert (run("bounded", 1, 64)[:64] == 1).all()
