#!/usr/bin/env bash
# GPU check, one command from the repo root on a machine with an NVIDIA GPU:
#   build the extension for the GPU present, print oni.build_info(), run the tests (CUDA ones included),
#   the benchmarks marked `cuda` (if any), compute-sanitizer memcheck + racecheck on
#   scripts/sanitizer_case.py, then a summary table (step, status, seconds).
# Needs: torch (CUDA build) with a matching nvcc, ninja, pytest (pytest-benchmark for the
# benchmarks); no network. Uses the active Python (or .venv when one exists and none is
# active). Keeps going after a failed step; exits non-zero if any step failed. Fits in
# 10 minutes on an H100 (each step is capped; a step with no time left is skipped).
#   ONI_GPU_CHECK_BUDGET  total seconds for all steps (default 570)
#   ONI_GPU_TESTS         the test paths to run (default: tests)
#   ONI_GPU_STEPS         which steps after the build, comma-separated, in this order:
#                         tests, bench, sanitizer (default: all three). A lease too short
#                         for all can split them over two calls, e.g. bench first, then
#                         ONI_GPU_STEPS=tests,sanitizer (the build is kept on a warm machine)
#   TORCH_CUDA_ARCH_LIST  respected when set; otherwise taken from the GPU present
# Wheels in .whl/ (scripts/gpu_wheels.sh fetches them; carry .whl) are installed into a
# temporary folder on PYTHONPATH first: captum, for the outside-baseline benchmark row.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/python ]]; then
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python="${PYTHON:-python}"
budget="${ONI_GPU_CHECK_BUDGET:-570}"
steps=",${ONI_GPU_STEPS:-tests,bench,sanitizer},"
for step in ${steps//,/ }; do
  case "$step" in
    tests|bench|sanitizer) ;;
    *) echo "ONI_GPU_STEPS: unknown step '$step' (expected tests, bench, sanitizer)" >&2; exit 2 ;;
  esac
done
wanted() { [[ "$steps" == *",$1,"* ]]; }
start=$SECONDS
logdir="$(mktemp -d "${TMPDIR:-/tmp}/oni-gpu-check.XXXXXX")"
names=() statuses=() times=()
failed=0
bench_ran=0  # whether this call ran the benchmarks (summary() reads it)

record() {  # name status seconds
  names+=("$1") statuses+=("$2") times+=("$3")
  if [[ "$2" == FAIL* || "$2" == TIMEOUT* ]]; then failed=1; fi
}

# run_step NAME LIMIT_S CMD...: runs CMD with a time cap (never past the total budget),
# output to the terminal (only its tail on failure when QUIET=1) and to $logdir/NAME.log;
# records PASS / FAIL (rc) / TIMEOUT.
QUIET=0
run_step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((budget - (SECONDS - start)))
  if ((left < limit)); then limit=$left; fi
  if ((limit < 10)); then
    record "$name" "SKIP (time budget spent)" 0
    return 1
  fi
  echo
  echo "=== [$name] $* (limit ${limit}s)"
  local t0=$SECONDS rc=0
  if ((QUIET)); then
    timeout --kill-after=15 "$limit" "$@" >"$logdir/$name.log" 2>&1 || rc=$?
    if ((rc != 0)); then tail -n 40 "$logdir/$name.log"; fi
  else
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$logdir/$name.log" || rc=$?
  fi
  local dt=$((SECONDS - t0))
  if ((rc == 0)); then
    record "$name" PASS "$dt"
  elif ((rc == 124 || rc == 137)); then
    record "$name" "TIMEOUT (${limit}s)" "$dt"
  else
    record "$name" "FAIL (rc=$rc)" "$dt"
  fi
  return "$rc"
}

summary() {
  if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then  # the device tool brings $OUT back
    tar -czf "$OUT/gpu_check_logs.tgz" -C "$logdir" . 2>/dev/null || true
    cp .benchmarks/gpu_summary.json "$OUT/" 2>/dev/null || true
  fi
  if [[ -f .benchmarks/gpu_summary.json ]]; then
    echo
    if ((bench_ran)); then
      echo "=== GPU benchmarks (.benchmarks/gpu_summary.json)"
    else  # a warm machine keeps an earlier call's file: say so, not pass it off as this one's
      echo "=== GPU benchmarks from an EARLIER call (the bench step did not run in this one;" \
        "$(date -r .benchmarks/gpu_summary.json '+%F %T' 2>/dev/null || echo 'time unknown'))"
    fi
    "$python" -m benchmarks.test_bench_gpu || true
  fi
  echo
  echo "=== oni GPU check summary (logs: $logdir)"
  printf '%-22s %-28s %8s\n' step status seconds
  printf '%-22s %-28s %8s\n' ---------------------- ---------------------------- --------
  local i
  for i in "${!names[@]}"; do
    printf '%-22s %-28s %8s\n' "${names[$i]}" "${statuses[$i]}" "${times[$i]}"
  done
  printf '%-22s %-28s %8s\n' total "$([[ $failed == 0 ]] && echo OK || echo FAILED)" \
    $((SECONDS - start))
}
trap summary EXIT

