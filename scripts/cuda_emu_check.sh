#!/usr/bin/env bash
# The CUDA kernels of csrc/cuda/*.cu, run on the CPU under the emulation of tests/cuda_emu
# (README there): builds the emulation library with g++, then runs the tests that call the
# kernels, with the emulated CUDA kernels in place of the CPU ones. No GPU needed; needs oni
# installed (scripts/setup.sh). Extra arguments go to pytest.
# ONI_CUDA_EMU_ASAN=1: the emulation built with AddressSanitizer, python run with libasan
# preloaded, so a kernel's access outside any allocation aborts the run with a report.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${ONI_VENV:-.venv}/bin/activate"
start=$(date +%s)
if [[ "${ONI_CUDA_EMU_ASAN:-0}" == 1 ]]; then
  python tests/cuda_emu/build.py  # built before libasan is preloaded into every process
  # libstdc++ too: ASan resolves __cxa_throw at start-up, and python itself does not load it
  export LD_PRELOAD="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libstdc++.so.6)"
  # python and torch leak by design at exit, and their own code is not instrumented
  # (tests that ask for more memory than exists expect an error, not an abort)
  export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1"
fi
op_tests=(tests/test_cuda_emu.py tests/test_cuda_ops.py tests/test_ops.py tests/test_ops_adam.py
          tests/test_ops_dispatch.py tests/test_ops_relu_bf16.py tests/test_ops_sparse_linear.py)
echo "[cuda-emu] op tests, the solvers' tests; threads run first to last between barriers"
ONI_CUDA_EMULATION=1 python -m pytest -p no:cacheprovider "${op_tests[@]}" tests/test_noise.py \
  tests/test_shapley.py "$@"
# A missing __syncthreads between a write and another thread's read gives the right answer in
# one order of the threads only (tests/cuda_emu/README.md): the op tests again, last to first.
echo "[cuda-emu] op tests; threads run last to first between barriers"
ONI_CUDA_EMULATION=1 ONI_CUDA_EMU_ORDER=reverse python -m pytest -p no:cacheprovider \
  "${op_tests[@]}" "$@"
# A warp that runs ahead of the others through its shuffles (a shared buffer reused without a
# __syncthreads between two block reductions) is seen only when each warp runs alone.
echo "[cuda-emu] op tests; each warp alone through its shuffles, turns reversed at barriers"
ONI_CUDA_EMULATION=1 ONI_CUDA_EMU_ORDER=warps python -m pytest -p no:cacheprovider \
  "${op_tests[@]}" "$@"
echo "[cuda-emu] done in $(( $(date +%s) - start )) s"
