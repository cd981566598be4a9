"""Every bad input of the issue's section 5 gets a ValueError/TypeError that names
the argument (and, for tensors, its shape and dtype). Nothing is modified."""
import math

import pytest
import torch

import cream_kernels as ck
from cream_kernels import BackendUnavailable


def em_args():
    f = torch.rand(2, 8, 4, 5)
    return dict(features=f, cam=torch.rand(2, 4, 5), fg_embedding=torch.randn(3, 8), bg_embedding=torch.randn(3, 8),
                labels=torch.tensor([0, 2]))


EM_BAD = [
    # (what, overrides, exception, words that must appear)
    ("features 3-D", dict(features=torch.rand(2, 8, 20)), ValueError, ["features", "(2, 8, 20)", "float32"]),
    ("features int", dict(features=torch.ones(2, 8, 4, 5, dtype=torch.int32)), TypeError, ["features", "int32"]),
    ("features not tensor", dict(features=[[1.0]]), TypeError, ["features"]),
    ("features d=0", dict(features=torch.rand(2, 0, 4, 5)), ValueError, ["features", "(2, 0, 4, 5)"]),
    ("cam 2-D", dict(cam=torch.rand(2, 20)), ValueError, ["cam", "(2, 20)"]),
    ("cam wrong B", dict(cam=torch.rand(3, 4, 5)), ValueError, ["cam", "(3, 4, 5)", "[2, 4, 5]"]),
    ("cam wrong hw", dict(cam=torch.rand(2, 5, 4)), ValueError, ["cam", "(2, 5, 4)"]),
    ("cam int", dict(cam=torch.ones(2, 4, 5, dtype=torch.long)), TypeError, ["cam", "int64"]),
    ("emb wrong d", dict(fg_embedding=torch.randn(3, 7), bg_embedding=torch.randn(3, 7)), ValueError, ["fg_embedding", "(3, 7)"]),
    ("emb 1-D", dict(fg_embedding=torch.randn(8), bg_embedding=torch.randn(8)), ValueError, ["fg_embedding", "(8,)"]),
    ("emb shapes differ", dict(bg_embedding=torch.randn(4, 8)), ValueError, ["bg_embedding", "(4, 8)"]),
    # issue 22: the contract is the argument, its shape and its dtype
    ("emb shapes and dtypes differ", dict(bg_embedding=torch.randn(4, 8, dtype=torch.float64)), ValueError,
     ["fg_embedding shape (3, 8) and dtype torch.float32", "bg_embedding shape (4, 8) and dtype torch.float64"]),
    ("emb one missing", dict(bg_embedding=None), ValueError, ["bg_embedding"]),
    ("emb per image wrong B", dict(fg_embedding=torch.randn(3, 8), bg_embedding=torch.randn(3, 8), labels=None), ValueError, ["fg_embedding", "[2, 8]"]),
    ("emb int", dict(fg_embedding=torch.ones(3, 8, dtype=torch.long)), TypeError, ["fg_embedding", "int64"]),
    ("labels float", dict(labels=torch.tensor([0.0, 1.0])), TypeError, ["labels", "float32"]),
    ("labels bool", dict(labels=torch.tensor([True, False])), TypeError, ["labels", "bool"]),
    ("labels wrong B", dict(labels=torch.tensor([0, 1, 2])), ValueError, ["labels", "(3,)"]),
    ("labels 3-D", dict(labels=torch.tensor([[[0]], [[1]]])), ValueError, ["labels", "(2, 1, 1)", "[2, K]"]),
    ("labels K=0", dict(labels=torch.zeros(2, 0, dtype=torch.long)), ValueError, ["labels", "(2, 0)", "K >= 1"]),
    ("labels too big", dict(labels=torch.tensor([0, 3])), ValueError, ["labels", "[0, 3)", "3"]),
    ("labels negative", dict(labels=torch.tensor([-1, 0])), ValueError, ["labels", "-1"]),
    ("labels without tables", dict(fg_embedding=None, bg_embedding=None), ValueError, ["labels"]),
    ("mixed devices", dict(cam=torch.rand(2, 4, 5, device="meta")), ValueError, ["cam", "meta"]),
    # issue 12: classifier_weight, K classes per image
    ("cam and weight", dict(classifier_weight=torch.randn(3, 8)), ValueError, ["exactly one", "cam", "classifier_weight"]),
    ("neither cam nor weight", dict(cam=None), ValueError, ["exactly one", "cam", "classifier_weight"]),
    ("weight without labels", dict(cam=None, classifier_weight=torch.randn(3, 8), fg_embedding=None, bg_embedding=None,
                                   labels=None), ValueError, ["classifier_weight", "labels"]),
    ("weight wrong d", dict(cam=None, classifier_weight=torch.randn(3, 9)), ValueError, ["classifier_weight", "(3, 9)", "[C, 8]"]),
    ("weight int", dict(cam=None, classifier_weight=torch.ones(3, 8, dtype=torch.int32)), TypeError, ["classifier_weight", "int32"]),
    ("weight too few rows", dict(cam=None, classifier_weight=torch.randn(2, 8)), ValueError, ["labels", "classifier_weight", "[0, 2)"]),
    ("cam 4-D K vs labels K", dict(cam=torch.rand(2, 3, 4, 5), labels=torch.zeros(2, 2, dtype=torch.long)), ValueError,
     ["cam", "(2, 3, 4, 5)", "K = 2"]),
    ("cam 4-D K>1 with labels [B]", dict(cam=torch.rand(2, 3, 4, 5)), ValueError, ["labels", "[2, 3]", "(2,)"]),
    ("cam 5-D", dict(cam=torch.rand(2, 1, 1, 4, 5)), ValueError, ["cam", "(2, 1, 1, 4, 5)", "[B, K, h, w]"]),
    ("per-image emb K-form wrong", dict(cam=torch.rand(2, 3, 4, 5), labels=None, fg_embedding=torch.randn(2, 8),
                                         bg_embedding=torch.randn(2, 8)), ValueError, ["fg_embedding", "[2, 3, 8]", "(2, 8)"]),
]


