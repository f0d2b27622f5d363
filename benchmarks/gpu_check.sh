#!/usr/bin/env bash
# The whole GPU check in one call (issue 7): device info, the kernel cache warm-up, the GPU
# tests, compute-sanitizer memcheck on small cases per kernel tier, the benchmark and its report.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh     # OUT defaults to ./gpu-out
#
# Everything it writes goes to $OUT (8 files at most, logs capped):
#   summary.txt      device, versions, one line per step
#   gpu-tests.log    pytest output          gpu-tests.xml   its junit XML
#   sanitizer.log    memcheck output        racecheck.log   racecheck (only if time is left)
#   bench.log        benchmark output       <date>-<gpu>.json / .md   the report
# A failing step does not stop the later ones; the exit status is 1 if any step failed.
# The steps share a wall-clock budget (XPS_CHECK_BUDGET_S, default 400 s), so the script ends
# within 7 minutes even when a step runs to its time limit. XPS_WHEELS may name a folder of wheels
# (array-api-compat, ...) to install offline first.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export PYTHONUNBUFFERED=1

START=$(date +%s)
BUDGET=${XPS_CHECK_BUDGET_S:-400}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

remaining() { echo $((START + BUDGET - $(date +%s))); }
# clamp NOMINAL AVAILABLE MIN: the smaller of NOMINAL and AVAILABLE, at least MIN
clamp() {
    local v=$1
    ((v > $2)) && v=$2
    ((v < $3)) && v=$3
    echo "$v"
}
note() { echo "$*" | tee -a "$SUMMARY"; }

# Keep a log short: its first 300 and last 1500 lines.
shrink() {
    local f=$1 n
    [ -f "$f" ] || return 0
    n=$(wc -l <"$f")
    if ((n > 1800)); then
        { head -n 300 "$f"; echo "[... $((n - 1800)) lines cut ...]"; tail -n 1500 "$f"; } >"$f.tmp"
        mv "$f.tmp" "$f"
    fi
}

# step NAME LIMIT_S LOG CMD...: run CMD with a time limit, log to LOG, show its tail.
step() {
    local name=$1 limit=$2 logf=$3
    shift 3
    local t0 rc
    t0=$(date +%s)
    echo
    echo "=== $name (limit ${limit}s, $(remaining)s of the budget left) ==="
    timeout --kill-after=10 "$limit" "$@" >"$logf" 2>&1
    rc=$?
    shrink "$logf"
    tail -n "${TAIL_LINES:-25}" "$logf"
    local status="rc=$rc"
    ((rc == 124 || rc == 137)) && status="$status (TIMED OUT after ${limit}s)"
    note "$name: $status, $(($(date +%s) - t0))s"
    ((rc != 0)) && FAILED=1
    return "$rc"
}

# --- device and versions ------------------------------------------------------------------
{
    echo "xpsoftmax GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    # The commit above can be stale where the tree was copied without its .git; this digest of the
    # sources is not: run the same line in a checkout to see whether it holds the code measured.
    echo "sources: $(find kernels xpsoftmax -name '*.cu' -o -name '*.cuh' -o -name '*.py' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
    nvidia-smi -L 2>&1 | head -n 4
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
        --format=csv,noheader 2>&1 | head -n 4
    echo "nvcc: $(nvcc --version 2>&1 | tail -n 1)"
    echo "compute-sanitizer: $(compute-sanitizer --version 2>&1 | grep -i version | head -n 1)"
} | tee -a "$SUMMARY"

if [ -n "${XPS_WHEELS:-}" ] && [ -d "$XPS_WHEELS" ]; then
    python3 -m pip install --quiet --no-index --no-deps "$XPS_WHEELS"/*.whl 2>&1 | tail -n 3
fi

python3 - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "cupy", "torch", "array_api_compat", "pytest", "xpsoftmax"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # report and go on: the steps below show what breaks
        print(f"{name}: IMPORT FAILED: {type(e).__name__}: {e}")
try:
    import cupy
    rt, drv = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
    print(f"CUDA runtime {rt}, driver {drv}, cupy.is_available() = {cupy.is_available()}")
    import torch
    print(f"torch CUDA {torch.version.cuda}, torch.cuda.is_available() = {torch.cuda.is_available()}")
except Exception as e:
    print(f"device query failed: {type(e).__name__}: {e}")
EOF

# --- 0. every kernel instantiation compiled into CuPy's disk cache, in parallel -------------
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
T=$(clamp 90 $(($(remaining) - 300)) 30)
TAIL_LINES=6 step "kernel cache warm-up" "$T" "$TMPD/warm-cache.log" \
    python3 benchmarks/gpu_warm_cache.py
note "  $(tail -n 1 "$TMPD/warm-cache.log")"

# --- 1. the GPU tests ---------------------------------------------------------------------
T=$(clamp 120 $(($(remaining) - 170)) 60)
XPSOFTMAX_GPU_TEST_DEADLINE=$(($(date +%s) + T - 20)) step "gpu tests" "$T" "$OUT/gpu-tests.log" \
    python3 -m pytest tests/test_gpu.py tests/test_cross_entropy.py tests/test_cli.py -m gpu -q -p no:cacheprovider --tb=short -rfE \
    --maxfail=300 --junitxml="$OUT/gpu-tests.xml"

# --- 2. compute-sanitizer memcheck ----------------------------------------------------------
T=$(clamp 75 $(($(remaining) - 100)) 45)
step "sanitizer memcheck" "$T" "$OUT/sanitizer.log" \
    compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    python3 benchmarks/sanitizer_cases.py --quick
note "  $(grep -E '^sanitizer_cases:' "$OUT/sanitizer.log" | tail -n 1)" \
    "$(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -n 1 | sed 's/^=* *//')"

# --- 3. the benchmark and the report ------------------------------------------------------
T=$(clamp 190 $(($(remaining) - 5)) 60)
TAIL_LINES=12 step "benchmark" "$T" "$OUT/bench.log" \
    python3 benchmarks/gpu_bench.py --out "$OUT" --budget-s $((T - 35)) \
    --junit "$OUT/gpu-tests.xml" --sanitizer-log "$OUT/sanitizer.log"
REPORT_MD=$(ls -t "$OUT"/*.md 2>/dev/null | head -n 1)
if [ -n "$REPORT_MD" ]; then
    echo
    sed -n '/^## Goals/,$p' "$REPORT_MD"
    note "report: $(basename "$REPORT_MD" .md).{json,md}"
else
    note "report: none written"
    FAILED=1
fi

# --- 4. racecheck on a few cases, only if time is left ------------------------------------
if (($(remaining) > 75)); then
    T=$(clamp 60 $(($(remaining) - 5)) 30)
    TAIL_LINES=5 step "sanitizer racecheck (quick)" "$T" "$OUT/racecheck.log" \
        compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
        python3 benchmarks/sanitizer_cases.py --quick
    note "  $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck.log" | tail -n 1 | sed 's/^=* *//')"
else
    note "sanitizer racecheck: skipped ($(remaining)s of the budget left)"
fi

note "total: $(($(date +%s) - START))s; $([ "$FAILED" = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
echo
echo "=== summary ($OUT/summary.txt) ==="
cat "$SUMMARY"
exit "$FAILED"
