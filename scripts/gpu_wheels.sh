#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the wheels the GPU benchmarks need that the lent GPU
# machine's image lacks, into .whl/ (git-ignored). Carry .whl with the device call;
# scripts/gpu_check.sh installs what it finds there before it runs anything.
#   captum (the issue's outside baseline, benchmarks/test_bench_gpu.py::test_shapley_gpu_captum):
#   pure Python; its needs (matplotlib, numpy, packaging, torch, tqdm) are in the image.
# The image's Python is 3.12 on x86-64 (/work/.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "captum==0.9.0"
ls -l .whl
