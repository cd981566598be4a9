"""SPG and ACoL (issue 23): guidance masks, side losses and erasing against hand-computed
cases, the networks' shapes on every backbone form, training a few steps with CREAM,
exact resume, and load_trained / evaluate / pseudo-boxes / regress on their checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("cream_kernels")

from cream_wsol.data import make_synthetic  # noqa: E402
from cream_wsol.evaluate import MapSpec, evaluate  # noqa: E402
from cream_wsol.methods import METHOD_DEFAULTS, make_method  # noqa: E402
from cream_wsol.spg_acol import (IGNORE, ACoLNet, SPGNet, acol_erase, acol_fused_map,  # noqa: E402
                                 build_method_model, minmax_normalize, spg_guidance_mask, spg_side_loss)
from cream_wsol.train import ResumeMismatchError, load_checkpoint, load_trained, train  # noqa: E402

from _tiny import IMAGE, tiny_cfg  # noqa: E402

I = IGNORE


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic(str(root), seed=1, num_classes=3, n_train=16, n_val=6, n_test=6, image_size=IMAGE)


# --------------------------------------------------------------------------- defaults
def test_defaults_are_wsolevaluations():
    # wsolevaluation config.py: --spg_threshold_{1h,1l,2h,2l,3h,3l}, --acol_threshold
    assert METHOD_DEFAULTS["spg"] == {"threshold_1h": 0.7, "threshold_1l": 0.01, "threshold_2h": 0.5,
                                      "threshold_2l": 0.05, "threshold_3h": 0.7, "threshold_3l": 0.1}
    assert METHOD_DEFAULTS["acol"] == {"threshold": 0.7}
    assert make_method("spg", threshold_2h=0.6).params["threshold_2h"] == 0.6
    with pytest.raises(ValueError, match="thresholds must be in"):
        make_method("acol", threshold=1.5)
    with pytest.raises(ValueError, match="no parameter"):
        make_method("spg", threshold=0.5)


# --------------------------------------------------------------------------- SPG masks / losses
def test_guidance_mask_thresholds_and_ignore_region():
    # 8 x 8: rows 0-3 at 0.9 (32 pixels > high 0.7, enough: no fallback), row 4 at 0.5 (between the
    # thresholds: ignored), row 5 at 0.1 (== low: not below it, ignored), rows 6-7 at 0.05 (< low 0.1: 0)
    a = torch.tensor([0.9] * 4 + [0.5, 0.1, 0.05, 0.05]).view(8, 1).expand(8, 8).reshape(1, 1, 8, 8)
    m = spg_guidance_mask(a, high=0.7, low=0.1)
    want = torch.tensor([1.0] * 4 + [I, I, 0.0, 0.0]).view(8, 1).expand(8, 8).reshape(1, 1, 8, 8)
    assert torch.equal(m, want)


def test_guidance_mask_fallback_per_image_and_background_wins():
    # image 0: only one pixel > high 0.9 (< 30): foreground becomes > 0.7 * max = 0.7 -> 1.0 and 0.8
    # image 1: 36 pixels > 0.9: no fallback (0.8 stays ignored)
    a0 = torch.full((8, 8), 0.3)
    a0[0, 0], a0[0, 1], a0[0, 2], a0[7, 7] = 1.0, 0.8, 0.7, 0.0
    a1 = torch.full((8, 8), 0.3)
    a1[:4, :] = 0.95
    a1[4, :4] = 0.95
    a1[7, 7] = 0.8
    m = spg_guidance_mask(torch.stack([a0, a1]), high=0.9, low=0.05)
    w0 = torch.full((8, 8), I)
    w0[0, 0] = w0[0, 1] = 1.0
    w0[7, 7] = 0.0  # 0.0 < low
    w1 = torch.full((8, 8), I)
    w1[:4, :] = 1.0
    w1[4, :4] = 1.0
    assert torch.equal(m[0], w0) and torch.equal(m[1], w1)
    # thresholds in the wrong order: a pixel both > high and < low ends as background (wsolevaluation
    # writes the foreground first, the background over it)
    b = torch.full((1, 6, 6), 0.3)
    assert torch.equal(spg_guidance_mask(b, high=0.2, low=0.5), torch.zeros(1, 6, 6))
    with pytest.raises(ValueError, match="attention"):
        spg_guidance_mask(torch.ones(4), 0.5, 0.1)


def test_side_loss_hand_computed():
    # 2 x 2 guide: fewer than 30 foreground pixels, so foreground is > 0.7 * max = 0.7: 1.0, 0.8;
    # 0.0 < low 0.1: background; 0.5: ignored. BCE-with-logits averaged over the 3 kept pixels.
    guide = torch.tensor([[1.0, 0.5], [0.0, 0.8]]).view(1, 1, 2, 2)
    logits = torch.tensor([[2.0, 5.0], [-1.0, 0.5]]).view(1, 1, 2, 2)  # same size: no resampling
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    want = (sp(-2.0) + sp(-1.0) + sp(-0.5)) / 3  # targets 1, 0, 1
    assert float(spg_side_loss(logits, guide, 0.7, 0.1)) == pytest.approx(want, rel=1e-6)
    # all foreground through the fallback (0.35 < 0.5 everywhere): log 2 at logit 0
    lg = torch.zeros(1, 1, 2, 2, requires_grad=True)
    assert float(spg_side_loss(lg, torch.full((1, 1, 2, 2), 0.5), high=0.9, low=0.1).detach()) == pytest.approx(math.log(2))
    # a zero map with low 0: nothing > 0, nothing < 0, every pixel ignored: 0 (wsolevaluation: NaN)
    z = spg_side_loss(lg, torch.zeros(1, 1, 2, 2), high=0.7, low=0.0)
    assert float(z) == 0.0
    z.backward()
    assert torch.equal(lg.grad, torch.zeros(1, 1, 2, 2))


def test_minmax_constant_map_is_zero():
    x = torch.full((2, 3, 3), 4.0)
    assert torch.equal(minmax_normalize(x), torch.zeros(2, 3, 3))
    y = torch.tensor([[[1.0, 3.0], [2.0, 5.0]]])
    assert torch.allclose(minmax_normalize(y), torch.tensor([[[0.0, 0.5], [0.25, 1.0]]]))


def test_spg_loss_is_ce_plus_three_guided_bces():
    torch.manual_seed(0)
    net = build_method_model("small", 3, "spg", width=4)
    net.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    out = net(x, labels=y, aux=True)
    assert out["logits"].shape == (2, 3) and out["features"].shape == (2, 16, 8, 8)
    for k in ("logits_b1", "logits_b2", "logits_c"):
        assert out[k].shape == (2, 1, 8, 8), k
    att = out["attention"]
    assert att.shape == (2, 1, 32, 32) and float(att.amin()) == 0.0 and float(att.amax()) == pytest.approx(1.0)
    # the attention is the label class's CAM, upsampled to the input, min-max normalised
    cam = torch.einsum("bdhw,bd->bhw", out["features"], net.fc.weight[y]).unsqueeze(1)
    up = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(att, minmax_normalize(up), atol=1e-5)
    up2 = lambda t: F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    b2i = torch.sigmoid(up2(out["logits_b2"]))
    fused = (torch.sigmoid(up2(out["logits_b1"])) + b2i) / 2
    (h1, l1), (h2, l2), (h3, l3) = (0.7, 0.01), (0.5, 0.05), (0.7, 0.1)
    want = (F.cross_entropy(out["logits"], y) + spg_side_loss(out["logits_b2"], att, h1, l1)
            + spg_side_loss(out["logits_b1"], b2i, h2, l2) + spg_side_loss(out["logits_c"], fused, h3, l3))
    got = net.loss(out, y)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    got.backward()
    for name in ("SPG_B_1a.0.weight", "SPG_B_2a.0.weight", "SPG_B_shared.0.weight", "SPG_C.0.weight",
                 "fc.weight", "SPG_A_3.0.weight", "backbone.features.0.0.weight"):
        p = dict(net.named_parameters())[name]
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    # thresholds from --method-param reach the loss
    net2 = build_method_model("small", 3, "spg", {"threshold_1h": 0.2}, width=4)
    assert net2.thresholds[0] == (0.2, 0.01)


# --------------------------------------------------------------------------- ACoL
def test_acol_erase_hand_computed():
    f = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2).clone()
    m = torch.tensor([[[2.0, 6.0], [5.0, 3.0]]])  # normalised: 0, 1, 0.75, 0.25
    erased, keep = acol_erase(f, m, 0.75)  # >= 0.75 is erased (wsolevaluation: torch.ge)
    assert torch.equal(keep, torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    want = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]]]).unsqueeze(0)
    assert torch.equal(erased, want)
    a = torch.tensor([[[0.0, 2.0], [1.0, 4.0]]])  # normalised 0, .5, .25, 1
    b = torch.tensor([[[3.0, 1.0], [5.0, 1.0]]])  # normalised .5, 0, 1, 0
    assert torch.allclose(acol_fused_map(a, b), torch.tensor([[[0.5, 0.5], [1.0, 1.0]]]))


def test_acol_net_heads_erasing_and_fused_cam():
    torch.manual_seed(1)
    net = build_method_model("small", 3, "acol", {"threshold": 0.6}, width=4)
    assert isinstance(net, ACoLNet) and net.threshold == 0.6 and not net.linear_cam
    with pytest.raises(TypeError, match="not linear"):
        net.classifier_weight
    net.eval()  # BN in eval mode: the training output and model.cams see the same numbers
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    out = net(x, labels=y, aux=True)
    f = out["features"]
    map_a = net.classifier_A(f)
    assert torch.allclose(out["logits"], map_a.mean((2, 3)), atol=1e-6)
    a = map_a[torch.arange(2), y]
    keep = (minmax_normalize(a) < 0.6).float()
    assert torch.equal(out["keep"], keep) and 0 < float(keep.mean()) < 1
    map_b = net.classifier_B(f * keep.unsqueeze(1))
    assert torch.allclose(out["logits_b"], map_b.mean((2, 3)), atol=1e-6)
    fused = torch.maximum(minmax_normalize(a), minmax_normalize(map_b[torch.arange(2), y]))
    assert torch.allclose(out["emb_cam"], fused, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(net.cams(f, y), fused, atol=1e-6)
    loss = net.loss(out, y)
    want = F.cross_entropy(map_a.mean((2, 3)), y) + F.cross_entropy(map_b.mean((2, 3)), y)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


# --------------------------------------------------------------------------- every backbone form
@pytest.mark.parametrize("arch,size,kw,d,hw", [
    ("small", 32, {"width": 4}, 16, 8),
    ("efficientnet_lite0", 64, {}, 1280, 4),
])
@pytest.mark.parametrize("method", ["spg", "acol"])
def test_embedded_backbones(arch, size, kw, d, hw, method):
    torch.manual_seed(0)
    net = build_method_model(arch, 4, method, **kw)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 3])
    net.train()
    out = net(x, labels=y, aux=True)
    loss = net.loss(out, y)
    assert torch.isfinite(loss)
    loss.backward()
    net.eval()
    with torch.no_grad():
        logits, f = net(x, return_features=True)
        cam = net.cams(f, y)
    assert logits.shape == (2, 4) and f.shape == (2, d, hw, hw) and cam.shape == (2, hw, hw)
    groups = {g["name"]: g for g in net.param_groups(0.01)}
    assert groups["classifier"]["lr"] == pytest.approx(0.1)
    head_ids = {id(p) for p in groups["classifier"]["params"]}
    assert all(id(p) not in head_ids for p in net.backbone.parameters())  # backbone at 1x, new layers at 10x


@pytest.mark.slow
def test_paper_backbones_param_groups_follow_wsolevaluation():
    def head_names(net):
        ids = {id(p) for p in [g for g in net.param_groups(1.0) if g["name"] == "classifier"][0]["params"]}
        return {n for n, p in net.named_parameters() if id(p) in ids}

    vs = head_names(build_method_model("vgg16", 2, "spg"))
    assert "backbone.features.17.weight" in vs and "backbone.features.14.weight" not in vs  # conv4 at 10x
    va = head_names(build_method_model("vgg16", 2, "acol"))
    assert "classifier_A.0.weight" in va and not any(n.startswith("backbone.") for n in va)
    rs = head_names(build_method_model("resnet50", 2, "spg"))
    assert "backbone.layer4.0.conv1.weight" in rs and "fc.weight" not in rs and "SPG_C.0.weight" not in rs
    ra = head_names(build_method_model("resnet50", 2, "acol"))
    assert "classifier_A.0.weight" not in ra and all("layer4." in n for n in ra)
    ins = head_names(build_method_model("inceptionv3", 2, "spg"))
    assert "backbone.SPG_A3_1b.0.weight" in ins and "SPG_B_1a.0.weight" in ins
    assert not any("Mixed" in n for n in ins)
    with torch.no_grad():  # 224 -> 14 x 14 (28 x 28 with large_feature_map)
        for m, lfm, want in (("spg", False, 14), ("acol", False, 14), ("spg", True, 28), ("acol", True, 28)):
            net = build_method_model("vgg16", 2, m, large_feature_map=lfm).eval()
            assert net(torch.zeros(1, 3, 224, 224), return_features=True)[1].shape[-1] == want, (m, lfm)


# --------------------------------------------------------------------------- training, CREAM, resume
def _cfg(data, out, method, **kw):
    return tiny_cfg(data, out, **{"seed": 6, "method": method, "model_kwargs": {"width": 4},
                                  "cam_threshold": 0.2, **kw})


@pytest.mark.parametrize("method", ["spg", "acol"])
def test_train_evaluate_with_cream_and_resume(tiny_data, tmp_path, method):
    data = tiny_data
    straight = train(_cfg(data, tmp_path / "a", method), resume=None)
    assert all(math.isfinite(e["loss"]) for e in straight["log"] if "loss" in e)
    ck = load_checkpoint(straight["checkpoint"])
    assert ck["config"]["method"] == method
    assert any(k.startswith(("SPG_", "classifier_A.")) for k in ck["model"])
    # one epoch, then resume for the second: the same weights and embeddings bit for bit
    train(_cfg(data, tmp_path / "b", method, epochs=1), resume=None)
    resumed = train(_cfg(data, tmp_path / "b", method), resume="auto")
    cb = load_checkpoint(resumed["checkpoint"])
    for k in ck["model"]:
        assert torch.equal(ck["model"][k], cb["model"][k]), k
    for k in ck["embeddings"]:
        assert torch.equal(ck["embeddings"][k], cb["embeddings"][k]), k
    assert float(ck["embeddings"]["fg"].abs().sum()) > 0  # the embeddings were learned
    # method params are part of what a resume must match
    other = {"threshold_1h": 0.6} if method == "spg" else {"threshold": 0.5}
    with pytest.raises(ResumeMismatchError, match="method-kwargs"):
        train(_cfg(data, tmp_path / "b", method, epochs=3, method_kwargs=other), resume="auto")
    with pytest.raises(ResumeMismatchError, match="method"):
        train(_cfg(data, tmp_path / "b", "cam", epochs=3), resume="auto")
    # load_trained rebuilds the method's network; evaluate scores CAM and CREAM on it
    model, emb, cfg = load_trained(straight["checkpoint"])
    assert isinstance(model, SPGNet if method == "spg" else ACoLNet) and not model.training
    from cream_wsol.data import WSOLDataset

    ds = WSOLDataset(data[0], data[1], "test", train=False, image_size=IMAGE)
    res = evaluate(model, ds, {"CAM": MapSpec("cam"), "CREAM": MapSpec("cream"),
                               "CREAM pred": MapSpec("cream", target="pred")},
                   embeddings={"learned": emb}, cam_curve_interval=0.05, progress=False)
    for name in ("CAM", "CREAM", "CREAM pred"):
        v = res["metrics"][name]["MaxBoxAccV2"]
        assert 0.0 <= v <= 100.0 and math.isfinite(v), name
    if method == "acol":  # the CAM row is the fused map, recomputed by hand for one batch
        x = torch.stack([ds[i][0] for i in range(3)])
        yy = torch.tensor([ds[i][1] for i in range(3)])
        with torch.no_grad():
            _, f = model(x, return_features=True)
            a = model.classifier_A(f)[torch.arange(3), yy]
            keep = (minmax_normalize(a) < model.threshold).float().unsqueeze(1)
            b = model.classifier_B(f * keep)[torch.arange(3), yy]
            assert torch.allclose(model.cams(f, yy), torch.maximum(minmax_normalize(a), minmax_normalize(b)))


@pytest.mark.parametrize("method", ["spg", "acol"])
def test_checkpoint_tools_rebuild_the_method_model(tiny_data, tmp_path, method, capsys):
    """evaluate (CLI), pseudo-boxes and regress on an SPG / ACoL checkpoint."""
    from cream_wsol.cli import main
    from cream_wsol.pseudo_boxes import generate_pseudo_boxes
    from cream_wsol.regress import RegressConfig, evaluate_cream_reg, train_regressor

    data = tiny_data
    summary = train(_cfg(data, tmp_path / "run", method, epochs=1), resume=None)
    ckpt = summary["checkpoint"]
    assert main(["evaluate", ckpt, "--split", "test", "--maps", "cam,cream", "--no-progress",
                 "--device", "cpu"]) == 0
    assert "cream" in capsys.readouterr().out
    meta = generate_pseudo_boxes(ckpt, str(tmp_path / "pb"), cam_curve_interval=0.05, progress=False)
    assert meta["num_images"] == 16 and meta["gt_known"] is not None
    rc = RegressConfig(pseudo_root=str(tmp_path / "pb"), data_root=str(data[0]), arch="small",
                       model_kwargs={"width": 4}, image_size=IMAGE, batch_size=8, lr=0.01, epochs=1, lr_step=1,
                       seed=4, out_dir=str(tmp_path / "reg"), progress=False)
    reg = train_regressor(rc)
    res = evaluate_cream_reg(ckpt, reg["checkpoint"], split="test", progress=False)
    assert 0.0 <= res["metrics"]["GT-known Loc"] <= 100.0 and res["classification"]["num_images"] == 6


def test_cli_train_spg_and_acol_method_params(tiny_data, tmp_path):
    from cream_wsol.cli import main

    data = tiny_data
    for method, param in (("spg", "threshold_3l=0.2"), ("acol", "threshold=0.6")):
        out = tmp_path / method
        assert main(["train", "--preset", "synthetic-quick", "--data-root", str(data[0]), "--metadata-root",
                     str(data[1]), "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "4",
                     "--image-size", str(IMAGE), "--method", method, "--method-param", param, "--out", str(out),
                     "--no-progress", "--device", "cpu"]) == 0
        ck = load_checkpoint(str(out / "checkpoint.pt"))
        k, v = param.split("=")
        assert ck["config"]["method"] == method and ck["config"]["method_kwargs"] == {k: float(v)}
