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
name=equal_walks
if [[ "${1:-}" == "quick" ]]; then sizes=(600); select=(-k d600); name=equal_walks_quick; fi

# a quick run writes its own files: the full run's are kept
ONI_BENCH_SUMMARY=".benchmarks/${name}_summary.json" \
python -m pytest benchmarks/test_bench_shapley.py -p no:cacheprovider --benchmark-only \
    --benchmark-columns=min,median,max,rounds --benchmark-sort=min \
    --benchmark-json=".benchmarks/${name}.json" "${select[@]}"

for d in "${sizes[@]}"; do
    python -m benchmarks.error_vs_time --d "$d" --json ".benchmarks/${name/equal_walks/error_vs_time}_d$d.json"
done
