"""Compile the Triton EM / context kernels for sm_90 without a GPU and report
ptxas registers, spills, the feature loads' width and the compile time.

    python scripts/triton_sm90.py [--kernels em,context,split] [--set full|ci|quick]
                                  [--json out.json] [--src TREE] [--check-spills BYTES]

Triton's front end and ptxas need no device: the kernels are compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` using the
launch parameters the launchers would pick (cream_kernels.triton.em.launch_config,
_common.feature_blocks), and the PTX goes through the ptxas Triton itself uses
for sm_90 (its bundled one, or TRITON_PTXAS_PATH) with -v. Must run WITHOUT
TRITON_INTERPRET. Each run compiles into a fresh Triton cache, so the compile
seconds are real (triton.compile, which runs ptxas once itself): wall time and
CPU time (this process + the ptxas it waits for; single-threaded, so about the
wall time on an idle machine, and robust to load).

Sets of configs:
  full   the SPEC.md benchmark shapes (d 1024/2048 x 14x14/28x28) x fp32/bf16 x
         NCHW/channels_last x the five EM forms it always had and the two context
         forms, plus the forms issue 17 added (per-image centroids V_BY_LABEL=False,
         classifier weight + training-free, cosine + sigma="auto", T=1, fp16) and the
         multi-row form (KB=4, d=64); ``--kernels split`` adds the split path's kernels
  ci     16 configs, every form, dtype and layout once (CI's spill check)
  base   the configs the script compiled before issue 17 (full without the added forms)
  quick  d=2048 28x28 only (the old --quick)

Load width: the feature tile's loads (tt.load of a [BLOCK_D, BLOCK_N] pointer tensor
of the feature dtype in the TTGIR), per-thread contiguous elements along the
unit-stride axis (sizePerThread) times the element size, in bytes; the narrowest
of the kernel's feature loads is reported. ``--src TREE`` compiles the kernels of
another checkout (e.g. a ``git archive`` of an older commit: the baseline).
``--check-spills BYTES`` exits 1 when any config spills more than BYTES.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
if "TRITON_CACHE_DIR" not in os.environ:  # a fresh cache: compile seconds are compiles, not cache hits
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_sm90_cache_")


def _src_arg(argv):
    for i, a in enumerate(argv):
        if a == "--src" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--src="):
            return a.split("=", 1)[1]
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.abspath(_src_arg(sys.argv)))
from cream_kernels.triton import context as ctx  # noqa: E402
from cream_kernels.triton import em  # noqa: E402
from cream_kernels.triton._common import feature_blocks, line_block  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

PTXAS = get_ptxas(90).path  # the ptxas Triton itself uses for sm_90
DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def features(d, N, dtype, cl):
    if cl:
        return torch.empty(1, N, d, dtype=dtype).transpose(1, 2)
    return torch.empty(1, d, N, dtype=dtype)


def _sig(fn, args: dict, consts: dict):
    """Signature + specialisation like the launcher's: ints == 1 become
    constexpr, ints and pointers divisible by 16 get the divisibility attribute."""
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}  # (older kernels: fewer args)
    sig, attrs, constexprs = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):  # pointer type
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                constexprs[name] = 1
            else:
                sig[name] = "i64" if abs(v) >= 2**31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    return sig, constexprs, attrs


def _cpu_s() -> float:
    """CPU seconds of this process and its waited-for children (the ptxas Triton runs)."""
    a, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + c.ru_utime + c.ru_stime


def compile_kernel(fn, args, consts, num_warps, num_stages=1, tile=None):
    """Compile fn for sm_90a; ``tile`` = (BLOCK_D, BLOCK_N, unit-stride axis) picks the
    feature loads whose width is reported."""
    sig, constexprs, attrs = _sig(fn, args, consts)
    src = ASTSource(fn.fn if hasattr(fn, "fn") and not hasattr(fn, "arg_names") else fn, sig, constexprs, attrs)
    t0, c0 = time.perf_counter(), _cpu_s()
    k = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    compile_s, compile_cpu_s = time.perf_counter() - t0, _cpu_s() - c0
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "k.ptx")
        with open(p, "w") as fh:
            fh.write(ptx)
        r = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", p, "-o", os.path.join(tmp, "k.o")],
                           capture_output=True, text=True)
    info = r.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", info).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", info).group(1))
    widths = {}
    for line in ptx.splitlines():
        m = re.search(r"ld\.global[^ \t]*", line)
        if m:
            op = m.group(0)
            widths[op] = widths.get(op, 0) + 1
    smem = k.metadata.shared
    # feature-tile loads: tt.load of a [BLOCK_D, BLOCK_N] pointer tensor of the feature dtype, and the
    # per-thread contiguous run (sizePerThread) its layout gives along the unit-stride axis
    ttgir = k.asm["ttgir"]
    layouts = dict(re.findall(r"(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([0-9, ]+)\]", ttgir))
    load_bytes = None
    f_loads = []
    if tile is not None:
        fdt = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[args["F"][1:]]
        esize = {"f32": 4, "f16": 2, "bf16": 2}[fdt]
        bd, bn, axis = tile
        for m in re.finditer(r"tt\.load[^\n]*tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>, (#blocked\d*)>", ttgir):
            if m.group(3) == fdt and (int(m.group(1)), int(m.group(2))) == (bd, bn):
                spt = [int(x) for x in layouts[m.group(4)].split(",")]
                f_loads.append(spt)
        if f_loads:
            load_bytes = min(spt[axis] for spt in f_loads) * esize
    return dict(regs=regs, spill_bytes=spill_st + spill_ld, shared=smem, ld_global=widths, f_load_spt=f_loads,
                load_bytes=load_bytes, compile_s=round(compile_s, 2),
                compile_cpu_s=round(compile_cpu_s, 2), cp_async=ptx.count("cp.async"),
                bar_sync=ptx.count("bar.sync"))


# EM forms: mode -> (HAS_W, HAS_V, V_BY_LABEL). "tab": learned tables by label; "rows":
# per-row centroids (V_BY_LABEL=False: gpu_check and the split path); "cam": given CAM,
# training-free; "w_tab": classifier weight + tables; "w_free": classifier weight,
# training-free (its CAM pass + masked means pass).
EM_MODES = {"tab": (False, True, True), "rows": (False, True, False), "cam": (False, False, False),
            "w_tab": (True, True, True), "w_free": (True, False, False)}


def em_case(d, N, dtype, cl, K=1, mode="tab", cosine=False, sigma_auto=False, num_stages=1, T=2):
    f3 = features(d, N, dtype, cl)
    if hasattr(em, "launch_config"):
        cfg = em.launch_config(f3, K)
        cfg.pop("groups")
    else:  # the kernel before issue 12 (one row per program)
        cfg = dict(KB=1, **feature_blocks(f3))
    num_warps = cfg.pop("num_warps")
    P = "*" + DT[dtype]
    args = dict(F=P, stride_b=f3.stride(0), stride_d=f3.stride(1), stride_n=f3.stride(2),
                CAM="*fp32", W="*fp32", VFG="*fp32", VBG="*fp32", LABELS="*i64",
                OUT="*fp32", ZOUT="*fp32", FGOUT="*fp32", BGOUT="*fp32", MIX="*fp32", PICKED="*u8",
                SIGMA_USED="*fp32", K=K, d=d, N=N, T=T, sigma=8.0, inv_sigma=0.125, ratio=0.2)
    has_w, has_v, by_label = EM_MODES[mode]
    consts = dict(HAS_W=has_w, HAS_V=has_v, V_BY_LABEL=by_label,
                  SIGMA_AUTO=sigma_auto, COSINE=cosine, HAS_LABELS=True, BLOCK_P=line_block(N), **cfg)
    tile = (cfg["BLOCK_D"], cfg["BLOCK_N"], 0 if cl else 1)
    r = compile_kernel(em._em_kernel, args, consts, num_warps, num_stages, tile)
    r.update(kernel="em", d=d, N=N, dtype=DT[dtype], layout="CL" if cl else "NCHW", K=K, mode=mode,
             cosine=cosine, sigma_auto=sigma_auto, T=T, num_warps=num_warps, num_stages=num_stages,
             BLOCK_N=cfg["BLOCK_N"], KB=cfg["KB"], VEC=cfg["VEC_D"] * cfg["VEC_N"])
    return r


def split_case(d, N, dtype, cl, last=False, cosine=False):
    """The small-batch split path's pass kernel (em._split_pass) with the blocks em._em_split picks."""
    f3 = features(d, N, dtype, cl)
    blocks = feature_blocks(f3, 1)
    num_warps = blocks.pop("num_warps")
    P = "*" + DT[dtype]
    args = dict(F=P, stride_b=f3.stride(0), stride_d=f3.stride(1), stride_n=f3.stride(2), FGOUT="*fp32",
                BGOUT="*fp32", MIX="*fp32", ZOUT="*fp32", WS="*fp32", WM="*fp32", K=3, d=d, N=N, P=49,
                tiles_per_chunk=3, inv_sigma=0.125)
    consts = dict(LAST=last, COSINE=cosine, PREFETCH=em._prefetch(f3), **blocks)
    tile = (blocks["BLOCK_D"], blocks["BLOCK_N"], 0 if cl else 1)
    r = compile_kernel(em._split_pass, args, consts, num_warps, tile=tile)
    r.update(kernel="split_pass", d=d, N=N, dtype=DT[dtype], layout="CL" if cl else "NCHW", last=last,
             cosine=cosine, num_warps=num_warps, BLOCK_N=blocks["BLOCK_N"], VEC=blocks["VEC_D"] * blocks["VEC_N"])
    return r


