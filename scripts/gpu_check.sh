#!/usr/bin/env bash
# The first GPU contact of cream_kernels, in ONE device call of at most 9 minutes (issue 18):
#
#   device run:  bash scripts/gpu_check.sh            (with the device tool: timeout_s 600, no carry)
#   here (CPU):  bash scripts/gpu_check.sh --dry-run  (same steps on CPU at tiny sizes; what needs a
#                                                      GPU is skipped or stood in for, and says so)
#
# Carry: nothing. It installs nothing and needs python3 with torch, triton, setuptools, pybind11,
# ninja, numpy, pillow, opencv, scikit-image, matplotlib, tqdm and pytest, plus nvcc,
# compute-sanitizer and ncu: the device image has all of them (.library/device/KINDS.md). The build
# step checks; should one be missing, wheels in .whl/ (gitignored; the caller carries the folder)
# are installed offline into a --target folder; make them with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION
#
# Steps, in this order, each under its own device limit (written here; they add up to 480 s, checked
# at every run, leaving 60 s of the 9 minutes to the build's variance; the whole run is capped at 540 s):
#   build         110 s  CUDA for this device's arch only (nvidia-smi compute_cap), MAX_JOBS=16;
#                        the kernels' resource usage (cuobjdump); nvidia-smi; python -m cream_kernels
#   canary         30 s  one tiny call each of generic, cluster and Triton against the reference, in
#                        parallel child processes under timeouts; if cluster hangs or mismatches,
#                        every later step runs with CREAM_KERNELS_CUDA_VARIANT=generic, no cluster
#   cuda-correct   60 s  every SPEC.md shape x {NCHW, channels_last} x {fp32, bf16} x B {256, 32, 1}
#                        at T=2, dot, tables, then the headline shape's options (cosine, training-free,
#                        T=1,3,4, K=5, classifier weight, sigma="auto"); one line per call, flushed;
#                        a supervised worker: a silent call is killed and the rest goes on
#   cuda-timing    40 s  CUDA timing table; the headline EM time against the one-read roofline
#   table7         45 s  the paper's Table 7: VGG16 CAM forward (+ CREAM T=1..4), B 1 and 32, fp32/bf16
#   harness        45 s  cream-wsol train (VGG16, random init, 40 steps of 16, synthetic images drawn at
#                        96 and seen at 224, cuda), then evaluate (32 test images) with the cuda and the
#                        reference backend at once: box metrics within 100/N points, PxAP within 0.1
#   triton         45 s  Triton's version; configs compiled in parallel children, each under a timeout
#   tests          50 s  pytest's GPU tests, a child per file under timeout: cluster, generic, rest
#   sanitizer      30 s  compute-sanitizer memcheck and racecheck, our kernels only, per variant
#   ncu            25 s  dram__bytes_read.sum at B=256 r50 28x28 bf16, each variant's EM kernel (one
#                        ncu process): DRAM bytes read over the feature bytes (passes over F)
# Logs in $OUT, written as each step runs (steps share files so that at most 8 files come back):
#   summary.txt (DRY RUN notice, the CUDA variant in force, headline numbers, then one
#   `NAME: rc=N (Ns)` line per step; rewritten after every step), build.log, cuda.log (canary,
#   cuda-correct, cuda-timing), e2e.log (table7, harness), triton.log, tests.log, tools.log
#   (sanitizer, ncu), results.jsonl (one JSON line per measured row).
# GPU_CHECK_STEPS=canary,cuda-correct (say) runs build and that subset (a short rerun); the others are listed as skipped.
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
START=$(date +%s)

STEPS=(build canary cuda-correct cuda-timing table7 harness triton tests sanitizer ncu)
declare -A LIMIT=([build]=110 [canary]=30 [cuda-correct]=60 [cuda-timing]=40 [table7]=45 [harness]=45
  [triton]=45 [tests]=50 [sanitizer]=30 [ncu]=25)
