"""Context embedding update (SPEC.md Op 1): every backend against reference.py.

The training-time op: the CAM is computed from the classifier weight inside the
op (W[y] . f_i, the fused path), then the CAM-masked fg/bg means move rows of
the [200, d] tables (CUB's 200 classes), momentum 0.8, in place.

Baselines: reference.context_stats (eager in float64 / float32, or
torch.compile(reference.context_stats)) followed by reference.context_apply
eagerly. context_apply is a Python loop over the batch on .tolist() values, so
compiling it would specialise on the labels and recompile every batch; only the
tensor part is compiled.
"""
import torch

import cream_kernels
from cream_kernels import reference


def test_update(benchmark, harness, update_case):
    case = update_case
    harness.skip_unless_runnable(case)
    x = harness.inputs(case)
    f, labels, weight = x["features"], x["labels"], x["weight"]
    fg, bg = x["fg_table"], x["bg_table"]  # updated in place by every call; the values stay bounded
    ratio, momentum = harness.ratio, harness.momentum

    if case.impl.startswith(("ref_", "compile_")):
        dt = torch.float64 if case.impl.endswith("f64") else torch.float32
        stats = harness.compiled("context_stats") if case.impl.startswith("compile_") else reference.context_stats

        def fn():
            means, nonempty = stats(f, labels, None, weight, ratio, dt)
            reference.context_apply(fg, bg, means, nonempty, labels, momentum)

    else:
        backend = case.impl

        def fn():
            cream_kernels.update_context_embeddings(
                fg, bg, f, labels, classifier_weight=weight, momentum=momentum, cam_threshold=ratio, backend=backend
            )

    harness.measure(benchmark, case, fn, features_bytes=f.numel() * f.element_size())