@pytest.mark.parametrize("what,overrides,exc,words", EM_BAD, ids=[c[0] for c in EM_BAD])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_em_bad_tensors(what, overrides, exc, words, backend):
    args = em_args()
    args.update(overrides)
    with pytest.raises(exc) as info:
        ck.em_reactivate(**args, backend=backend)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


EM_BAD_SCALARS = [
    ("num_iters", 0, ValueError), ("num_iters", -2, ValueError), ("num_iters", 2.0, TypeError), ("num_iters", True, TypeError),
    ("sigma", 0.0, ValueError), ("sigma", -1.0, ValueError), ("sigma", math.inf, ValueError), ("sigma", math.nan, ValueError),
    ("sigma", "8", ValueError), ("sigma", "AUTO", ValueError), ("sigma", None, TypeError),
    ("cam_threshold", -0.1, ValueError), ("cam_threshold", 1.5, ValueError), ("cam_threshold", math.nan, ValueError),
    ("similarity", "euclid", ValueError), ("backend", "gpu", ValueError), ("backend", 3, TypeError),
]


@pytest.mark.parametrize("name,value,exc", EM_BAD_SCALARS, ids=[f"{n}={v!r}" for n, v, _ in EM_BAD_SCALARS])
def test_em_bad_scalars(name, value, exc):
    with pytest.raises(exc, match=name):
        ck.em_reactivate(**em_args(), **{name: value})


def update_args():
    return dict(fg_embedding=torch.zeros(3, 8), bg_embedding=torch.zeros(3, 8), features=torch.rand(2, 8, 4, 5),
                labels=torch.tensor([0, 2]), cam=torch.rand(2, 4, 5))


