"""Triton kernels called directly (cream_kernels.triton.em / .context), below
ops.py: the issue-12 EM contract (K rows per image, CAM from the classifier
weight, v_by_label, sigma = "auto", sigma_used) against a per-row loop over the
reference, and issue 11's int64 offsets (an image view whose element offsets
pass 2^31, read through a strided view of a lazily allocated buffer so the
test touches a few pages only). Runs under TRITON_INTERPRET=1 (conftest)."""
from __future__ import annotations

import math

import pytest
import torch

from cream_kernels import reference as R

tr = pytest.importorskip("cream_kernels.triton")
if tr.IMPORT_ERROR or not (tr.INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton cannot run here", allow_module_level=True)
from cream_kernels.triton import context as tctx  # noqa: E402
from cream_kernels.triton import em as tem  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and not tr.INTERPRET else "cpu"


# --------------------------------------------------------------------------- #
# Oracle: one reference call per row r = b*K + k
# --------------------------------------------------------------------------- #
def _auto_sigma(f, vf, vb, cosine):
    """SPEC.md sigma = "auto" in float64: f [d, N], initial centroids [d]."""
    if cosine:
        f = f / f.norm(dim=0).clamp_min(1e-12)
    delta = (vf - vb) @ f
    s = delta.std(unbiased=False)
    if s <= 1e-6 * delta.abs().max():
        return math.inf
    return float(s / 2)


def ref_rows(f3, cam, weight, v_fg, v_bg, labels, K, v_by_label, T, sigma, sigma_auto, ratio, cosine):
    B, d, N = f3.shape
    outs = [[] for _ in range(7)]
    f64 = f3.double().cpu()
    for r in range(B * K):
        b = r // K
        if weight is not None:
            c = weight.double().cpu()[labels[r]] @ f64[b]
        else:
            c = cam[r].double().cpu()
        if v_fg is None:
            vf = vb = None
        else:
            row = int(labels[r]) if v_by_label else r
            vf, vb = v_fg[row:row + 1].double().cpu(), v_bg[row:row + 1].double().cpu()
        sig = sigma
        if sigma_auto:
            if vf is None:
                m = R.cam_foreground_mask(c.reshape(1, N), ratio).double()[0]
                ivf = (f64[b] * m).sum(1) / m.sum().clamp_min(1)
                ivb = (f64[b] * (1 - m)).sum(1) / (1 - m).sum().clamp_min(1)
            else:
                ivf, ivb = vf[0], vb[0]
            if cosine:
                ivf = ivf / ivf.norm().clamp_min(1e-12)
                ivb = ivb / ivb.norm().clamp_min(1e-12)
            sig = _auto_sigma(f64[b], ivf, ivb, cosine)
        # +inf drops the similarity term: the reference gets it as a huge sigma
        res = R.em_reactivate(f64[b:b + 1].reshape(1, d, N, 1), c.reshape(1, N, 1), vf, vb, T,
                              sig if math.isfinite(sig) else 1e300, ratio, cosine)
        for i, x in enumerate((res.output, res.z_fg, res.fg_centroid, res.bg_centroid, res.mix, res.picked_fg)):
            outs[i].append(x.reshape(-1))
        outs[6].append(torch.tensor([sig], dtype=torch.float64))
    return [torch.stack(o).reshape(B * K, -1).squeeze(1) if i in (5, 6) else torch.stack(o)
            for i, o in enumerate(outs)]


def make_case(B, d, N, K, mode, cl=False, dtype=torch.float32, C=7, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, N, d, generator=g).transpose(1, 2) if cl else torch.randn(B, d, N, generator=g)
    f = (f * scale).to(dtype).to(DEV)
    labels = torch.randint(0, C, (B * K,), generator=g).to(DEV)
    cam = weight = v_fg = v_bg = None
    v_by_label = False
    if mode.startswith("w"):
        weight = torch.randn(C, d, generator=g).to(DEV)
    else:
        cam = torch.randn(B * K, N, generator=g).to(DEV)
    if mode.endswith("tab"):
        v_fg, v_bg, v_by_label = (torch.randn(C, d, generator=g) * scale).to(DEV), \
            (torch.randn(C, d, generator=g) * scale).to(DEV), True
    elif mode.endswith("rows"):
        v_fg, v_bg = (torch.randn(B * K, d, generator=g) * scale).to(DEV), \
            (torch.randn(B * K, d, generator=g) * scale).to(DEV)
    return dict(f3=f, cam=cam, weight=weight, v_fg=v_fg, v_bg=v_bg, labels=labels, K=K, v_by_label=v_by_label)


def outputs(R_, N, d):
    nan = math.nan  # poisoned: an element the kernel forgets fails the comparison
    return (torch.full((R_, N), nan, device=DEV), torch.full((R_, N), nan, device=DEV),
            torch.full((R_, d), nan, device=DEV), torch.full((R_, d), nan, device=DEV),
            torch.full((R_, 2), nan, device=DEV), torch.full((R_,), 7, dtype=torch.uint8, device=DEV),
            torch.full((R_,), nan, device=DEV))


def run_kernel(case, T=2, sigma=8.0, sigma_auto=False, ratio=0.2, cosine=False):
    B, d, N = case["f3"].shape
    outs = outputs(B * case["K"], N, d)
    tem.em_reactivate(case["f3"], case["cam"], case["weight"], case["v_fg"], case["v_bg"], case["labels"],
                      case["K"], case["v_by_label"], T, sigma, sigma_auto, ratio, cosine, outs)
    return outs


def check(outs, ref, tol, sig_rtol=1e-4):
    names = ("out", "z_fg", "fg", "bg", "mix", "picked", "sigma_used")
    for name, a, r in zip(names, outs, ref):
        a = a.cpu().double().reshape(r.shape)
        if name == "picked":
            assert torch.equal(a.bool(), r.bool()), name
        elif name == "sigma_used":
            both_inf = torch.isinf(a) & torch.isinf(r)
            assert torch.allclose(torch.where(both_inf, 1.0, a), torch.where(both_inf, 1.0, r.double()),
                                  rtol=sig_rtol, atol=0), (name, a, r)
        else:
            assert torch.isfinite(a).all(), f"{name}: not every element written/finite"
            err = (a - r.double()).abs().max().item()
            assert err <= tol, f"{name}: max error {err:.3g} > {tol}"


MODES = ("cam", "w", "tab", "w_tab", "rows", "w_rows")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sigma_auto", [False, True], ids=["sigma8", "auto"])
@pytest.mark.parametrize("cosine", [False, True], ids=["dot", "cos"])
def test_em_contract_vs_reference(mode, sigma_auto, cosine):
    # d=37, N=21: neither a power of 2; K=5 spans two programs (KB_MAX=4) of each image
    case = make_case(1, 37, 21, 5, mode, seed=MODES.index(mode) + 10 * sigma_auto + 100 * cosine)
    sigma = 0.5 if cosine else 8.0
    for T in ((1, 2) if not cosine else (2,)):
        outs = run_kernel(case, T=T, sigma=sigma, sigma_auto=sigma_auto, cosine=cosine)
        check(outs, ref_rows(case["f3"], case["cam"], case["weight"], case["v_fg"], case["v_bg"], case["labels"],
                             case["K"], case["v_by_label"], T, sigma, sigma_auto, 0.2, cosine), tol=2e-5)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", ["w_tab", "cam"])
def test_em_layouts_dtypes(cl, dtype, mode):
    case = make_case(1, 72, 49, 2, mode, cl=cl, dtype=dtype, seed=3)  # BLOCK_D 128: one row per program
    for sigma_auto in (False, True):
        outs = run_kernel(case, T=2, sigma_auto=sigma_auto)
        ref = ref_rows(case["f3"].float(), case["cam"], case["weight"], case["v_fg"], case["v_bg"], case["labels"],
                       case["K"], case["v_by_label"], 2, 8.0, sigma_auto, 0.2, False)
        check(outs, ref, tol=1e-4)


@pytest.mark.parametrize("mode", ["tab", "rows"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("cosine", [False, True], ids=["dot", "cos"])
def test_em_split_path_vs_reference(monkeypatch, mode, cl, cosine):
    """Issue 11: small batches split each row's pixels over P programs (pass + reduce
    launches per iteration). Forced here with CREAM_KERNELS_TRITON_SPLIT; every T and
    both K forms against the float64 reference, and launch counts that show the split ran."""
    case = make_case(2, 40, 150, 2, mode, cl=cl, seed=7 + cl + 2 * cosine)  # N=150: a partial last tile
    blocks = tem.feature_blocks(case["f3"], 1)
    tiles = -(-150 // blocks["BLOCK_N"])
    assert tiles >= 3, blocks  # the case really has several chunks to split into
    sigma = 0.5 if cosine else 8.0
    calls = []
    for name in ("_split_pass", "_split_reduce", "_em_kernel"):
        kern = getattr(tem, name)
        monkeypatch.setattr(tem, name, _Counting(kern, name, calls))
    for chunks in (3, 1000):  # 1000: capped at one tile per chunk
        monkeypatch.setenv(tem.SPLIT_ENV, str(chunks))
        for T in (1, 2, 3):
            calls.clear()
            outs = run_kernel(case, T=T, sigma=sigma, cosine=cosine)
            assert calls.count("_split_pass") == T and calls.count("_split_reduce") == T - 1, calls
            assert "_em_kernel" not in calls
            check(outs, ref_rows(case["f3"], case["cam"], None, case["v_fg"], case["v_bg"], case["labels"],
                                 case["K"], case["v_by_label"], T, sigma, False, 0.2, cosine), tol=2e-5)
    # the forms the split path does not cover keep the one-program kernel; "0" never splits
    for env, kw in (("3", dict(sigma_auto=True)), ("0", {})):
        monkeypatch.setenv(tem.SPLIT_ENV, env)
        calls.clear()
        run_kernel(case, T=2, sigma=sigma, cosine=cosine, **kw)
        assert calls == ["_em_kernel"]
    monkeypatch.setenv(tem.SPLIT_ENV, "two")
    with pytest.raises(ValueError, match=tem.SPLIT_ENV):
        run_kernel(case, T=2)


@pytest.mark.parametrize("mode,d,K", [("w_tab", 72, 2), ("rows", 37, 5), ("cam", 72, 1)])
def test_em_batches_beyond_grid_axis1(monkeypatch, mode, d, K):
    """Issue 17: _em_kernel's grid puts the images on axis 1, which CUDA caps at 65,535;
    a larger batch is launched in slices of at most GRID_AXIS1_MAX images. The limit is
    lowered to 4 here (B = 9: launches of 4, 4 and 1 images), with per-row centroids
    (sliced with the images), K spanning two programs (d=37, K=5) and the classifier
    weight; the result equals the one-launch result and the float64 reference. A forced
    split of more rows than the limit also falls back to the sliced kernel."""
    case = make_case(9, d, 21, K, mode, seed=17 + K)
    whole = run_kernel(case, T=2)
    calls = []
    monkeypatch.setattr(tem, "GRID_AXIS1_MAX", 4)
    monkeypatch.setattr(tem, "_em_kernel", _Counting(tem._em_kernel, "_em_kernel", calls))
    assert tem.image_slices(9) == [(0, 4), (4, 8), (8, 9)]
    for env in ("", "3"):
        monkeypatch.setenv(tem.SPLIT_ENV, env)
        calls.clear()
        outs = run_kernel(case, T=2)
        assert calls == ["_em_kernel"] * 3
        check(outs, ref_rows(case["f3"], case["cam"], case["weight"], case["v_fg"], case["v_bg"], case["labels"],
                             case["K"], case["v_by_label"], 2, 8.0, False, 0.2, False), tol=2e-5)
        for a, b in zip(outs, whole):
            assert torch.equal(a, b)


def test_em_split_default_rule(monkeypatch):
    monkeypatch.delenv(tem.SPLIT_ENV, raising=False)
    blocks = dict(BLOCK_N=16, VEC_N=4)
    assert tem.split_chunks(torch.zeros(1, 8, 4096), 1, blocks) == 1  # CPU tensors (the interpreter): never
    if torch.cuda.is_available():
        f3 = torch.zeros(1, 2048, 784, device="cuda")
        sms = tem._sm_count(f3.device)
        assert 1 < tem.split_chunks(f3, 1, blocks) <= 49  # batch 1: about one program per SM, whole tiles
        assert tem.split_chunks(f3, sms, blocks) == 1  # enough rows to fill the GPU: the one-program kernel
        assert tem.split_chunks(f3, 1, dict(BLOCK_N=2, VEC_N=4)) == 1  # a tile under one vector: never split


class _Counting:
    """A launched kernel's stand-in that records its name (kernel[grid](...) calls)."""

    def __init__(self, kern, name, calls):
        self.kern, self.name, self.calls = kern, name, calls

    def __getitem__(self, grid):
        self.calls.append(self.name)
        return self.kern[grid]


def test_k_rows_equal_separate_calls():
    """K rows in one launch = K launches of one row each (issue 12)."""
    case = make_case(2, 24, 20, 5, "w_tab", seed=5)
    together = run_kernel(case, T=2, sigma_auto=True)
    B, d, N = case["f3"].shape
    K = case["K"]
    for k in range(K):
        one = dict(case, K=1, labels=case["labels"].view(B, K)[:, k].contiguous())
        sep = run_kernel(one, T=2, sigma_auto=True)
        for a, s in zip(together, sep):
            a = a.view(B, K, -1)[:, k].reshape(s.shape)
            assert torch.allclose(a.double(), s.double(), rtol=1e-6, atol=1e-6)


def test_sigma_auto_degenerate_and_scale_free():
    # every pixel alike: the logit gaps have no spread -> sigma +inf, Z = a
    f = torch.randn(2, 16, 1).expand(2, 16, 25).contiguous().to(DEV)
    case = dict(make_case(2, 16, 25, 1, "tab", seed=7), f3=f)
    for T in (1, 3):
        outs = run_kernel(case, T=T, sigma_auto=True)
        assert torch.isinf(outs[6]).all() and (outs[6] > 0).all()
        z, mix = outs[1].cpu(), outs[4].cpu()
        assert torch.allclose(z, mix[:, :1].expand_as(z), atol=1e-6)
    # scaling the features and the centroids by c > 0 leaves Z unchanged (sigma scales by c^2)
    base = run_kernel(make_case(2, 20, 36, 2, "rows", seed=8), T=2, sigma_auto=True)
    big = run_kernel(make_case(2, 20, 36, 2, "rows", seed=8, scale=100.0), T=2, sigma_auto=True)
    assert torch.allclose(base[1], big[1], atol=1e-4)
    assert torch.allclose(big[6] / 100.0**2, base[6], rtol=1e-4)


def test_em_k_zero_and_empty_batch():
    case = make_case(1, 8, 9, 1, "cam")
    case = dict(case, f3=case["f3"][:0], cam=case["cam"][:0], labels=case["labels"][:0])
    run_kernel(case)  # nothing to do, nothing written, no launch


# --------------------------------------------------------------------------- #
# int64 offsets (issue 11 section 4)
# --------------------------------------------------------------------------- #
S = 2**30 + 16  # a stride that fits int32 while stride * 2 does not


def _huge_view(d, N, cl, dtype=torch.float16):
    """A [1, d, N] view whose last element sits past 2^31 elements: the big
    stride is over N (channels_last) or over d (NCHW). The buffer is allocated
    lazily (torch.empty on CPU), and only the viewed elements are touched."""
    if DEV != "cpu":
        pytest.skip("lazy 4 GiB allocation: CPU only")
    if cl:
        n_elem = (N - 1) * S + d
        store = torch.empty(n_elem, dtype=dtype)
        return store.as_strided((1, d, N), (n_elem, 1, S))
    n_elem = (d - 1) * S + N
    store = torch.empty(n_elem, dtype=dtype)
    return store.as_strided((1, d, N), (n_elem, S, 1))


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_em_offsets_beyond_int32(cl):
    d, N = (16, 3) if cl else (3, 16)
    f = _huge_view(d, N, cl)
    assert (max(d - 1, 0) * f.stride(1) + (N - 1) * f.stride(2)) > 2**31
    g = torch.Generator().manual_seed(11)
    vals = torch.randn(1, d, N, generator=g).half()
    f.copy_(vals)
    case = dict(f3=f, cam=None, weight=torch.randn(4, d, generator=g), v_fg=None, v_bg=None,
                labels=torch.tensor([1, 3]), K=2, v_by_label=False)
    big = run_kernel(case, T=2, sigma_auto=True)
    small = run_kernel(dict(case, f3=vals.clone()), T=2, sigma_auto=True)
    for a, b in zip(big, small):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_context_offsets_beyond_int32(cl):
    d, N = (16, 3) if cl else (3, 16)
    f = _huge_view(d, N, cl)
    g = torch.Generator().manual_seed(12)
    vals = torch.randn(1, d, N, generator=g).half()
    f.copy_(vals)
    labels = torch.tensor([2])
    w = torch.randn(4, d, generator=g)
    res = []
    for x in (f, vals.clone()):
        means = torch.full((1, 2, d), math.nan)
        ne = torch.zeros(1, 2, dtype=torch.uint8)
        tctx.context_stats(x, labels, None, w, 0.2, means, ne)
        res.append((means, ne))
    assert torch.allclose(res[0][0], res[1][0], rtol=1e-6, atol=1e-6) and torch.equal(res[0][1], res[1][1])


# --------------------------------------------------------------------------- #
# Context update: aliasing (issue 11 section 4, last item)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("alias", ["features", "weight"])
def test_context_update_reads_before_writing_aliased_tables(alias):
    """Features (or the classifier weight) that are views of the tables being
    updated: the result is SPEC.md's update computed from the inputs as they
    were before the call, whatever order the programs run in."""
    C, d, N, B = 6, 4, 3, 4
    g = torch.Generator().manual_seed(13)
    fg = torch.randn(C, d * N, generator=g).to(DEV)
    bg = torch.randn(C, d * N, generator=g).to(DEV)
    labels = torch.tensor([1, 1, 4, 1], device=DEV)  # class 1 repeated: the ticket path
    fgt, bgt = fg.view(C * d * N).view(-1, d * N), bg  # tables as [C, d*N] rows of length D
    D = d * N
    if alias == "features":
        f3 = fg.view(-1)[: B * D].view(B, D, 1)  # [B, D, 1] features = the first rows of fg
        weight = torch.randn(C, D, generator=g).to(DEV)
    else:
        f3 = torch.randn(B, D, 1, generator=g).to(DEV)
        weight = bg  # CAM weight = the bg table
    cam = None
    exp_fg, exp_bg = fg.clone().cpu(), bg.clone().cpu()
    R.update_context_embeddings(exp_fg, exp_bg, f3.clone().cpu().view(B, D, 1, 1), labels.cpu(), None,
                                weight.clone().cpu(), 0.8, 0.2)
    means = torch.full((B, 2, D), math.nan, device=DEV)
    ne = torch.zeros(B, 2, dtype=torch.uint8, device=DEV)
    tctx.context_update(fgt, bgt, f3, labels, cam, weight, 0.2, 0.8, means, ne)
    assert torch.allclose(fg.cpu(), exp_fg, atol=1e-5) and torch.allclose(bg.cpu(), exp_bg, atol=1e-5)
    assert tctx._overlaps(f3 if alias == "features" else weight, fg if alias == "features" else bg)
