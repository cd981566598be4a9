#!/usr/bin/env bash
# A regression check between two commits on this machine's CPU:
#
#   benchmarks/compare_commits.sh A B            # e.g. 07bde90 HEAD
#
# Builds both commits CPU-only (CREAM_KERNELS_CUDA=0), each from `git archive` in
# a temporary directory with its own temporary venv (torch==2.13.0, which pip
# takes from the machine's local wheel directory or index, never an unpinned
# torch), then runs the same pytest-benchmark selection with each commit's own
# benchmarks/ in alternating rounds (A B, B A, A B, ...) and prints, per timed
# test, the median over the rounds of each commit's wall-time median and of its
# process CPU time per call (all threads, recorded by a small pytest plugin the
# script loads into both runs), the ratios B / A (below 1: B is faster), every
# round's ratios and the load.
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

# A pytest plugin loaded into both commits' runs: it records, per timed test, the
# median wall time and the process CPU time per call (all threads; pool spinning
# included, waits for a core excluded), which moves much less with the load.
cat > "$WORK/cream_compare_plugin.py" <<'PY'
import json, os, time
import pytest_benchmark.fixture as _fx

_orig = _fx.BenchmarkFixture.pedantic


def _pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
    c0 = time.process_time()
    result = _orig(self, target, args=args, kwargs=kwargs, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds,
                   iterations=iterations)
    cpu = time.process_time() - c0
    stats = getattr(getattr(self, "stats", None), "stats", None)
    with open(os.environ["CREAM_COMPARE_LOG"], "a") as f:
        f.write(json.dumps({"name": self.name, "median_us": stats.median * 1e6 if stats else None,
                            "cpu_us": cpu / ((rounds + warmup_rounds) * iterations) * 1e6,
                            "load1": os.getloadavg()[0]}) + "\n")
    return result


_fx.BenchmarkFixture.pedantic = _pedantic
PY

run_side() {  # side round
  local side=$1 r=$2 dir="$WORK/$1"
  # shellcheck disable=SC2086
  (cd "$dir/src" && PYTHONPATH="$dir/src:$dir/src/python:$WORK" CREAM_COMPARE_LOG="$dir/round$r.jsonl" \
    "$dir/venv/bin/python" -m pytest -q -p no:cacheprovider -p cream_compare_plugin $FILES --benchmark-only -k "$K") \
    > "$dir/round$r.log" 2>&1 \
    || { tail -30 "$dir/round$r.log" >&2; echo "error: the benchmarks of $side failed in round $r" >&2; exit 1; }
  echo "  round $r $side: $(wc -l < "$dir/round$r.jsonl" 2>/dev/null || echo 0) rows, load $(cut -d' ' -f1-3 /proc/loadavg)"
}

setup_side A "$SHA_A"
setup_side B "$SHA_B"
echo "rounds: $ROUNDS; -k: $K"
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then run_side A "$r"; run_side B "$r"; else run_side B "$r"; run_side A "$r"; fi
done

"$WORK/B/venv/bin/python" - "$WORK" "$ROUNDS" "$SHA_A" "$SHA_B" "${OMP_NUM_THREADS:-unset}" <<'EOF'
import json, os, platform, statistics, sys
from pathlib import Path

work, rounds, sha_a, sha_b, omp = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]


def load(side):
    rows = {}
    for r in range(1, rounds + 1):
        path = work / side / f"round{r}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            row = json.loads(line)
            if row.get("median_us"):
                rows.setdefault(row["name"], []).append(row)
    return rows


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


a, b = load("A"), load("B")
med = lambda rs, k: statistics.median(x[k] for x in rs) / 1e3
print(f"\n## {sha_a[:7]} (A) vs {sha_b[:7]} (B): {rounds} alternating rounds (A B, B A, ...), each commit's own benchmarks/")
print(f"\nmachine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; python {platform.python_version()}; "
      f"OMP_NUM_THREADS={omp}. wall = the row's pytest-benchmark median; CPU = process CPU time per call "
      "(all threads); each the median over the rounds; load1 = 1-min load average after each row.\n")
print("| test | A wall (ms) | B wall (ms) | B/A wall | B/A wall by round | A CPU (ms) | B CPU (ms) | B/A CPU | B/A CPU by round | load1 (A; B) |")
print("|---|---:|---:|---:|---|---:|---:|---:|---|---|")
for name in sorted(set(a) | set(b)):
    ra, rb = a.get(name, []), b.get(name, [])
    if not ra or not rb:
        print(f"| {name} | only in {'A' if ra else 'B'} | | | | | | | | |")
        continue
    wa, wb, ca, cb = med(ra, "median_us"), med(rb, "median_us"), med(ra, "cpu_us"), med(rb, "cpu_us")
    pw = ", ".join(f"{y['median_us'] / x['median_us']:.2f}" for x, y in zip(ra, rb))
    pc = ", ".join(f"{y['cpu_us'] / x['cpu_us']:.2f}" for x, y in zip(ra, rb))
    ld = "; ".join(", ".join(f"{x['load1']:.1f}" for x in rs) for rs in (ra, rb))
    print(f"| {name} | {wa:.3f} | {wb:.3f} | {wb / wa:.2f} | {pw} | {ca:.3f} | {cb:.3f} | {cb / ca:.2f} | {pc} | {ld} |")
EOF
