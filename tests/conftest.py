import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from helpers import CUDA_EMULATION  # noqa: E402  (helpers lives beside this file)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models, restored afterwards: on a busy 2-core
    machine several threads per op contend for the cores (measured 8-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    # ONI_CUDA_EMULATION=1: the CPU kernels are replaced by the CUDA kernels of csrc/cuda/,
    # run under the CPU emulation of tests/cuda_emu (see its README), so the CPU tests check
    # the CUDA code on a machine without a GPU.
    if CUDA_EMULATION:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emu"))
        import build as cuda_emu_build

        cuda_emu_build.load()
        # every at::empty the kernels' host code allocates comes filled with NaN (integers
        # with their maximum), so an output element a kernel never writes shows up
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True


def pytest_terminal_summary(terminalreporter):
    if CUDA_EMULATION:
        counts = torch.ops.oni_emu_selftest.launch_counts()
        terminalreporter.write_sep("-", "emulated CUDA kernel launches")
        terminalreporter.write(counts or "none\n")
