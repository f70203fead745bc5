#!/usr/bin/env bash
# One command from a fresh clone: set everything up (like scripts/test.sh), then run the
# experiment, `oni run`, on the embedded default (synthetic Purchase-shaped data; about 4
# minutes on a 2-core CPU, 6.5 with the set-up). Arguments go to `oni run`, e.g.
#   bash scripts/run.sh --set train.epochs=5 --out runs/short
#   bash scripts/run.sh --preset paper --set data.path=/data/dataset_purchase
# Results: runs/default/ (report.md, results.csv, results.json, figures/); re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${ONI_VENV:-.venv}/bin/activate"
python -m oni.cli run "$@"
