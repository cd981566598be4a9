#!/usr/bin/env bash
# GPU verification of cream_kernels' CUDA kernels in ONE device call (H100/H200):
#
#   device run:  bash scripts/gpu_check.sh
#
# Steps (each with its own time limit; the whole run stays under ~9 minutes):
#   1. build the extension in place with the machine's python3/torch/nvcc
#      (sm_90a only by default, to save time: CREAM_KERNELS_CUDA_ARCHS overrides),
#      and dump the kernels' resource usage (registers, spills, shared memory);
#   2. nvidia-smi and `python -m cream_kernels`;
#   3. python -m pytest tests -q (the suite includes CUDA when a GPU is present),
#      then its CUDA tests again with CREAM_KERNELS_CUDA_VARIANT=cluster;
#   4. a script running both ops on test-like shapes with the cuda backend, for
#      both EM variants (CREAM_KERNELS_CUDA_VARIANT=generic and =cluster):
#      plain against the reference, then under compute-sanitizer memcheck and
#      racecheck (fewer shapes, outputs poisoned with NaN);
#   5. kernel timings (CUPTI device times, L2 flushed before each call) of the
#      targets, both EM variants, with % of the measured copy bandwidth;
#   6. python -m pytest benchmarks/ --benchmark-only on the GPU grid.
# Logs go to $OUT (8 files at most, flat): build.log info.log tests.log
# sanitizer.log timing.log bench.log bench.json summary.txt. Every step tees its
# log there as it runs, so a timeout still leaves what was printed.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-530}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
TMP=$(mktemp -d)

export PY OUT TMP
left() { echo $((BUDGET - ($(date +%s) - START))); }
# step NAME LIMIT_S LOG FUNCTION: runs the (exported) shell function in a child
# bash under a time limit (cut to what is left); its output is tee'd to LOG.
step() {
  local name=$1 limit=$2 log=$3 fn=$4
  local l
  l=$(left)
  if ((l < 25)); then
    echo "SKIP $name: out of time" | tee -a "$log"
    echo "$name: skipped (time)" >>"$SUMMARY"
    return
  fi
  ((limit > l - 15)) && limit=$((l - 15))
  echo "=== $name (limit ${limit}s, $(($(date +%s) - START))s elapsed)" | tee -a "$log"
  local t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$fn" 2>&1 | tee -a "$log"
  local rc=$?
  echo "$name: rc=$rc ($(($(date +%s) - t0))s)" | tee -a "$SUMMARY"
}

# ---------------------------------------------------------------- 1. build
build() {
  command -v nvcc || ls /usr/local/cuda*/bin/nvcc
  CREAM_KERNELS_CUDA=1 CREAM_KERNELS_CUDA_ARCHS=${CREAM_KERNELS_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py build_ext --inplace || return 1
  local so
  so=$(ls -t cream_kernels/_C*.so | head -1)
  local cuobj
  cuobj=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
  echo "--- resource usage of $so (per arch: registers, stack frame, static shared, local)"
  [ -n "$cuobj" ] || { echo "cuobjdump not found"; return 0; }
  "$cuobj" --dump-resource-usage "$so" | sed 's/^[[:space:]]*//' |
    awk '/^arch/{a=$3} /^Function/{f=$2; sub(":$","",f)} /^REG/{print a, $1, $2, $3, $4, f}' |
    { command -v c++filt >/dev/null && c++filt || cat; } |
    sed -E 's/cream::cuda:://g; s/cream:://g; s/\((EMParams|ContextParams)[^)]*\)//' | sort -u
}
export -f build
step build 180 "$OUT/build.log" build

# ---------------------------------------------------------------- 2. info
info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -m cream_kernels
}
export -f info
step info 40 "$OUT/info.log" info

# ---------------------------------------------------------------- 3. tests
run_tests() {
  local rc=0
  "$PY" -m pytest tests -q -p no:cacheprovider || rc=1
  echo "--- the CUDA tests again, with the cluster EM variant"
  CREAM_KERNELS_CUDA_VARIANT=cluster "$PY" -m pytest tests -q -p no:cacheprovider -k cuda || rc=1
  return $rc
}
export -f run_tests
if [ -d tests ]; then
  step tests 160 "$OUT/tests.log" run_tests
else
  echo "tests: no tests/ directory" >>"$SUMMARY"
fi

# ---------------------------------------------------------------- 4. sanitizer
cat >"$TMP/ops_smoke.py" <<'PYEOF'
"""Both ops, cuda backend, test-like shapes, against the reference (loose bounds:
the test suite holds the real tolerances). SMOKE_SMALL=1 (under the sanitizer):
fewer cases and no reference calls, so that mostly our kernels are instrumented."""
import os
import torch
import cream_kernels
from cream_kernels import ops

small = os.environ.get("SMOKE_SMALL") == "1"
dev = torch.device("cuda")
g = torch.Generator(device="cpu").manual_seed(0)
cases = [  # dtype, B, d, h, w, channels_last
    (torch.float32, 2, 59, 7, 7, False),
    (torch.bfloat16, 2, 64, 14, 14, False),
    (torch.float16, 2, 40, 13, 17, True),
    (torch.bfloat16, 3, 111, 7, 7, True),
    (torch.float32, 2, 128, 28, 28, False),
]
if small:
    cases = cases[:3]
