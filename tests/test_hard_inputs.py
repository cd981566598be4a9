"""Hard inputs and small things a user hits (issue 11 section 4, issue 12 sections
3-4): every integer label width, extreme sigma and float64 CAMs, huge Python
ints, num_iters' bound, memory shared with the tables, the flat-posterior
warning, [B, 1, h, w] CAMs and unbatched images, no gradient, no torch._dynamo
on an eager call, and CUDA graph capture (GPU only)."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import cream_kernels as ck
from cream_kernels import ops
from _helpers import TOL, assert_close, backend_ids, kernel_backends, make_inputs

BACKENDS = [("reference", torch.device("cpu"))] + kernel_backends()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mv(t, device):
    return None if t is None else t.to(device)


# --------------------------------------------------------------------------- labels of every width
@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("dtype", ops.LABEL_DTYPES, ids=str)
def test_labels_of_every_integer_width(backend, device, dtype):
    """Every integer dtype gives exactly the int64 result; uint8 is a label, not a mask."""
    f, cam, fg, bg, _ = make_inputs(4, 9, 3, 4, num_classes=3, device=device)
    labels = torch.tensor([1, 0, 2, 1], device=device)
    want = ck.em_reactivate(f, cam, fg, bg, labels, backend=backend)
    got = ck.em_reactivate(f, cam, fg, bg, labels.to(dtype), backend=backend)
    assert torch.equal(got, want)
    tables = [[torch.zeros(3, 9, device=device) for _ in range(2)] for _ in range(2)]
    ck.update_context_embeddings(*tables[0], f, labels, cam=cam, backend=backend)
    ck.update_context_embeddings(*tables[1], f, labels.to(dtype), cam=cam, backend=backend)
    assert torch.equal(tables[0][0], tables[1][0]) and torch.equal(tables[0][1], tables[1][1])


@pytest.mark.parametrize("dtype", [torch.bool, torch.float16, torch.float32, torch.complex64], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_integer_labels_rejected(dtype, backend):
    f, cam, fg, bg, _ = make_inputs(2, 9, 3, 4)
    labels = torch.tensor([1, 0]).to(dtype)
    with pytest.raises(TypeError, match="labels") as info:
        ck.em_reactivate(f, cam, fg, bg, labels, backend=backend)
    assert str(dtype) in str(info.value)
    with pytest.raises(TypeError, match="labels"):
        ck.update_context_embeddings(torch.zeros(3, 9), torch.zeros(3, 9), f, labels, cam=cam, backend=backend)


def test_uint64_beyond_int64_is_out_of_range():
    f, cam, fg, bg, _ = make_inputs(2, 9, 3, 4)
    labels = torch.tensor([2**63, 0], dtype=torch.uint64)
    with pytest.raises(ValueError, match="labels must lie in"):
        ck.em_reactivate(f, cam, fg, bg, labels)


# --------------------------------------------------------------------------- sigma, float64 CAMs
@pytest.mark.parametrize("sigma", [1e-39, 1e-45, 5e38, 1e300, 10**400], ids=["1e-39", "1e-45", "5e38", "1e300", "10**400"])
def test_sigma_outside_float32_rejected(sigma):
    f, cam, fg, bg, labels = make_inputs(2, 9, 3, 4)
    with pytest.raises(ValueError, match="sigma") as info:
        ck.em_reactivate(f, cam, fg, bg, labels, sigma=sigma)
    assert "float32" in str(info.value)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("sigma", [2e-38, 1e-30, 1e30])
def test_extreme_but_valid_sigma_is_finite(backend, device, sigma):
    f, cam, fg, bg, labels = make_inputs(2, 9, 3, 4, device=device)
    got = ck.em_reactivate(f, cam, fg, bg, labels, sigma=sigma, num_iters=3, return_extras=True, backend=backend)
    exp = ck.em_reactivate(f.cpu(), cam.cpu(), fg.cpu(), bg.cpu(), labels.cpu(), sigma=sigma, num_iters=3,
                           return_extras=True, backend="reference")
    for name in ("output", "z_fg", "fg_centroid", "bg_centroid", "mix"):
        assert torch.isfinite(getattr(got, name)).all(), name
        assert_close(getattr(got, name), getattr(exp, name), name=name, **TOL[torch.float32])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("scale", [1e-300, 1.0, 1e100, 1e300])
def test_float64_cam_beyond_float32_range(backend, device, scale):
    """A float64 CAM far outside float32 gives the result of the same CAM at unit scale."""
    f, cam, fg, bg, labels = make_inputs(2, 9, 4, 4, device=device, seed=3)
    cam64 = cam.double()
    base = ck.em_reactivate(f, cam64, fg, bg, labels, return_extras=True, backend="reference" if device.type == "cpu" else backend)
    got = ck.em_reactivate(f, cam64 * scale, fg, bg, labels, return_extras=True, backend=backend)
    assert torch.isfinite(got.output).all()
    assert torch.equal(got.picked_fg.cpu(), base.picked_fg.cpu())
    assert_close(got.output, base.output, atol=2e-5, rtol=1e-4)
    # the update's mask from such a CAM, and a float64 weight beyond float32
    t1 = [torch.zeros(3, 9, device=device) for _ in range(2)]
    t2 = [torch.zeros(3, 9, device=device) for _ in range(2)]
    ck.update_context_embeddings(*t1, f, labels, cam=cam64, backend=backend)
    ck.update_context_embeddings(*t2, f, labels, cam=cam64 * scale, backend=backend)
    assert_close(t2[0], t1[0], atol=1e-5, rtol=1e-5)
    w = torch.randn(3, 9, dtype=torch.float64, device=device)
    t3 = [torch.zeros(3, 9, device=device) for _ in range(2)]
    t4 = [torch.zeros(3, 9, device=device) for _ in range(2)]
    ck.update_context_embeddings(*t3, f, labels, classifier_weight=w, backend=backend)
    ck.update_context_embeddings(*t4, f, labels, classifier_weight=w * scale, backend=backend)
    assert torch.isfinite(t4[0]).all()
    assert_close(t4[0], t3[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- huge Python ints, num_iters' bound
@pytest.mark.parametrize("name", ["sigma", "cam_threshold"])
def test_huge_int_scalars_em(name):
    f, cam, fg, bg, labels = make_inputs(2, 9, 3, 4)
    with pytest.raises(ValueError, match=name):
        ck.em_reactivate(f, cam, fg, bg, labels, **{name: 10**400})


def test_huge_int_momentum():
    f, cam, _, _, labels = make_inputs(2, 9, 3, 4)
    for kw in (dict(momentum=10**400), dict(cam_threshold=-(10**400))):
        with pytest.raises(ValueError, match=next(iter(kw))):
            ck.update_context_embeddings(torch.zeros(3, 9), torch.zeros(3, 9), f, labels, cam=cam, **kw)
    with pytest.raises(ValueError, match="momentum"):
        ck.ContextEmbeddings(3, 9, momentum=10**400)


@pytest.mark.parametrize("num_iters", [ops.MAX_NUM_ITERS + 1, 2**31, 10**400])
def test_num_iters_upper_bound(num_iters):
    f, cam, fg, bg, labels = make_inputs(2, 9, 3, 4)
    with pytest.raises(ValueError, match="num_iters") as info:
        ck.em_reactivate(f, cam, fg, bg, labels, num_iters=num_iters)
    assert str(ops.MAX_NUM_ITERS) in str(info.value)


def test_num_iters_at_the_bound_runs():
    f, cam, fg, bg, labels = make_inputs(1, 3, 2, 2)
    out = ck.em_reactivate(f, cam, fg, bg, labels, num_iters=ops.MAX_NUM_ITERS, backend="cpu")
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- aliasing with the tables
@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("what", ["features_of_fg", "features_of_bg_slice", "cam_of_fg", "weight_is_bg", "tables_overlap"])
def test_inputs_sharing_the_tables_are_rejected(backend, device, what):
    C, d = 8, 4
    fg, bg = torch.rand(C, d, device=device), torch.rand(C, d, device=device)
    f = torch.rand(2, d, 2, 2, device=device)
    labels = torch.tensor([0, 1], device=device)
    src = dict(cam=torch.rand(2, 2, 2, device=device))
    name = {"features_of_fg": "features", "features_of_bg_slice": "features", "cam_of_fg": "cam",
            "weight_is_bg": "classifier_weight", "tables_overlap": "different"}[what]
    if what == "features_of_fg":
        f = fg.view(2, d, 2, 2)
    elif what == "features_of_bg_slice":
        big = torch.rand(16, d, device=device)
        bg, f = big[:8], big[8:].view(2, d, 2, 2).transpose(2, 3)  # adjacent, not overlapping: allowed
    elif what == "cam_of_fg":
        src = dict(cam=fg[:2].view(2, 2, 2))
    elif what == "weight_is_bg":
        src = dict(classifier_weight=bg)
    else:
        big = torch.rand(C + 1, d, device=device)
        fg, bg = big[:C], big[1:]
    before = (fg.clone(), bg.clone())
    if what == "features_of_bg_slice":  # the control: no shared bytes, so it runs
        ck.update_context_embeddings(fg, bg, f, labels, backend=backend, **src)
        return
    with pytest.raises(ValueError, match=name) as info:
        ck.update_context_embeddings(fg, bg, f, labels, backend=backend, **src)
    if what != "tables_overlap":
        assert "shares memory" in str(info.value)
    assert torch.equal(fg, before[0]) and torch.equal(bg, before[1])


def test_context_apply_rejects_aliasing():
    fg, bg = torch.zeros(4, 3), torch.zeros(4, 3)
    means = fg.view(2, 2, 3)
    with pytest.raises(ValueError, match="means shares memory"):
        ops.context_apply(fg, bg, means, torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- flat posteriors warn once
def test_flat_posteriors_warn_once(monkeypatch):
    monkeypatch.setitem(ops._FLAT, "warned", False)
    monkeypatch.setitem(ops._FLAT, "cuda_checked", False)
    f, cam, fg, bg, labels = make_inputs(2, 9, 4, 4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ck.em_reactivate(f, cam, fg, bg, labels, sigma="auto", backend="cpu")  # sharp: no warning
        assert not [w for w in seen if issubclass(w.category, ck.FlatPosteriorWarning)]
        ck.em_reactivate(f, cam, fg, bg, labels, sigma=1e6, backend="cpu")  # flat
        ck.em_reactivate(f, cam, fg, bg, labels, sigma=1e6, backend="reference")  # flat again: no second warning
    flat = [w for w in seen if issubclass(w.category, ck.FlatPosteriorWarning)]
    assert len(flat) == 1
    assert "0.45" in str(flat[0].message) and "sigma='auto'" in str(flat[0].message)
    assert flat[0].filename == __file__  # points at the caller


def test_flat_posterior_advice_fits_the_sigma_in_use(monkeypatch):
    """With sigma='auto' already in use the warning must not advise it (issue 22)."""
    f, cam, fg, bg, labels = make_inputs(2, 9, 4, 4)
    seen_auto = []
    real = ops._maybe_warn_flat
    monkeypatch.setattr(ops, "_maybe_warn_flat", lambda z, sigma_auto=False: (seen_auto.append(sigma_auto),
                                                                               real(z, sigma_auto))[1])
    ck.em_reactivate(f, cam, fg, bg, labels, sigma="auto", backend="cpu")
    ck.em_reactivate(f, cam, fg, bg, labels, sigma=8.0, backend="cpu")
    assert seen_auto == [True, False]  # the op tells the check which sigma it ran
    flat = torch.full((2, 4, 4), 0.5)
    messages = {}
    for auto in (True, False):
        monkeypatch.setitem(ops._FLAT, "warned", False)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            real(flat, auto)
        (w,) = seen
        messages[auto] = str(w.message)
    assert "try sigma='auto'" in messages[False]
    assert "try sigma='auto'" not in messages[True] and "sigma='auto' is in use" in messages[True]


# --------------------------------------------------------------------------- shapes users pass
@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_cam_with_singleton_class_axis(backend, device):
    f, cam, fg, bg, labels = make_inputs(3, 9, 4, 5, device=device)
    want = ck.em_reactivate(f, cam, fg, bg, labels, backend=backend)
    got = ck.em_reactivate(f, cam[:, None], fg, bg, labels, backend=backend)
    assert got.shape == (3, 1, 4, 5) and torch.equal(got[:, 0], want)
    got2 = ck.em_reactivate(f, cam[:, None], fg, bg, labels[:, None], backend=backend)
    assert torch.equal(got2, got)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_unbatched_single_image(backend, device):
    f, cam, fg, bg, labels = make_inputs(2, 9, 4, 5, device=device)
    batched = ck.em_reactivate(f, cam, fg, bg, labels, return_extras=True, backend=backend)
    one = ck.em_reactivate(f[0], cam[0], fg, bg, labels[0], return_extras=True, backend=backend)
    assert one.output.shape == (4, 5) and one.fg_centroid.shape == (9,) and one.picked_fg.shape == ()
    for a, b in zip(one, batched):
        assert torch.equal(a, b[0])
    per_image = ck.em_reactivate(f[0], cam[0], fg[labels[0]], bg[labels[0]], backend=backend)
    assert torch.equal(per_image, batched.output[0])
    free = ck.em_reactivate(f[0], cam[0], backend=backend)
    assert torch.equal(free, ck.em_reactivate(f, cam, backend=backend)[0])


def test_unbatched_k_classes_and_errors():
    f, cam, fg, bg, _ = make_inputs(1, 9, 4, 5, num_classes=4)
    w = torch.randn(4, 9)
    ks = torch.tensor([3, 1])
    one = ck.em_reactivate(f[0], None, fg, bg, ks, classifier_weight=w)
    assert one.shape == (2, 4, 5)
    assert torch.equal(one, ck.em_reactivate(f, None, fg, bg, ks[None], classifier_weight=w)[0])
    with pytest.raises(ValueError) as info:
        ck.em_reactivate(f[0], cam[0, :3], None, None)
    for word in ("cam", "[h, w] = [4, 5]", "(3, 5)", "unbatched"):
        assert word in str(info.value)
    with pytest.raises(ValueError, match=r"labels must be a 0-d tensor"):
        ck.em_reactivate(f[0], cam[0], fg, bg, torch.tensor([[0]]))


# --------------------------------------------------------------------------- no gradient
@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_no_gradient(backend, device):
    f, cam, fg, bg, labels = make_inputs(2, 9, 4, 5, device=device)
    f = f.clone().requires_grad_(True)
    cam = cam.clone().requires_grad_(True)
    w = torch.nn.Parameter(torch.randn(3, 9, device=device))
    outs = [ck.em_reactivate(f, cam, fg, bg, labels, backend=backend),
            ck.em_reactivate(f, cam, fg, bg, labels, return_extras=True, backend=backend).z_fg]
    outs.append(ck.em_reactivate(f, None, fg, bg, labels, classifier_weight=w, backend=backend))
    for out in outs:
        assert out.grad_fn is None and not out.requires_grad
    t = [torch.zeros(3, 9, device=device) for _ in range(2)]
    ck.update_context_embeddings(*t, f, labels, classifier_weight=w, backend=backend)
    assert t[0].grad_fn is None and t[0].any()


# --------------------------------------------------------------------------- eager calls stay out of torch._dynamo
def test_eager_call_does_not_import_dynamo():
    code = (
        "import sys, torch, cream_kernels as ck\n"
        "f = torch.rand(2, 8, 4, 5); cam = torch.rand(2, 4, 5)\n"
        "ck.em_reactivate(f, cam, None, None, sigma='auto')\n"
        "ck.em_reactivate(f, None, None, None, torch.tensor([[0, 1], [1, 0]]), classifier_weight=torch.randn(2, 8))\n"
        "ck.update_context_embeddings(torch.zeros(2, 8), torch.zeros(2, 8), f, torch.tensor([0, 1]), cam=cam)\n"
        "bad = sorted(m for m in sys.modules if m.startswith('torch._dynamo') or m.startswith('torch._inductor'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# --------------------------------------------------------------------------- CUDA graphs (GPU only)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_captures_both_ops(backend):
    if ops.backend_reasons(backend, torch.device("cuda")):
        pytest.skip(f"{backend} cannot run here")
    f, cam, fg, bg, labels = make_inputs(4, 64, 7, 7, device="cuda")
    tables = [fg.clone(), bg.clone()]

    def step():
        ck.update_context_embeddings(*tables, f, labels, cam=cam, backend=backend)
        return ck.em_reactivate(f, cam, tables[0], tables[1], labels, backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (compiles, allocates, runs the first-call checks)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    tables[0].copy_(fg)
    tables[1].copy_(bg)
    graph.replay()
    torch.cuda.synchronize()
    ref_tables = [fg.cpu().clone(), bg.cpu().clone()]
    ck.update_context_embeddings(*ref_tables, f.cpu(), labels.cpu(), cam=cam.cpu(), backend="reference")
    exp = ck.em_reactivate(f.cpu(), cam.cpu(), *ref_tables, labels.cpu(), backend="reference")
    assert_close(out, exp, **TOL[torch.float32])
