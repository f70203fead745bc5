#!/usr/bin/env bash
# The CUDA kernels of csrc/cuda/*.cu, run on the CPU under the emulation of tests/cuda_emu
# (README there): builds the emulation library with g++, then runs the tests that call the
# kernels, with the emulated CUDA kernels in place of the CPU ones. No GPU needed; needs oni
# installed (scripts/setup.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${ONI_VENV:-.venv}/bin/activate"
start=$(date +%s)
ONI_CUDA_EMULATION=1 python -m pytest -p no:cacheprovider \
  tests/test_cuda_emu.py tests/test_cuda_ops.py tests/test_ops.py tests/test_ops_adam.py \
  tests/test_ops_dispatch.py tests/test_ops_relu_bf16.py tests/test_ops_sparse_linear.py \
  tests/test_noise.py tests/test_shapley.py "$@"
echo "[cuda-emu] done in $(( $(date +%s) - start )) s"
