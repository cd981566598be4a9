"""Issue 12's EM extensions on every backend against the reference: the CAM from
the classifier weight, K classes per image in one call, sigma="auto"."""
import pytest
import torch

import cream_kernels as ck
from cream_kernels import reference as ref
from _helpers import TOL, assert_close, backend_ids, kernel_backends, make_inputs, skip_unless_new_features, supports

BACKENDS = kernel_backends()
ALL = [("reference", torch.device("cpu"))] + BACKENDS
FIELDS = ("output", "z_fg", "fg_centroid", "bg_centroid", "mix", "sigma_used")
C = 5


def _inputs(B, d, h, w, K, *, dtype=torch.float32, device="cpu", layout="nchw", seed=0):
    f, cam, fg, bg, _ = make_inputs(B, d, h, w, dtype=dtype, device=device, num_classes=C, seed=seed, layout=layout)
    g = torch.Generator().manual_seed(seed + 100)
    # distinct classes per image (as top-k gives), and a weight whose CAMs differ per class
    labels = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(B)]).to(device)
    weight = (torch.randn(C, d, generator=g) + 0.5).to(device)
    cams = torch.stack([cam + 0.5 * torch.randn(cam.shape, generator=g).to(device) for _ in range(K)], dim=1)
    return f, cams, weight, fg, bg, labels


def _call(backend, f, *, mode, source, K, cams, weight, fg, bg, labels, **kw):
    """One call in the given mode. K=None: the [B] / [B, h, w] form (first class only)."""
    lab = labels[:, :K] if K is not None else labels[:, 0]
    cam = cams[:, :K] if K is not None else cams[:, 0]
    args = dict(cam=cam if source == "cam" else None, classifier_weight=weight if source == "weight" else None)
    if mode == "table":
        args.update(fg_embedding=fg, bg_embedding=bg, labels=lab)
    elif mode == "per_image":
        # per image (and class) centroids: the table rows the labels pick
        args.update(fg_embedding=fg[lab].contiguous(), bg_embedding=bg[lab].contiguous())
        if source == "weight":
            pytest.skip("labels index the tables whenever both are given: per-image centroids need a given cam")
    else:
        if source == "weight":
            args.update(labels=lab)
    return ck.em_reactivate(f, return_extras=True, backend=backend, **args, **kw)


def _on(t, device):
    return None if t is None else t.to(device)


def _compare(got, exp, dtype, label=""):
    assert got.output.dtype == torch.float32 and got.picked_fg.dtype == torch.bool
    assert got.output.shape == exp.output.shape
    assert torch.equal(got.picked_fg.cpu(), exp.picked_fg), f"{label} calibration branch differs"
    for name in FIELDS:
        assert_close(getattr(got, name), getattr(exp, name), name=f"{label} {name}", **TOL[dtype])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("K", [None, 1, 3], ids=["noK", "K1", "K3"])