worst = {}
def note(key, a, b):
    if small:  # no reference: only check that every output was written (poisoned with NaN)
        err = 0.0 if a.numel() == 0 or torch.isfinite(a.float()).all() else float("nan")
    else:
        err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    worst[key] = max(worst.get(key, 0.0), err) if err == err else err
ref_backend = "cuda" if small else "reference"
for dtype, B, d, h, w, cl in cases:
    f = torch.randn(B, d, h, w, generator=g).to(dtype).to(dev)
    if cl:
        f = f.contiguous(memory_format=torch.channels_last)
    cam = torch.randn(B, h, w, generator=g).to(dev)
    C = 5
    fg, bg = torch.randn(C, d, generator=g).to(dev), torch.randn(C, d, generator=g).to(dev)
    lab = torch.randint(0, C, (B,), generator=g).to(dev)
    for T in ((1, 2) if small else (1, 2, 3)):
        for sim in ("dot", "cosine"):
            for mode in ("labels", "per_image", "training_free"):
                if mode == "labels":
                    args = (fg, bg, lab)
                elif mode == "per_image":
                    args = (fg[lab], bg[lab], None)
                else:
                    args = (None, None, None)
                kw = dict(num_iters=T, similarity=sim, return_extras=True)
                r = cream_kernels.em_reactivate(f, cam, *args, backend="cuda", **kw)
                q = r if small else cream_kernels.em_reactivate(f, cam, *args, backend="reference", **kw)
                for name, a, b in zip(r._fields, r, q):
                    note("em." + name, a, b)
    W = torch.randn(C, d, generator=g).to(dev) * 0.1
    for src in ("cam", "weight"):
        kw = dict(cam=cam) if src == "cam" else dict(classifier_weight=W)
        t1 = [torch.randn(C, d, generator=g).to(dev) for _ in range(2)]
        t2 = [t.clone() for t in t1]
        cream_kernels.update_context_embeddings(*t1, f, lab, backend="cuda", **kw)
        cream_kernels.update_context_embeddings(*t2, f, lab, backend=ref_backend, **kw)
        note("update." + src, torch.stack(t1), torch.stack(t2))
        m1, n1 = ops.context_stats(f, lab, num_classes=C, backend="cuda", **kw)
        m2, n2 = ops.context_stats(f, lab, num_classes=C, backend=ref_backend, **kw)
        note("stats." + src, m1, m2)
        assert torch.equal(n1.cpu(), n2.cpu()), "nonempty flags differ"
        ops.context_apply(*t1, m1, n1, lab, backend="cuda")
        ops.context_apply(*t2, m2, n2, lab, backend=ref_backend)
        note("apply." + src, torch.stack(t1), torch.stack(t2))
torch.cuda.synchronize()
print("variant", os.environ.get("CREAM_KERNELS_CUDA_VARIANT", "auto"), "max abs errors:")
for k, v in sorted(worst.items()):
    print(f"  {k:<22} {v:.3e}{'   <-- LARGE' if v > 2e-2 else ''}")
bad = [k for k, v in worst.items() if not v <= 2e-2]
if bad:
    raise SystemExit(f"errors above 2e-2 (or NaN): {bad}")
print("smoke OK")
PYEOF
sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  [ -n "$cs" ] || { echo "compute-sanitizer not found"; return 1; }
  local rc=0 v
  for v in generic cluster; do
    echo "--- plain run, variant $v (no sanitizer)"
    CREAM_KERNELS_CUDA_VARIANT=$v "$PY" "$TMP/ops_smoke.py" || rc=1
  done
  for v in generic cluster; do
    echo "--- memcheck, variant $v"
    CREAM_KERNELS_CUDA_VARIANT=$v CREAM_KERNELS_DEBUG_POISON=1 SMOKE_SMALL=1 "$cs" --tool memcheck \
      --error-exitcode 9 --print-limit 20 "$PY" "$TMP/ops_smoke.py" || rc=1
  done
  for v in generic cluster; do
    echo "--- racecheck, variant $v"
    CREAM_KERNELS_CUDA_VARIANT=$v SMOKE_SMALL=1 "$cs" --tool racecheck --racecheck-report hazard \
      --error-exitcode 9 --print-limit 20 "$PY" "$TMP/ops_smoke.py" || rc=1
  done
  return $rc
}
export -f sanitize
step sanitizer 160 "$OUT/sanitizer.log" sanitize

# ---------------------------------------------------------------- 5. timings of the targets
cat >"$TMP/timing.py" <<'PYEOF'
"""Device time of the cream_kernels CUDA kernels (CUPTI, via torch.profiler), L2
flushed before every call, against the measured copy bandwidth."""
import os
import torch
import cream_kernels
from torch.profiler import ProfilerActivity, profile

dev = torch.device("cuda")
torch.manual_seed(0)
x = torch.empty(1 << 28, device=dev)
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
e0.record()
for _ in range(10):
    y.copy_(x)
