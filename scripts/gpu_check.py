"""The Python steps of scripts/gpu_check.sh (one device call that always yields
the numbers). Each subcommand prints as it goes (run with PYTHONUNBUFFERED=1):

  smoke     both CUDA EM variants and Triton against the reference on the
            benchmark shapes, with the cluster plan (or why it fell back)
  timing    the timing table: median device time per implementation and shape,
            feature GB/s and % of the measured copy bandwidth
  workload  one configuration, no reference (what compute-sanitizer and ncu run)
  ncu       parse an `ncu --csv --print-units base --metrics dram__bytes_read.sum`
            log: DRAM bytes read per kernel over the feature bytes (passes)

--dry-run (or GPU_CHECK_DRY_RUN=1) runs the same code on CPU tensors with a few
small shapes: the cpu backend stands in for both CUDA variants and Triton runs
through its interpreter, so the script itself is exercised without a GPU.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

# The benchmark shapes (SPEC.md): VGG16 1024x14x14, ResNet50 2048x14x14 and 28x28.
SHAPES = [("vgg16", 1024, 14), ("r50", 2048, 14), ("r50", 2048, 28)]
BATCHES = [1, 32, 256]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DRY_SHAPES = [("tiny", 24, 5)]
DRY_BATCHES = [1, 3]
# impl name -> (backend, CREAM_KERNELS_CUDA_VARIANT or None)
IMPLS = {"generic": ("cuda", "generic"), "cluster": ("cuda", "cluster"), "triton": ("triton", None)}
DRY_IMPLS = {"cpu(stand-in for generic/cluster)": ("cpu", None), "triton": ("triton", None)}
NUM_ITERS = 2


def log(*a):
    print(*a, flush=True)


def setup(dry: bool):
    import cream_kernels  # noqa: F401  (imported here so --help works without it)

    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are used
        return torch.device("cpu"), DRY_SHAPES, DRY_BATCHES, DRY_IMPLS
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run to exercise the script on CPU)")
    return torch.device("cuda"), SHAPES, BATCHES, IMPLS


def inputs(B, d, hw, dtype, device, seed=0):
    """Features (non-negative with an object-like bump), CAM and per-image
    centroids, drawn on the CPU (so few torch kernels run under the tools)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(B, d, hw, hw, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, hw), torch.linspace(-1, 1, hw), indexing="ij")
    f[:, : max(1, d // 3)] += 2 * torch.exp(-4 * (xx**2 + yy**2))
    cam = f[:, : max(1, d // 3)].mean(1) + 0.3 * torch.randn(B, hw, hw, generator=g)
    v_fg = torch.randn(B, d, generator=g)
    v_bg = torch.randn(B, d, generator=g)
    return f.to(dtype).to(device), cam.to(device), v_fg.to(device), v_bg.to(device)


def run_impl(impl, backend, variant, f, cam, v_fg, v_bg):
    import cream_kernels

    if backend == "triton":  # "nosplit": Triton's one-program-per-row kernel even for small batches
        os.environ["CREAM_KERNELS_TRITON_SPLIT"] = "0" if variant == "nosplit" else ""
    elif variant is not None:
        os.environ["CREAM_KERNELS_CUDA_VARIANT"] = variant  # read by the C++ dispatch at every call
    return cream_kernels.em_reactivate(f, cam, v_fg, v_bg, num_iters=NUM_ITERS, backend=backend)


def plan_line(B, d, hw, dtype, device):
    """The cluster variant's plan for this shape (cream_kernels._ext.cuda_em_plan),
    or why there is none."""
    if device.type != "cuda":
        return "plan: dry run (no GPU), not queried"
    try:
        from cream_kernels import _ext
    except ImportError as exc:
        return f"plan query unavailable ({exc})"
    fn = getattr(_ext, "cuda_em_plan", None)
    if fn is None:
        return "plan query unavailable (cream_kernels._ext has no cuda_em_plan)"
    try:
        os.environ["CREAM_KERNELS_CUDA_VARIANT"] = "cluster"
        plan = fn(B, d, hw * hw, dtype, channels_last=False, K=1, num_iters=NUM_ITERS, trainfree=False,
                  cosine=False)
    except Exception as exc:  # an API mismatch must not stop the check
        return f"plan query unavailable ({type(exc).__name__}: {exc})"
    if plan is None:
        return "plan query unavailable (built without CUDA)"
    if isinstance(plan, dict):
        return "plan: " + ", ".join(f"{k}={v}" for k, v in plan.items())
    return f"plan: {plan}"


def rel_err(a, b):
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.nan
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def cmd_smoke(args):
    import cream_kernels

    device, shapes, batches, impls = setup(args.dry_run)
    dtypes = {k: DTYPES[k] for k in args.dtypes.split(",")}
    bound = {torch.float32: 1e-4, torch.bfloat16: 1e-4}
    bad = []
    log(f"smoke: {len(impls)} implementations x {len(shapes)} shapes x {len(batches)} batches x {len(dtypes)} "
        f"dtypes, num_iters={NUM_ITERS}, per-image centroids; error = |out - ref| / |ref| (reference backend, "
        "float64 math on the same inputs)")
    for name, d, hw in shapes:
        for B in batches:
            for dn, dt in dtypes.items():
                f, cam, v_fg, v_bg = inputs(B, d, hw, dt, device)
                ref = cream_kernels.em_reactivate(f, cam, v_fg, v_bg, num_iters=NUM_ITERS, backend="reference")
                row = [f"{name} {d}x{hw}x{hw} B={B} {dn}:"]
                for impl, (backend, variant) in impls.items():
                    try:
                        out = run_impl(impl, backend, variant, f, cam, v_fg, v_bg)
                        e = rel_err(out, ref)
                        ok = e <= bound[dt]
                        row.append(f"{impl} {e:.1e}{'' if ok else ' FAIL'}")
                        if not ok:
                            bad.append(f"{name} B={B} {dn} {impl}: {e:.2e}")
                    except Exception as exc:
                        row.append(f"{impl} ERROR {type(exc).__name__}: {exc}")
                        bad.append(f"{name} B={B} {dn} {impl}: {type(exc).__name__}")
                log("  ".join(row))
                log("    cluster " + plan_line(B, d, hw, dt, device))
                del f, cam, v_fg, v_bg, ref
    if bad:
        log(f"smoke: {len(bad)} FAILED: " + "; ".join(bad))
        return 1
    log("smoke: all within bounds")
    return 0


def bench(fn, device, reps_ms):
    """Median time of fn() in microseconds."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return 1e3 * do_bench(fn, warmup=10, rep=reps_ms, return_mode="median")
        except ImportError:
            pass
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            times.append(1e3 * e0.elapsed_time(e1))
        return sorted(times)[len(times) // 2]
    fn()  # dry run: one warm-up and one timed call (the path, not the number, is what is checked)
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


def copy_bandwidth(device):
    """Bytes read + written per second by a large device copy (GB/s)."""
    if device.type != "cuda":
        return math.nan
    x = torch.empty(1 << 28, device=device)
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x), device, 50)
    del x, y
    return 2 * (1 << 28) * 4 / (us * 1e-6) / 1e9


def _triton_splits(f) -> bool:
    """Whether Triton's EM would take its small-batch split path for features f (the
    per-image centroid form run_impl calls), by the kernel module's own rule."""
    from cream_kernels.triton import em

    f3 = f.reshape(f.shape[0], f.shape[1], -1)
    forced = os.environ.pop(em.SPLIT_ENV, None)  # the default rule, whatever run_impl set last
    try:
        return em.split_chunks(f3, f3.shape[0], em.feature_blocks(f3, 1)) > 1
    finally:
        if forced is not None:
            os.environ[em.SPLIT_ENV] = forced


def cmd_timing(args):
    device, shapes, batches, impls = setup(args.dry_run)
    dtypes = {k: DTYPES[k] for k in args.dtypes.split(",")}
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run: timings are not GPU numbers)"
    log(f"timing: {name}; copy bandwidth {bw:.0f} GB/s (read + write); em_reactivate num_iters={NUM_ITERS}, "
        "per-image centroids, median of do_bench; GB/s = feature bytes / time")
    header = ["shape", "B", "dtype", "impl", "us", "GB/s", "%copyBW"]
    log("  ".join(f"{h:>10}" for h in header))
    rows = []
    if device.type == "cuda":  # Triton's small-batch split path against its one-program kernel
        impls = dict(impls, **{"triton-nosplit": ("triton", "nosplit")})
    for sname, d, hw in shapes:
        for B in batches:
            for dn, dt in dtypes.items():
                f, cam, v_fg, v_bg = inputs(B, d, hw, dt, device)
                nbytes = f.numel() * f.element_size()
                for impl, (backend, variant) in impls.items():
                    if variant == "nosplit" and not _triton_splits(f):
                        continue  # the split path does not apply here: nothing to compare against
                    try:
                        us = bench(lambda: run_impl(impl, backend, variant, f, cam, v_fg, v_bg), device,
                                   args.rep_ms)
                        gbs = nbytes / (us * 1e-6) / 1e9
                        row = [f"{sname}{hw}", B, dn, impl, f"{us:.1f}", f"{gbs:.0f}", f"{100 * gbs / bw:.1f}"]
                    except Exception as exc:
                        row = [f"{sname}{hw}", B, dn, impl, "ERROR", type(exc).__name__, str(exc)[:60]]
                    rows.append(row)
                    log("  ".join(f"{str(c):>10}" for c in row))
                del f, cam, v_fg, v_bg
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
    return 0


def parse_cases(spec):
    """"2x59x7:fp32;2x40x13:bf16:cl" -> [(B, d, hw, dtype name, channels_last)]."""
    out = []
    for item in filter(None, spec.split(";")):
        parts = item.split(":")
        B, d, hw = (int(x) for x in parts[0].split("x"))
        out.append((B, d, hw, parts[1] if len(parts) > 1 else "bf16", len(parts) > 2 and parts[2] == "cl"))
    return out


def cmd_workload(args):
    """Each case once per implementation named, no reference: for compute-sanitizer
    (one process for several shapes: the tool's start-up is the slow part) and ncu."""
    device, _, _, impls = setup(args.dry_run)
    names = list(impls) if args.dry_run else args.impls.split(",")
    for B, d, hw, dn, cl in parse_cases(args.cases):
        dt = DTYPES[dn]
        f, cam, v_fg, v_bg = inputs(B, d, hw, dt, device)
        if cl:
            f = f.contiguous(memory_format=torch.channels_last)
        for impl in names:
            backend, variant = impls[impl]
            for _ in range(args.reps):
                out = run_impl(impl, backend, variant, f, cam, v_fg, v_bg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            finite = bool(torch.isfinite(out).all())
            log(f"workload {impl}: B={B} d={d} {hw}x{hw} {dn}{' channels_last' if cl else ''} x{args.reps}: "
                f"outputs finite={finite}" + ("; " + plan_line(B, d, hw, dt, device) if impl == "cluster" else ""))
            if not finite:
                return 1
    return 0


def parse_ncu(path, feature_bytes):
    """[(kernel, dram bytes read, passes)] from an ncu --csv --print-units base log."""
    with open(path) as fh:
        lines = [ln for ln in fh if ln.startswith('"')]
    out = []
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "dram__bytes_read.sum":
            continue
        v = float(str(r["Metric Value"]).replace(",", ""))
        unit = (r.get("Metric Unit") or "byte").lower()
        scale = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9}.get(unit, 1)
        b = v * scale
        out.append((r.get("Kernel Name", "?"), b, b / feature_bytes))
    return out


def cmd_ncu(args):
    fb = args.B * args.d * args.hw * args.hw * (4 if args.dtype == "fp32" else 2)
    rows = parse_ncu(args.log, fb)
    if not rows:
        log(f"ncu {args.label}: no dram__bytes_read.sum rows in {args.log}")
        return 1
    for k, b, p in rows:
        log(f"ncu {args.label}: {k[:60]}: DRAM read {b / 1e6:.1f} MB = {p:.2f} passes over the "
            f"{fb / 1e6:.1f} MB of features")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smoke")
    s.add_argument("--dtypes", default="fp32,bf16")
    t = sub.add_parser("timing")
    t.add_argument("--dtypes", default="fp32,bf16")
    t.add_argument("--rep-ms", type=float, default=40)
    t.add_argument("--csv", default=None)
    w = sub.add_parser("workload")
    w.add_argument("--impls", default="generic,cluster")
    w.add_argument("--cases", default="256x2048x28:bf16", help='"BxDxHW:dtype[:cl];..." (cl: channels_last)')
    w.add_argument("--reps", type=int, default=1)
    n = sub.add_parser("ncu")
    n.add_argument("--log", required=True)
    n.add_argument("--label", default="")
    for k, v in (("--B", 256), ("--d", 2048), ("--hw", 28)):
        n.add_argument(k, type=int, default=v)
    n.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    args = ap.parse_args(argv)
    return {"smoke": cmd_smoke, "timing": cmd_timing, "workload": cmd_workload, "ncu": cmd_ncu}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
