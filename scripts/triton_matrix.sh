#!/usr/bin/env bash
# The sm_90a compile matrix of the Triton kernels over Triton versions (issue 17).
#
#   scripts/triton_matrix.sh [--venv-root DIR] [--versions "3.6.0 3.7.1 3.8.0 3.9.0"]
#                            [--out FILE.md] [--] [triton_sm90.py options, e.g. --set ci]
#
# For each Triton version: a venv DIR/venv-triton-VERSION (made on first use, kept for
# the next run) with the pinned CPU torch beside triton==VERSION from PyPI, then
# scripts/triton_sm90.py (no GPU needed: Triton's front end + its ptxas -v) in it.
# Prints one table, config x version -> registers / spill bytes / feature-load width /
# compile seconds, a one-line summary per version and the config count; --out also
# writes it (markdown) with the date, the machine's load and the versions.
# DIR defaults to $TRITON_MATRIX_VENVS or ~/.cache/cream_kernels/triton-venvs; keep it
# outside the source tree. Compiles are CPU-heavy: develop with --set ci.
# TRITON_MATRIX_KEEP=DIR keeps each version's triton_sm90.py JSON in DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT="${TRITON_MATRIX_VENVS:-$HOME/.cache/cream_kernels/triton-venvs}"
VERSIONS="3.6.0 3.7.1 3.8.0 3.9.0"
OUT=""
TORCH="${TRITON_MATRIX_TORCH:-torch==2.13.0}"  # the CI pin (.ci/run)
while [ $# -gt 0 ]; do
    case "$1" in
        --venv-root) ROOT="$2"; shift 2 ;;
        --versions) VERSIONS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
mkdir -p "$ROOT"
if [ -n "${TRITON_MATRIX_KEEP:-}" ]; then  # keep each version's JSON there
    TMP="$TRITON_MATRIX_KEEP"; mkdir -p "$TMP"
else
    TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
fi
LOAD0="$(cut -d' ' -f1-3 /proc/loadavg)"
for v in $VERSIONS; do
    venv="$ROOT/venv-triton-$v"
    if ! "$venv/bin/python" -c "import triton, torch, sys; sys.exit(triton.__version__ != '$v')" 2>/dev/null; then
        echo "== making $venv (triton==$v, $TORCH)" >&2
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q "$TORCH" "triton==$v" numpy >&2
    fi
    echo "== triton $v" >&2
    env -u TRITON_INTERPRET "$venv/bin/python" scripts/triton_sm90.py --table --json "$TMP/$v.json" "$@" >&2
done
LOAD1="$(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$TMP" "$OUT" "$LOAD0" "$LOAD1" "$*" $VERSIONS <<'PY'
import datetime, json, os, sys

tmp, out, load0, load1, args, *versions = sys.argv[1:]


def describe(r):
    if r["kernel"] == "em":
        form = r["mode"] + ("+cos" if r["cosine"] else "") + ("+auto" if r["sigma_auto"] else "")
        form += f" K={r['K']}" + (f" T={r['T']}" if r.get("T", 2) != 2 else "")
    elif r["kernel"] == "context":
        form = "w" if r["has_w"] else "cam"
    elif r["kernel"] == "split_pass":
        form = ("last" if r["last"] else "em") + ("+cos" if r["cosine"] else "")
    else:
        return f"split_reduce d={r['d']}"
    return f"{r['kernel']} {r['d']}x{r['N']} {r['dtype']} {r['layout']} {form}"


runs = {v: json.load(open(os.path.join(tmp, f"{v}.json"))) for v in versions}
torch_v = {runs[v]["torch"] for v in versions}
order, cells = [], {}
for v in versions:
    for r in runs[v]["rows"]:
        key = describe(r)
        if key not in cells:
            order.append(key)
            cells[key] = {}
        cells[key][v] = r


def cell(r):
    if r is None:
        return "-"
    lb = r.get("load_bytes")
    cpu = r.get("compile_cpu_s")
    return (f"{r['regs']} / {r['spill_bytes']} / {'-' if lb is None else lb} / {r['compile_s']:.1f}"
            + ("" if cpu is None else f" ({cpu:.1f})"))


lines = [f"# Triton sm_90a compile matrix ({datetime.date.today().isoformat()})", "",
         f"scripts/triton_matrix.sh {args}".rstrip(), "",
         f"Triton {', '.join(versions)}; torch {', '.join(sorted(torch_v))} (CPU); ptxas: each Triton's own for sm_90.",
         f"Load average (1/5/15 min) at start {load0}, at end {load1}: compile seconds are wall time on this "
         f"machine at that load.", "",
         "Cell: registers / spill bytes (stores + loads) / feature-load width in bytes / compile seconds, wall "
         "(CPU: this process + its ptxas; about the idle wall time).", "",
         "| config | " + " | ".join(versions) + " |", "|---|" + "---|" * len(versions)]
for key in order:
    lines.append(f"| {key} | " + " | ".join(cell(cells[key].get(v)) for v in versions) + " |")
lines += ["", "Per version (kernel: max spills, register range, narrowest feature load, max compile seconds, configs):", ""]
for v in versions:
    parts = []
    for kern in ("em", "context", "split_pass", "split_reduce"):
        rows = [r for r in runs[v]["rows"] if r["kernel"] == kern]
        if not rows:
            continue
        loads = [r["load_bytes"] for r in rows if r.get("load_bytes") is not None]
        parts.append(f"{kern}: max spill {max(r['spill_bytes'] for r in rows)} B, "
                     f"regs {min(r['regs'] for r in rows)}-{max(r['regs'] for r in rows)}, "
                     + (f"loads >= {min(loads)} B, " if loads else "")
                     + f"compile <= {max(r['compile_s'] for r in rows):.1f} s"
                     + (f" ({max(r['compile_cpu_s'] for r in rows):.1f} s CPU)" if all("compile_cpu_s" in r for r in rows)
                        else "")
                     + f", {len(rows)} configs")
    lines.append(f"- Triton {v}: " + "; ".join(parts))
lines.append("")
lines.append(f"{len(order)} configs per version.")
text = "\n".join(lines) + "\n"
print(text)
if out:
    with open(out, "w") as fh:
        fh.write(text)
PY