UPDATE_BAD = [
    ("no source", dict(cam=None), ValueError, ["cam", "classifier_weight"]),
    ("both sources", dict(classifier_weight=torch.randn(3, 8)), ValueError, ["cam", "classifier_weight"]),
    ("weight wrong d", dict(cam=None, classifier_weight=torch.randn(3, 9)), ValueError, ["classifier_weight", "(3, 9)"]),
    ("weight too few rows", dict(cam=None, classifier_weight=torch.randn(2, 8)), ValueError, ["labels", "classifier_weight"]),
    ("table float64", dict(fg_embedding=torch.zeros(3, 8, dtype=torch.float64)), TypeError, ["fg_embedding", "float64"]),
    ("table wrong d", dict(bg_embedding=torch.zeros(3, 5), fg_embedding=torch.zeros(3, 5)), ValueError, ["fg_embedding", "(3, 5)"]),
    ("table non-contiguous", dict(fg_embedding=torch.zeros(8, 3).t()), ValueError, ["fg_embedding", "contiguous"]),
    ("tables' shapes differ", dict(bg_embedding=torch.zeros(4, 8)), ValueError,
     ["fg_embedding shape (3, 8) and dtype torch.float32", "bg_embedding shape (4, 8) and dtype torch.float32"]),
    ("same table twice", "same", ValueError, ["different"]),
    ("labels out of range", dict(labels=torch.tensor([0, 3])), ValueError, ["labels", "[0, 3)"]),
    ("labels float", dict(labels=torch.tensor([0.0, 1.0])), TypeError, ["labels", "float32"]),
    ("features 5-D", dict(features=torch.rand(2, 8, 4, 5, 1)), ValueError, ["features", "(2, 8, 4, 5, 1)"]),
    ("cam mismatched", dict(cam=torch.rand(2, 4, 4)), ValueError, ["cam", "(2, 4, 4)"]),
    ("mixed devices", dict(labels=torch.tensor([0, 2], device="meta")), ValueError, ["labels", "meta"]),
    ("momentum", dict(momentum=1.2), ValueError, ["momentum"]),
    ("momentum negative", dict(momentum=-0.1), ValueError, ["momentum"]),
    ("cam_threshold", dict(cam_threshold=2.0), ValueError, ["cam_threshold"]),
]


@pytest.mark.parametrize("what,overrides,exc,words", UPDATE_BAD, ids=[c[0] for c in UPDATE_BAD])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_update_bad_inputs_leave_tables_untouched(what, overrides, exc, words, backend):
    args = update_args()
    if overrides == "same":
        args["bg_embedding"] = args["fg_embedding"]
    else:
        args.update(overrides)
    before = (args["fg_embedding"].clone(), args["bg_embedding"].clone())
    with pytest.raises(exc) as info:
        ck.update_context_embeddings(**args, backend=backend)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    assert torch.equal(args["fg_embedding"], before[0]) and torch.equal(args["bg_embedding"], before[1])


def test_unavailable_backend_lists_reasons():
    with pytest.raises(BackendUnavailable) as info:
        ck.em_reactivate(**em_args(), backend="cuda")
    assert "cuda" in str(info.value) and "CUDA tensors" in str(info.value)


def test_float64_only_on_cpu_and_reference():
    args = em_args()
    args["features"] = args["features"].double()
    out = ck.em_reactivate(**args, backend="cpu")
    assert out.dtype == torch.float32
    with pytest.raises(BackendUnavailable, match="float64"):
        ck.em_reactivate(**args, backend="triton")


def test_env_override(monkeypatch):
    monkeypatch.setenv("CREAM_KERNELS_BACKEND", "reference")
    from cream_kernels import ops

    assert ops.resolve_backend(None, torch.device("cpu"), torch.float32) == "reference"
    monkeypatch.setenv("CREAM_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="CREAM_KERNELS_BACKEND"):
        ck.em_reactivate(**em_args())
    monkeypatch.delenv("CREAM_KERNELS_BACKEND")
    assert ops.resolve_backend(None, torch.device("cpu"), torch.float32) == "cpu"
