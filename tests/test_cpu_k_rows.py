"""The cpu backend runs an image's K classes together (csrc/cpu/em_cpu.cpp): a
K-row call must give, bit for bit, what K one-row calls give, in every storage
dtype and layout, with enough channels for the NCHW four-row sweeps, their
prefetch of the next sweep and the leftover channels (issue 25)."""
import pytest
import torch

import cream_kernels as ck
from cream_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="cpu backend not built")

FIELDS = ("output", "z_fg", "fg_centroid", "bg_centroid", "mix", "picked_fg", "sigma_used")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("source", ["cam", "weight", "training_free"])
def test_k_row_call_is_bitwise_k_one_row_calls(dtype, layout, source):
    B, d, h, w, K, C = 3, 42, 6, 7, 3, 7  # d = 4*10 + 2: ten four-row sweeps (nine prefetches) and two leftovers
    g = torch.Generator().manual_seed(25)
    f = torch.randn(B, d, h, w, generator=g).relu_().to(dtype)
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(C, d, generator=g) + 0.3
    labels = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(B)])
    cams = torch.randn(B, K, h, w, generator=g)
    fg, bg = torch.rand(C, d, generator=g), torch.rand(C, d, generator=g)

    def call(k):  # k None: all K rows in one call
        kw = dict(num_iters=3, sigma=0.5, return_extras=True, backend="cpu")
        lab = labels if k is None else labels[:, k]
        if source == "cam":
            return ck.em_reactivate(f, cams if k is None else cams[:, k], fg, bg, lab, **kw)
        if source == "weight":
            return ck.em_reactivate(f, None, fg, bg, lab, classifier_weight=weight, **kw)
        return ck.em_reactivate(f, None, None, None, lab, classifier_weight=weight, **kw)

    whole = call(None)
    assert whole.output.shape == (B, K, h, w)
    for k in range(K):
        one = call(k)
        for name in FIELDS:
            a, b = getattr(whole, name)[:, k], getattr(one, name)
            assert torch.equal(a, b), f"{name} of class {k} differs from its one-row call ({dtype}, {layout}, {source})"
