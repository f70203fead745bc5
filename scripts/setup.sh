#!/usr/bin/env bash
# Set up oni from nothing: a virtual environment (.venv, or $ONI_VENV), torch, the test
# tools, and the compiled extension. Safe to re-run; it reuses what is already there.
#   ONI_TORCH_SPEC   torch requirement to install when the venv has none (default torch==2.14.1)
#   ONI_FORCE_CUDA=1 / ONI_FORCE_CPU=1   passed through to setup.py (see README, "Build")
#   ONI_CONSTRAINTS  pip constraints for the other packages (default scripts/constraints.txt,
#                    the versions CI passed with; /dev/null for the newest)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${ONI_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip setuptools wheel
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${ONI_TORCH_SPEC:-torch==2.14.1}"
  python -m pip install --quiet "${ONI_TORCH_SPEC:-torch==2.14.1}"
fi
constraints="${ONI_CONSTRAINTS:-scripts/constraints.txt}"  # the versions CI passed with
echo "[setup] installing build and test tools (versions: $constraints)"
python -m pip install --quiet -c "$constraints" numpy ninja pytest scipy captum shap \
  "opacus>=1.5" safetensors
echo "[setup] building the extension (torch $(python -c 'import torch; print(torch.__version__)'))"
log="$(mktemp)"
if ! python -m pip install -v --no-build-isolation -c "$constraints" -e . >"$log" 2>&1; then
  tail -n 60 "$log"
  echo "[setup] building the extension failed (full log: $log)" >&2
  exit 1
fi
grep -E "\[oni setup\]" "$log" | sort -u || true
rm -f "$log"
python -c "import oni; print('[setup] oni.build_info():', oni.build_info())"
