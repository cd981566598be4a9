"""Shared test helpers: which backends run here, tolerances, and comparisons."""
from __future__ import annotations

import torch

from cream_kernels import ops

# Tolerances per feature dtype, in one table. Every backend reads exactly the
# same input values as the reference (fp16/bf16 convert exactly to fp32), so
# the only differences are fp32 accumulation against the reference's float64
# and summation order: the tolerances are the same for all low-precision dtypes.
TOL = {
    torch.float32: dict(atol=5e-5, rtol=1e-4),
    torch.float16: dict(atol=5e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-5, rtol=1e-4),
    torch.float64: dict(atol=1e-6, rtol=1e-6),  # output rounding to float32 only
}


def devices():
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out


def kernel_backends():
    """(backend, device) pairs that can run here, excluding the reference."""
    pairs = []
    for dev in devices():
        for name in ("cpu", "triton", "cuda"):
            if not ops.backend_reasons(name, dev):
                pairs.append((name, dev))
    return pairs


def backend_ids(pairs):
    return [f"{n}-{d.type}" for n, d in pairs]


def _new_features_ok(backend: str) -> bool:
    """Whether ``backend`` implements issue 12's EM extensions (classifier_weight,
    K classes per image, sigma="auto") in this tree. The Triton kernel gains them
    in the Triton helper's branch; until that merges, its tests of them skip."""
    if backend != "triton":
        return True
    return ops._triton_em_has_new_api()


def skip_unless_new_features(backend: str) -> None:
    import pytest

    if not _new_features_ok(backend):
        pytest.skip("this tree's Triton EM kernel predates issue 12's extensions (the Triton helper's branch adds them)")


def supports(backend: str, dtype: torch.dtype) -> bool:
    return dtype != torch.float64 or backend == "cpu"


def assert_close(actual, expected, *, atol, rtol, name="tensor"):
    """allclose with a report that names the worst index and the share of bad elements."""
    actual = actual.detach().cpu().to(torch.float64)
    expected = expected.detach().cpu().to(torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN pattern differs ({int(nan_a.sum())} vs {int(nan_e.sum())} NaNs)"
    a, e = actual[~nan_a], expected[~nan_e]
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bool(bad.any()):
        full = torch.zeros_like(actual)
        full[~nan_a] = err
        worst = int(full.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements ({100.0 * float(bad.float().mean()):.2f}%) exceed "
            f"atol={atol} rtol={rtol}; worst at {idx}: got {actual[idx].item():.8g}, expected {expected[idx].item():.8g} "
            f"(abs err {full.max().item():.3g})"
        )


def make_inputs(B, d, h, w, *, dtype=torch.float32, device="cpu", num_classes=3, seed=0, layout="nchw"):
    """Features, CAM, tables and labels for one test case. The features are
    non-negative (post-ReLU, as in the paper's backbones) with an object-like
    bump so the CAM and the EM have structure to find."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(B, d, h, w, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    bump = torch.exp(-4 * (xx**2 + yy**2))
    f[:, : max(1, d // 3)] += 2 * bump
    cam = (f[:, : max(1, d // 3)].mean(1) + 0.3 * torch.randn(B, h, w, generator=g))
    fg = torch.randn(num_classes, d, generator=g)
    bg = torch.randn(num_classes, d, generator=g)
    labels = torch.randint(0, num_classes, (B,), generator=g)
    f = f.to(dtype)
    if layout == "channels_last":
        f = f.to(memory_format=torch.channels_last)
    elif layout == "strided":  # neither layout: a slice of a wider tensor, transposed spatially
        wide = torch.zeros(B, d + 3, w, h, dtype=dtype)
        wide[:, 1 : d + 1] = f.transpose(2, 3)
        f = wide[:, 1 : d + 1].transpose(2, 3)
    dev = torch.device(device)
    return f.to(dev), cam.to(dev), fg.to(dev), bg.to(dev), labels.to(dev)
