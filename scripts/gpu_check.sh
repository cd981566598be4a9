#!/usr/bin/env bash
# GPU check of cream_kernels in ONE device call of at most 10 minutes (issue 11):
#
#   device run:  bash scripts/gpu_check.sh            (carry .whl only if pybind11/ninja are missing there)
#   here (CPU):  bash scripts/gpu_check.sh --dry-run  (same steps, what needs a GPU is skipped and said so)
#
# It installs nothing from the network. It needs python3 with torch (and triton),
# setuptools, pybind11 and ninja, nvcc, and for steps 6-7 compute-sanitizer and
# ncu. If pybind11 or ninja cannot be imported, wheels in .whl/ (gitignored: the
# caller carries the folder) are installed offline into a temporary --target
# directory; make them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pybind11 ninja
#
# Steps, each under its own time limit (the limits add up to 525 s and the whole run is
# capped at 535 s, under 9 minutes);
# every step tees its output to its own file under $OUT as it runs, so a timeout or
# a crash later still leaves what came before:
#   1 build     150 s  CUDA for this device's arch only (nvidia-smi compute_cap), MAX_JOBS=16;
#                      then the kernels' resource usage (cuobjdump)                  build.log
#   2 info       20 s  nvidia-smi, python -m cream_kernels                          info.log
#   3 smoke      80 s  generic + cluster CUDA EM and Triton vs the reference on the
#                      benchmark shapes (SPEC.md), with the cluster plan per shape  smoke.log
#   4 timing     60 s  the timing table (early, so a later failure cannot lose it)  timing.log
#   5 tests     110 s  only the CUDA/Triton tests: pytest -m gpu (tests/conftest.py
#                      marks them), generic then cluster                            tests.log
#   6 sanitizer  55 s  compute-sanitizer memcheck, our kernels only, a few shapes   sanitizer.log
#   7 ncu        50 s  dram__bytes_read.sum at B=256 r50 28x28 bf16, per variant:
#                      passes over the features = bytes read / feature bytes        ncu.log
#   summary.txt: one line per step (rc, seconds) and the headline numbers.
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-535}
SCALE=${GPU_CHECK_LIMIT_SCALE:-1} # multiplies every limit and the budget (a slow CPU for the dry run)
BUDGET=$((BUDGET * SCALE))
FAILED=0
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 CREAM_KERNELS_DEBUG_POISON=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
GC="$PY scripts/gpu_check.py"
if ((DRY)); then
  GC="$GC --dry-run"
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  echo "DRY RUN on CPU: GPU-only parts are skipped and say so" | tee -a "$SUMMARY"
fi
ENVF="${TMPDIR:-/tmp}/gpu_check_env.$$"
rm -f "$ENVF"
export PY OUT DRY GC SUMMARY SCALE ENVF

left() { echo $((BUDGET - ($(date +%s) - START))); }
# step NAME LIMIT_S FUNCTION: runs the exported shell function in a child bash under
# a time limit (cut to what is left of the budget), tee'd to $OUT/NAME.log.
step() {
  local name=$1 limit=$(($2 * SCALE)) fn=$3 log="$OUT/$1.log" l t0 rc
  l=$(left)
  if ((l < 15)); then
    echo "SKIP $name: out of time" | tee -a "$log"
    echo "$name: skipped (out of time)" >>"$SUMMARY"
    FAILED=1
    return
  fi
  ((limit > l - 5)) && limit=$((l - 5))
  echo "=== $name (limit ${limit}s, $(($(date +%s) - START))s elapsed)" | tee -a "$log"
  t0=$(date +%s)
  timeout -k 5 "$limit" bash -c "$fn" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  ((rc == 124 || rc == 137)) && echo "$name: TIMED OUT after ${limit}s" | tee -a "$log"
  echo "$name: rc=$rc ($(($(date +%s) - t0))s)" | tee -a "$SUMMARY"
  ((rc == 0)) || FAILED=1
}

