#!/usr/bin/env bash
# Shapley benchmarks (see BENCHMARKS.md): equal-walks timings, then error vs time.
#   scripts/bench.sh            # both sizes: ~5-8 min suite + ~5 min per size (2-core CPU)
#   scripts/bench.sh quick      # d = 600 only
# Needs: pip install pytest-benchmark shap captum shapiq (tests of missing tools are skipped).
# Trained models and references are cached under .benchmarks/ (the first run trains and
# computes them: ~3 min). On a shared machine: ONI_BENCH_WAIT_IDLE=300 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
mkdir -p .benchmarks

sizes=(600 6170)
select=()
if [[ "${1:-}" == "quick" ]]; then sizes=(600); select=(-k d600); fi

python -m pytest benchmarks/test_bench_shapley.py -p no:cacheprovider --benchmark-only \
    --benchmark-columns=min,median,max,rounds --benchmark-sort=min \
    --benchmark-json=.benchmarks/equal_walks.json "${select[@]}"

for d in "${sizes[@]}"; do
    python -m benchmarks.error_vs_time --d "$d"
done
