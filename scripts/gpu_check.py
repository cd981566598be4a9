"""The Python steps of scripts/gpu_check.sh: the one device call that turns this
project's GPU claims into numbers (issue 18). Every subcommand prints and
flushes each line as soon as it is measured, so a step cut off by its limit
still leaves what came before in its log.

  canary     one tiny call of each CUDA variant and of Triton against the
             reference, each in a child process under a timeout; writes which
             CUDA variant the later steps run with (generic if cluster failed)
  correct    every SPEC.md benchmark shape x {NCHW, channels_last} x {fp32, bf16}
             x batches {256, 32, 1} at T=2, dot, tables, per CUDA variant, then
             the headline shape's options (cosine, training-free, T=1,3,4, K=5,
             classifier weight, sigma="auto"); a supervised worker process: a
             call that hangs is killed and the rest goes on (without cluster,
             if it was cluster that hung)
  timing     the CUDA timing table (median device time, GB/s, % of the copy
             bandwidth; the headline as a share of the one-read roofline)
  triton     Triton's version, then one child per config, compiled in parallel
             under a per-config timeout (a slow compile is skipped and named)
  table7     the paper's Table 7 with the VGG16 CAM network: per-image latency of
             forward + CAM (T=0) and + CREAM T=1..4, batch 1 and 32, fp32/bf16
  harness    cream-wsol train (VGG16, random init, a few dozen steps, synthetic
             data at 224) then evaluate with the cuda and the reference backend
  tests      pytest's GPU tests, one child per test file under a timeout:
             the cuda backend with CREAM_KERNELS_CUDA_VARIANT=cluster first,
             then with generic, then the rest (Triton)
  workload   one configuration, no reference (what compute-sanitizer and ncu run)
  ncu        parse an `ncu --csv --print-units base --metrics dram__bytes_read.sum`
             log: DRAM bytes read per kernel over the feature bytes (passes)

--dry-run (or GPU_CHECK_DRY_RUN=1) runs the same code on CPU tensors at tiny
sizes: the cpu backend stands in for both CUDA variants (and says so), Triton
runs through its interpreter, so the script itself is exercised without a GPU.
--state DIR: where a step leaves its headline line for summary.txt.
GPU_CHECK_NO_CLUSTER=1 (set by the canary when cluster hung or mismatched)
drops the cluster variant from every step. GPU_CHECK_SIMULATE_HANG=cluster
makes the cluster canary child hang (to test the fallback without a GPU).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()

# The benchmark shapes (SPEC.md): d x h x w of VGG16 / InceptionV3 (1024) and
# ResNet50 (2048) at 14x14 and as large feature maps (28x28). The headline
# shape (ResNet50 28x28) comes first everywhere.
SHAPES = [("r50", 2048, 28), ("vgg16", 1024, 14), ("r50", 2048, 14), ("vgg16", 1024, 28)]
BATCHES = [256, 32, 1]
HEADLINE = ("r50", 2048, 28, 256, "bf16")
DRY_SHAPES = [("tiny", 24, 5), ("tiny", 40, 3)]
DRY_BATCHES = [3, 1]
DRY_HEADLINE = ("tiny", 24, 5, 3, "bf16")
NUM_ITERS = 2
NUM_CLASSES = 200  # rows of the context tables (as benchmarks/test_bench_table7.py)
BOUND = 1e-4  # |out - ref| / |ref| (the reference reads the same values in float64)
VARIANTS = ("generic", "cluster")
# Table 7 of the paper: ms per image (T=0 is the CAM alone)
PAPER_TABLE7_MS = {0: 1.7, 1: 5.8, 2: 6.0, 3: 6.2, 4: 6.5}


def log(*a):
    print(*a, flush=True)


def dry_run_default() -> bool:
    return os.environ.get("GPU_CHECK_DRY_RUN") == "1"


def no_cluster() -> bool:
    return os.environ.get("GPU_CHECK_NO_CLUSTER") == "1"


def write_state(state, name, text):
    """A step's headline line(s) for summary.txt (gpu_check.sh puts them on top)."""
    if state:
        Path(state).mkdir(parents=True, exist_ok=True)
        Path(state, name).write_text(text.rstrip("\n") + "\n")


def append_result(rec):
    """One JSON line per measured row into $GPU_CHECK_RESULTS (results.jsonl)."""
    path = os.environ.get("GPU_CHECK_RESULTS")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")


# --------------------------------------------------------------------------- #
# child processes: a timeout that works even when a kernel hangs in C code
# --------------------------------------------------------------------------- #
# children of this process (each in its own session, so that a hung one can be
# killed with everything it started): killed too if this process gets SIGTERM
# (gpu_check.sh's step timeout), so nothing outlives its step
PYEXE = [sys.executable] + (["-P"] if sys.version_info >= (3, 11) else [])  # -P: no cwd on sys.path
_CHILDREN: "set[subprocess.Popen]" = set()


def _on_term(signum, frame):
    for p in list(_CHILDREN):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    os._exit(128 + signum)


def _spawn(argv, env=None):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True, cwd=ROOT)
    _CHILDREN.add(p)
    return p


def _kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_child(argv, timeout, env=None, prefix="", echo=lambda ln: True):
    """Run argv in its own process group, its output streamed (prefixed) as it comes;
    killed with its children after `timeout` s. Returns (rc, seconds, output);
    rc 124 on timeout (as timeout(1))."""
    t0 = time.time()
    p = _spawn(argv, env)
    lines = []

    def pump():
        for ln in p.stdout:
            lines.append(ln)
            if echo(ln):
                sys.stdout.write(prefix + ln)
                sys.stdout.flush()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        rc = p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        _kill_group(p)
        rc = 124
    th.join(timeout=5)
    _CHILDREN.discard(p)
    return rc, time.time() - t0, "".join(lines)


def run_children(jobs, parallel, deadline):
    """jobs: [(key, argv, timeout, env, prefix)], started in list order, at most
    `parallel` at once, each timeout cut to the deadline; lines with "::" (test
    ids of a --collect-only) are kept but not echoed. Returns {key: (rc, s, out)}."""
    results = {}
    pending = list(jobs)
    running = {}
    lock = threading.Lock()

    def worker(job):
        key, argv, tmo, env, prefix = job
        r = run_child(argv, min(tmo, max(1.0, deadline - time.time())), env, prefix, echo=lambda ln: "::" not in ln)
        with lock:
            results[key] = r

    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            if deadline - time.time() < 2:
                results[job[0]] = (125, 0.0, "not started: out of time\n")
                log(f"{job[4]}not started: out of time")
                continue
            log(f"{job[4]}started (timeout {job[2]:.0f} s)")
            th = threading.Thread(target=worker, args=(job,), daemon=True)
            th.start()
            running[job[0]] = th
        for key, th in list(running.items()):
            if not th.is_alive():
                del running[key]
        time.sleep(0.05)
    return results


