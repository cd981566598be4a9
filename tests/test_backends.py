"""Every available backend against the reference (SPEC.md is the reference)."""
import pytest
import torch

import cream_kernels as ck
from cream_kernels import reference as ref
from _helpers import TOL, assert_close, backend_ids, kernel_backends, make_inputs, supports

BACKENDS = kernel_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# d not a multiple of any block; 7x7, 13x17, 28x28, and a 1x1 map.
SHAPES = [(3, 37, 7, 7), (2, 64, 13, 17), (2, 19, 28, 28), (2, 5, 1, 1)]
EXTRA_NAMES = ("output", "z_fg", "fg_centroid", "bg_centroid", "mix")


def _em_both(backend, device, f, cam, fg, bg, labels, **kw):
    got = ck.em_reactivate(f, cam, fg, bg, labels, return_extras=True, backend=backend, **kw)
    exp = ck.em_reactivate(f.cpu(), cam.cpu(), None if fg is None else fg.cpu(), None if bg is None else bg.cpu(),
                           None if labels is None else labels.cpu(), return_extras=True, backend="reference", **kw)
    return got, exp


def _check_em(got, exp, dtype, label=""):
    assert got.output.dtype == torch.float32 and got.picked_fg.dtype == torch.bool
    assert torch.equal(got.picked_fg.cpu(), exp.picked_fg), f"{label} calibration branch differs"
    for name in EXTRA_NAMES:
        assert_close(getattr(got, name), getattr(exp, name), name=f"{label} {name}", **TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_em_shapes_dtypes(backend, device, shape, dtype, similarity):
    if not supports(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    f, cam, fg, bg, labels = make_inputs(*shape, dtype=dtype, device=device)
    got, exp = _em_both(backend, device, f, cam, fg, bg, labels, similarity=similarity)
    _check_em(got, exp, dtype)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("num_iters", [1, 2, 3, 4])
def test_em_iterations(backend, device, num_iters, similarity):
    f, cam, fg, bg, labels = make_inputs(3, 37, 7, 7, device=device, seed=1)
    sigma = 8.0 if similarity == "dot" else 0.25
    got, exp = _em_both(backend, device, f, cam, fg, bg, labels, num_iters=num_iters, similarity=similarity, sigma=sigma)
    _check_em(got, exp, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("mode", ["table", "per_image", "training_free"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_em_modes_layouts(backend, device, mode, layout):
    f, cam, fg, bg, labels = make_inputs(3, 21, 6, 9, device=device, seed=2, layout=layout)
    if mode == "per_image":
        fg, bg, labels = fg[labels].contiguous(), bg[labels].contiguous(), None
    elif mode == "training_free":
        fg = bg = labels = None
    for similarity in ("dot", "cosine"):
        got, exp = _em_both(backend, device, f, cam, fg, bg, labels, similarity=similarity, cam_threshold=0.35)
        _check_em(got, exp, torch.float32, label=f"{similarity}:")


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_em_bigger_map(backend, device):
    """A VGG16-like channel count with a non-square map, bf16 and fp32."""
    for dtype in (torch.float32, torch.bfloat16):
        f, cam, fg, bg, labels = make_inputs(2, 1024, 7, 9, dtype=dtype, device=device, seed=3)
        got, exp = _em_both(backend, device, f, cam, fg / 8, bg / 8, labels)
        _check_em(got, exp, dtype)


# --------------------------------------------------------------------------- context update
def _update_both(backend, f, labels, *, C, momentum=0.8, seed=0, **src):
    g = torch.Generator().manual_seed(seed)
    tables = [torch.randn(C, f.shape[1], generator=g) for _ in range(2)]
    mine = [t.clone().to(f.device) for t in tables]
    ck.update_context_embeddings(*mine, f, labels, backend=backend, momentum=momentum, **src)
    cpu_src = {k: v.cpu() for k, v in src.items()}
    ck.update_context_embeddings(*tables, f.cpu(), labels.cpu(), backend="reference", momentum=momentum, **cpu_src)
    return mine, tables


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("source", ["cam", "classifier_weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_update_matches_reference(backend, device, shape, dtype, source):
    if not supports(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    B, d, h, w = shape
    f, cam, fg, _, _ = make_inputs(B + 3, d, h, w, dtype=dtype, device=device, num_classes=4)
    labels = torch.tensor([1, 1, 0, 1, 3, 2][: B + 3], device=device)  # repeated labels
    src = {"cam": cam} if source == "cam" else {"classifier_weight": fg}
    mine, theirs = _update_both(backend, f, labels, C=4, **src)
    for m, t, name in zip(mine, theirs, ("fg", "bg")):
        assert_close(m, t, name=name, **TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_update_layouts(backend, device, layout):
    f, cam, _, _, _ = make_inputs(5, 23, 5, 7, device=device, layout=layout)
    labels = torch.tensor([0, 2, 2, 0, 2], device=device)
    mine, theirs = _update_both(backend, f, labels, C=3, cam=cam)
    for m, t in zip(mine, theirs):
        assert_close(m, t, **TOL[torch.float32])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_update_is_deterministic(backend, device):
    f, cam, _, _, _ = make_inputs(16, 40, 7, 7, device=device, seed=5)
    labels = torch.zeros(16, dtype=torch.long, device=device)  # every sample hits row 0
    runs = []
    for _ in range(3):
        t = [torch.ones(2, 40, device=device), torch.ones(2, 40, device=device)]
        ck.update_context_embeddings(*t, f, labels, cam=cam, backend=backend)
        runs.append(t)
    for other in runs[1:]:
        assert torch.equal(other[0], runs[0][0]) and torch.equal(other[1], runs[0][1])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_stats_and_apply_halves(backend, device):
    """The two halves used by the distributed path compose to the fused op."""
    from cream_kernels import ops

    f, cam, _, _, _ = make_inputs(6, 33, 7, 7, device=device, seed=6)
    labels = torch.tensor([2, 0, 2, 2, 1, 0], device=device)
    means, nonempty = ops.context_stats(f, labels, cam=cam, num_classes=3, backend=backend)
    rmeans, rnonempty = ops.context_stats(f.cpu(), labels.cpu(), cam=cam.cpu(), num_classes=3, backend="reference")
    assert_close(means, rmeans, **TOL[torch.float32])
    assert torch.equal(nonempty.cpu(), rnonempty)
    a = [torch.zeros(3, 33, device=device) for _ in range(2)]
    b = [torch.zeros(3, 33, device=device) for _ in range(2)]
    ops.context_apply(*a, means, nonempty, labels, momentum=0.7, backend=backend)
    ck.update_context_embeddings(*b, f, labels, cam=cam, momentum=0.7, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------- the oracle itself
def test_reference_float32_compute_agrees_with_float64():
    f, cam, fg, bg, labels = make_inputs(3, 37, 13, 17, seed=7)
    for cosine in (False, True):
        r64 = ref.em_reactivate(f, cam, fg[labels], bg[labels], 3, 8.0, 0.2, cosine)
        r32 = ref.em_reactivate(f, cam, fg[labels], bg[labels], 3, 8.0, 0.2, cosine, compute_dtype=torch.float32)
        assert torch.equal(r64.picked_fg, r32.picked_fg)
        for a, b in zip(r64[:5], r32[:5]):
            assert_close(b, a, **TOL[torch.float32])


def test_reference_is_per_image():
    """Batching never mixes images: each image alone gives the same result."""
    f, cam, fg, bg, labels = make_inputs(4, 16, 5, 6, seed=8)
    whole = ref.em_reactivate(f, cam, fg[labels], bg[labels], 2, 8.0, 0.2, False)
    for b in range(4):
        one = ref.em_reactivate(f[b : b + 1], cam[b : b + 1], fg[labels[b : b + 1]], bg[labels[b : b + 1]], 2, 8.0, 0.2, False)
        for x, y in zip(whole, one):
            assert torch.equal(x[b : b + 1], y)


def test_reference_update_closed_form():
    """SPEC.md: k updates of one row give lambda^k V + sum_j (1-lambda) lambda^(k-1-j) mean_j."""
    torch.manual_seed(0)
    f = torch.rand(4, 6, 3, 3, dtype=torch.float64)
    cam = torch.rand(4, 3, 3, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    lam = 0.6
    fg, bg = torch.randn(1, 6), torch.randn(1, 6)
    V = fg.clone().double()
    ref.update_context_embeddings(fg, bg, f, labels, cam=cam, momentum=lam)
    means, _ = ref.context_stats(f, labels, cam=cam)
    k = 4
    expected = lam**k * V[0] + sum((1 - lam) * lam ** (k - 1 - j) * means[j, 0].double() for j in range(k))
    assert_close(fg[0], expected, atol=1e-6, rtol=1e-6)


def test_reference_mask_rule():
    cam = torch.tensor([[0.0, 0.1, 0.2, 0.5, 1.0], [-3.0, -1.0, -2.6, -3.0, -3.0]])
    mask = ref.cam_foreground_mask(cam, 0.2)
    # row 0: thr = 0.2 -> pixels >= 0.2; row 1: lo=-3, hi=-1, thr=0.4 -> m >= -2.6
    assert mask.tolist() == [[False, False, True, True, True], [False, True, True, False, False]]
    assert ref.cam_foreground_mask(torch.full((1, 4), 2.0), 0.2).all()
