"""pytest-benchmark suites for cream_kernels: grids, inputs, timing, memory, results.

    pytest benchmarks/ --benchmark-only                        # default grid
    CREAM_BENCH_GRID=smoke pytest benchmarks/ --benchmark-only # CI: < 30 s, every suite once
    CREAM_BENCH_GRID=full  pytest benchmarks/ --benchmark-only # SPEC.md's whole grid
    CREAM_BENCH_SAVE=1 ...                                     # write benchmarks/results/<device>.json

Environment variables (all optional):
    CREAM_BENCH_GRID      smoke | default | full                        (default: default)
    CREAM_BENCH_DEVICE    cpu | cuda          (default: cuda when torch sees a GPU, else cpu)
    CREAM_BENCH_SAVE      1 (-> benchmarks/results/<device-slug>.json) or a .json path
    CREAM_BENCH_COMPILE   grid (default: torch.compile baselines where the grid says) | all | 0
    CREAM_BENCH_BUDGET_S  seconds of timed calls per row (default 0.05 smoke / 0.8 default / 1.5 full)
    CREAM_BENCH_PEAK_GBPS the device's peak memory bandwidth, overriding the built-in table
    CREAM_BENCH_WAIT_QUIET  seconds: before each row, wait up to this long for other processes
                          to leave the CPU (< 10% use); for committed numbers from shared machines

Every row times one implementation ("impl") on one case (op, shape, batch, dtype, T):
    ref_f64      reference.py eager, float64 inside (the oracle, as tests use it)
    ref_f32      reference.py eager with compute_dtype=torch.float32 (what a user would write)
    compile_f64  torch.compile(reference.py function), float64 inside
    compile_f32  torch.compile(reference.py function), compute_dtype=torch.float32
    cpu / triton / cuda   the package's public op with backend=<name>
Baselines run before the kernels of the same case in the same session, and each
row's extra_info holds ``speedup_vs_<baseline>`` = baseline median / row median.
Unavailable backends are skipped with ops.backend_reasons(); the Triton interpreter
is never timed.

Timing: CPU rows use pytest-benchmark's own rounds (median of ``rounds`` calls).
CUDA rows: the timed function ends with torch.cuda.synchronize() (so
pytest-benchmark's wall times are honest), and extra_info["median_us"] comes from
triton.testing.do_bench (CUDA events, L2 flushed before every call, median); GB/s,
% of peak and speedups use that number.

Memory: extra_info["extra_bytes"] = the peak of allocations during one call minus
the bytes of what the call returns (inputs exist before the call). CUDA: deltas of
torch.cuda.max_memory_allocated. CPU: the allocation events recorded by
torch.profiler(profile_memory=True) (every torch allocation, including those in
ops.py and in torch.compile's generated code), replayed in time order; the cpu
backend's C++ per-thread scratch (std::vector, invisible to torch) is added
analytically from csrc/cpu (see README.md).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

try:  # an in-place build (python setup.py build_ext --inplace) is not on sys.path under `pytest`
    import cream_kernels  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
try:
    import cream_wsol  # noqa: F401
except ImportError:
    if (ROOT / "python" / "cream_wsol").is_dir():
        sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

import cream_kernels  # noqa: E402
from cream_kernels import ops, reference  # noqa: E402

# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
GRID = (os.environ.get("CREAM_BENCH_GRID", "default") or "default").strip().lower()
if GRID not in ("smoke", "default", "full"):
    raise pytest.UsageError(f"CREAM_BENCH_GRID must be smoke, default or full; got {GRID!r}")

_dev = (os.environ.get("CREAM_BENCH_DEVICE", "") or ("cuda" if torch.cuda.is_available() else "cpu")).strip().lower()
if _dev not in ("cpu", "cuda"):
    raise pytest.UsageError(f"CREAM_BENCH_DEVICE must be cpu or cuda; got {_dev!r}")
if _dev == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError("CREAM_BENCH_DEVICE=cuda but torch.cuda.is_available() is False")
DEVICE = torch.device(_dev)
ON_CUDA = DEVICE.type == "cuda"

COMPILE_MODE = (os.environ.get("CREAM_BENCH_COMPILE", "grid") or "grid").strip().lower()
if COMPILE_MODE not in ("grid", "all", "0", "none", "off"):
    raise pytest.UsageError(f"CREAM_BENCH_COMPILE must be grid, all or 0; got {COMPILE_MODE!r}")

_BUDGETS = {"smoke": 0.05, "default": 0.8, "full": 1.5}
BUDGET_S = float(os.environ.get("CREAM_BENCH_BUDGET_S", _BUDGETS[GRID]))
MIN_ROUNDS = {"smoke": 1, "default": 5, "full": 7}[GRID]
MAX_ROUNDS = 200

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SPEC.md's benchmark shapes (d, h, w) and the backbones that produce them.
SHAPES = {
    "1024x14x14": ((1024, 14, 14), ("VGG16", "InceptionV3")),
    "2048x14x14": ((2048, 14, 14), ("ResNet50",)),
    "1024x28x28": ((1024, 28, 28), ("VGG16", "InceptionV3")),
    "2048x28x28": ((2048, 28, 28), ("ResNet50",)),
}
NUM_CLASSES = 200  # CUB-200: the size of the context-embedding tables and of the classifier
SIGMA, RATIO, MOMENTUM = 8.0, 0.2, 0.8
BASELINES = ("ref_f64", "ref_f32", "compile_f64", "compile_f32")
KERNELS = ("cpu", "triton", "cuda")
IMPL_ORDER = BASELINES + KERNELS

# Peak HBM bandwidth (GB/s = 1e9 B/s) by device name; the first matching pattern wins.
PEAK_BANDWIDTH_GBPS = [
    (r"GH200", 4000.0),
    (r"H200", 4800.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100.*NVL", 3900.0),
    (r"H100", 3350.0),  # SXM5 (HBM3), e.g. "NVIDIA H100 80GB HBM3"
    (r"H800.*PCIe", 2000.0),
    (r"H800", 3350.0),
    (r"B200", 8000.0),
    (r"A100.*80GB.*PCIe|A100 80GB PCIe", 1935.0),
    (r"A100.*SXM4.*80GB|A100.*80GB", 2039.0),
    (r"A100", 1555.0),  # 40 GB
    (r"A800", 2039.0),
    (r"L40S", 864.0),
    (r"L40", 864.0),
    (r"A10G", 600.0),
    (r"A10\b", 600.0),
    (r"L4\b", 300.0),
    (r"RTX 4090", 1008.0),
    (r"RTX 3090", 936.0),
    (r"V100", 900.0),
    (r"T4\b", 320.0),
]


def _compile_here(default: bool) -> bool:
    if COMPILE_MODE in ("0", "none", "off"):
        return False
    return True if COMPILE_MODE == "all" else default


# --------------------------------------------------------------------------- #
# Cases (the grids)
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Case:
    suite: str  # "em" | "em_k" | "em_after" | "update" | "table7"
    shape: str  # key of SHAPES (table7: the feature map the backbone gives)
    B: int
    dtype: str  # "fp32" | "bf16"
    T: int  # EM iterations (update: 0; table7: 0 = CAM forward only)
    impl: str  # ref_f64 ... | cpu | triton | cuda | (table7) auto
    kind: str = ""  # table7: "cam" (forward + CAM), "cream" (the EM alone), "e2e" (forward + CAM + EM)
    image: int = 224  # table7 input size
    K: int = 1  # em_k: classes per image

    @property
    def key(self) -> str:
        """The case without the impl: rows with one key are compared with each other."""
        if self.suite == "table7":
            return f"{self.kind}-img{self.image}-B{self.B}-T{self.T}"
        if self.suite == "em_k":
            return f"{self.shape}-B{self.B}-{self.dtype}-T{self.T}-K{self.K}-{self.kind}"
        if self.suite == "em_after":
            return f"{self.shape}-B{self.B}-{self.dtype}-T{self.T}-{self.kind}"
        t = f"-T{self.T}" if self.suite == "em" else ""
        return f"{self.shape}-B{self.B}-{self.dtype}{t}"

    @property
    def id(self) -> str:
        return f"{self.key}-{self.impl}"


def _expand(suite: str, keys) -> list:
    """keys: (shape, B, dtype, T, with_compile) -> cases, baselines before kernels."""
    out = []
    for shape, B, dtype, T, with_compile in keys:
        impls = ["ref_f64", "ref_f32"]
        if _compile_here(with_compile):
            # smoke: one torch.compile (its cold start alone is ~15 s on 2 cores)
            impls += ["compile_f32"] if GRID == "smoke" and COMPILE_MODE != "all" else ["compile_f64", "compile_f32"]
        impls += list(KERNELS)
        out += [Case(suite, shape, B, dtype, T, impl) for impl in impls]
    return out


def em_cases() -> list:
    V, R, VL, RL = "1024x14x14", "2048x14x14", "1024x28x28", "2048x28x28"
    if GRID == "smoke":
        keys = [(V, 2, "fp32", 1, True), (V, 2, "bf16", 2, False)]  # T=1: the smallest graph to compile
    elif GRID == "default" and not ON_CUDA:
        keys = [(V, 32, "fp32", 2, True)]  # the headline case: the only torch.compile one
        keys += [(V, 32, "fp32", T, False) for T in (1, 3, 4)]
        keys += [(V, 1, "fp32", 2, False), (V, 256, "fp32", 2, False)]
        keys += [(R, 1, "fp32", 2, False), (R, 32, "fp32", 2, False)]
        keys += [(VL, 1, "fp32", 2, False), (VL, 32, "fp32", 2, False)]
        keys += [(V, 32, "bf16", 2, False)]
    elif GRID == "default":  # CUDA: every shape, batch and dtype at T=2, plus T=1..4 at the headline
        keys = [(V, 32, "fp32", 2, True)]
        keys += [(V, 32, "fp32", T, False) for T in (1, 3, 4)]
        for shape in (V, R, VL, RL):
            for B in (1, 32, 256):
                for dt in ("fp32", "bf16"):
                    if (shape, B, dt) != (V, 32, "fp32"):
                        keys.append((shape, B, dt, 2, dt == "fp32"))
    else:  # full
        keys = [
            (shape, B, dt, T, T == 2)
            for shape in (V, R, VL, RL)
            for B in (1, 32, 256)
            for dt in ("fp32", "bf16")
            for T in (1, 2, 3, 4)
        ]
    return _expand("em", keys)


def update_cases() -> list:
    V, R, VL, RL = "1024x14x14", "2048x14x14", "1024x28x28", "2048x28x28"
    if GRID == "smoke":
        keys = [(V, 2, "fp32", 0, False)]
    elif GRID == "default" and not ON_CUDA:
        keys = [(V, 32, "fp32", 0, True), (V, 1, "fp32", 0, False), (V, 256, "fp32", 0, False)]
        keys += [(R, 32, "fp32", 0, False), (VL, 32, "fp32", 0, False), (V, 32, "bf16", 0, False)]
    else:
        keys = [
            (shape, B, dt, 0, (shape, B, dt) == (V, 32, "fp32") or (GRID == "full" and dt == "fp32"))
            for shape in (V, R, VL, RL)
            for B in (1, 32, 256)
            for dt in ("fp32", "bf16")
        ]
    return _expand("update", keys)


def table7_cases() -> list:
    """Paper Table 7: CAM forward (T=0) and CAM + CREAM for T=1..4, VGG16-CAM, fp32."""
    if GRID == "smoke":
        image, batches, Ts, e2e = 64, (1,), (2,), (2,)
    elif GRID == "default":
        image, batches, Ts, e2e = 224, ((32,) if ON_CUDA else (1,)), (1, 2, 3, 4), (2,)
    else:
        image, batches, Ts, e2e = 224, ((1, 32) if ON_CUDA else (1, 8)), (1, 2, 3, 4), (1, 2, 3, 4)
    shape = "1024x14x14" if image == 224 else f"1024x{image // 16}x{image // 16}"
    out = []
    for B in batches:
        out.append(Case("table7", shape, B, "fp32", 0, "auto", kind="cam", image=image))
        out += [Case("table7", shape, B, "fp32", T, "auto", kind="cream", image=image) for T in Ts]
        out += [Case("table7", shape, B, "fp32", T, "auto", kind="e2e", image=image) for T in e2e]
    return out


def em_k_cases() -> list:
    """Top-K re-activation from the classifier weight (issue 12): K=1 in one call,
    K=5 as 5 separate calls, K=5 in one call; kernels only."""
    V = "1024x14x14"
    B = 2 if GRID == "smoke" else 32
    out = []
    for impl in KERNELS:
        out.append(Case("em_k", V, B, "fp32", 2, impl, kind="one_call", K=1))
        out.append(Case("em_k", V, B, "fp32", 2, impl, kind="separate", K=5))
        out.append(Case("em_k", V, B, "fp32", 2, impl, kind="one_call", K=5))
    return out


def em_after_cases() -> list:
    """The EM op right after a forward pass (issue 25), as a user calls it: before every
    timed call, untimed, a stand-in for the CAM network's last layers runs over the
    batch (see Harness.forward_pass), so the features are no longer in the caches and
    torch's thread pool has just been busy. The headline case; the kernels, and
    torch.compile of the float32 reference to compare with."""
    B = 2 if GRID == "smoke" else 32
    impls = (["compile_f32"] if GRID != "smoke" and _compile_here(True) else []) + list(KERNELS)
    return [Case("em_after", "1024x14x14", B, "fp32", 2, impl, kind="after_forward") for impl in impls]


def pytest_configure(config):
    # torch.compile's first use imports torch.jit code that warns about its own deprecation
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_generate_tests(metafunc):
    for name, make in (("em_case", em_cases), ("update_case", update_cases), ("table7_case", table7_cases),
                       ("em_k_case", em_k_cases), ("em_after_case", em_after_cases)):
        if name in metafunc.fixturenames:
            cases = make()
            metafunc.parametrize(name, cases, ids=[c.id for c in cases])


# --------------------------------------------------------------------------- #
# Machine description
# --------------------------------------------------------------------------- #
def _sync():
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None


def device_name() -> str:
    if ON_CUDA:
        return torch.cuda.get_device_name(DEVICE)
    return f"CPU: {_cpu_model()} ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores)"


def device_slug() -> str:
    name = torch.cuda.get_device_name(DEVICE) if ON_CUDA else f"cpu-{_cpu_model()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _table_peak(name: str) -> Optional[float]:
    for pattern, gbps in PEAK_BANDWIDTH_GBPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return gbps
    return None


def measure_cpu_copy_bandwidth(mib: int = 256, reps: int = 7) -> dict:
    """A STREAM-like copy: dst.copy_(src) of `mib` MiB float32, (read + write bytes) / time."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()
    times.sort()
    return {
        "best_gbps": moved / times[0] / 1e9,
        "median_gbps": moved / times[len(times) // 2] / 1e9,
        "method": f"measured on this machine: torch copy_ of a {mib} MiB float32 tensor, "
        f"(read + write bytes) / time, best of {reps}, {torch.get_num_threads()} torch threads",
    }


# --------------------------------------------------------------------------- #
# Memory
# --------------------------------------------------------------------------- #
def measure_extra_bytes(fn: Callable) -> dict:
    """Peak of the allocations made during one call of fn, minus what is still
    allocated when it returns (its new outputs; inputs passed through are not
    counted): the workspace the call needed on top of its inputs and outputs."""
    if ON_CUDA:
        _sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        out = fn()
        _sync()
        peak = torch.cuda.max_memory_allocated(DEVICE) - base
        kept = torch.cuda.memory_allocated(DEVICE) - base
        method = "torch.cuda.max_memory_allocated / memory_allocated deltas"
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        kept = peak = 0
        for e in events:
            kept += e.nbytes()
            peak = max(peak, kept)
        method = "torch.profiler(profile_memory=True) allocation events, replayed in order"
    del out
    return {"peak_alloc_bytes": int(peak), "output_bytes": int(kept), "extra_bytes": int(max(0, peak - kept)), "method": method}


def cpu_native_workspace_bytes(case: Case) -> int:
    """The cpu backend's per-thread std::vector scratch (csrc/cpu): invisible to torch.

    em_cpu.cpp:      N + K (6 N + 5 d + 4) accumulators per thread (K classes per image)
    context_cpu.cpp: (3 N + 3 d) accumulators per thread
    (accumulators are float for fp32/bf16/fp16 features, double for float64)."""
    (d, h, w), _ = SHAPES[case.shape]
    N = h * w
    threads = cream_kernels._ext._C.cpu_num_threads() if cream_kernels._ext.available() else 1
    K = 1 if case.kind == "separate" else case.K  # separate calls: one class at a time
    per = (N + K * (6 * N + 5 * d + 4)) if case.suite in ("em", "em_k", "em_after") else (3 * N + 3 * d)
    return int(min(threads, case.B) * per * 4)


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #
def _cpu_ticks() -> Optional[tuple]:
    """(busy ticks of the whole machine, total ticks, ticks of this process): Linux only."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        v = [int(x) for x in f]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
        total = busy + v[3] + v[4]
        me = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, total, int(me[11]) + int(me[12])  # utime + stime (all threads)
    except (OSError, IndexError, ValueError):
        return None


def _thread_count() -> Optional[int]:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def others_cpu_pct(before: Optional[tuple], after: Optional[tuple]) -> Optional[float]:
    """% of the machine's CPU time that other processes used between two _cpu_ticks():
    the contention a timing saw (the load average lags by a minute; this does not)."""
    if not before or not after or after[1] <= before[1]:
        return None
    others = (after[0] - before[0]) - (after[2] - before[2])
    return round(max(0.0, 100.0 * others / (after[1] - before[1])), 1)


def _do_bench_us(fn: Callable) -> float:
    """CUDA: median device time of fn in microseconds, L2 flushed before each call."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median")) * 1e3
    except ImportError:
        pass
    flush = torch.empty(256 * (1 << 20), dtype=torch.int8, device=DEVICE)
    fn()
    _sync()
    times = []
    for _ in range(30):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2] * 1e3