def supervise(base_argv, *, call_timeout, setup_timeout, deadline, env=None):
    """Run a worker (base_argv + --start I [--drop-cluster]) that prints
    `@@call I IMPL` before each call it makes and `@@done` at the end. A call
    silent for call_timeout s is killed with its process; the worker restarts at
    the same row without cluster if cluster was running (a hang there is the
    cluster kernel's), else at the next row. Returns (rc, notes)."""
    start, drop, notes, rc = 0, no_cluster(), [], 0
    while True:
        argv = list(base_argv) + ["--start", str(start)] + (["--drop-cluster"] if drop else [])
        p = _spawn(argv, env)
        q: "queue.Queue[str | None]" = queue.Queue()

        def pump(p=p, q=q):
            for ln in p.stdout:
                q.put(ln)
            q.put(None)

        threading.Thread(target=pump, daemon=True).start()
        cur = None  # (row, impl) of the call in progress
        last = time.time()
        limit = setup_timeout
        done = False
        while True:
            wait = min(limit - (time.time() - last), deadline - time.time())
            if wait <= 0:
                break
            try:
                ln = q.get(timeout=min(wait, 1.0))
            except queue.Empty:
                continue
            if ln is None:
                done = True
                break
            if ln.startswith("@@call "):
                _, row, impl = ln.split()
                cur, last, limit = (int(row), impl), time.time(), call_timeout
                continue
            if ln.startswith("@@done"):
                continue
            sys.stdout.write(ln)
            sys.stdout.flush()
        if done:
            wrc = p.wait()
            _CHILDREN.discard(p)
            if wrc != 0:
                rc = rc or wrc
            return rc, notes
        _kill_group(p)
        _CHILDREN.discard(p)
        if deadline - time.time() <= 1:
            notes.append("out of time")
            log("supervisor: out of the step's time; worker killed")
            return rc or 124, notes
        if cur is None:
            notes.append(f"worker silent for {setup_timeout:.0f} s before its first call")
            log(f"supervisor: the worker printed no call within {setup_timeout:.0f} s: killed")
            return 124, notes
        row, impl = cur
        rc = 1
        if impl == "cluster" and not drop:
            drop = True
            start = row
            notes.append(f"cluster HUNG at row {row} (no answer in {call_timeout:.0f} s)")
            log(f"supervisor: HUNG: cluster call of row {row} silent for {call_timeout:.0f} s: killed; "
                "the rest runs without cluster")
        else:
            start = row + 1
            notes.append(f"{impl} HUNG at row {row}")
            log(f"supervisor: HUNG: {impl} call of row {row} silent for {call_timeout:.0f} s: killed; row skipped")


# --------------------------------------------------------------------------- #
# inputs and comparisons
# --------------------------------------------------------------------------- #
def torch_setup(dry):
    import warnings

    import torch

    # the random test inputs may leave the EM's posteriors flat; the comparison with the reference stands
    warnings.filterwarnings("ignore", message=".*posterior.*")

    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are used
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run to exercise the script on CPU)")
    return torch.device("cuda")


