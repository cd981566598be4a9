"""Degenerate but valid inputs never produce NaN, on every backend, and still
match the reference; non-finite inputs propagate as documented in ops.py."""
import pytest
import torch

import cream_kernels as ck
from _helpers import TOL, assert_close, backend_ids, kernel_backends, make_inputs

BACKENDS = [("reference", torch.device("cpu"))] + kernel_backends()


def _run(backend, device, f, cam, fg, bg, labels, **kw):
    mv = lambda t: None if t is None else t.to(device)
    got = ck.em_reactivate(mv(f), mv(cam), mv(fg), mv(bg), mv(labels), return_extras=True, backend=backend, **kw)
    exp = ck.em_reactivate(f, cam, fg, bg, labels, return_extras=True, backend="reference", **kw)
    return got, exp


def _finite_and_matching(got, exp):
    for name in ("output", "z_fg", "fg_centroid", "bg_centroid", "mix"):
        t = getattr(got, name)
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
        assert_close(t, getattr(exp, name), name=name, **TOL[torch.float32])
    assert torch.equal(got.picked_fg.cpu(), exp.picked_fg)
    assert (got.output >= 0).all() and (got.output <= 2).all()


CASES = {
    "constant_cam": lambda f, cam: (f, torch.full_like(cam, 3.0)),
    "zero_cam": lambda f, cam: (f, torch.zeros_like(cam)),
    "negative_cam": lambda f, cam: (f, cam - 10.0),
    "zero_features": lambda f, cam: (torch.zeros_like(f), cam),
    "huge_features": lambda f, cam: (f * 1e4, cam),
    "one_hot_cam": lambda f, cam: (f, torch.zeros_like(cam).index_put_((torch.tensor([0]), torch.tensor([1]), torch.tensor([2])), torch.tensor(1.0))),
}


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("mode", ["table", "training_free", "zero_tables"])
def test_degenerate_em(backend, device, case, similarity, mode):
    f, cam, fg, bg, labels = make_inputs(2, 11, 4, 5)
    f, cam = CASES[case](f, cam)
    if mode == "training_free":
        fg = bg = labels = None
    elif mode == "zero_tables":
        fg, bg = torch.zeros_like(fg), torch.zeros_like(bg)
    got, exp = _run(backend, device, f, cam, fg, bg, labels, similarity=similarity, num_iters=3)
    _finite_and_matching(got, exp)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_extremes(backend, device, threshold):
    f, cam, fg, bg, labels = make_inputs(2, 9, 3, 3, seed=4)
    got, exp = _run(backend, device, f, cam, None, None, None, cam_threshold=threshold)
    _finite_and_matching(got, exp)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_one_pixel_map(backend, device):
    f, cam, fg, bg, labels = make_inputs(3, 6, 1, 1)
    got, exp = _run(backend, device, f, cam, fg, bg, labels, num_iters=4)
    _finite_and_matching(got, exp)
    # one pixel: the normalised CAM term is 0, so the output is the calibrated posterior
    z = got.z_fg.cpu()
    assert_close(got.output, z.where(got.picked_fg.cpu()[:, None, None], 1 - z), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_saturated_posteriors(backend, device):
    """A tiny sigma saturates Z to exactly 0/1: the empty-mass M-step keeps v, no NaN."""
    f, cam, fg, bg, labels = make_inputs(2, 8, 5, 5)
    got, exp = _run(backend, device, f, cam, fg * 100, bg, labels, sigma=1e-6, num_iters=4)
    _finite_and_matching(got, exp)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_empty_batch(backend, device):
    f = torch.rand(0, 4, 3, 3, device=device)
    out = ck.em_reactivate(f, torch.rand(0, 3, 3, device=device), None, None, backend=backend)
    assert out.shape == (0, 3, 3)
    t = [torch.zeros(2, 4, device=device), torch.zeros(2, 4, device=device)]
    ck.update_context_embeddings(*t, f, torch.zeros(0, dtype=torch.long, device=device),
                                 cam=torch.rand(0, 3, 3, device=device), backend=backend)
    assert not t[0].any()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_nan_propagates_to_its_image_only(backend, device):
    f, cam, fg, bg, labels = make_inputs(2, 7, 4, 4)
    f[0, 3, 1, 2] = float("nan")
    got = ck.em_reactivate(f.to(device), cam.to(device), fg.to(device), bg.to(device), labels.to(device), backend=backend).cpu()
    assert torch.isnan(got[0]).any()
    exp = ck.em_reactivate(f[1:], cam[1:], fg, bg, labels[1:], backend="reference")
    assert_close(got[1:], exp, **TOL[torch.float32])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_update_empty_masks_leave_rows(backend, device):
    """A constant CAM makes every pixel foreground: the bg mask is empty and bg is untouched."""
    f, cam, _, _, _ = make_inputs(3, 10, 4, 4)
    cam = torch.full_like(cam, 0.5)
    labels = torch.tensor([0, 1, 0])
    fg, bg = torch.randn(2, 10), torch.randn(2, 10)
    fg0, bg0 = fg.clone(), bg.clone()
    fgd, bgd = fg.to(device), bg.to(device)
    ck.update_context_embeddings(fgd, bgd, f.to(device), labels.to(device), cam=cam.to(device), backend=backend)
    assert torch.equal(bgd.cpu(), bg0)
    assert not torch.equal(fgd.cpu(), fg0) and torch.isfinite(fgd).all()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_update_zero_features_and_momentum_edges(backend, device):
    f = torch.zeros(2, 6, 3, 3, device=device)
    labels = torch.tensor([1, 1], device=device)
    for momentum, expect_row in ((1.0, 1.0), (0.0, 0.0)):
        t = [torch.ones(2, 6, device=device), torch.ones(2, 6, device=device)]
        ck.update_context_embeddings(*t, f, labels, cam=torch.rand(2, 3, 3, device=device), momentum=momentum, backend=backend)
        assert torch.all(t[0][1] == expect_row) and torch.all(t[0][0] == 1.0)
