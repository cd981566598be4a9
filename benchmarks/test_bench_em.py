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
