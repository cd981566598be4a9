"""WSOL training methods (issue 9): HaS, ADL, CutMix as wsolevaluation defines them, their
hook in train(), and exact resume with a method's randomness."""
import numpy as np
import pytest
import torch

pytest.importorskip("cream_kernels")

from cream_wsol.data import make_synthetic  # noqa: E402
from cream_wsol.methods import ADL, METHOD_DEFAULTS, attach_adl, cutmix, has, make_method  # noqa: E402
from cream_wsol.models import build_model  # noqa: E402
from cream_wsol.train import TrainConfig, load_checkpoint, train  # noqa: E402

from _tiny import IMAGE, tiny_cfg  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(str(root), seed=1, num_classes=3, n_train=16, n_val=6, n_test=6, image_size=IMAGE)


def _cfg(data, out, **kw) -> TrainConfig:
    return tiny_cfg(data, out, **{"seed": 5, **kw})


def test_defaults_are_wsolevaluations():
    assert METHOD_DEFAULTS["has"] == {"grid_size": 4, "drop_rate": 0.5}
    assert METHOD_DEFAULTS["adl"] == {"drop_rate": 0.75, "threshold": 0.9}
    assert METHOD_DEFAULTS["cutmix"] == {"beta": 1.0, "prob": 1.0}


def test_has_patches():
    x = torch.randn(3, 2, 10, 10) + 5.0  # never 0 by chance
    assert torch.equal(has(x, 4, 0.0), x)
    assert torch.count_nonzero(has(x, 4, 1.0)) == 0
    torch.manual_seed(0)
    y = has(x, 4, 0.5)
    zero = (y == 0)
    assert torch.equal(zero[:, 0], zero[:, 1])  # every channel of a patch together
    for i in range(0, 10, 4):  # 4x4 patches (the last ones cut to 2 pixels)
        for j in range(0, 10, 4):
            blk = zero[:, 0, i:i + 4, j:j + 4]
            assert bool((blk.all(-1).all(-1) | (~blk).all(-1).all(-1)).all())
    assert torch.equal(y[~zero], x[~zero])
    share = float(has(torch.ones(64, 1, 40, 40), 4, 0.5).eq(0).float().mean())
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="drop_rate"):
        has(x, 4, 1.5)
    with pytest.raises(ValueError, match="images"):
        has(torch.ones(3, 4), 4, 0.5)


def test_cutmix_box_and_lambda():
    np.random.seed(3)
    torch.manual_seed(3)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 2, 16, 16).clone()
    y = torch.tensor([0, 1, 2, 3])
    out, ya, yb, lam = cutmix(x, y, 1.0)
    assert torch.equal(ya, y)
    pasted = out[:, 0] != x[:, 0]
    # pasted pixels come from image yb; the kept share is exactly lam (a permutation may map an image to itself)
    for b in range(4):
        assert torch.all(out[b, 0][pasted[b]] == float(yb[b]))
        if int(yb[b]) != b:
            assert float((~pasted[b]).float().mean()) == pytest.approx(lam)
    assert 0.0 <= lam <= 1.0
    with pytest.raises(ValueError, match="beta"):
        cutmix(x, y, 0.0)


def test_adl_layer():
    x = torch.rand(2, 3, 5, 5)
    layer = ADL(drop_rate=1.0, threshold=0.9)
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.train()
    att = x.mean(1, keepdim=True)
    mask = (att < 0.9 * att.flatten(1).max(1).values.view(-1, 1, 1, 1)).float()
    assert torch.equal(layer(x), x * mask)
    layer = ADL(drop_rate=0.0, threshold=0.9).train()
    assert torch.allclose(layer(x), x * torch.sigmoid(att))
    with pytest.raises(ValueError, match="drop_rate"):
        ADL(drop_rate=2.0)


def test_attach_adl_keeps_state_dict_and_eval():
    torch.manual_seed(0)
    plain = build_model("small", 3, width=8)
    wrapped = build_model("small", 3, width=8)
    wrapped.load_state_dict(plain.state_dict())
    attach_adl(wrapped, 1.0, 0.9)
    assert plain.state_dict().keys() == wrapped.state_dict().keys()
    x = torch.randn(2, 3, IMAGE, IMAGE)
    plain.eval()
    wrapped.eval()
    assert torch.equal(plain(x), wrapped(x))
    plain.train()
    wrapped.train()
    assert not torch.allclose(plain(x), wrapped(x))
    for arch in ("vgg16", "resnet50", "inceptionv3", "efficientnet_lite0"):
        attach_adl(build_model(arch, 3), 0.75, 0.9)  # default positions exist in every backbone


def test_make_method_validation():
    assert make_method("cutmix", beta=0.5).params == {"beta": 0.5, "prob": 1.0}
    with pytest.raises(ValueError, match="unknown WSOL method"):
        make_method("gradcam")
    with pytest.raises(ValueError, match="no parameter"):
        make_method("has", beta=1.0)


@pytest.mark.parametrize("method", ["has", "adl", "cutmix"])
def test_train_with_method_and_resume(tiny_data, tmp_path, method):
    straight = train(_cfg(tiny_data, tmp_path / "a", method=method))
    assert len(straight["log"]) == 2 and all(np.isfinite(e["loss"]) for e in straight["log"])
    train(_cfg(tiny_data, tmp_path / "b", method=method, epochs=1))
    resumed = train(_cfg(tiny_data, tmp_path / "b", method=method), resume="auto")
    a, b = load_checkpoint(straight["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert a["config"]["method"] == method
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["embeddings"]:
        assert torch.equal(a["embeddings"][k], b["embeddings"][k]), k


def test_methods_differ_from_cam(tiny_data, tmp_path):
    cam = load_checkpoint(train(_cfg(tiny_data, tmp_path / "cam", epochs=1))["checkpoint"])["model"]
    for method in ("has", "adl", "cutmix"):
        other = load_checkpoint(train(_cfg(tiny_data, tmp_path / method, epochs=1, method=method))["checkpoint"])
        assert any(not torch.equal(cam[k], other["model"][k]) for k in cam if cam[k].is_floating_point()), method