def split_reduce_case(d):
    bd = max(16, triton.next_power_of_2(d))
    args = dict(WS="*fp32", WM="*fp32", FGOUT="*fp32", BGOUT="*fp32", MIX="*fp32", d=d, N=784, P=49, F="*fp32")
    r = compile_kernel(em._split_reduce, args, dict(COSINE=False, BLOCK_D=bd), 4 if bd < 1024 else 8)
    r.update(kernel="split_reduce", d=d)
    return r


def context_case(d, N, dtype, cl, has_w=False, fused=True):
    f3 = features(d, N, dtype, cl)
    blocks = feature_blocks(f3)
    num_warps = blocks.pop("num_warps")
    P = "*" + DT[dtype]
    args = dict(F=P, stride_b=f3.stride(0), stride_d=f3.stride(1), stride_n=f3.stride(2), LABELS="*i64",
                CAM="*fp32", W="*fp32", MEANS="*fp32", NONEMPTY="*u8", FG="*fp32", BG="*fp32", TICKETS="*i32",
                B=32, d=d, N=N, ratio=0.2, lam=0.8)
    consts = dict(HAS_W=has_w, FUSED=fused, BLOCK_P=line_block(N), BLOCK_B=32, **blocks)
    tile = (blocks["BLOCK_D"], blocks["BLOCK_N"], 0 if cl else 1)
    r = compile_kernel(ctx._context_kernel, args, consts, num_warps, tile=tile)
    r.update(kernel="context", d=d, N=N, dtype=DT[dtype], layout="CL" if cl else "NCHW", has_w=has_w,
             num_warps=num_warps, BLOCK_N=blocks["BLOCK_N"], VEC=blocks["VEC_D"] * blocks["VEC_N"])
    return r


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# the five EM forms the script always compiled: (K, mode, cosine, sigma_auto)
BASE_EM = ((1, "tab", False, False), (1, "tab", True, False), (1, "w_tab", False, True),
           (5, "w_tab", False, True), (1, "cam", False, False))