QUIET_WAIT_S = float(os.environ.get("CREAM_BENCH_WAIT_QUIET", "0") or 0)
QUIET_PCT = 10.0
_quiet_budget = [float(os.environ.get("CREAM_BENCH_WAIT_QUIET_TOTAL", "1800") or 1800)]


def wait_for_quiet() -> float:
    """CREAM_BENCH_WAIT_QUIET=<s>: before timing a row, wait (at most <s> per row, and
    CREAM_BENCH_WAIT_QUIET_TOTAL s per session) until other processes use < 10% of the
    machine's CPU over one second. For committing numbers from a shared machine."""
    if QUIET_WAIT_S <= 0 or _quiet_budget[0] <= 0:
        return 0.0
    t0 = time.perf_counter()
    while True:
        a = _cpu_ticks()
        time.sleep(1.0)
        pct = others_cpu_pct(a, _cpu_ticks())
        waited = time.perf_counter() - t0
        if pct is None or pct < QUIET_PCT or waited >= min(QUIET_WAIT_S, _quiet_budget[0]):
            _quiet_budget[0] -= max(0.0, waited - 1.0)
            return round(waited - 1.0, 1) if waited > 1.5 else 0.0


@dataclass
class Harness:
    """Session state: machine description, inputs cache, the rows measured so far."""

    rows: list = field(default_factory=list)
    medians: dict = field(default_factory=dict)  # (suite, key) -> {impl: median_us}
    started: str = ""
    load_start: tuple = ()
    _peak: Optional[dict] = None
    _inputs_key: Optional[tuple] = None
    _inputs: Optional[dict] = None
    _compiled: dict = field(default_factory=dict)

    # ---- device peak bandwidth ------------------------------------------
    def peak(self) -> dict:
        if self._peak is None:
            override = os.environ.get("CREAM_BENCH_PEAK_GBPS")
            if override:
                self._peak = {"gbps": float(override), "source": "CREAM_BENCH_PEAK_GBPS"}
            elif ON_CUDA:
                name = torch.cuda.get_device_name(DEVICE)
                g = _table_peak(name)
                self._peak = {"gbps": g, "source": f"spec-sheet table by device name ({name!r})" if g else f"unknown device {name!r}: no % of peak"}
            else:
                m = measure_cpu_copy_bandwidth(*((64, 3) if GRID == "smoke" else (256, 7)))
                self._peak = {"gbps": m["best_gbps"], "median_gbps": m["median_gbps"], "source": m["method"]}
        return self._peak

    # ---- compiled references (one torch.compile object per function) -------
    def compiled(self, name: str) -> Callable:
        if name not in self._compiled:
            import torch._dynamo

            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
            self._compiled[name] = torch.compile(getattr(reference, name))
        return self._compiled[name]

    # ---- a forward pass to run before a row's timed calls ----------------------
    def forward_pass(self, B: int) -> Callable:
        """A stand-in for the last layers of a CAM network's forward pass over a batch
        of B images: a depthwise 3x3 convolution, bias and ReLU over [B, 256, 28, 28]
        float32 activations (B=32: 26 MB in, 26 MB out, twice the features' size in all),
        under torch.no_grad. Cheap in arithmetic (~0.1 GFLOP at B=32), so it mostly moves
        memory: after it the features are out of the caches, and torch's intra-op
        thread pool has just run, as when a model's forward pass precedes the op."""
        g = torch.Generator(device="cpu").manual_seed(2)
        x = torch.randn(B, 256, 28, 28, generator=g).to(DEVICE)
        conv = torch.nn.Conv2d(256, 256, 3, padding=1, groups=256).to(DEVICE).eval()

        def run():
            with torch.no_grad():
                return torch.relu(conv(x))

        return run

    # ---- inputs --------------------------------------------------------------
    def inputs(self, case: Case) -> dict:
        """Features, CAM, centroids, labels, tables for a case; cached for its impls."""
        (d, h, w), _ = SHAPES[case.shape]
        key = (case.suite, case.shape, case.B, case.dtype)
        if key == self._inputs_key:
            return self._inputs
        self._inputs = None  # free the previous case's tensors first
        g = torch.Generator(device="cpu").manual_seed(0)
        B = case.B
        f = torch.randn(B, d, h, w, generator=g).relu_().to(DEVICE)  # post-ReLU, like the CAM layers
        labels = torch.randint(0, NUM_CLASSES, (B,), generator=g).to(DEVICE)
        weight = (torch.randn(NUM_CLASSES, d, generator=g) / math.sqrt(d)).to(DEVICE)
        cam = torch.einsum("bdhw,bd->bhw", f, weight[labels]).contiguous()
        # initial centroids near the CAM-masked means (as trained embeddings would be)
        means, _ = reference.context_stats(f, labels, cam, None, RATIO, compute_dtype=torch.float32)
        noise = torch.randn(B, 2, d, generator=g).to(DEVICE) * 0.05
        means = (means + noise).contiguous()
        feats = f.to(DTYPES[case.dtype]).contiguous()
        del f
        fg_table = (torch.randn(NUM_CLASSES, d, generator=g) * 0.1).abs().to(DEVICE).contiguous()
        bg_table = (torch.randn(NUM_CLASSES, d, generator=g) * 0.1).abs().to(DEVICE).contiguous()
        self._inputs = {
            "features": feats,
            "cam": cam,
            "v_fg": means[:, 0].contiguous(),
            "v_bg": means[:, 1].contiguous(),
            "labels": labels,
            "weight": weight.contiguous(),
            "fg_table": fg_table,
            "bg_table": bg_table,
        }
        self._inputs_key = key
        _sync()
        return self._inputs

    # ---- helpers the suites use (conftest is not importable by name) --------
    device = DEVICE
    on_cuda = ON_CUDA
    sigma, ratio, momentum = SIGMA, RATIO, MOMENTUM

    @staticmethod
    def dtype(case: Case) -> torch.dtype:
        return DTYPES[case.dtype]

    @staticmethod
    def skip_unless_runnable(case: Case) -> None:
        skip_unless_runnable(case.impl, DTYPES[case.dtype])
        skip_if_too_big(case)

    # ---- one row ---------------------------------------------------------------
    def measure(self, benchmark, case: Case, fn: Callable, *, features_bytes: int, info: Optional[dict] = None,
                setup: Optional[Callable] = None) -> dict:
        """Warm up, measure extra memory, time with pytest-benchmark, fill extra_info.
        ``setup``, when given, runs before every timed call, outside the timing."""
        benchmark.group = f"{case.suite} {case.key}"
        is_compile = case.impl.startswith("compile")
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        _sync()
        t_first = time.perf_counter() - t0
        t_est = t_first
        if is_compile or t_first < 0.2:  # a second warm call: compiled code, caches, thread pools
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            _sync()
            t_est = time.perf_counter() - t0
        mem = measure_extra_bytes(fn) if case.suite != "table7" or case.kind == "cream" else None

        if ON_CUDA:
            def timed():
                r = fn()
                torch.cuda.synchronize(DEVICE)
                return r
        else:
            timed = fn
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(BUDGET_S / max(t_est, 1e-6)))))
        if ON_CUDA:
            rounds = min(rounds, 50)
        waited = wait_for_quiet()
        ticks0 = _cpu_ticks()
        cpu0 = time.process_time()
        if setup:
            setup_cpu = [0.0]

            def timed_setup():  # its CPU time is taken out of process_cpu_us
                c = time.process_time()
                setup()
                _sync()
                setup_cpu[0] += time.process_time() - c

            benchmark.pedantic(timed, setup=timed_setup, rounds=rounds, iterations=1, warmup_rounds=0)
        else:
            setup_cpu = [0.0]
            benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
        cpu_per_call_us = (time.process_time() - cpu0 - setup_cpu[0]) / rounds * 1e6
        others = others_cpu_pct(ticks0, _cpu_ticks())

        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        row = {
            "suite": case.suite,
            "key": case.key,
            "impl": case.impl,
            "shape": case.shape,
            "archs": list(SHAPES[case.shape][1]) if case.shape in SHAPES else ["VGG16"],
            "B": case.B,
            "dtype": case.dtype,
            "T": case.T,
            "kind": case.kind,
            "image": case.image if case.suite == "table7" else None,
            "rounds": rounds,
            "load1": round(os.getloadavg()[0], 2),
            "others_cpu_pct": others,
            # CPU time of this process (all its threads) per timed call: the work, plus any
            # spinning of idle pool threads; unlike the wall time, not the waits for a core
            "process_cpu_us": cpu_per_call_us,
            "process_threads": _thread_count(),
        }
        if waited:
            row["waited_for_quiet_s"] = waited
        if stats is None:  # --benchmark-disable: one call, no statistics
            row["median_us"] = None
        elif ON_CUDA:
            row["wall_median_us"] = stats.median * 1e6
            row["median_us"] = _do_bench_us(fn)
            row["timing"] = "triton.testing.do_bench median (CUDA events, L2 flushed)"
        else:
            row["median_us"] = stats.median * 1e6
            row["min_us"] = stats.min * 1e6
            row["iqr_us"] = stats.iqr * 1e6
            row["timing"] = "pytest-benchmark median (perf_counter)"
        row["features_bytes"] = int(features_bytes)
        if row["median_us"]:
            gbps = features_bytes / (row["median_us"] * 1e-6) / 1e9
            row["gbps"] = gbps
            peak = self.peak()
            if peak.get("gbps"):
                row["pct_peak"] = 100.0 * gbps / peak["gbps"]
        if mem is not None:
            row.update({k: v for k, v in mem.items() if k != "method"})
            if case.impl == "cpu" and not ON_CUDA:
                row["native_workspace_bytes"] = cpu_native_workspace_bytes(case)
                row["extra_bytes"] += row["native_workspace_bytes"]
            (d, h, w), _ = SHAPES.get(case.shape, ((1024, 14, 14), ()))
            row["extra_bytes_per_Bd"] = row["extra_bytes"] / (case.B * d)
            row["extra_over_features"] = row["extra_bytes"] / features_bytes
        if info:
            row.update(info)
        # speedups over the baselines measured earlier in this session for this case
        bucket = self.medians.setdefault((case.suite, case.key), {})
        if row["median_us"]:
            bucket[case.impl] = row["median_us"]
        for base in BASELINES:
            if base != case.impl and bucket.get(base) and row["median_us"]:
                row[f"speedup_vs_{base}"] = bucket[base] / row["median_us"]
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("suite", "key")})
        self.rows.append(row)
        return row

    def finalize(self) -> None:
        """Recompute speedups over every row of the session (any baseline order)."""
        for row in self.rows:
            bucket = self.medians.get((row["suite"], row["key"]), {})
            for base in BASELINES:
                if base != row["impl"] and bucket.get(base) and row.get("median_us"):
                    row[f"speedup_vs_{base}"] = bucket[base] / row["median_us"]

    def metadata(self) -> dict:
        import cream_kernels._ext as ext

        try:
            import triton

            triton_version = triton.__version__
        except Exception:
            triton_version = None
        meta = {
            "device": device_name(),
            "device_type": DEVICE.type,
            "grid": GRID,
            "date_utc": self.started,
            "finished_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "cream_kernels": cream_kernels.__version__,
            "cream_kernels_build": ext.build_info() if ext.available() else ext.IMPORT_ERROR,
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty_sources": bool(_git("status", "--porcelain", "--", "cream_kernels", "csrc")),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(),
            "openmp_threads_C": ext._C.cpu_num_threads() if ext.available() else None,
            "load_avg_start": self.load_start,
            "load_avg_end": tuple(round(x, 2) for x in os.getloadavg()),
            "peak_bandwidth": self.peak() if self.rows else None,
            "compile_mode": COMPILE_MODE,
            "budget_s_per_row": BUDGET_S,
            "wait_quiet_s_per_row": QUIET_WAIT_S,
        }
        if ON_CUDA:
            p = torch.cuda.get_device_properties(DEVICE)
            meta["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            meta["gpu_sm_count"] = p.multi_processor_count
            meta["cuda_capability"] = f"{p.major}.{p.minor}"
        loads = [r["load1"] for r in self.rows if r.get("load1") is not None]
        if loads:
            meta["load1_during"] = {"min": min(loads), "max": max(loads), "mean": round(sum(loads) / len(loads), 2)}
        others = [r["others_cpu_pct"] for r in self.rows if r.get("others_cpu_pct") is not None]
        if others:
            meta["others_cpu_pct_during"] = {
                "min": min(others), "max": max(others), "mean": round(sum(others) / len(others), 1),
                "rows_over_20pct": sum(1 for o in others if o > 20),
                "meaning": "% of all CPU time used by other processes while a row was being timed",
            }
        return meta


_HARNESS = Harness()


@pytest.fixture(scope="session")
def harness() -> Harness:
    if not _HARNESS.started:
        _HARNESS.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        _HARNESS.load_start = tuple(round(x, 2) for x in os.getloadavg())
    return _HARNESS


def skip_unless_runnable(impl: str, dtype: torch.dtype) -> None:
    """Skip a kernel row that this machine cannot run, with ops.backend_reasons' words."""
    if impl not in KERNELS:
        return
    reasons = ops.backend_reasons(impl, DEVICE, dtype)
    if impl == "triton" and not reasons and DEVICE.type == "cpu":
        reasons = ["benchmarks never time the Triton interpreter (TRITON_INTERPRET=1 runs on CPU via numpy)"]
    if reasons:
        pytest.skip(f"backend {impl!r} on {DEVICE.type}: " + "; ".join(reasons))


def _available_bytes() -> Optional[int]:
    if ON_CUDA:
        return torch.cuda.mem_get_info(DEVICE)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def skip_if_too_big(case: Case) -> None:
    """Skip rows whose working set would not fit (the full grid's B=256 x 2048x28x28
    float64 reference needs ~10 GB), instead of letting the OOM killer decide."""
    (d, h, w), _ = SHAPES[case.shape]
    n = case.B * d * h * w
    itemsize = 8 if case.impl.endswith("f64") else 4
    need = n * 4 * 2 + (3 * n * itemsize if case.impl in BASELINES else 0)  # inputs + reference temporaries
    have = _available_bytes()
    if have is not None and need > 0.8 * have:
        pytest.skip(f"needs ~{need / 2**30:.1f} GiB, only {have / 2**30:.1f} GiB available on {DEVICE.type}")


def features_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------- #
# Session end: speedups, results JSON, a summary in the terminal
# --------------------------------------------------------------------------- #
def _save_path() -> Optional[Path]:
    v = (os.environ.get("CREAM_BENCH_SAVE", "") or "").strip()
    if not v or v == "0":
        return None
    if v.endswith(".json"):
        return Path(v)
    return RESULTS_DIR / f"{device_slug()}.json"


def pytest_sessionfinish(session, exitstatus):
    if not _HARNESS.rows:
        return
    _HARNESS.finalize()
    path = _save_path()
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"metadata": _HARNESS.metadata(), "rows": _HARNESS.rows}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    _HARNESS.saved_to = str(path)