# --- 0. the GPU and the toolchain
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to torch $("$python" -c 'import torch; print(torch.__version__)')" >&2
  record gpu "FAIL (no CUDA device)" 0
  exit 1
fi
"$python" - <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$python" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")"
  export TORCH_CUDA_ARCH_LIST
  echo "TORCH_CUDA_ARCH_LIST unset: using the GPU's $TORCH_CUDA_ARCH_LIST"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  site="$(mktemp -d "${TMPDIR:-/tmp}/oni-wheels.XXXXXX")"
  if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$site" .whl/*.whl; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "carried wheels installed in $site: $(cd .whl && echo *.whl)"
  else
    echo "carried wheels in .whl/ failed to install: the rows that need them will skip" >&2
  fi
fi
command -v nvcc >/dev/null || export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
nvcc --version | tail -n 2 || true

# One C++ toolchain for compiling and linking, matching the libstdc++ that torch runs with:
# seen on the lent H100 image, sources compiled with /opt/gcc's g++ (CXX) but linked with the
# system g++ crashed in libstdc++'s ostream code inside oni/_C.so on every error message.
runtime_stdcxx="$("$python" -c "import torch
print(next((l.split()[-1] for l in open('/proc/self/maps') if 'libstdc++' in l), ''))")"
echo "libstdc++ loaded with torch: ${runtime_stdcxx:-none}; CXX=${CXX:-unset}; CC=${CC:-unset}"
if [[ -z "${ONI_KEEP_CXX:-}" && "$runtime_stdcxx" == /usr/lib* && -x /usr/bin/g++ ]]; then
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
  echo "building with the system compiler: $("$CXX" --version | head -n 1)"
fi

# --- 1. build (CUDA kernels required), 2. build info
built=0
QUIET=1
if run_step build 300 "$python" -m pip install --no-build-isolation --no-deps -v -e .; then
  QUIET=0
  grep -h "\[oni setup\]" "$logdir/build.log" | sort -u || true
  run_step build_info 60 "$python" -c "
import oni, sys
info = oni.build_info()
print('oni.build_info():', info)
missing = [op for op in oni._ops.OP_NAMES if op not in info['cuda_ops']]
print('ops without a CUDA kernel:', missing or 'none')
sys.exit(0 if info['cuda'] else 'some ops have no CUDA kernel')" && built=1
fi

if ((built)); then
  # --- 3. the tests
  # every test (CUDA-parametrised ones included) in xdist workers: a crash in one test is
  # reported as that test's failure instead of ending the run
  xdist=()
  if "$python" -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi
  if wanted tests; then
    # shellcheck disable=SC2086
    run_step tests 240 "$python" -m pytest -q -p no:cacheprovider "${xdist[@]}" \
      ${ONI_GPU_TESTS:-tests} || true
  else
    record tests "SKIP (ONI_GPU_STEPS)" 0
  fi

  # --- 4. benchmarks marked `cuda` (pytest exit 5 = none collected), before the sanitizers:
  # the timings are what a lent GPU is for, and a step with no time left is skipped
  if ! wanted bench; then
    record bench_cuda "SKIP (ONI_GPU_STEPS)" 0
  elif [[ -d benchmarks ]]; then
    rc=0
    "$python" -m pytest benchmarks -m cuda --collect-only -q -p no:cacheprovider \
      >"$logdir/bench_collect.log" 2>&1 || rc=$?
    if ((rc == 5)); then
      record bench_cuda "SKIP (none marked cuda)" 0
    elif ((rc != 0)); then
      cat "$logdir/bench_collect.log"
      record bench_cuda "FAIL (collection, rc=$rc)" 0
    else
      rm -f .benchmarks/gpu_summary.json
      bench_ran=1
      run_step bench_cuda 300 "$python" -m pytest benchmarks -m cuda -p no:cacheprovider -s \
        --benchmark-only --benchmark-columns=min,median,max,rounds || true
    fi
  else
    record bench_cuda "SKIP (no benchmarks/)" 0
  fi

  # --- 5-6. compute-sanitizer (every buffer its own allocation: memcheck sees true bounds)
  sanitizer="$(command -v compute-sanitizer || true)"
  for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
              /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [[ -z "$sanitizer" && -x "$cand" ]]; then sanitizer="$cand"; fi
  done
  if ! wanted sanitizer; then
    record sanitizer_memcheck "SKIP (ONI_GPU_STEPS)" 0
    record sanitizer_racecheck "SKIP (ONI_GPU_STEPS)" 0
  elif [[ -n "$sanitizer" ]]; then
    for tool in memcheck racecheck; do
      run_step "sanitizer_$tool" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" \
        --tool "$tool" --error-exitcode 1 "$python" scripts/sanitizer_case.py || true
    done
  else
    record sanitizer_memcheck "SKIP (no compute-sanitizer)" 0
    record sanitizer_racecheck "SKIP (no compute-sanitizer)" 0
  fi
else
  for step in tests bench_cuda sanitizer_memcheck sanitizer_racecheck; do
    record "$step" "SKIP (build failed)" 0
  done
fi

exit "$failed"