def dtype_of(name):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def make_case(B, d, hw, dtype, device, *, layout="nchw", K=1, seed=0):
    """Features (non-negative, an object-like bump), a CAM per row, [C, d] tables,
    labels and a classifier weight, drawn on the device (fast at B=256)."""
    import torch

    gen_dev = device if device.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    f = torch.rand(B, d, hw, hw, generator=g, device=gen_dev)
    lin = torch.linspace(-1, 1, hw, device=gen_dev)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    n_obj = max(1, d // 3)
    f[:, :n_obj] += 2 * torch.exp(-4 * (xx**2 + yy**2))
    cam = f[:, :n_obj].mean(1, keepdim=True) + 0.3 * torch.randn(B, K, hw, hw, generator=g, device=gen_dev)
    fg = torch.randn(NUM_CLASSES, d, generator=g, device=gen_dev)
    bg = torch.randn(NUM_CLASSES, d, generator=g, device=gen_dev)
    weight = torch.randn(NUM_CLASSES, d, generator=g, device=gen_dev) * 0.05
    labels = torch.randint(0, NUM_CLASSES, (B, K), generator=g, device=gen_dev)
    f = f.to(dtype)
    if layout == "cl":
        f = f.contiguous(memory_format=torch.channels_last)
    out = dict(features=f, cam=cam, fg=fg, bg=bg, weight=weight, labels=labels)
    return {k: v.to(device) for k, v in out.items()}


def rel_err(a, b):
    import torch

    a = a.detach().double()
    b = b.detach().double().to(a.device)
    if not bool(torch.isfinite(a).all()):
        return math.nan
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def call_em(case, opts, backend):
    """em_reactivate with the row's options; opts: T, similarity, trainfree, K,
    weight (CAM from the classifier weight), sigma."""
    import cream_kernels

    K = opts.get("K", 1)
    cam = None if opts.get("weight") else (case["cam"][:, :K] if K > 1 else case["cam"][:, 0])
    fg, bg = (None, None) if opts.get("trainfree") else (case["fg"], case["bg"])
    labels = None
    if fg is not None or opts.get("weight"):  # labels index the tables and/or the classifier weight
        labels = case["labels"][:, :K] if K > 1 else case["labels"][:, 0]
    sigma = opts.get("sigma", 8.0 if opts.get("similarity", "dot") == "dot" else 0.25)
    return cream_kernels.em_reactivate(
        case["features"], cam, fg, bg, labels, classifier_weight=case["weight"] if opts.get("weight") else None,
        num_iters=opts.get("T", NUM_ITERS), sigma=sigma, similarity=opts.get("similarity", "dot"), backend=backend)


def reference_chunked(case, opts, chunk=32):
    """The reference backend, `chunk` images at a time (images are independent;
    float64 on [256, 2048, 28, 28] x K=5 would take tens of GB at once)."""
    import torch

    B = case["features"].shape[0]
    outs = []
    for s in range(0, B, chunk):
        sub = {k: (v[s:s + chunk] if k in ("features", "cam", "labels") else v) for k, v in case.items()}
        outs.append(call_em(sub, opts, "reference"))
    return torch.cat(outs)


def set_variant(impl):
    """The C++ dispatch reads CREAM_KERNELS_CUDA_VARIANT at every call."""
    os.environ["CREAM_KERNELS_CUDA_VARIANT"] = impl


def impl_backend(impl, dry):
    if dry:
        return "cpu"  # the stand-in for both CUDA variants on CPU
    return "cuda"


def plan_text(B, d, hw, dtype, layout, opts, device, impl="cluster"):
    """The cluster variant's plan for this row (cream_kernels._ext.cuda_em_plan)."""
    if device.type != "cuda":
        return "plan: dry run (no GPU)"
    from cream_kernels import _ext

    prev = os.environ.get("CREAM_KERNELS_CUDA_VARIANT")
    try:
        set_variant(impl)
        plan = _ext.cuda_em_plan(B, d, hw * hw, dtype, channels_last=layout == "cl", K=opts.get("K", 1),
                                 num_iters=opts.get("T", NUM_ITERS), trainfree=bool(opts.get("trainfree")),
                                 cosine=opts.get("similarity") == "cosine", weight=bool(opts.get("weight")),
                                 sigma_auto=opts.get("sigma") == "auto")
    except Exception as exc:  # an API mismatch must not stop the check
        return f"plan: unavailable ({type(exc).__name__}: {exc})"
    finally:
        if prev is not None:
            os.environ["CREAM_KERNELS_CUDA_VARIANT"] = prev
    if plan is None:
        return "plan: unavailable (built without CUDA)"
    if plan.get("variant") == "cluster":
        keys = ("rule", "ctas_per_image", "ctas_per_sm", "clusters_resident", "rows", "rows_resident",
                "smem_per_cta", "grid")
        return "plan: cluster " + " ".join(f"{k}={plan.get(k)}" for k in keys)
    return f"plan: generic ({plan.get('why')}) smem_per_cta={plan.get('smem_per_cta')} tile={plan.get('pixel_tile')}"


def opts_text(o):
    parts = [f"T={o.get('T', NUM_ITERS)}", o.get("similarity", "dot")]
    parts.append("trainfree" if o.get("trainfree") else "tables")
    if o.get("K", 1) > 1:
        parts.append(f"K={o['K']}")
    if o.get("weight"):
        parts.append("cam=classifier-weight")
    if "sigma" in o:
        parts.append(f"sigma={o['sigma']}")
    return " ".join(parts)


def correct_rows(dry):
    """[(name, d, hw, B, dtype name, layout, opts)]: the headline row, the headline
    shape's options, then the grid."""
    shapes, batches, head = (DRY_SHAPES, DRY_BATCHES, DRY_HEADLINE) if dry else (SHAPES, BATCHES, HEADLINE)
    name, d, hw, B, dt = head
    rows = [(name, d, hw, B, dt, "nchw", {})]
    for o in ({"similarity": "cosine"}, {"trainfree": True}, {"T": 1}, {"T": 3}, {"T": 4}, {"K": 5},
              {"weight": True}, {"sigma": "auto"}):
        rows.append((name, d, hw, B, dt, "nchw", o))
    for sname, sd, shw in shapes:
        for b in batches:
            for dn in ("bf16", "fp32"):
                for layout in ("nchw", "cl"):
                    r = (sname, sd, shw, b, dn, layout, {})
                    if r not in rows:
                        rows.append(r)
    return rows


def cmd_correct(args):
    import torch

    dry = args.dry_run
    device = torch_setup(dry)
    import cream_kernels  # noqa: F401

    impls = [v for v in VARIANTS if not (v == "cluster" and (args.drop_cluster or no_cluster()))]
    rows = correct_rows(dry)
    if args.start == 0:
        log(f"cuda-correct: {len(rows)} rows x {impls}; error = |out - ref| / |ref| against the reference backend "
            f"(float64 on the same inputs), bound {BOUND:g}; outputs poisoned with NaN before each call"
            + ("; DRY RUN: the cpu backend stands in for both CUDA variants" if dry else ""))
    elif args.drop_cluster:
        log(f"cuda-correct: resumed at row {args.start} without cluster")
    fails = 0
    for i in range(args.start, len(rows)):
        name, d, hw, B, dn, layout, opts = rows[i]
        dt = dtype_of(dn)
        head = f"{name} {d}x{hw}x{hw} B={B} {dn} {layout} {opts_text(opts)}"
        try:
            case = make_case(B, d, hw, dt, device, layout=layout, K=opts.get("K", 1), seed=i)
            ref = reference_chunked(case, opts)
        except Exception as exc:  # the row's inputs or reference: every variant's row fails, the rest goes on
            for impl in impls:
                fails += 1
                log(f"row {i:3d} {head} | {impl}{'(cpu stand-in)' if dry else ''} ERROR in the inputs or the "
                    f"reference: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        for impl in impls:
            log(f"@@call {i} {impl}")
            set_variant(impl)
            t0 = time.time()
            try:
                out = call_em(case, opts, impl_backend(impl, dry))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                e = rel_err(out, ref)
                ok = e <= BOUND
                res = f"{e:.1e} {'ok' if ok else 'FAIL'}"
            except Exception as exc:
                ok, e = False, math.nan
                res = f"ERROR {type(exc).__name__}: {str(exc)[:200]}"
            fails += not ok
            plan = plan_text(B, d, hw, dt, layout, opts, device, impl) if impl == "cluster" else ""
            log(f"row {i:3d} {head} | {impl}{'(cpu stand-in)' if dry else ''} {res} ({time.time() - t0:.2f} s)"
                + (f" | {plan}" if plan else ""))
            append_result(dict(step="cuda-correct", row=i, shape=f"{d}x{hw}x{hw}", B=B, dtype=dn, layout=layout,
                               opts=opts_text(opts), impl=impl, rel_err=e, ok=ok, plan=plan or None))
        del case, ref
    log("@@done")
    log(f"cuda-correct: {'all within bounds' if not fails else f'{fails} FAILED'} (rows {args.start}..{len(rows) - 1})")
    return 1 if fails else 0


def summarize_correct(log_text, state, notes, expected):
    """pass/fail per variant from the row lines of a cuda-correct run (expected: rows per variant)."""
    per = {}
    ran_cluster = 0  # cluster rows whose plan ran the cluster kernel (the others fell back to generic)
    for m in re.finditer(r"^row +\d+ .*? \| (\w+)(?:\(cpu stand-in\))? (\S+) (ok|FAIL)?.*$", log_text, re.M):
        impl, val, ok = m.group(1), m.group(2), m.group(3)
        n_ok, n = per.get(impl, (0, 0))
        per[impl] = (n_ok + (ok == "ok"), n + 1)
        ran_cluster += impl == "cluster" and "| plan: cluster " in m.group(0)
    parts = []
    for impl in VARIANTS:
        if impl in per:
            n_ok, n = per[impl]
            notes_i = [f"{expected - n} not measured"] if n < expected else []
            if impl == "cluster" and "plan: dry run" not in log_text:
                notes_i.append(f"{ran_cluster} ran the cluster kernel, {n - ran_cluster} fell back to generic by plan")
            parts.append(f"{impl} {'PASS' if n_ok == n == expected else 'FAIL'} {n_ok}/{expected} rows within "
                         f"{BOUND:g}" + (f" ({'; '.join(notes_i)})" if notes_i else ""))
        else:
            parts.append(f"{impl} not run")
    text = "cuda-correct: " + ", ".join(parts) + (f" ({'; '.join(notes)})" if notes else "")
    write_state(state, "head.11-correct", text)
    cluster_bad = "cluster" in per and per["cluster"][0] < per["cluster"][1]
    return text, cluster_bad or any(n.startswith("cluster HUNG") for n in notes)


def cmd_correct_supervised(args):
    dry = args.dry_run
    scale = float(os.environ.get("GPU_CHECK_LIMIT_SCALE", "1"))
    deadline = time.time() + args.limit
    base = PYEXE + ["-u", str(HERE)] + (["--dry-run"] if dry else []) + ["correct-worker"]
    buf = []
    real_stdout = sys.stdout

    class Tee:
        def write(self, s):
            buf.append(s)
            real_stdout.write(s)

        def flush(self):
            real_stdout.flush()

    sys.stdout = Tee()
    try:
        rc, notes = supervise(base, call_timeout=args.call_timeout * scale, setup_timeout=60 * scale,
                              deadline=deadline)
    finally:
        sys.stdout = real_stdout
    text, cluster_bad = summarize_correct("".join(buf), args.state, notes, len(correct_rows(dry)))
    log(text)
    if cluster_bad and not no_cluster():
        line = ("CUDA variant in force: generic (the cluster canary passed, but cluster failed or hung in "
                "cuda-correct: every later step runs with CREAM_KERNELS_CUDA_VARIANT=generic and without cluster)")
        write_state(args.state, "head.00-variant", line)
        if args.env_file:
            with open(args.env_file, "a") as fh:
                fh.write("export CREAM_KERNELS_CUDA_VARIANT=generic GPU_CHECK_NO_CLUSTER=1\n")
        log(line)
    return rc


# --------------------------------------------------------------------------- #
# canary
# --------------------------------------------------------------------------- #
def cmd_canary_one(args):
    """One tiny call of one implementation against the reference (a child of canary)."""
    if args.impl == "cluster" and os.environ.get("GPU_CHECK_SIMULATE_HANG") == "cluster":
        log("canary cluster: GPU_CHECK_SIMULATE_HANG=cluster: hanging on purpose")
        while True:
            time.sleep(1)
    import torch

    dry = args.dry_run
    device = torch_setup(dry)
    import cream_kernels  # noqa: F401

    B, d, hw = (2, 64, 7) if not dry else (2, 24, 5)
    if args.impl == "cluster" and not dry:  # the smallest of these shapes the cluster kernel has a plan for
        for B, d, hw in ((2, 64, 7), (8, 256, 14), (4, 1024, 14), (2, 2048, 28)):
            if "plan: cluster" in plan_text(B, d, hw, torch.bfloat16, "nchw", {}, device, "cluster"):
                break
    case = make_case(B, d, hw, torch.bfloat16, device, seed=7)
    ref = reference_chunked(case, {})
    if args.impl == "triton":
        backend = "triton"
    else:
        set_variant(args.impl)
        backend = impl_backend(args.impl, dry)
    t0 = time.time()
    out = call_em(case, {}, backend)
    if device.type == "cuda":
        torch.cuda.synchronize()
    e = rel_err(out, ref)
    ok = e <= BOUND
    plan = plan_text(B, d, hw, torch.bfloat16, "nchw", {}, device, args.impl) if args.impl != "triton" else ""
    log(f"canary {args.impl}{'(cpu stand-in)' if dry and args.impl != 'triton' else ''}: B={B} {d}x{hw}x{hw} bf16 "
        f"T=2: rel err {e:.1e} {'ok' if ok else 'MISMATCH'} ({time.time() - t0:.2f} s incl. first-call setup)"
        + (f"; {plan}" if plan else ""))
    if args.impl == "cluster" and not dry and "plan: cluster" not in plan:
        log("canary cluster: the cluster kernel did NOT run here (no plan at this shape): cannot vouch for it")
        return 3
    return 0 if ok else 1


def cmd_canary(args):
    dry = args.dry_run
    scale = float(os.environ.get("GPU_CHECK_LIMIT_SCALE", "1"))
    deadline = time.time() + args.limit
    jobs = []
    for impl in ("generic", "cluster", "triton"):
        argv = PYEXE + ["-u", str(HERE)] + (["--dry-run"] if dry else []) + ["canary-one", "--impl", impl]
        tmo = (args.cuda_timeout if impl != "triton" else args.triton_timeout) * scale
        jobs.append((impl, argv, tmo, None, f"[{impl}] "))
    log(f"canary: generic, cluster and triton in parallel child processes, each under a timeout "
        f"(cuda {args.cuda_timeout * scale:.0f} s, triton {args.triton_timeout * scale:.0f} s)")
    res = run_children(jobs, 3, deadline)
    verdict = {}
    for impl in ("generic", "cluster", "triton"):
        rc, secs, _ = res[impl]
        verdict[impl] = ("ok" if rc == 0 else
                         ("TIMED OUT (a slow compile or a hang)" if impl == "triton" else "HUNG (timed out)")
                         if rc in (124, 137, 125) else
                         "no cluster plan" if rc == 3 else "MISMATCH" if rc == 1 else f"ERROR rc={rc}")
        log(f"canary {impl}: {verdict[impl]} ({secs:.1f} s)")
    env_lines = []
    if verdict["cluster"] == "ok":
        why = "the canary's cluster call matched the reference"
        line = f"CUDA variant in force: cluster (canary passed: {why}; auto is generic until a passing device run)"
        if dry:
            line = "CUDA variant in force: none on CPU (dry run: the cpu backend stood in for both variants; " \
                   "on the device: cluster if its canary passes, else generic)"
        env_lines.append("export CREAM_KERNELS_CUDA_VARIANT=cluster")
    else:
        line = (f"CUDA variant in force: generic (the cluster canary {verdict['cluster']}: every later step runs "
                "with CREAM_KERNELS_CUDA_VARIANT=generic and without cluster)")
        env_lines.append("export CREAM_KERNELS_CUDA_VARIANT=generic GPU_CHECK_NO_CLUSTER=1")
    if args.env_file:
        with open(args.env_file, "a") as fh:
            fh.write("\n".join(env_lines) + "\n")
    write_state(args.state, "head.00-variant", line)
    write_state(args.state, "head.10-canary",
                "canary: " + ", ".join(f"{k} {'PASS' if v == 'ok' else 'FAIL: ' + v}" for k, v in verdict.items()))
    log(line)
    # the step fails when a CUDA variant fails (Triton's canary may run out of compile time)
    return 0 if verdict["generic"] == "ok" and verdict["cluster"] == "ok" else 1


# --------------------------------------------------------------------------- #
# timing
# --------------------------------------------------------------------------- #
def bench_us(fn, device, rep_ms):
    """Median time of fn() in microseconds (do_bench: CUDA events, L2 flushed)."""
    import torch

    if device.type == "cuda":
        from triton.testing import do_bench

        return 1e3 * do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")
    fn()  # dry run: one warm-up and one timed call (the path, not the number, is what is checked)
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


def copy_bandwidth(device):
    """Bytes read + written per second by a large device copy (GB/s)."""
    import torch

    if device.type != "cuda":
        return math.nan
    x = torch.empty(1 << 28, device=device)
    y = torch.empty_like(x)
    us = bench_us(lambda: y.copy_(x), device, 50)
    del x, y
    return 2 * (1 << 28) * 4 / (us * 1e-6) / 1e9


def timing_rows(dry):
    shapes, batches, head = (DRY_SHAPES, DRY_BATCHES, DRY_HEADLINE) if dry else (SHAPES, BATCHES, HEADLINE)
    name, d, hw, B, dt = head
    rows = [(name, d, hw, B, dt, "nchw"), (name, d, hw, B, dt, "cl")]
    for sname, sd, shw in shapes:
        for b in batches:
            for dn in ("bf16", "fp32"):
                r = (sname, sd, shw, b, dn, "nchw")
                if r not in rows:
                    rows.append(r)
    return rows


def cmd_timing(args):
    import torch

    dry = args.dry_run
    device = torch_setup(dry)
    import cream_kernels  # noqa: F401

    os.environ["CREAM_KERNELS_DEBUG_POISON"] = "0"  # no fill kernel inside the timed calls
    impls = [v for v in VARIANTS if not (v == "cluster" and no_cluster())]
    bw = copy_bandwidth(device)
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (DRY RUN: timings are not GPU numbers)"
    log(f"cuda-timing: {dev_name}; copy bandwidth {bw:.0f} GB/s (read + write); em_reactivate T={NUM_ITERS}, dot, "
        "[200, d] tables, median of do_bench (L2 flushed); GB/s = feature bytes / time; "
        "roofline% = (feature bytes / copy bandwidth) / time, the one-read roofline")
    log("  ".join(f"{h:>12}" for h in ("shape", "B", "dtype", "layout", "impl", "us", "GB/s", "roofline%")))
    head_res = {}
    for i, (sname, d, hw, B, dn, layout) in enumerate(timing_rows(dry)):
        case = make_case(B, d, hw, dtype_of(dn), device, layout=layout, seed=100 + i)
        nbytes = case["features"].numel() * case["features"].element_size()
        for impl in impls:
            set_variant(impl)
            backend = impl_backend(impl, dry)
            try:
                us = bench_us(lambda: call_em(case, {}, backend), device, args.rep_ms)
                gbs = nbytes / (us * 1e-6) / 1e9
                roof = 100 * (nbytes / (bw * 1e9) * 1e6) / us if bw == bw else math.nan
                cells = [f"{us:.1f}", f"{gbs:.0f}", f"{roof:.1f}"]
                if i == 0:
                    head_res[impl] = (us, roof)
                append_result(dict(step="cuda-timing", shape=f"{d}x{hw}x{hw}", B=B, dtype=dn, layout=layout,
                                   impl=impl, us=us, gbs=gbs, roofline_pct=roof, copy_gbs=bw))
            except Exception as exc:
                cells = ["ERROR", type(exc).__name__, str(exc)[:60]]
            label = impl + ("(cpu)" if dry else "")
            log("  ".join(f"{str(c):>12}" for c in [f"{sname}{hw}", B, dn, layout, label] + cells))
        del case
    name, d, hw, B, dn = DRY_HEADLINE if dry else HEADLINE
    roof_us = B * d * hw * hw * 2 / (bw * 1e9) * 1e6 if bw == bw else math.nan
    parts = [f"{k} {us:.0f} us = {r:.0f}%" for k, (us, r) in head_res.items()]
    text = (f"EM at B={B} {name} {d}x{hw}x{hw} {dn} T={NUM_ITERS} as a share of the one-read roofline "
            f"({roof_us:.0f} us at the measured {bw:.0f} GB/s copy): " + (", ".join(parts) or "not measured"))
    if dry:
        text = "EM vs roofline: DRY RUN, no GPU numbers (" + ", ".join(f"{k} timed on cpu" for k in head_res) + ")"
    write_state(args.state, "head.20-em", text)
    log(text)
    return 0


# --------------------------------------------------------------------------- #
# triton
# --------------------------------------------------------------------------- #
TRITON_CONFIGS = [  # (name, d, hw, B, dtype, layout): the headline first
    ("r50", 2048, 28, 256, "bf16", "nchw"), ("r50", 2048, 28, 256, "fp32", "nchw"),
    ("r50", 2048, 28, 1, "bf16", "nchw"), ("vgg16", 1024, 14, 32, "bf16", "nchw"),
    ("vgg16", 1024, 14, 32, "fp32", "nchw"), ("r50", 2048, 14, 32, "bf16", "nchw"),
    ("r50", 2048, 28, 256, "bf16", "cl"),
]
DRY_TRITON_CONFIGS = [("tiny", 24, 5, 3, "bf16", "nchw"), ("tiny", 24, 5, 1, "fp32", "cl")]


def cmd_triton_one(args):
    """One Triton config in this process: compile (the first call), check, time."""
    import torch

    dry = args.dry_run
    device = torch_setup(dry)
    import cream_kernels  # noqa: F401

    name, d, hw, B, dn, layout = (DRY_TRITON_CONFIGS if dry else TRITON_CONFIGS)[args.config]
    case = make_case(B, d, hw, dtype_of(dn), device, layout=layout, seed=200 + args.config)
    ref = reference_chunked(case, {})
    t0 = time.time()
    out = call_em(case, {}, "triton")
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.time() - t0
    e = rel_err(out, ref)
    ok = e <= BOUND
    os.environ["CREAM_KERNELS_DEBUG_POISON"] = "0"
    lock = open(os.path.join(tempfile.gettempdir(), "gpu_check_gpu.lock"), "w")
    import fcntl

    fcntl.flock(lock, fcntl.LOCK_EX)  # one config times at a time (the others may still compile)
    try:
        us = bench_us(lambda: call_em(case, {}, "triton"), device, 40)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
    nbytes = case["features"].numel() * case["features"].element_size()
    log(f"triton {name} {d}x{hw}x{hw} B={B} {dn} {layout} T={NUM_ITERS}: compile + first call {first:.1f} s, "
        f"rel err {e:.1e} {'ok' if ok else 'FAIL'}, {us:.1f} us ({nbytes / (us * 1e-6) / 1e9:.0f} GB/s)"
        + (" [DRY RUN: interpreter]" if dry else ""))
    append_result(dict(step="triton", shape=f"{d}x{hw}x{hw}", B=B, dtype=dn, layout=layout, compile_s=first,
                       rel_err=e, ok=ok, us=us))
    return 0 if ok else 1


def cmd_triton(args):
    dry = args.dry_run
    scale = float(os.environ.get("GPU_CHECK_LIMIT_SCALE", "1"))
    deadline = time.time() + args.limit
    try:
        import triton

        version = triton.__version__
    except Exception as exc:  # noqa: BLE001
        version = f"not importable ({type(exc).__name__}: {exc})"
    from importlib import metadata

    log(f"triton {version} (torch {metadata.version('torch')}){' TRITON_INTERPRET=1' if dry else ''}")
    configs = DRY_TRITON_CONFIGS if dry else TRITON_CONFIGS
    par = max(1, min(len(configs), (os.cpu_count() or 2) // 2, args.parallel))
    tmo = args.config_timeout * scale
    log(f"triton: {len(configs)} configs, {par} compiling at once in child processes, each under a {tmo:.0f} s "
        "timeout (a config that does not compile in time is skipped and named); timing one at a time")
    jobs = []
    for i, c in enumerate(configs):
        argv = PYEXE + ["-u", str(HERE)] + (["--dry-run"] if dry else []) + ["triton-one", "--config", str(i)]
        jobs.append((i, argv, tmo, None, ""))
    res = run_children(jobs, par, deadline)
    ok, skipped, failed = [], [], []
    for i, c in enumerate(configs):
        rc, secs, _ = res[i]
        label = f"{c[0]} {c[1]}x{c[2]}x{c[2]} B={c[3]} {c[4]} {c[5]}"
        if rc == 0:
            ok.append(label)
        elif rc in (124, 125, 137):
            skipped.append(label)
            log(f"triton SKIPPED {label}: no result within {secs:.0f} s (compile too slow or hung)")
        else:
            failed.append(label)
            log(f"triton FAILED {label}: rc={rc}")
    text = (f"triton {version.split(' ')[0]}: {len(ok)}/{len(configs)} configs compiled and matched"
            + (f"; skipped (slow): {'; '.join(skipped)}" if skipped else "")
            + (f"; FAILED: {'; '.join(failed)}" if failed else ""))
    write_state(args.state, "head.41-triton", text)
    log(text)
    return 1 if failed else 0


# --------------------------------------------------------------------------- #
# table 7
# --------------------------------------------------------------------------- #
def cmd_table7(args):
    import torch

    dry = args.dry_run
    device = torch_setup(dry)
    import cream_kernels
    from cream_kernels import ops
    from cream_wsol.models import VGG16CAM  # the network benchmarks/test_bench_table7.py times

    os.environ["CREAM_KERNELS_DEBUG_POISON"] = "0"
    image = 32 if dry else 224
    batches = [1, 2] if dry else [1, 32]
    backend = ops.resolve_backend(None, device, torch.float32)
    variant = os.environ.get("CREAM_KERNELS_CUDA_VARIANT", "auto")
    log(f"table7: VGG16 CAM (cream_wsol.models.VGG16CAM, random weights, eval), {image}x{image}, per-image ms = "
        f"median / B; T=0: forward + top-1 CAM; T>0: + em_reactivate (backend {backend}, CUDA variant {variant}, "
        f"[200, 1024] tables, dot, sigma 8); paper (CVPR 2022 Table 7): "
        + ", ".join(f"T={t} {v} ms" for t, v in PAPER_TABLE7_MS.items())
        + (" [DRY RUN: CPU at 32x32, not comparable]" if dry else ""))
    log("  ".join(f"{h:>10}" for h in ("dtype", "B", "T", "ms/image", "paper ms", "ratio")))
    base = VGG16CAM(num_classes=NUM_CLASSES).eval().to(device)
    g = torch.Generator().manual_seed(0)
    fg_table = (torch.randn(NUM_CLASSES, 1024, generator=g) * 0.1).abs().to(device)
    bg_table = (torch.randn(NUM_CLASSES, 1024, generator=g) * 0.1).abs().to(device)
    res = {}
    for dn in ("fp32", "bf16"):
        model = base.to(dtype_of(dn))
        for B in batches:
            x = torch.randn(B, 3, image, image, generator=g).to(device=device, dtype=dtype_of(dn))
            for T in range(0, 5):
                def fn(T=T, x=x, model=model):
                    with torch.inference_mode():
                        logits, feats = model(x, return_features=True)
                        pred = logits.argmax(dim=1)
                        cam = model.cams(feats, pred)
                        if T == 0:
                            return cam
                        return cream_kernels.em_reactivate(feats, cam, fg_table, bg_table, pred, num_iters=T)

                try:
                    ms = bench_us(fn, device, args.rep_ms) / 1e3 / B
                    paper = PAPER_TABLE7_MS[T]
                    res[(dn, B, T)] = ms
                    log("  ".join(f"{str(c):>10}" for c in (dn, B, T, f"{ms:.3f}", paper, f"{ms / paper:.2f}")))
                    append_result(dict(step="table7", dtype=dn, B=B, T=T, ms_per_image=ms, paper_ms=paper,
                                       backend=backend, variant=variant, image=image))
                except Exception as exc:
                    log(f"{dn:>10}  {B:>10}  {T:>10}  ERROR {type(exc).__name__}: {str(exc)[:120]}")
    b1, b2 = batches
    cells = []
    for T in (0, 2):
        a, b = res.get(("fp32", b1, T)), res.get(("fp32", b2, T))
        cells.append(f"T={T} {a if a is None else f'{a:.2f}'} / {b if b is None else f'{b:.2f}'} ms "
                     f"(paper {PAPER_TABLE7_MS[T]})")
    text = f"Table 7 (VGG16 {image}x{image} fp32, ms per image at B={b1} / B={b2}): " + ", ".join(cells)
    if dry:
        text = "Table 7: DRY RUN, CPU at 32x32 (path only): " + ", ".join(cells)
    write_state(args.state, "head.30-table7", text)
    log(text)
    return 0 if len(res) == 2 * len(batches) * 5 else 1


# --------------------------------------------------------------------------- #
# harness
# --------------------------------------------------------------------------- #
BOX_KEYS = ("MaxBoxAccV2", "BoxAcc@30", "BoxAcc@50", "BoxAcc@70", "GT-known Loc", "Top-1 Loc", "Top-5 Loc")


def compare_metrics(a, b, n_images):
    """[(map, key, a, b, bound, ok)]: box metrics within one image's share
    (100 / N points), PxAP within 0.1."""
    out = []
    for name in a:
        for key, va in a[name].items():
            vb = b.get(name, {}).get(key)
            if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)):
                continue
            if key in BOX_KEYS:
                bound = 100.0 / n_images + 1e-9
            elif key == "PxAP":
                bound = 0.1
            else:
                continue
            out.append((name, key, va, vb, bound, abs(va - vb) <= bound))
    return out


def cmd_harness(args):
    import shutil

    work = Path(tempfile.mkdtemp(prefix="gpu_check_harness_"))
    try:
        return _harness(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _harness(args, work):
    dry = args.dry_run
    from cream_wsol.data import make_synthetic

    size = 64 if dry else 224  # the frame the model sees (train crop and evaluation)
    disk = 64 if dry else 96  # the images on disk (the loader resizes; drawing 224-pixel images costs ~0.1 s each)
    n_train, n_test = (16, 8) if dry else (128, 32)
    arch = "small" if dry else "vgg16"
    device = "cpu" if dry else "cuda"
    backend = "cpu" if dry else "cuda"
    steps_per_epoch, epochs, batch = (2, 1, 8) if dry else (8, 5, 16)
    t0 = time.time()
    data_root, meta_root = make_synthetic(work / "data", seed=0, num_classes=4, n_train=n_train, n_val=4,
                                          n_test=n_test, image_size=disk)
    log(f"harness: synthetic data, {n_train} train / {n_test} test images of {disk}x{disk} (seen at {size}x{size}), "
        f"made in {time.time() - t0:.1f} s ({work})"
        + (" [DRY RUN: small CNN at 64 on CPU, the cpu backend standing in for cuda]" if dry else ""))
    env = dict(os.environ)
    env.pop("CREAM_KERNELS_BACKEND", None)
    py = PYEXE + ["-u", "-m", "cream_wsol"]
    train = py + ["train", "--preset", "synthetic", "--arch", arch, "--no-pretrained", "--image-size", str(size),
                  "--epochs", str(epochs), "--max-steps-per-epoch", str(steps_per_epoch), "--batch-size", str(batch),
                  "--lr", "0.001", "--no-val", "--no-resume", "--device", device, "--no-progress",
                  "--data-root", str(data_root), "--metadata-root", str(meta_root), "--out", str(work / "train")]
    log(f"harness: cream-wsol train, {arch}, {epochs} x {steps_per_epoch} steps of batch {batch}, --device {device}")
    deadline = time.time() + args.limit
    rc, secs, _ = run_child(train, deadline - time.time() - 2, env=env, prefix="  train| ")
    log(f"harness: train rc={rc} ({secs:.1f} s)")
    if rc != 0:
        write_state(args.state, "head.40-harness", f"harness: train FAILED rc={rc}")
        return 1
    jobs = []
    for be in (backend, "reference"):  # the two evaluations at once (separate processes, one GPU)
        ev = py + ["evaluate", str(work / "train"), "--split", "test", "--device", device, "--no-progress",
                   "--maps", "cam,cream,free", "--out", str(work / f"eval_{be}.json")]
        jobs.append((be, ev, deadline - time.time() - 2, dict(env, CREAM_KERNELS_BACKEND=be), f"  eval[{be}]| "))
    res = run_children(jobs, 2, deadline - 1)
    results = {}
    for be in (backend, "reference"):
        rc, secs, _ = res[be]
        log(f"harness: evaluate with CREAM_KERNELS_BACKEND={be}: rc={rc} ({secs:.1f} s)")
        if rc != 0:
            write_state(args.state, "head.40-harness", f"harness: evaluate ({be}) FAILED rc={rc}")
            return 1
        results[be] = json.loads((work / f"eval_{be}.json").read_text())
    n = int(results[backend]["classification"]["num_images"])
    rows = compare_metrics(results[backend]["metrics"], results["reference"]["metrics"], n)
    bad = [r for r in rows if not r[5]]
    for name, key, va, vb, bound, ok in rows:
        log(f"harness: {name:>6} {key:<13} {backend} {va:7.2f}  reference {vb:7.2f}  |diff| {abs(va - vb):.3f} "
            f"<= {bound:.3f} {'ok' if ok else 'FAIL'}")
    append_result(dict(step="harness", n_images=n, backend=backend, metrics=results[backend]["metrics"],
                       reference=results["reference"]["metrics"], ok=not bad and bool(rows)))
    verdict = "PASS" if rows and not bad else "FAIL"
    text = (f"harness: {arch} at {size}, {epochs * steps_per_epoch} train steps on {device}; evaluate {backend} vs "
            f"reference on {n} test images: {verdict} ({len(rows) - len(bad)}/{len(rows)} metrics within "
            f"100/N = {100 / n:.2f} points (box) / 0.1 (PxAP))" + (" [DRY RUN]" if dry else ""))
    write_state(args.state, "head.40-harness", text)
    log(text)
    return 0 if verdict == "PASS" else 1


# --------------------------------------------------------------------------- #
# tests
# --------------------------------------------------------------------------- #
CUDA_K = "cuda-cuda or [cuda]"  # the cuda backend's cases: backend-device ids or a bare [cuda] parameter


def cmd_tests(args):
    """pytest's GPU tests, one child process per test file and group, each under
    `timeout`: cluster (the cuda backend's tests with CREAM_KERNELS_CUDA_VARIANT=
    cluster) first, then generic, then the rest (Triton). Dry run: the same
    plumbing with --collect-only, the cpu backend's cases standing in."""
    dry = args.dry_run
    scale = float(os.environ.get("GPU_CHECK_LIMIT_SCALE", "1"))
    deadline = time.time() + args.limit
    sel = "gpu and not slow"
    k_cuda = "cpu-cpu or [cpu]" if dry else CUDA_K
    base = PYEXE + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    col = base + ["tests", "--collect-only", "-m", "not slow" if dry else sel]
    rc, secs, out = run_child(col, min(60 * scale, deadline - time.time()), prefix="  collect| ",
                              echo=lambda ln: "::" not in ln)
    ids = [ln.strip() for ln in out.splitlines() if "::" in ln and not ln.startswith(" ")]
    if rc not in (0, 5):
        log(f"tests: collection failed rc={rc}")
        return 1
    if dry:  # the cpu backend's cases stand in for the cuda backend's
        def is_cuda(i):
            return "cpu-cpu" in i or "[cpu]" in i
    else:
        def is_cuda(i):
            return "cuda-cuda" in i or "[cuda]" in i
    cuda_files = sorted({i.split("::")[0] for i in ids if is_cuda(i)})
    rest_files = sorted({i.split("::")[0] for i in ids if not is_cuda(i)})
    if dry:  # the plumbing, not the suite: a few files of each group
        cuda_files, rest_files = cuda_files[:1], rest_files[:1]
    log(f"tests: {len(ids)} tests collected in {secs:.1f} s (-m '{'not slow' if dry else sel}'); files with cuda-backend "
        f"cases: {len(cuda_files)}, with other GPU cases: {len(rest_files)}"
        + (" [DRY RUN: the cpu backend's cases stand in; children run --collect-only]" if dry else ""))
    per = args.file_timeout * scale
    extra = ["--collect-only"] if dry else ["--maxfail=10"]
    jobs = []
    groups = []
    if not no_cluster():
        groups.append(("cluster", cuda_files, ["-k", k_cuda], {"CREAM_KERNELS_CUDA_VARIANT": "cluster"}))
    else:
        log("tests: cluster group dropped (the canary failed: CREAM_KERNELS_CUDA_VARIANT=generic)")
    groups.append(("generic", cuda_files, ["-k", k_cuda], {"CREAM_KERNELS_CUDA_VARIANT": "generic"}))
    groups.append(("rest", rest_files, ["-k", f"not ({k_cuda})"], {"CREAM_KERNELS_CUDA_VARIANT": "generic"}))
    for gname, gfiles, kargs, genv in groups:
        for f in gfiles:
            env = dict(os.environ, **genv)
            jobs.append(((gname, f), base + [f, "-m", sel if not dry else "not slow"] + kargs + extra, per, env,
                         f"  {gname}:{Path(f).name}| "))
    par = max(1, min(args.parallel, os.cpu_count() or 2))
    log(f"tests: {len(jobs)} pytest children, {par} at once, each under a {per:.0f} s timeout, cluster group first")
    res = run_children(jobs, par, deadline)
    summary = {}
    bad = []
    for key, (rc_, s, out_) in res.items():
        g = key[0]
        m = re.findall(r"(\d+)(?:/\d+)? (passed|failed|error|errors|skipped|tests? collected)", out_)
        counts = {}
        for n, w in m:
            counts[w] = counts.get(w, 0) + int(n)
        ok = rc_ in (0, 5)
        tot = summary.setdefault(g, {"files": 0, "ok": 0, "passed": 0, "failed": 0, "collected": 0, "timeouts": []})
        tot["files"] += 1
        tot["ok"] += ok
        tot["passed"] += counts.get("passed", 0)
        tot["failed"] += counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
        tot["collected"] += sum(v for k, v in counts.items() if "collected" in k)
        if rc_ in (124, 125, 137):
            tot["timeouts"].append(Path(key[1]).name)
        if not ok:
            bad.append(f"{g}:{key[1]} rc={rc_}")
        log(f"tests: {g:<8} {key[1]}: rc={rc_} ({s:.1f} s) {dict(counts)}")
    parts = []
    for g in [grp[0] for grp in groups if grp[0] in summary]:  # in run order: cluster first
        t = summary[g]
        what = f"{t['collected']} collected" if dry else f"{t['passed']} passed, {t['failed']} failed"
        parts.append(f"{g} {'PASS' if t['ok'] == t['files'] else 'FAIL'} ({t['ok']}/{t['files']} files, {what}"
                     + (f", timed out: {', '.join(t['timeouts'])}" if t["timeouts"] else "") + ")")
    text = "tests: " + ("; ".join(parts) or "none") + (" [DRY RUN: --collect-only]" if dry else "")
    write_state(args.state, "head.12-tests", text)
    log(text)
    return 1 if bad else 0


# --------------------------------------------------------------------------- #
# workload (compute-sanitizer, ncu) and the ncu parser
# --------------------------------------------------------------------------- #
def parse_cases(spec):
    """"2x59x7:fp32;2x40x13:bf16:cl" -> [(B, d, hw, dtype name, layout)]."""
    out = []
    for item in filter(None, spec.split(";")):
        parts = item.split(":")
        B, d, hw = (int(x) for x in parts[0].split("x"))
        out.append((B, d, hw, parts[1] if len(parts) > 1 else "bf16", "cl" if len(parts) > 2 and parts[2] == "cl"
                    else "nchw"))
    return out


def cmd_workload(args):
    """Each case once per implementation named, no reference: for compute-sanitizer
    (one process for several shapes: the tool's start-up is the slow part) and ncu."""
    import torch

    dry = args.dry_run
    device = torch_setup(dry)
    import cream_kernels  # noqa: F401

    names = args.impls.split(",")
    for i, (B, d, hw, dn, layout) in enumerate(parse_cases(args.cases)):
        case = make_case(B, d, hw, dtype_of(dn), device, layout=layout, seed=300 + i)
        for impl in names:
            set_variant(impl)
            for _ in range(args.reps):
                out = call_em(case, {}, impl_backend(impl, dry))
            if device.type == "cuda":
                torch.cuda.synchronize()
            finite = bool(torch.isfinite(out).all())
            plan = plan_text(B, d, hw, dtype_of(dn), layout, {}, device, impl) if impl == "cluster" else ""
            log(f"workload {impl}{'(cpu stand-in)' if dry else ''}: B={B} d={d} {hw}x{hw} {dn} {layout} "
                f"x{args.reps}: outputs finite={finite}" + (f"; {plan}" if plan else ""))
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
    ap.add_argument("--dry-run", action="store_true", default=dry_run_default())
    ap.add_argument("--state", default=os.environ.get("GPU_CHECK_STATE"), help="folder for the summary's headlines")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("canary")
    c.add_argument("--limit", type=float, default=30)
    c.add_argument("--cuda-timeout", type=float, default=20)
    c.add_argument("--triton-timeout", type=float, default=28)
    c.add_argument("--env-file", default=None)
    c1 = sub.add_parser("canary-one")
    c1.add_argument("--impl", choices=["generic", "cluster", "triton"], required=True)
    co = sub.add_parser("correct")
    co.add_argument("--limit", type=float, default=60)
    co.add_argument("--call-timeout", type=float, default=15)
    co.add_argument("--env-file", default=None)
    cw = sub.add_parser("correct-worker")
    cw.add_argument("--start", type=int, default=0)
    cw.add_argument("--drop-cluster", action="store_true")
    t = sub.add_parser("timing")
    t.add_argument("--rep-ms", type=int, default=25)
    tr = sub.add_parser("triton")
    tr.add_argument("--limit", type=float, default=45)
    tr.add_argument("--config-timeout", type=float, default=40)
    tr.add_argument("--parallel", type=int, default=7)
    t1 = sub.add_parser("triton-one")
    t1.add_argument("--config", type=int, required=True)
    t7 = sub.add_parser("table7")
    t7.add_argument("--rep-ms", type=int, default=60)
    h = sub.add_parser("harness")
    h.add_argument("--limit", type=float, default=45)
    ts = sub.add_parser("tests")
    ts.add_argument("--limit", type=float, default=50)
    ts.add_argument("--file-timeout", type=float, default=40)
    ts.add_argument("--parallel", type=int, default=6)
    w = sub.add_parser("workload")
    w.add_argument("--impls", default="generic,cluster")
    w.add_argument("--cases", default="256x2048x28:bf16", help='"BxDxHW:dtype[:cl];..." (cl: channels_last)')
    w.add_argument("--reps", type=int, default=1)
    n = sub.add_parser("ncu")
    n.add_argument("--log", required=True)
    n.add_argument("--label", default="")
    for k, v in (("--B", 256), ("--d", 2048), ("--hw", 28)):
        n.add_argument(k, type=int, default=v)
    n.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    args = ap.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_term)  # a step's timeout: take the children along
    return {"canary": cmd_canary, "canary-one": cmd_canary_one, "correct": cmd_correct_supervised,
            "correct-worker": cmd_correct, "timing": cmd_timing, "triton": cmd_triton, "triton-one": cmd_triton_one,
            "table7": cmd_table7, "harness": cmd_harness, "tests": cmd_tests, "workload": cmd_workload,
            "ncu": cmd_ncu}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
