#!/usr/bin/env bash
# One command from a fresh clone: set everything up, then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${ONI_VENV:-.venv}/bin/activate"
python -m pytest tests "$@"