# ---------------------------------------------------------------- 1. build
build() {
  local need
  if ((DRY)); then  # a built or installed module needs no build requirements
    if "$PY" -c "import cream_kernels._C" 2>/dev/null; then
      echo "dry run: this tree's cream_kernels._C is built; not rebuilding"
      return 0
    fi
    if (cd / && env -u PYTHONPATH "$PY" -c "import cream_kernels._C") 2>/dev/null; then
      echo "dry run: this tree has no built module; using the installed cream_kernels (as pytest tests does)"
      echo "export PYTHONPATH=" >"$ENVF"
      return 0
    fi
  fi
  need=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pybind11', 'ninja', 'setuptools') if u.find_spec(m) is None))")
  if [ -n "$need" ]; then
    echo "missing build requirements: $need; installing the wheels in .whl/ offline"
    ls .whl/*.whl 2>/dev/null || { echo "no .whl/ folder: carry it (see the header of this script)"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site \
      .whl/*.whl || return 1
    export PYTHONPATH="/tmp/gpu_check_site:$PYTHONPATH"
    echo "export PYTHONPATH=/tmp/gpu_check_site:\$PYTHONPATH" >"$ENVF"
  else
    echo "build requirements present (setuptools, pybind11, ninja)"
  fi
  local cc arch
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  if [ -z "$cc" ]; then
    if ((DRY)); then
      echo "dry run: no nvidia-smi/GPU; on the device the arch comes from nvidia-smi --query-gpu=compute_cap"
      echo "dry run: building the CPU part only, in place"
      CREAM_KERNELS_CUDA=0 "$PY" setup.py -q build_ext --inplace
      return
    fi
    echo "nvidia-smi gave no compute capability"
    return 1
  fi
  arch=${cc/./}
  [ "$arch" = 90 ] && arch=90a # Hopper: the arch-specific target (wgmma, setmaxnreg; HOPPER.md)
  echo "device compute capability $cc: building for sm_$arch only"
  CREAM_KERNELS_CUDA=1 CREAM_KERNELS_CUDA_ARCHS=${CREAM_KERNELS_CUDA_ARCHS:-$arch} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py build_ext --inplace || return 1
  local so cuobj
  so=$(ls -t cream_kernels/_C*.so | head -1)
  cuobj=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
  [ -n "$cuobj" ] || { echo "cuobjdump not found: no resource usage"; return 0; }
  echo "--- resource usage of $so (arch, registers, stack, shared, local, kernel)"
  "$cuobj" --dump-resource-usage "$so" | bash scripts/resource_usage.sh
}
export -f build
step build 150 build
[ -f "$ENVF" ] && . "$ENVF" && rm -f "$ENVF"

# ---------------------------------------------------------------- 2. info
info() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  else
    echo "dry run: no nvidia-smi"
  fi
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -m cream_kernels
}
export -f info
step info 20 info

# ---------------------------------------------------------------- 3. smoke
smoke() { $GC smoke ${GPU_CHECK_DTYPES:+--dtypes $GPU_CHECK_DTYPES}; }
export -f smoke
step smoke 80 smoke

# ---------------------------------------------------------------- 4. timing
# no output poisoning while timing (it adds a fill kernel per call)
timing() { CREAM_KERNELS_DEBUG_POISON=0 $GC timing ${GPU_CHECK_DTYPES:+--dtypes $GPU_CHECK_DTYPES}; }
export -f timing
step timing 60 timing

# ---------------------------------------------------------------- 5. tests (CUDA/Triton only)
run_tests() {
  local rc=0 sel="gpu and not slow"
  if ((DRY)); then
    echo "dry run: what -m '$sel' selects here (on a GPU the cuda-device cases are added):"
    "$PY" -m pytest tests -q -p no:cacheprovider -m "$sel" --collect-only
    rc=$?
    echo "dry run: and the cluster rerun's -k 'cuda-cuda or [cuda]':"
    "$PY" -m pytest tests -q -p no:cacheprovider -m "$sel" -k "cuda-cuda or [cuda]" --collect-only
    ((rc == 0 || rc == 5)) && rc=$?
    ((rc == 5)) && rc=0 # nothing collected is fine without a GPU
    return $rc
  fi
  echo "--- CUDA/Triton tests (-m '$sel'), CREAM_KERNELS_CUDA_VARIANT=generic"
  CREAM_KERNELS_CUDA_VARIANT=generic "$PY" -m pytest tests -q -p no:cacheprovider -m "$sel" --maxfail=5 || rc=1
  # the cuda backend's cases only: ids backend-device (cuda-cuda) or a bare [cuda] parameter
  echo "--- the cuda backend's tests again, CREAM_KERNELS_CUDA_VARIANT=cluster (-k 'cuda-cuda or [cuda]')"
  CREAM_KERNELS_CUDA_VARIANT=cluster "$PY" -m pytest tests -q -p no:cacheprovider -m "$sel" \
    -k "cuda-cuda or [cuda]" --maxfail=5 || rc=1
  return $rc
}
export -f run_tests
step tests 110 run_tests

# ---------------------------------------------------------------- 6. compute-sanitizer memcheck
sanitize() {
  local cs rc=0 v flt
  # a few shapes, one process per variant: odd sizes (masked tails), 8-byte and
  # 1-element accesses, channels_last
  local cases="2x59x7:fp32;3x64x14:bf16;2x40x13:bf16:cl"
  if ((DRY)); then
    echo "dry run: no compute-sanitizer on CPU; the same workloads without it:"
    $GC workload --cases "$cases"
    return
  fi
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  [ -n "$cs" ] || { echo "compute-sanitizer not found"; return 1; }
  # only our kernels are instrumented (their names contain the cream namespace)
  if "$cs" --help 2>&1 | grep -q -- "--kernel-name"; then flt="--kernel-name kns=cream"; else flt="--filter kns=cream"; fi
  for v in generic cluster; do
    echo "--- memcheck $v ($flt) on $cases"
    "$cs" --tool memcheck $flt --error-exitcode 9 --print-limit 10 $GC workload --impls $v --cases "$cases" || rc=1
  done
  return $rc
}
export -f sanitize
step sanitizer 55 sanitize

# ---------------------------------------------------------------- 7. ncu: passes over the features
ncu_passes() {
  local n rc=0 v
  if ((DRY)); then
    echo "dry run: no ncu on CPU; the workload it would profile, at a small size:"
    $GC workload --cases "2x32x6:bf16" || return 1
    return 0
  fi
  n=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$n" ] || { echo "ncu not found"; return 1; }
  for v in generic cluster; do
    echo "--- ncu dram__bytes_read.sum, $v, B=256 r50 28x28 bf16 (cold caches: ncu flushes them)"
    "$n" --metrics dram__bytes_read.sum --kernel-name regex:"em_(generic|cluster)_kernel" --launch-count 1 \
      --clock-control none --csv --print-units base --log-file "/tmp/ncu_$v.csv" \
      $GC workload --impls $v --cases "256x2048x28:bf16" || rc=1
    cat "/tmp/ncu_$v.csv"
    $GC ncu --log "/tmp/ncu_$v.csv" --label "$v" --B 256 --d 2048 --hw 28 --dtype bf16 | tee -a "$SUMMARY" || rc=1
  done
  return $rc
}
export -f ncu_passes
step ncu 50 ncu_passes

echo "=== done in $(($(date +%s) - START))s (budget ${BUDGET}s)" | tee -a "$SUMMARY"
grep -h "FAIL\|passes over\|smoke: \|TIMED OUT" "$OUT"/smoke.log "$OUT"/ncu.log 2>/dev/null | head -20 >>"$SUMMARY"
cat "$SUMMARY"
exit $FAILED