def _fmt_us(us) -> str:
    if us is None:
        return "-"
    return f"{us / 1e3:.3f} ms" if us >= 1000 else f"{us:.1f} us"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _HARNESS.rows
    if not rows:
        return
    _HARNESS.finalize()
    tr = terminalreporter
    peak = _HARNESS.peak()
    tr.section(f"cream_kernels benchmarks ({GRID} grid, {device_name()})")
    tr.write_line(f"peak bandwidth for %: {peak.get('gbps') and round(peak['gbps'], 1)} GB/s ({peak['source']})")
    tr.write_line("speedup columns: baseline median / row median, same case, same session; "
                  "ref = reference.py eager, cmp = torch.compile(reference.py); f64/f32 = compute dtype")
    hdr = f"{'case':<34} {'impl':<12} {'median':>11} {'GB/s':>7} {'%peak':>6} {'x ref_f64':>9} {'x ref_f32':>9} {'x cmp_f64':>9} {'x cmp_f32':>9} {'extra MiB':>9} {'others%':>7} {'proc CPU':>11}"
    tr.write_line(hdr)
    for r in rows:
        def sp(b):
            v = r.get(f"speedup_vs_{b}")
            return f"{v:9.2f}" if v else f"{'-':>9}"

        extra = r.get("extra_bytes")
        tr.write_line(
            f"{r['suite'] + ' ' + r['key']:<34} {r['impl']:<12} {_fmt_us(r.get('median_us')):>11} "
            f"{r.get('gbps', 0):7.1f} {r.get('pct_peak', 0):6.1f} {sp('ref_f64')} {sp('ref_f32')} {sp('compile_f64')} {sp('compile_f32')} "
            f"{(extra / 2**20 if extra is not None else float('nan')):9.3f} "
            f"{r['others_cpu_pct'] if r.get('others_cpu_pct') is not None else '-':>7} "
            f"{_fmt_us(r.get('process_cpu_us')):>11}"
        )
    t7 = [r for r in rows if r["suite"] == "table7"]
    if t7:
        tr.write_line("Table 7 (per image, VGG16-CAM): " + "; ".join(
            f"{r['kind']} T={r['T']} B={r['B']}: {r.get('per_image_ms', float('nan')):.2f} ms" for r in t7))
    if getattr(_HARNESS, "saved_to", None):
        tr.write_line(f"results written to {_HARNESS.saved_to}")
    load = os.getloadavg()
    tr.write_line(f"load average now: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
