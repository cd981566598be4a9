"""The ops are real torch.library custom ops: opcheck passes and torch.compile
traces a whole function with fullgraph=True (no graph break around our ops)."""
import pytest
import torch

import cream_kernels as ck
from _helpers import TOL, _new_features_ok, assert_close, backend_ids, kernel_backends, make_inputs

BACKENDS = [("reference", torch.device("cpu"))] + kernel_backends()


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_opcheck_em(backend, device):
    f, cam, fg, bg, labels = make_inputs(2, 9, 4, 5, device=device)
    weight = torch.randn(3, 9, device=device)
    labels_k = torch.tensor([0, 2, 1, 1, 0, 2], device=device)  # B=2, K=3, flattened rows
    cases = [
        # (cam, weight, fg, bg, labels, K, sigma, sigma_auto, cosine)
        (cam, None, fg, bg, labels, 1, 8.0, False, False),
        (cam, None, None, None, None, 1, 8.0, False, True),
        (None, weight, fg, bg, labels, 1, 8.0, False, False),
        (None, weight, None, None, labels_k, 3, 0.0, True, False),
        (cam.repeat_interleave(3, 0), None, fg, bg, labels_k, 3, 0.0, True, True),
        (cam.repeat_interleave(2, 0), None, fg.repeat(2, 1)[:4], bg.repeat(2, 1)[:4], None, 2, 4.0, False, False),
    ]
    if not _new_features_ok(backend):
        cases = cases[:2]
    for cam_, w, v_fg, v_bg, lab, K, sigma, auto, cosine in cases:
        args = (f, cam_, w, v_fg, v_bg, lab, K, 2, sigma, auto, 0.2, cosine, backend)
        torch.library.opcheck(torch.ops.cream_kernels.em_reactivate.default, args)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=backend_ids(BACKENDS))
def test_opcheck_update(backend, device):
    f, cam, fg, bg, labels = make_inputs(3, 9, 4, 5, device=device)
    for cam_, w in ((cam, None), (None, fg)):
        args = (fg.clone(), bg.clone(), f, labels, cam_, w, 0.8, 0.2, backend)
        torch.library.opcheck(torch.ops.cream_kernels.update_context_embeddings.default, args)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_compile_fullgraph(compile_backend):
    f, cam, fg, bg, labels = make_inputs(2, 12, 5, 5)
    weight = torch.randn(3, 12)

    def step(f, fg, bg, labels, weight):
        cam = torch.einsum("bdhw,bd->bhw", f, weight[labels])
        ck.update_context_embeddings(fg, bg, f, labels, classifier_weight=weight, momentum=0.5)
        out = ck.em_reactivate(f, cam, fg, bg, labels, num_iters=2) * 2.0
        topk = torch.stack([labels, (labels + 1) % 3], dim=1)  # [B, 2]
        many = ck.em_reactivate(f, None, fg, bg, topk, classifier_weight=weight, sigma="auto", return_extras=True)
        return out, many.output, many.sigma_used

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    tables_c = (fg.clone(), bg.clone())
    tables_e = (fg.clone(), bg.clone())
    got = compiled(f, *tables_c, labels, weight)
    exp = step(f, *tables_e, labels, weight)
    for g, e in zip(got, exp):
        assert_close(g, e, **TOL[torch.float32])
    assert got[1].shape == (2, 2, 5, 5)
    assert torch.equal(tables_c[0], tables_e[0]) and torch.equal(tables_c[1], tables_e[1])


@pytest.mark.slow
def test_compile_inductor():
    f, cam, fg, bg, labels = make_inputs(2, 12, 5, 5)
    fn = lambda f, cam: ck.em_reactivate(f, cam, None, None, return_extras=True).output + 1.0
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True)(f, cam)
    assert_close(got, fn(f, cam), **TOL[torch.float32])