e1.record()
torch.cuda.synchronize()
bw = 2 * x.numel() * 4 * 10 / (e0.elapsed_time(e1) * 1e-3)
del x, y
flush = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")

def device_us(fn, reps):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        if "cream::cuda::" in e.key:
            t = getattr(e, "device_time_total", None)
            if t is None:
                t = getattr(e, "cuda_time_total", 0.0)
            per[e.key.split("<")[0].split("(")[0].replace("void ", "").replace("cream::cuda::", "")] = t / reps
    return per

rows = []
def run(name, fn, nbytes, variant, reps=20):
    os.environ["CREAM_KERNELS_CUDA_VARIANT"] = variant
    per = device_us(fn, reps)
    us = sum(per.values())
    gbs = nbytes / (us * 1e-6) / 1e9 if us else float("nan")
    rows.append((name, variant, "+".join(sorted(per)) or "?", us, gbs, 100 * nbytes / (us * 1e-6) / bw if us else float("nan")))
    print(f"{name:<34} {variant:<8} {rows[-1][2]:<34} {us:9.1f} us {gbs:8.0f} GB/s {rows[-1][5]:6.1f}% of copy BW", flush=True)

dt = {"bf16": torch.bfloat16, "fp32": torch.float32}
em_cases = [  # name, B, d, hw, dtype, T
    ("em vgg16 14x14 B1 T2", 1, 1024, 14, "bf16", 2),
    ("em vgg16 14x14 B1 T2", 1, 1024, 14, "fp32", 2),
    ("em vgg16 14x14 B32 T1", 32, 1024, 14, "bf16", 1),
    ("em vgg16 14x14 B32 T4", 32, 1024, 14, "bf16", 4),
    ("em vgg16 14x14 B32 T1", 32, 1024, 14, "fp32", 1),
    ("em vgg16 14x14 B32 T4", 32, 1024, 14, "fp32", 4),
    ("em r50 14x14 B256 T2", 256, 2048, 14, "bf16", 2),
    ("em r50 28x28 B256 T2", 256, 2048, 28, "bf16", 2),
    ("em r50 28x28 B256 T2", 256, 2048, 28, "fp32", 2),
]
for name, B, d, hw, dts, T in em_cases:
    f = torch.randn(B, d, hw, hw, device=dev).to(dt[dts])
    cam = torch.randn(B, hw, hw, device=dev)
    vf, vb = torch.randn(B, d, device=dev), torch.randn(B, d, device=dev)
    fn = lambda: cream_kernels.em_reactivate(f, cam, vf, vb, num_iters=T, backend="cuda")
    for v in ("generic", "cluster"):
        run(f"{name} {dts}", fn, f.numel() * f.element_size(), v, reps=10 if B == 256 else 20)
    del f
for name, B, d, hw in (("update r50 14x14 B256", 256, 2048, 14), ("update r50 28x28 B256", 256, 2048, 28)):
    f = torch.randn(B, d, hw, hw, device=dev).to(torch.bfloat16)
    cam = torch.randn(B, hw, hw, device=dev)
    W = torch.randn(1000, d, device=dev) * 0.01
    lab = torch.randint(0, 1000, (B,), device=dev)
    tf, tb = torch.zeros(1000, d, device=dev), torch.zeros(1000, d, device=dev)
    run(name + " bf16 cam", lambda: cream_kernels.update_context_embeddings(tf, tb, f, lab, cam=cam, backend="cuda"),
        f.numel() * 2, "generic", reps=10)
    run(name + " bf16 weight", lambda: cream_kernels.update_context_embeddings(tf, tb, f, lab, classifier_weight=W,
        backend="cuda"), f.numel() * 2, "generic", reps=10)
    del f
print("\nTargets (H100): B1 VGG16 <= 15 us; B32 T4 <= 1.3 x T1; r50 28x28 B256 bf16 T2 >= 80%; update B256 >= 70%")
t = {(r[0], r[1]): r[3] for r in rows}
for dts in ("bf16", "fp32"):
    for v in ("generic", "cluster"):
        a, b = t.get((f"em vgg16 14x14 B32 T1 {dts}", v)), t.get((f"em vgg16 14x14 B32 T4 {dts}", v))
        if a and b:
            print(f"B32 T4/T1 {dts} {v}: {b / a:.2f}")
PYEOF
timing() { "$PY" "$TMP/timing.py"; }
export -f timing
step timing 90 "$OUT/timing.log" timing

# ---------------------------------------------------------------- 6. benchmarks
bench() {
  CREAM_BENCH_DEVICE=cuda CREAM_BENCH_COMPILE=${CREAM_BENCH_COMPILE:-0} CREAM_BENCH_BUDGET_S=${CREAM_BENCH_BUDGET_S:-0.2} \
    "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/bench.json"
}
export -f bench
if [ -d benchmarks ]; then
  step bench 120 "$OUT/bench.log" bench
fi

rm -rf "$TMP"
echo "=== done in $(($(date +%s) - START))s" | tee -a "$SUMMARY"
cat "$SUMMARY"