declare -A LOGF=([build]=build.log [canary]=cuda.log [cuda-correct]=cuda.log [cuda-timing]=cuda.log
  [table7]=e2e.log [harness]=e2e.log [triton]=triton.log [tests]=tests.log [sanitizer]=tools.log [ncu]=tools.log)
MAX_LIMITS=480 # seconds: the step limits must add up to at most this
BUDGET=540     # the whole run (9 minutes)
SCALE=${GPU_CHECK_LIMIT_SCALE:-1} # multiplies every limit and the budget (a slow CPU for the dry run)

total=0
for s in "${STEPS[@]}"; do total=$((total + LIMIT[$s])); done
LIMITS_LINE="step limits: $(for s in "${STEPS[@]}"; do printf '%s %ss, ' "$s" "${LIMIT[$s]}"; done)total ${total}s (at most ${MAX_LIMITS}s; run capped at ${BUDGET}s)"
if ((total > MAX_LIMITS)); then
  echo "gpu_check.sh: the step limits add up to ${total}s, over ${MAX_LIMITS}s: fix LIMIT" >&2
  exit 2
fi
BUDGET=$((BUDGET * SCALE))
FAILED=0
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 CREAM_KERNELS_DEBUG_POISON=1
unset CREAM_KERNELS_BACKEND GPU_CHECK_NO_CLUSTER
export CREAM_KERNELS_CUDA_VARIANT=auto
SUMMARY="$OUT/summary.txt"
STATE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_state.XXXXXX")
ENVF="$STATE/env"
export GPU_CHECK_STATE="$STATE" GPU_CHECK_RESULTS="$OUT/results.jsonl" GPU_CHECK_LIMIT_SCALE="$SCALE"
: >"$GPU_CHECK_RESULTS"
: >"$STATE/steps"
for s in "${STEPS[@]}"; do : >"$OUT/${LOGF[$s]}"; done
GC="$PY scripts/gpu_check.py"
if ((DRY)); then
  GC="$GC --dry-run"
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export PY OUT DRY GC SUMMARY SCALE ENVF STATE

# summary.txt: the DRY RUN notice, the CUDA variant in force, the headline lines the steps left
# in $STATE, then the step lines; rewritten after every step (a killed call still leaves one)
write_summary() {
  {
    ((DRY)) && echo "DRY RUN on CPU (no GPU): every step ran its path at tiny sizes; no number here is a GPU number"
    if [ -f "$STATE/head.00-variant" ]; then cat "$STATE/head.00-variant"; else
      echo "CUDA variant in force: not decided (the canary has not run)"; fi
    for f in "$STATE"/head.[1-9]*; do [ -f "$f" ] && cat "$f"; done
    echo "$LIMITS_LINE"
    cat "$STATE/steps"
    [ -f "$STATE/done" ] && cat "$STATE/done"
  } >"$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
}

left() { echo $((BUDGET - ($(date +%s) - START))); }
# build always runs (on a warm machine it has nothing to do; without it nothing else can)
selected() { [ -z "${GPU_CHECK_STEPS:-}" ] || [ "$1" = build ] || [[ ",$GPU_CHECK_STEPS," == *",$1,"* ]]; }
# step NAME FUNCTION: runs the exported shell function in a child bash under the step's limit
# (cut to what is left of the budget), appended to its log file as it runs.
step() {
  local name=$1 fn=$2 limit=$((LIMIT[$1] * SCALE)) log="$OUT/${LOGF[$1]}" l t0 rc
  if ! selected "$name"; then
    echo "$name: skipped (not in GPU_CHECK_STEPS)" >>"$STATE/steps"
    write_summary
    return
  fi
  l=$(left)
  if ((l < 10)); then
    echo "SKIP $name: out of time" | tee -a "$log"
    echo "$name: skipped (out of time)" >>"$STATE/steps"
    FAILED=1
    write_summary
    return
  fi
  ((limit > l - 5)) && limit=$((l - 5))
  [ -f "$ENVF" ] && . "$ENVF" # the canary's (or cuda-correct's) choice of CUDA variant
  echo "=== $name (limit ${limit}s, $(($(date +%s) - START))s elapsed, CREAM_KERNELS_CUDA_VARIANT=$CREAM_KERNELS_CUDA_VARIANT)" | tee -a "$log"
  t0=$(date +%s)
  STEP_LIMIT=$limit timeout -k 5 "$limit" bash -c "$fn" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  ((rc == 124 || rc == 137)) && echo "$name: TIMED OUT after ${limit}s" | tee -a "$log"
  echo "$name: rc=$rc ($(($(date +%s) - t0))s)" | tee -a "$log" >>"$STATE/steps"
  ((rc == 0)) || FAILED=1
  write_summary
}
export -f left