@pytest.mark.parametrize("sigma", [8.0, "auto"])
@pytest.mark.parametrize("source", ["cam", "weight"])
@pytest.mark.parametrize("mode", ["table", "per_image", "training_free"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_modes_against_reference(backend, device, mode, source, sigma, K, similarity):
    skip_unless_new_features(backend)
    f, cams, weight, fg, bg, labels = _inputs(3, 21, 6, 9, 3, device=device)
    kw = dict(mode=mode, source=source, K=K, cams=cams, weight=weight, fg=fg, bg=bg, labels=labels,
              sigma=sigma, similarity=similarity, cam_threshold=0.3)
    got = _call(backend, f, **kw)
    cpu = {k: _on(v, "cpu") for k, v in kw.items() if isinstance(v, torch.Tensor)}
    exp = _call("reference", f.cpu(), **{**kw, **cpu})
    lead = (3,) if K is None else (3, K)
    assert got.output.shape == lead + (6, 9) and got.sigma_used.shape == lead and got.fg_centroid.shape == lead + (21,)
    _compare(got, exp, torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_dtypes_layouts_against_reference(backend, device, dtype, layout, similarity):
    skip_unless_new_features(backend)
    if not supports(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    f, cams, weight, fg, bg, labels = _inputs(2, 37, 7, 7, 4, dtype=dtype, device=device, layout=layout, seed=3)
    for mode in ("table", "training_free"):
        kw = dict(mode=mode, source="weight", K=4, cams=cams, weight=weight, fg=fg, bg=bg, labels=labels,
                  sigma="auto", similarity=similarity, num_iters=3)
        got = _call(backend, f, **kw)
        cpu = {k: _on(v, "cpu") for k, v in kw.items() if isinstance(v, torch.Tensor)}
        exp = _call("reference", f.cpu(), **{**kw, **cpu})
        _compare(got, exp, dtype, label=mode)


@pytest.mark.parametrize("backend,device", ALL, ids=backend_ids(ALL))
@pytest.mark.parametrize("source", ["cam", "weight"])
@pytest.mark.parametrize("sigma", [8.0, "auto"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_k_classes_equal_k_separate_calls(backend, device, source, sigma, layout):
    skip_unless_new_features(backend)
    K = 4
    f, cams, weight, fg, bg, labels = _inputs(3, 33, 5, 8, K, device=device, layout=layout, seed=5)
    src = dict(cam=cams) if source == "cam" else dict(classifier_weight=weight)
    for tables in (True, False):
        emb = dict(fg_embedding=fg, bg_embedding=bg) if tables else {}
        if not tables and source == "cam":
            lab = None
        else:
            lab = labels
        whole = ck.em_reactivate(f, labels=lab, sigma=sigma, return_extras=True, backend=backend, **emb, **src)
        assert whole.output.shape == (3, K, 5, 8)
        for k in range(K):
            src_k = dict(cam=cams[:, k]) if source == "cam" else dict(classifier_weight=weight)
            one = ck.em_reactivate(f, labels=None if lab is None else lab[:, k], sigma=sigma, return_extras=True,
                                   backend=backend, **emb, **src_k)
            assert torch.equal(whole.picked_fg[:, k], one.picked_fg)
            for name in FIELDS:
                # the same kernel on the same row: equal up to summation order (cpu: bitwise)
                a, b = getattr(whole, name)[:, k], getattr(one, name)
                if backend == "cpu":
                    assert torch.equal(a, b), f"{name} of class {k} differs from its separate call"
                else:
                    assert_close(a, b, name=f"{name}[k={k}]", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", ALL, ids=backend_ids(ALL))
def test_weight_equals_given_cam(backend, device):
    """The in-kernel CAM is W[y] . f: passing that CAM explicitly gives the same result."""
    skip_unless_new_features(backend)
    f, _, weight, fg, bg, labels = _inputs(3, 24, 6, 6, 2, device=device, seed=7)
    cam = torch.einsum("bdhw,bkd->bkhw", f.double(), weight.double()[labels]).float()
    for emb in (dict(fg_embedding=fg, bg_embedding=bg), {}):
        a = ck.em_reactivate(f, None, labels=labels, classifier_weight=weight, return_extras=True, backend=backend, **emb)
        b = ck.em_reactivate(f, cam, labels=labels if emb else None, return_extras=True, backend=backend, **emb)
        _compare(a, b, torch.float32)


@pytest.mark.parametrize("backend,device", ALL, ids=backend_ids(ALL))
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_auto_sigma_is_scale_free(backend, device, similarity):
    """SPEC.md: scaling the features by c > 0 (centroids learned from them) leaves Z unchanged."""
    skip_unless_new_features(backend)
    f, cams, weight, _, _, labels = _inputs(2, 16, 7, 7, 2, device=device, seed=9)
    base = ck.em_reactivate(f, None, labels=labels, classifier_weight=weight, sigma="auto", similarity=similarity,
                            return_extras=True, backend=backend)
    assert float(base.z_fg.max() - base.z_fg.min()) > 0.5, "auto sigma should give sharp posteriors here"
    for c in (0.01, 10.0, 1000.0):
        scaled = ck.em_reactivate(f * c, None, labels=labels, classifier_weight=weight, sigma="auto",
                                  similarity=similarity, return_extras=True, backend=backend)
        assert_close(scaled.z_fg, base.z_fg, atol=2e-5, rtol=1e-4, name=f"z_fg at scale {c}")
        assert torch.equal(scaled.picked_fg, base.picked_fg)
        if similarity == "dot":
            assert_close(scaled.sigma_used, base.sigma_used * c * c, atol=0, rtol=1e-4, name="sigma_used")


def test_auto_sigma_rule_by_hand():
    """sigma_used is half the population std of the initial logit gaps, per row."""
    f, cams, _, fg, bg, labels = _inputs(2, 10, 4, 6, 3, dtype=torch.float64, seed=11)
    r = ck.em_reactivate(f, cams, fg, bg, labels, sigma="auto", return_extras=True, backend="reference")
    for b in range(2):
        for k in range(3):
            v = (fg[labels[b, k]] - bg[labels[b, k]]).double()
            delta = torch.einsum("d,dn->n", v, f[b].reshape(10, -1))
            s = ((delta - delta.mean()) ** 2).mean().sqrt()
            assert abs(float(r.sigma_used[b, k]) - float(s) / 2) <= 1e-6 * float(s)
    # and the reference's auto run equals a numeric run at that sigma
    one = ck.em_reactivate(f[:1], cams[:1, 0], fg, bg, labels[:1, 0], sigma=float(r.sigma_used[0, 0]),
                           return_extras=True, backend="reference")
    assert_close(one.z_fg, r.z_fg[:1, 0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", ALL, ids=backend_ids(ALL))
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("case", ["constant_features", "zero_features", "equal_tables"])
def test_auto_sigma_degenerate(backend, device, similarity, case):
    """No spread in the logit gap: Z = a (0.5 at the first E-step), sigma_used = inf, never NaN."""
    skip_unless_new_features(backend)
    f, cams, weight, fg, bg, labels = _inputs(2, 12, 5, 5, 2, device=device, seed=13)
    if case == "constant_features":
        f = torch.full_like(f, 0.7)
    elif case == "zero_features":
        f = torch.zeros_like(f)
    else:
        bg = fg.clone()
    for num_iters in (1, 3):
        got = ck.em_reactivate(f, cams, fg, bg, labels, sigma="auto", similarity=similarity, num_iters=num_iters,
                               return_extras=True, backend=backend)
        exp = ck.em_reactivate(f.cpu(), cams.cpu(), fg.cpu(), bg.cpu(), labels.cpu(), sigma="auto",
                               similarity=similarity, num_iters=num_iters, return_extras=True, backend="reference")
        for name in ("output", "z_fg", "fg_centroid", "bg_centroid", "mix"):
            assert torch.isfinite(getattr(got, name)).all(), name
        assert torch.isinf(got.sigma_used).all() and (got.sigma_used > 0).all()
        assert_close(got.z_fg, torch.full_like(got.z_fg, 0.5), atol=1e-6, rtol=0, name="z_fg")
        _compare(got, exp, torch.float32, label=case)


@pytest.mark.parametrize("backend,device", ALL, ids=backend_ids(ALL))
def test_empty_batch_k(backend, device):
    skip_unless_new_features(backend)
    f = torch.rand(0, 4, 3, 3, device=device)
    r = ck.em_reactivate(f, None, labels=torch.zeros(0, 3, dtype=torch.long, device=device),
                         classifier_weight=torch.randn(2, 4, device=device), sigma="auto", return_extras=True,
                         backend=backend)
    assert r.output.shape == (0, 3, 3, 3) and r.sigma_used.shape == (0, 3)


def test_reference_k_rows_are_independent():
    """The oracle's K rows of an image are its K separate single-class runs."""
    f, cams, weight, fg, bg, labels = _inputs(2, 9, 4, 4, 3, dtype=torch.float64, seed=17)
    R = labels.numel()
    whole = ref.em_reactivate(f, None, fg[labels.reshape(R)], bg[labels.reshape(R)], 2, 8.0, 0.2, False, K=3,
                              weight=weight, labels=labels.reshape(R), sigma_auto=True)
    for b in range(2):
        for k in range(3):
            one = ref.em_reactivate(f[b:b + 1], None, fg[labels[b, k:k + 1]], bg[labels[b, k:k + 1]], 2, 8.0, 0.2,
                                    False, weight=weight, labels=labels[b, k:k + 1], sigma_auto=True)
            for x, y in zip(whole, one):
                assert torch.equal(x[b * 3 + k : b * 3 + k + 1], y)
