"""Compile the Triton EM / context kernels for sm_90 without a GPU and report
ptxas registers, spills and the global load widths in the PTX.

    python scripts/triton_sm90.py [--kernels em,context] [--json out.json]

Triton's front end and ptxas need no device: the kernels are compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` using the
launch parameters the launchers would pick (cream_kernels.triton.em.launch_config,
_common.feature_blocks) for the SPEC.md benchmark shapes, and the PTX goes
through Triton's bundled ptxas with -v. Must run WITHOUT TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
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


def compile_kernel(fn, args, consts, num_warps, num_stages=1):
    sig, constexprs, attrs = _sig(fn, args, consts)
    src = ASTSource(fn.fn if hasattr(fn, "fn") and not hasattr(fn, "arg_names") else fn, sig, constexprs, attrs)
    k = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "k.ptx")
        open(p, "w").write(ptx)
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
    # feature-tile loads: tt.load of a 2-D pointer tensor of the feature dtype, and the
    # per-thread contiguous run (sizePerThread) the layout gives along the unit-stride axis
    ttgir = k.asm["ttgir"]
    layouts = dict(re.findall(r"(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([0-9, ]+)\]", ttgir))
    fdt = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}[args["F"][1:]]
    f_loads = []
    for m in re.finditer(r"tt\.load[^\n]*tensor<(\d+)x(\d+)x!tt\.ptr<(\w+)>, (#blocked\d*)>", ttgir):
        if m.group(3) == fdt:
            spt = [int(x) for x in layouts[m.group(4)].split(",")]
            f_loads.append(spt)
    return dict(regs=regs, spill_bytes=spill_st + spill_ld, shared=smem, ld_global=widths, f_load_spt=f_loads,
                cp_async=ptx.count("cp.async"), bar_sync=ptx.count("bar.sync"))


def em_case(d, N, dtype, cl, K=1, mode="tab", cosine=False, sigma_auto=False, num_stages=1):
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
                SIGMA_USED="*fp32", K=K, d=d, N=N, T=2, sigma=8.0, inv_sigma=0.125, ratio=0.2)
    consts = dict(HAS_W=mode.startswith("w"), HAS_V=mode.endswith("tab"), V_BY_LABEL=mode.endswith("tab"),
                  SIGMA_AUTO=sigma_auto, COSINE=cosine, HAS_LABELS=True, BLOCK_P=line_block(N), **cfg)
    r = compile_kernel(em._em_kernel, args, consts, num_warps, num_stages)
    r.update(kernel="em", d=d, N=N, dtype=DT[dtype], layout="CL" if cl else "NCHW", K=K, mode=mode,
             cosine=cosine, sigma_auto=sigma_auto, num_warps=num_warps, num_stages=num_stages,
             BLOCK_N=cfg["BLOCK_N"], KB=cfg["KB"], VEC=cfg["VEC_D"] * cfg["VEC_N"])
    return r


def split_case(d, N, dtype, cl, last=False, cosine=False):
    """The small-batch split path's pass kernel (em._split_pass) and, once per d, its
    reduce kernel, with the blocks em._em_split picks."""
    f3 = features(d, N, dtype, cl)
    blocks = feature_blocks(f3, 1)
    num_warps = blocks.pop("num_warps")
    P = "*" + DT[dtype]
    args = dict(F=P, stride_b=f3.stride(0), stride_d=f3.stride(1), stride_n=f3.stride(2), FGOUT="*fp32",
                BGOUT="*fp32", MIX="*fp32", ZOUT="*fp32", WS="*fp32", WM="*fp32", K=3, d=d, N=N, P=49,
                tiles_per_chunk=3, inv_sigma=0.125)
    consts = dict(LAST=last, COSINE=cosine, PREFETCH=em._prefetch(f3), **blocks)
    r = compile_kernel(em._split_pass, args, consts, num_warps)
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
    r = compile_kernel(ctx._context_kernel, args, consts, num_warps)
    r.update(kernel="context", d=d, N=N, dtype=DT[dtype], layout="CL" if cl else "NCHW", has_w=has_w,
             num_warps=num_warps, BLOCK_N=blocks["BLOCK_N"], VEC=blocks["VEC_D"] * blocks["VEC_N"])
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="em,context")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="d=2048 28x28 only")
    a = ap.parse_args()
    shapes = [(2048, 784)] if a.quick else [(1024, 196), (1024, 784), (2048, 196), (2048, 784)]
    rows = []
    for d, N in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True):
                if "em" in a.kernels:
                    for K, mode, cos, sa in ((1, "tab", False, False), (1, "tab", True, False),
                                             (1, "w_tab", False, True), (5, "w_tab", False, True),
                                             (1, "cam", False, False)):
                        rows.append(em_case(d, N, dtype, cl, K, mode, cos, sa))
                        print(json.dumps(rows[-1]), flush=True)
                if "split" in a.kernels:
                    for last, cos in ((False, False), (True, False), (False, True)):
                        rows.append(split_case(d, N, dtype, cl, last, cos))
                        print(json.dumps(rows[-1]), flush=True)
                if "context" in a.kernels:
                    for has_w in (False, True):
                        rows.append(context_case(d, N, dtype, cl, has_w))
                        print(json.dumps(rows[-1]), flush=True)
    if "split" in a.kernels:
        for d in sorted({d for d, _ in shapes}):
            rows.append(split_reduce_case(d))
            print(json.dumps(rows[-1]), flush=True)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
