#!/usr/bin/env bash
# A regression check between two commits on this machine's CPU:
#
#   benchmarks/compare_commits.sh A B            # e.g. 07bde90 HEAD
#
# Builds both commits CPU-only (CREAM_KERNELS_CUDA=0), each from `git archive` in
# a temporary directory with its own temporary venv (torch==2.13.0, which pip
# takes from the machine's local wheel directory or index, never an unpinned
# torch), then runs the same pytest-benchmark selection with each commit's own
# benchmarks/ in alternating rounds (A B, B A, A B, ...) and prints, per row the
# two commits share, the median over the rounds of each commit's row median and
# the ratio B / A (below 1: B is faster), with every round's ratio and the load.
#
# Environment (all optional):
#   CREAM_COMPARE_ROUNDS   rounds per commit (default 3)
#   CREAM_COMPARE_K        pytest -k expression (default: the cpu rows of the headline
#                          case, B=1, B=256, bf16 and the update op; see below)
#   CREAM_COMPARE_FILES    benchmark files, relative to the checkout (default: the em and
#                          update suites)
#   CREAM_COMPARE_VENV     an existing venv to use for both commits instead of creating two
#                          (it needs torch, numpy, pybind11, ninja, setuptools, pytest,
#                          pytest-benchmark); the builds stay separate
#   CREAM_COMPARE_KEEP=1   keep the temporary directory (printed) instead of removing it
#   CREAM_BENCH_*          passed through to the suite (e.g. CREAM_BENCH_BUDGET_S)
#   OMP_NUM_THREADS        passed through: the threads of both builds' kernels and of torch
#
# Wall times on a shared machine move with the load: read the ratios of one run
# (both commits saw the same machine, round by round), not absolute figures.
set -euo pipefail

usage() { echo "usage: $0 COMMIT_A COMMIT_B" >&2; exit 2; }
[ $# -eq 2 ] || usage
REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
ROUNDS=${CREAM_COMPARE_ROUNDS:-3}
FILES=${CREAM_COMPARE_FILES:-"benchmarks/test_bench_em.py benchmarks/test_bench_update.py"}
K=${CREAM_COMPARE_K:-"(test_em and (1024x14x14-B32-fp32-T2-cpu or 1024x14x14-B1-fp32-T2-cpu or 1024x14x14-B256-fp32-T2-cpu or 1024x14x14-B32-bf16-T2-cpu)) or (test_update and 1024x14x14-B32-fp32-cpu)"}
case "$ROUNDS" in ''|*[!0-9]*|0) echo "error: CREAM_COMPARE_ROUNDS must be a positive integer, got '$ROUNDS'" >&2; exit 2;; esac

SHA_A=$(git -C "$REPO" rev-parse --verify --quiet "$1^{commit}") || { echo "error: '$1' is not a commit of $REPO" >&2; exit 2; }
SHA_B=$(git -C "$REPO" rev-parse --verify --quiet "$2^{commit}") || { echo "error: '$2' is not a commit of $REPO" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cream-compare.XXXXXX")
if [ "${CREAM_COMPARE_KEEP:-0}" = 1 ]; then echo "work directory kept: $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

setup_side() {  # side sha
  local side=$1 sha=$2 dir="$WORK/$1"
  mkdir -p "$dir/src"
  git -C "$REPO" archive "$sha" | tar -x -C "$dir/src"
  if [ -n "${CREAM_COMPARE_VENV:-}" ]; then
    ln -s "$CREAM_COMPARE_VENV" "$dir/venv"
  else
    echo "[$side ${sha:0:7}] creating a venv (torch==2.13.0, pytest-benchmark, build tools)"
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/python" -m pip install -q torch==2.13.0 numpy pybind11 ninja "setuptools>=64" pytest pytest-benchmark \
      > "$dir/pip.log" 2>&1 || { tail -20 "$dir/pip.log" >&2; echo "error: pip install failed for $side" >&2; exit 1; }
  fi
  echo "[$side ${sha:0:7}] building the CPU extension"
  (cd "$dir/src" && CREAM_KERNELS_CUDA=0 CREAM_KERNELS_BUILD_DIR="$dir/build" \
    "$dir/venv/bin/python" setup.py -q build_ext --inplace) > "$dir/build.log" 2>&1 \
    || { tail -20 "$dir/build.log" >&2; echo "error: the build of $side failed" >&2; exit 1; }
}

run_side() {  # side round
  local side=$1 r=$2 dir="$WORK/$1"
  # shellcheck disable=SC2086
  (cd "$dir/src" && PYTHONPATH="$dir/src:$dir/src/python" CREAM_BENCH_SAVE="$dir/round$r.json" \
    "$dir/venv/bin/python" -m pytest -q -p no:cacheprovider $FILES --benchmark-only -k "$K") > "$dir/round$r.log" 2>&1 \
    || { tail -30 "$dir/round$r.log" >&2; echo "error: the benchmarks of $side failed in round $r" >&2; exit 1; }
  echo "  round $r $side: $(grep -c '"median_us"' "$dir/round$r.json" 2>/dev/null || echo 0) rows, load $(cut -d' ' -f1-3 /proc/loadavg)"
}

setup_side A "$SHA_A"
setup_side B "$SHA_B"
echo "rounds: $ROUNDS; -k: $K"
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then run_side A "$r"; run_side B "$r"; else run_side B "$r"; run_side A "$r"; fi
done

"$WORK/B/venv/bin/python" - "$WORK" "$ROUNDS" "$SHA_A" "$SHA_B" <<'EOF'
import json, platform, statistics, sys
from pathlib import Path

work, rounds, sha_a, sha_b = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]

def load(side):
    rows, meta = {}, []
    for r in range(1, rounds + 1):
        doc = json.loads((work / side / f"round{r}.json").read_text())
        meta.append(doc["metadata"])
        for row in doc["rows"]:
            if row.get("median_us"):
                rows.setdefault((row["suite"], row["key"], row["impl"]), []).append((row["median_us"], row.get("load1")))
    return rows, meta

a, meta_a = load("A")
b, meta_b = load("B")
m = meta_b[0]
print(f"\n## {sha_a[:7]} (A) vs {sha_b[:7]} (B): {rounds} alternating rounds, each commit's own benchmarks/")
print(f"machine: {m.get('device')}, torch {m.get('torch')}, python {platform.python_version()}, "
      f"torch threads {m.get('torch_threads')}, OpenMP threads {m.get('openmp_threads_C')}")
loads = [x.get("load_avg_start", [None])[0] for x in meta_a + meta_b]
print(f"1-min load at the start of the {2 * rounds} sessions: {', '.join(str(x) for x in loads)}\n")
print("| suite | case | impl | A median (ms) | B median (ms) | B / A | B / A by round | load1 by round (A; B) |")
print("|---|---|---|---:|---:|---:|---|---|")
for key in sorted(set(a) | set(b)):
    ra, rb = a.get(key, []), b.get(key, [])
    ma = statistics.median(x for x, _ in ra) / 1e3 if ra else None
    mb = statistics.median(x for x, _ in rb) / 1e3 if rb else None
    ratio = f"{mb / ma:.2f}" if ma and mb else "-"
    per = ", ".join(f"{y[0] / x[0]:.2f}" for x, y in zip(ra, rb)) if ra and rb else "-"
    ld = "; ".join(", ".join(str(l) for _, l in rs) or "-" for rs in (ra, rb))
    fmt = lambda v: f"{v:.3f}" if v is not None else "(absent)"
    print(f"| {key[0]} | {key[1]} | {key[2]} | {fmt(ma)} | {fmt(mb)} | {ratio} | {per} | {ld} |")
EOF