def configs(which: str, kernels: str):
    """(label, thunk) per config of the set ``which`` (full / base / ci / quick)."""
    out = []
    em_on, ctx_on, split_on = ("em" in kernels.split(",")), ("context" in kernels), ("split" in kernels)

    def em_(d, N, dt, cl, K=1, mode="tab", cos=False, sa=False, T=2):
        out.append(("em", lambda: em_case(d, N, dt, cl, K, mode, cos, sa, T=T)))

    def ctx_(d, N, dt, cl, has_w):
        out.append(("context", lambda: context_case(d, N, dt, cl, has_w)))

    def split_(d, N, dt, cl, last, cos):
        out.append(("split", lambda: split_case(d, N, dt, cl, last, cos)))

    if which == "ci":  # every form, dtype and layout once: 16 compiles
        if em_on:
            em_(2048, 196, F32, False)                                   # tables, dot
            em_(2048, 196, BF16, True, cos=True)                         # tables, cosine
            em_(2048, 196, F16, False, 5, "w_tab", sa=True)              # W + tables, auto, K=5
            em_(2048, 196, F32, True, mode="w_tab", T=1)                 # W + tables, T=1
            em_(2048, 196, F16, True, mode="rows")                       # per-image centroids
            em_(2048, 196, F32, False, mode="w_free")                    # W, training-free
            em_(2048, 196, BF16, False, mode="cam")                      # CAM, training-free
            em_(2048, 196, F32, True, mode="tab", cos=True, sa=True)     # cosine + auto
            em_(64, 784, F32, False, 4, "w_tab", sa=True)                # multi-row (KB=4)
            em_(64, 784, BF16, True, 4, "tab", cos=True)                 # multi-row, CL
        if split_on:
            split_(2048, 196, F32, False, False, False)
            split_(2048, 196, BF16, True, True, True)
            out.append(("split", lambda: split_reduce_case(2048)))
        if ctx_on:
            ctx_(2048, 196, F32, False, True)
            ctx_(2048, 196, BF16, True, False)
            ctx_(2048, 196, F16, False, False)
        return out
    # full = base (what the script compiled before issue 17) + the forms issue 17 added
    shapes = [(2048, 784)] if which == "quick" else [(1024, 196), (1024, 784), (2048, 196), (2048, 784)]
    for d, N in shapes:
        for dt in (F32, BF16):
            for cl in (False, True):
                if em_on:
                    for K, mode, cos, sa in BASE_EM:
                        em_(d, N, dt, cl, K, mode, cos, sa)
                if split_on:
                    for last, cos in ((False, False), (True, False), (False, True)):
                        split_(d, N, dt, cl, last, cos)
                if ctx_on:
                    for has_w in (False, True):
                        ctx_(d, N, dt, cl, has_w)
    if which == "full":  # the forms issue 17 added, at the largest shapes, both layouts
        for d, N in ((2048, 196), (2048, 784)):
            for cl in (False, True):
                if em_on:
                    em_(d, N, F32, cl, mode="rows")
                    em_(d, N, BF16, cl, mode="w_free")
                    em_(d, N, F32, cl, mode="tab", cos=True, sa=True)
                    em_(d, N, BF16, cl, mode="w_tab", T=1)
                    em_(d, N, F16, cl)
                    em_(d, N, F16, cl, 5, "w_tab", sa=True)
                if ctx_on:
                    ctx_(d, N, F16, cl, True)
        if em_on:
            for dt in (F32, BF16):
                for cl in (False, True):
                    em_(64, 784, dt, cl, 4, "w_tab", sa=True)
                    em_(64, 784, dt, cl, 4, "tab", cos=True)
    if split_on:
        for d in sorted({d for d, _ in shapes}):
            out.append(("split", lambda d=d: split_reduce_case(d)))
    return out


