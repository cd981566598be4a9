"""EM re-activation (SPEC.md Op 2): every backend against reference.py, eager and compiled.

One row per (shape, batch, dtype, T, impl); the grid is in conftest.py
(CREAM_BENCH_GRID). Centroids are per image [B, d] (what ContextEmbeddings
gathers by label), similarity "dot", sigma 8, ratio 0.2.
"""
import torch

import cream_kernels
from cream_kernels import reference


def test_em(benchmark, harness, em_case):
    case = em_case
    harness.skip_unless_runnable(case)
    x = harness.inputs(case)
    f, cam, vf, vb = x["features"], x["cam"], x["v_fg"], x["v_bg"]
    T, sigma, ratio = case.T, harness.sigma, harness.ratio

    if case.impl in ("ref_f64", "ref_f32"):
        dt = torch.float64 if case.impl == "ref_f64" else torch.float32

        def fn():
            return reference.em_reactivate(f, cam, vf, vb, T, sigma, ratio, False, dt)

    elif case.impl in ("compile_f64", "compile_f32"):
        dt = torch.float64 if case.impl == "compile_f64" else torch.float32
        compiled = harness.compiled("em_reactivate")

        def fn():
            return compiled(f, cam, vf, vb, T, sigma, ratio, False, dt)

    else:
        backend = case.impl

        def fn():
            return cream_kernels.em_reactivate(f, cam, vf, vb, num_iters=T, sigma=sigma, cam_threshold=ratio, backend=backend)

    harness.measure(benchmark, case, fn, features_bytes=f.numel() * f.element_size())


def test_em_top_k(benchmark, harness, em_k_case):
    """Top-K re-activation with the CAM from the classifier weight and the [C, d]
    tables (issue 12): K=5 classes in one call (the features read once per pass
    for all 5, on the cpu backend) against 5 separate calls, and K=1 for scale.
    The one-call row's extra_info has speedup_vs_separate."""
    case = em_k_case
    harness.skip_unless_runnable(case)
    x = harness.inputs(case)
    f, weight, fg, bg, labels = x["features"], x["weight"], x["fg_table"], x["bg_table"], x["labels"]
    g = torch.Generator().manual_seed(1)
    topk = torch.stack([torch.randperm(weight.shape[0], generator=g)[: case.K] for _ in range(case.B)]).to(f.device)
    common = dict(classifier_weight=weight, num_iters=case.T, sigma=harness.sigma, cam_threshold=harness.ratio,
                  backend=case.impl)
    if case.kind == "separate":
        def fn():
            return [cream_kernels.em_reactivate(f, None, fg, bg, topk[:, k], **common) for k in range(case.K)]
    else:
        def fn():
            return cream_kernels.em_reactivate(f, None, fg, bg, topk, **common)

    info = {"K": case.K, "kind": case.kind, "source": "classifier_weight"}
    sep = harness.medians.get(("em_k", case.key.replace("-one_call", "-separate")), {}).get(case.impl)
    row = harness.measure(benchmark, case, fn, features_bytes=f.numel() * f.element_size(), info=info)
    if case.kind == "one_call" and sep and row.get("median_us"):
        row["speedup_vs_separate"] = sep / row["median_us"]
        benchmark.extra_info["speedup_vs_separate"] = row["speedup_vs_separate"]


FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import cream_kernels as ck
t2 = time.perf_counter()
f = torch.rand(1, 1024, 14, 14)
cam = torch.rand(1, 14, 14)
t3 = time.perf_counter()
ck.em_reactivate(f, cam, None, None, backend="cpu")
t4 = time.perf_counter()
ck.em_reactivate(f, cam, None, None, backend="cpu")
t5 = time.perf_counter()
print(json.dumps({"import_torch_s": t1 - t0, "import_cream_kernels_s": t2 - t1, "first_call_s": t4 - t3,
                  "second_call_s": t5 - t4, "dynamo_imported": "torch._dynamo" in sys.modules}))
"""


def test_em_first_call(benchmark, harness):
    """The first eager em_reactivate call in a fresh process (issue 12: it used to
    import torch._dynamo, 2.5-9 s). One subprocess, one round; the row's
    median_us is the first call alone, extra_info has the import times."""
    import json
    import os
    import subprocess
    import sys

    import cream_kernels

    # the child imports the package this process benchmarks (installed, or a built checkout)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cream_kernels.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    result = {}

    def run():
        # cwd "/": `python -c` puts the cwd first on sys.path, which in a checkout is the unbuilt source tree
        out = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, timeout=600,
                             cwd="/")
        assert out.returncode == 0, out.stderr[-2000:]
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.group = "em first call (fresh process)"
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert not result["dynamo_imported"], "an eager call imported torch._dynamo"
    row = {"suite": "first_call", "key": "1024x14x14-B1-fp32-T2", "impl": "cpu", "shape": "1024x14x14", "B": 1,
           "dtype": "fp32", "T": 2, "kind": "first_call", "median_us": result["first_call_s"] * 1e6,
           "load1": round(os.getloadavg()[0], 2), "others_cpu_pct": None,
           "timing": "perf_counter around the first call in a fresh interpreter (one run)", **result}
    benchmark.extra_info.update(row)
    harness.rows.append(row)


def test_em_after_forward(benchmark, harness, em_after_case):
    """The headline case as a user runs it: each timed call comes right after a
    forward pass over the batch (harness.forward_pass, untimed), which pushes the
    features out of the caches and has just used torch's thread pool. Given CAM,
    per-image centroids, like test_em; compare with test_em's row of the same key."""
    case = em_after_case
    harness.skip_unless_runnable(case)
    x = harness.inputs(case)
    f, cam, vf, vb = x["features"], x["cam"], x["v_fg"], x["v_bg"]
    T, sigma, ratio = case.T, harness.sigma, harness.ratio
    if case.impl == "compile_f32":
        compiled = harness.compiled("em_reactivate")

        def fn():
            return compiled(f, cam, vf, vb, T, sigma, ratio, False, torch.float32)

    else:
        backend = case.impl

        def fn():
            return cream_kernels.em_reactivate(f, cam, vf, vb, num_iters=T, sigma=sigma, cam_threshold=ratio,
                                               backend=backend)

    harness.measure(benchmark, case, fn, features_bytes=f.numel() * f.element_size(),
                    setup=harness.forward_pass(case.B), info={"kind": "after_forward"})