# ---------------------------------------------------------------- build
build() {
  local need run_need
  echo "$LIMITS_LINE"
  run_need=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('torch', 'triton', 'numpy', 'PIL', 'cv2', 'skimage', 'matplotlib', 'tqdm', 'pytest')
               if u.find_spec(m) is None))")
  if [ -n "$run_need" ]; then
    echo "WARNING: python modules missing here: $run_need (on the device: carry them as wheels in .whl/)"
  else
    echo "carry: nothing needed (torch, triton, numpy, PIL, cv2, skimage, matplotlib, tqdm, pytest all importable)"
  fi
  if ((DRY)); then # a built or installed module needs no build requirements
    if "$PY" -c "import cream_kernels._C" 2>/dev/null; then
      echo "dry run: this tree's cream_kernels._C is built; not rebuilding"
      "$PY" -c "import cream_kernels._ext as e; print('with CUDA:', e.with_cuda(), '; variant:', e.cuda_em_variant())"
      return 0
    fi
    if (cd / && env -u PYTHONPATH "$PY" -c "import cream_kernels._C") 2>/dev/null; then
      echo "dry run: this tree has no built module; using the installed cream_kernels (as pytest tests does)"
      echo "export PYTHONPATH=" >>"$ENVF"
      return 0
    fi
  fi
  need=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pybind11', 'ninja', 'setuptools') if u.find_spec(m) is None))")
  if [ -n "$need" ]; then
    echo "missing build requirements: $need; installing the wheels in .whl/ offline"
    ls .whl/*.whl 2>/dev/null || {
      echo "no .whl/ folder: carry it (see the header of this script)"
      ((DRY)) && { echo "dry run: a missing carry is a warning here"; return 0; }
      return 1
    }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site \
      .whl/*.whl || return 1
    export PYTHONPATH="/tmp/gpu_check_site:$PYTHONPATH"
    echo "export PYTHONPATH=/tmp/gpu_check_site:\$PYTHONPATH" >>"$ENVF"
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
  if [ -n "$cuobj" ]; then
    echo "--- resource usage of $so (arch, registers, stack, shared, local, kernel)"
    "$cuobj" --dump-resource-usage "$so" | bash scripts/resource_usage.sh
  else
    echo "cuobjdump not found: no resource usage"
  fi
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$PY" -m cream_kernels
}
export -f build

# ---------------------------------------------------------------- the Python steps
canary() { $GC canary --limit $((STEP_LIMIT - 3)) --env-file "$ENVF"; }
cuda_correct() { $GC correct --limit $((STEP_LIMIT - 3)) --env-file "$ENVF"; }
cuda_timing() { $GC timing; }
table7() { $GC table7; }
harness() { $GC harness --limit $((STEP_LIMIT - 3)); }
triton_step() { $GC triton --limit $((STEP_LIMIT - 3)); }
run_tests() { $GC tests --limit $((STEP_LIMIT - 3)); }
export -f canary cuda_correct cuda_timing table7 harness triton_step run_tests

impls() { if [ "${GPU_CHECK_NO_CLUSTER:-0}" = 1 ]; then echo generic; else echo generic cluster; fi; }
export -f impls

# ---------------------------------------------------------------- compute-sanitizer
# memcheck on a few shapes (odd sizes: masked tails; 8-byte and 1-element accesses; channels_last)
# and racecheck on one, per variant, the four runs in parallel, each under a timeout
sanitize() {
  local cs flt v tool cases rc=0 f t
  local cases_mem="2x59x7:fp32;3x64x14:bf16;2x40x13:bf16:cl" cases_race="2x64x7:bf16"
  if ((DRY)); then
    echo "dry run: no compute-sanitizer on CPU; the same workloads without it:"
    $GC workload --impls generic,cluster --cases "$cases_mem" || return 1
    echo "sanitizer: DRY RUN, not run (no GPU)" >"$STATE/head.13-sanitizer"
    return 0
  fi
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  [ -n "$cs" ] || { echo "compute-sanitizer not found"; return 1; }
  # only our kernels are instrumented (their names contain the cream namespace)
  if "$cs" --help 2>&1 | grep -q -- "--kernel-name"; then flt="--kernel-name kns=cream"; else flt="--filter kns=cream"; fi
  t=$((STEP_LIMIT - 4))
  for tool in memcheck racecheck; do
    cases=$cases_mem
    [ $tool = racecheck ] && cases=$cases_race
    for v in $(impls); do
      (
        timeout -k 3 $t "$cs" --tool $tool $flt --error-exitcode 9 --print-limit 10 \
          $GC workload --impls $v --cases "$cases" 2>&1 | sed -u "s/^/[$tool $v] /"
        echo "${PIPESTATUS[0]}" >"$STATE/san.$tool.$v"
      ) &
    done
  done
  wait
  local line="sanitizer:"
  for tool in memcheck racecheck; do
    for v in $(impls); do
      f=$(cat "$STATE/san.$tool.$v" 2>/dev/null || echo "?")
      case $f in 0) line="$line $tool $v clean;" ;; 124 | 137) line="$line $tool $v TIMED OUT;" ; rc=1 ;;
        9) line="$line $tool $v ERRORS;" ; rc=1 ;; *) line="$line $tool $v rc=$f;" ; rc=1 ;; esac
    done
  done
  echo "$line" | tee "$STATE/head.13-sanitizer"
  return $rc
}
export -f sanitize

# ---------------------------------------------------------------- ncu: passes over the features
ncu_passes() {
  local n rc=0 v t
  if ((DRY)); then
    echo "dry run: no ncu on CPU; the workload it would profile, at a small size:"
    $GC workload --impls generic,cluster --cases "2x32x6:bf16" || return 1
    echo "ncu: DRY RUN, not run (no GPU)" >"$STATE/head.50-ncu"
    return 0
  fi
  n=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$n" ] || { echo "ncu not found"; return 1; }
  # one ncu process for both variants (its start-up is the slow part): one launch of each EM kernel
  set -- $(impls)
  v=$(echo "$@" | tr ' ' ,)
  t=$((STEP_LIMIT - 4))
  echo "--- ncu dram__bytes_read.sum, $v, B=256 r50 28x28 bf16 (cold caches: ncu flushes them), timeout ${t}s"
  timeout -k 3 $t "$n" --metrics dram__bytes_read.sum --kernel-name regex:"em_(generic|cluster)_kernel" \
    --launch-count $# --clock-control none --csv --print-units base --log-file "$STATE/ncu.csv" \
    $GC workload --impls "$v" --cases "256x2048x28:bf16" || rc=1
  cat "$STATE/ncu.csv" 2>/dev/null
  $GC ncu --log "$STATE/ncu.csv" --label "B=256 r50 28x28 bf16" --B 256 --d 2048 --hw 28 --dtype bf16 |
    tee "$STATE/head.50-ncu" || rc=1
  return $rc
}
export -f ncu_passes

write_summary
step build build
step canary canary
step cuda-correct cuda_correct
step cuda-timing cuda_timing
step table7 table7
step harness harness
step triton triton_step
step tests run_tests
step sanitizer sanitize
step ncu ncu_passes

echo "=== done in $(($(date +%s) - START))s (budget ${BUDGET}s)" >"$STATE/done"
write_summary
cat "$SUMMARY"
rm -rf "$STATE"
exit $FAILED