def describe(r: dict) -> str:
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="em,context")
    ap.add_argument("--set", default="full", help="full, base, ci or quick, or several joined by commas")
    ap.add_argument("--quick", action="store_true", help="same as --set quick")
    ap.add_argument("--json")
    ap.add_argument("--src", help="the checkout whose kernels are compiled (default: this one)")
    ap.add_argument("--check-spills", type=int, default=None, metavar="BYTES",
                    help="exit 1 when a config spills more than BYTES")
    ap.add_argument("--table", action="store_true", help="one line per config instead of JSON lines")
    a = ap.parse_args()
    for w in a.set.split(","):
        if w not in ("full", "base", "ci", "quick"):
            ap.error(f"--set {a.set!r}: expected full, base, ci or quick (comma-separated)")
    which = "quick" if a.quick else a.set
    rows = []
    print(f"# triton {triton.__version__}, torch {torch.__version__}, ptxas {PTXAS}, set {which}", flush=True)
    for _kind, thunk in [c for w in which.split(",") for c in configs(w, a.kernels)]:
        r = thunk()
        rows.append(r)
        if a.table:
            lb = r.get("load_bytes")
            print(f"{describe(r):48s} regs {r['regs']:4d}  spill {r['spill_bytes']:7d} B  "
                  f"load {('-' if lb is None else str(lb) + ' B'):>5s}  {r['compile_s']:6.1f} s "
                  f"({r['compile_cpu_s']:.1f} s CPU)", flush=True)
        else:
            out = {k: v for k, v in r.items() if k != "ld_global"}
            print(json.dumps(out), flush=True)
    print(f"# {len(rows)} configs", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, set=which, kernels=a.kernels,
                           rows=rows), fh, indent=1)
    if a.check_spills is not None:
        bad = [r for r in rows if r["spill_bytes"] > a.check_spills]
        for r in bad:
            print(f"SPILL {describe(r)}: {r['spill_bytes']} B > {a.check_spills} B", file=sys.stderr)
        if bad:
            sys.exit(1)


if __name__ == "__main__":
    main()
