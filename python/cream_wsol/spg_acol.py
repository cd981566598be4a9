"""SPG and ACoL: the two WSOL methods that change the network (issue 23).

Both follow clovaai/wsolevaluation (``wsol/method/spg.py``, ``wsol/method/acol.py``,
``wsol/method/util.py`` and the SPG / ACoL classes of ``wsol/{vgg,resnet,inception}.py``;
defaults from its ``config.py``); the code is ours.

**SPG** (Self-produced Guidance, Zhang et al. ECCV 2018). The backbone is tapped at two
points (``t1``, ``t2``) before its CAM feature map ``f``; the classifier ``fc`` (a 1x1
conv = linear after GAP, wsolevaluation's ``SPG_A4``) gives the logits and the CAM. Three
one-channel side outputs:

* ``b1 = B_shared(B_1a(t1))`` and ``b2 = B_shared(B_2a(t2))`` (``B_shared`` is one module
  used twice), ``c = C(f)``.
* Guidance maps, all upsampled (bilinear) to the input size: ``attention`` = the CAM of the
  label class, min-max normalised; ``b2i = sigmoid(b2)``; ``fused = (sigmoid(b1) +
  sigmoid(b2)) / 2`` (detached).
* A guidance mask from a map ``m`` and thresholds (high, low): 1 where ``m > high`` (if that
  marks fewer than 30 pixels of an image, ``m > 0.7 max(m)`` instead), then 0 where
  ``m < low``, and *ignored* (255) everywhere else: the region between the thresholds.
* Loss = ``CE(logits, y) + BCE(b2 | mask(attention, t1h, t1l)) + BCE(b1 | mask(b2i, t2h, t2l))
  + BCE(c | mask(fused, t3h, t3l))``, every weight 1, each BCE-with-logits averaged over the
  batch's non-ignored pixels (the side logits upsampled to the input size).
* Thresholds (wsolevaluation's defaults): (0.7, 0.01), (0.5, 0.05), (0.7, 0.1).
* The localisation map is the classifier's CAM, so CREAM runs on it unchanged.

**ACoL** (Adversarial Complementary Learning, Zhang et al. CVPR 2018). Two classifier heads
on the same feature map ``f`` (each conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv1x1 to the
classes, logits = GAP of the class maps). Head A sees ``f``; its label-class map, min-max
normalised, erases ``f`` where it is ``>= threshold`` (0.7); head B sees the erased
features. Loss = ``CE(A) + CE(B)``. The localisation map is
``max(minmax(map_A[c]), minmax(map_B[c]))`` (wsolevaluation normalises each class channel,
only the channel of class ``c`` is used). It is not linear in ``f``, so :class:`ACoLNet`
has no ``classifier_weight``; ``model.cams(f, classes)`` computes it (the erasure follows the
class asked for: the ground truth for GT-known maps, as wsolevaluation's inference does, the
prediction for ``target="pred"``). The harness's context embeddings live on ``f`` (the
features both heads read) and are updated with this fused map as the CAM; CREAM uses it too.

Where wsolevaluation and the papers differ, wsolevaluation is followed:

* SPG's paper (Sec. 3.2) builds the mask of ``B2`` from the classifier's attention and the
  masks of ``B1`` / ``C`` as described above; wsolevaluation hard-codes the 224 x 224
  upsampling (its input size): here the maps go to the input size (the same at 224).
* The papers use their own backbones and learning rates; the parameter groups follow
  wsolevaluation's name patterns (``main.py``, ``_FEATURE_PARAM_LAYER_PATTERNS``), with their
  quirks: on VGG16 everything outside ``features`` trains at the classifier rate, and SPG's
  ``features`` end at pool3 (its conv4/conv5, ``SPG_A_1`` / ``SPG_A_2``, train at the classifier
  rate); on ResNet50 only ``layer4`` and ``fc`` do, so SPG's
  ``SPG_A4`` / side branches and ACoL's two heads train at the backbone rate; on InceptionV3
  everything outside ``Mixed*`` / ``Conv2d_1-4`` does.
* ACoL's paper erases with the *predicted* class at test time; wsolevaluation passes the
  ground-truth label (GT-known maps), and so does ``target="gt"`` here.

Guards wsolevaluation does not have (it would give NaN): a constant map normalises to 0
(not 0/0), and a side loss with no non-ignored pixel is 0.

Architectures (wsolevaluation's where it has them; ``small`` and ``efficientnet_lite0`` are
ours, in the same pattern, sized to stay light):

==================  ==============================  ============================  ==========================
arch                SPG taps t1 / t2 -> CAM f       SPG side widths (B / C)       ACoL f (both heads' input)
==================  ==============================  ============================  ==========================
vgg16               pool3+conv4+pool(3,2,1) 512 /   512 / 512                     conv5_3 + pool(3,1,1) +
                    conv5 512 -> 2 new convs 512                                  avgpool(3,1,1), 512; heads
                                                                                  1024 wide; pools (3,2,1)
resnet50            layer3 block 0, 1024 / layer3   1024 / 512                    layer4, 2048; heads 1024
                    1024 -> layer4 2048
inceptionv3         Mixed_5d + pool 288 / Mixed_6d  512 / 512                     Mixed_6e, 768; heads 1024
                    768 -> SPG_A3_2b 1024
small               features.2 2w / features.3 4w   2w / 2w                       features.3, 4w; heads 4w
                    -> one new conv-BN-ReLU 4w
efficientnet_lite0  _blocks.10 112 / _blocks.14     128 / 128                     head conv, 1280; heads 256
                    192 -> head conv 1280
==================  ==============================  ============================  ==========================

(``w`` is the small CNN's width; with ``large_feature_map`` the VGG SPG pool after conv4
goes, as in wsolevaluation, and VGG ACoL keeps the pool after conv4 at stride 1.) New layers
are initialised as wsolevaluation does per arch (xavier; ResNet50's ACoL: he); on ``small`` and
``efficientnet_lite0`` xavier, and ``small``'s new convs carry BatchNorm like its own blocks.
He init (fan-out) on a 1x1 conv to a handful of classes gives weights of std sqrt(2 / C), so
large logits: with it (and no BN) a 4-step ``small`` ACoL smoke run had loss 786 in its first
epoch.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import CAMNet, _init_weights, build_model, canonical_arch

__all__ = ["SPGNet", "ACoLNet", "build_method_model", "minmax_normalize", "spg_guidance_mask",
           "spg_side_loss", "spg_loss", "acol_erase", "acol_fused_map", "IGNORE", "SPG_MIN_FG_PIXELS",
           "SPG_FALLBACK_RATIO", "MODEL_METHODS"]

IGNORE = 255.0  # the guidance mask's "ignore" value (wsolevaluation's)
SPG_MIN_FG_PIXELS = 30  # fewer foreground pixels than this: fall back to 0.7 * max
SPG_FALLBACK_RATIO = 0.7
MODEL_METHODS = ("spg", "acol")  # methods whose model differs from the plain CAM model


# --------------------------------------------------------------------------- #
# the maths, on tensors
# --------------------------------------------------------------------------- #
def minmax_normalize(x: Tensor) -> Tensor:
    """Min-max normalise each map over its last two dims (wsolevaluation's ``normalize_tensor``);
    a constant map gives 0 instead of 0/0."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)


def spg_guidance_mask(attention: Tensor, high: float, low: float, min_fg: int = SPG_MIN_FG_PIXELS,
                      fallback: float = SPG_FALLBACK_RATIO) -> Tensor:
    """SPG's self-produced guidance mask of ``attention`` [B, H, W] (or [B, 1, H, W]): 1 where
    ``> high`` (per image: where ``> fallback * max`` if that marks fewer than ``min_fg``
    pixels), then 0 where ``< low`` (background wins over foreground), :data:`IGNORE` elsewhere.
    Returns a float tensor of ``attention``'s shape."""
    if not isinstance(attention, Tensor) or attention.dim() not in (3, 4):
        raise ValueError(f"spg_guidance_mask: attention must be [B, H, W] or [B, 1, H, W]; got "
                         f"{getattr(attention, 'shape', type(attention).__name__)}")
    a = attention.detach()
    flat = a.reshape(a.shape[0], -1)
    fg = flat > float(high)
    few = fg.sum(dim=1) < int(min_fg)
    if bool(few.any()):
        fb = flat > (fallback * flat.amax(dim=1, keepdim=True))
        fg = torch.where(few[:, None], fb, fg)
    mask = torch.full_like(flat, IGNORE)
    mask[fg] = 1.0
    mask[flat < float(low)] = 0.0
    return mask.view_as(a)


def _up(x: Tensor, size: Tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def spg_side_loss(logits: Tensor, guide: Tensor, high: float, low: float) -> Tensor:
    """BCE-with-logits of a one-channel side output ``logits`` [B, 1, h, w] (upsampled to
    ``guide``'s size) against the guidance mask of ``guide`` [B, 1, H, W], averaged over the
    non-ignored pixels (0 when there is none)."""
    mask = spg_guidance_mask(guide, high, low)
    up = _up(logits, tuple(guide.shape[-2:]))
    keep = mask != IGNORE
    if not bool(keep.any()):
        return up.sum() * 0.0
    return F.binary_cross_entropy_with_logits(up[keep], mask[keep])


def spg_loss(out: Dict[str, Tensor], labels: Tensor, thresholds: Sequence[Tuple[float, float]]) -> Tensor:
    """SPG's training loss from :meth:`SPGNet.forward` ``(aux=True)`` outputs (every weight 1)."""
    (h1, l1), (h2, l2), (h3, l3) = thresholds
    size = tuple(out["input_size"])
    b2i = torch.sigmoid(_up(out["logits_b2"], size))
    fused = ((torch.sigmoid(_up(out["logits_b1"], size)) + b2i) / 2.0).detach()
    loss = F.cross_entropy(out["logits"], labels)
    loss = loss + spg_side_loss(out["logits_b2"], out["attention"], h1, l1)
    loss = loss + spg_side_loss(out["logits_b1"], b2i.detach(), h2, l2)
    loss = loss + spg_side_loss(out["logits_c"], fused, h3, l3)
    return loss


def acol_erase(features: Tensor, class_map: Tensor, threshold: float) -> Tuple[Tensor, Tensor]:
    """ACoL's erasing: ``features`` [B, d, h, w] times 0 where the min-max normalised
    ``class_map`` [B, h, w] is ``>= threshold``. Returns (erased features, keep mask [B, h, w])."""
    att = minmax_normalize(class_map.detach().float())
    keep = (att < float(threshold)).to(features.dtype)
    return features * keep.unsqueeze(1), keep


def acol_fused_map(map_a: Tensor, map_b: Tensor) -> Tensor:
    """``max(minmax(map_a), minmax(map_b))`` of two [B, h, w] class maps."""
    return torch.maximum(minmax_normalize(map_a.float()), minmax_normalize(map_b.float()))


# --------------------------------------------------------------------------- #
# modules
# --------------------------------------------------------------------------- #
def _conv_relu(cin: int, cout: int, bn: bool = False) -> List[nn.Module]:
    """conv3x3 + ReLU (wsolevaluation's); conv3x3 + BN + ReLU for the ``small`` forms (the
    small CNN's own block, so its from-scratch learning rate stays stable)."""
    if bn:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]


def _pick(x: Tensor, classes: Tensor) -> Tensor:
    return x[torch.arange(x.shape[0], device=x.device), classes]


class _MethodNet(CAMNet):
    """Shared plumbing: the plain CAM backbone lives in ``self.backbone`` (its ImageNet
    weights load there before wrapping); :func:`_head_rule` says which parameters train at
    the classifier rate (wsolevaluation's name patterns)."""

    method = ""

    def __init__(self, backbone: CAMNet, feature_dim: int):
        super().__init__(backbone.num_classes, feature_dim)
        self.arch = backbone.arch
        self.backbone = backbone

    def param_groups(self, lr: float, classifier_lr_mult: float = 10.0, weight_decay: float = 1e-4) -> List[dict]:
        backbone, head = [], []
        is_head = _head_rule(self.arch, self.method)
        for name, p in self.named_parameters():
            if p.requires_grad:
                (head if is_head(name) else backbone).append(p)
        groups = []
        if backbone:
            groups.append({"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone"})
        if head:
            groups.append({"params": head, "lr": lr * classifier_lr_mult, "weight_decay": weight_decay,
                           "name": "classifier"})
        return groups


class SPGNet(_MethodNet):
    """SPG around a CAM backbone: :func:`_spg_taps` gives (t1, t2, f); ``fc`` is SPG_A4."""

    method = "spg"

    def __init__(self, backbone: CAMNet, c1: int, c2: int, d: int, width_b: int, width_c: int,
                 thresholds: Sequence[Tuple[float, float]], dropout: float = 0.0, init: str = "xavier",
                 bn: bool = False):
        super().__init__(backbone, d)
        self.dropout = float(dropout)
        self.thresholds = tuple((float(h), float(lo)) for h, lo in thresholds)
        self.SPG_B_1a = nn.Sequential(*_conv_relu(c1, width_b, bn))
        self.SPG_B_2a = nn.Sequential(*_conv_relu(c2, width_b, bn))
        self.SPG_B_shared = nn.Sequential(*_conv_relu(width_b, width_b, bn), nn.Conv2d(width_b, 1, 1))
        self.SPG_C = nn.Sequential(*_conv_relu(d, width_c, bn), nn.Conv2d(width_c, 1, 1))
        _init_weights([*self.SPG_B_1a.modules(), *self.SPG_B_2a.modules(), *self.SPG_B_shared.modules(),
                       *self.SPG_C.modules()], init)
        _init_weights([self.fc], init)

    def forward(self, x: Tensor, return_features: bool = False, labels: Optional[Tensor] = None,
                aux: bool = False):
        t1, t2, f = _spg_taps(self, x)
        fd = F.dropout(f, self.dropout, self.training) if self.dropout else f
        logits = self.fc(fd.mean(dim=(2, 3)))
        if not aux:
            return (logits, f) if return_features else logits
        classes = logits.argmax(1) if labels is None else labels
        size = tuple(x.shape[-2:])
        cam = torch.einsum("bdhw,bd->bhw", fd, self.fc.weight[classes]).unsqueeze(1)
        attention = minmax_normalize(_up(cam.detach(), size))
        return {"logits": logits, "features": f, "attention": attention, "input_size": size,
                "logits_b1": self.SPG_B_shared(self.SPG_B_1a(t1)),
                "logits_b2": self.SPG_B_shared(self.SPG_B_2a(t2)),
                "logits_c": self.SPG_C(fd)}

    def loss(self, out: Dict[str, Any], labels: Tensor) -> Tensor:
        return spg_loss(out, labels, self.thresholds)


class ACoLNet(_MethodNet):
    """ACoL around a CAM backbone: :func:`_acol_trunk` gives f; heads ``classifier_A`` / ``classifier_B``."""

    method = "acol"
    linear_cam = False  # evaluate / pseudo-boxes call model.cams(features, classes)

    def __init__(self, backbone: CAMNet, d: int, width: int, threshold: float, init: str = "xavier",
                 bn: bool = False):
        super().__init__(backbone, d)
        self.fc = None  # two conv heads instead of one linear classifier
        self.threshold = float(threshold)
        c = backbone.num_classes

        def head():
            return nn.Sequential(*_conv_relu(d, width, bn), *_conv_relu(width, width, bn), nn.Conv2d(width, c, 1))

        self.classifier_A = head()
        self.classifier_B = head()
        _init_weights([*self.classifier_A.modules(), *self.classifier_B.modules()], init)

    @property
    def classifier_weight(self) -> Tensor:
        raise TypeError("ACoL's localisation map (the max of its two heads' normalised maps) is not linear in the "
                        "features: there is no classifier_weight; use model.cams(features, classes)")

    def forward(self, x: Tensor, return_features: bool = False, labels: Optional[Tensor] = None,
                aux: bool = False):
        f = _acol_trunk(self, x)
        map_a = self.classifier_A(f)
        logits = map_a.mean(dim=(2, 3))
        if not aux:
            return (logits, f) if return_features else logits
        classes = logits.argmax(1) if labels is None else labels
        a = _pick(map_a, classes)
        erased, keep = acol_erase(f, a, self.threshold)
        map_b = self.classifier_B(erased)
        b = _pick(map_b, classes)
        return {"logits": logits, "logits_b": map_b.mean(dim=(2, 3)), "features": f, "keep": keep,
                "emb_cam": acol_fused_map(a.detach(), b.detach())}

    def loss(self, out: Dict[str, Any], labels: Tensor) -> Tensor:
        return F.cross_entropy(out["logits"], labels) + F.cross_entropy(out["logits_b"], labels)

    def cams(self, features: Tensor, classes: Tensor) -> Tensor:
        """The fused map [B, h, w] for ``classes`` (erasing with those classes' maps)."""
        a = _pick(self.classifier_A(features), classes)
        erased, _ = acol_erase(features, a, self.threshold)
        b = _pick(self.classifier_B(erased), classes)
        return acol_fused_map(a, b)


# --------------------------------------------------------------------------- #
# per-architecture wiring
# --------------------------------------------------------------------------- #
def _vgg_conv4_end(feats: nn.Sequential) -> int:
    """Index of conv4_3's ReLU in the VGG ``features`` (the 10th conv's ReLU)."""
    n = 0
    for i, m in enumerate(feats):
        if isinstance(m, nn.Conv2d):
            n += 1
            if n == 10:
                return i + 1
    raise ValueError("VGG16 features have fewer than 10 convs")


def _is_inception_backbone(name: str) -> bool:
    return any(p in name for p in ("Mixed", "Conv2d_1", "Conv2d_2", "Conv2d_3", "Conv2d_4"))


def _lite0_run(bb, x: Tensor, lo: int, hi: int) -> Tensor:
    for b in bb._blocks[lo:hi]:
        x = b(x)
    return x


def _lite0_stem(bb, x: Tensor) -> Tensor:
    x = x * bb.in_scale + bb.in_shift
    return F.relu6(bb._bn0(bb._conv_stem(x)))


def _lite0_head(bb, x: Tensor) -> Tensor:
    return F.relu6(bb._bn1(bb._conv_head(x)))


def _vgg_is_large(feats: nn.Sequential) -> bool:
    return not isinstance(feats[_vgg_conv4_end(feats)], nn.MaxPool2d)


def _spg_taps(net: "SPGNet", x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(t1, t2, f) of the SPG network ``net`` (per arch, wsolevaluation's tap points)."""
    bb, arch = net.backbone, net.arch
    if arch == "vgg16":
        feats = bb.features
        k = _vgg_conv4_end(feats)  # conv4_3's ReLU + 1: the pool after conv4 (absent when large)
        split = k if _vgg_is_large(feats) else k + 1
        t1 = feats[:split](x)
        t2 = feats[split:](t1)
        return t1, t2, net.SPG_A_3(t2)
    if arch == "resnet50":
        x = bb.maxpool(bb.relu(bb.bn1(bb.conv1(x))))
        t1 = bb.layer3[0](bb.layer2(bb.layer1(x)))
        t2 = bb.layer3[1:](t1)
        return t1, t2, bb.layer4(t2)
    if arch == "inceptionv3":
        t1 = bb.forward_to_mixed_5d(x)
        t2 = bb.Mixed_6d(bb.Mixed_6c(bb.Mixed_6b(bb.Mixed_6a(t1))))  # wsolevaluation taps B2 at Mixed_6d
        f = F.dropout(bb.Mixed_6e(t2), 0.5, net.training)
        f = F.dropout(bb.SPG_A3_1b(f), 0.5, net.training)
        return t1, t2, bb.SPG_A3_2b(f)
    if arch == "small":
        t1 = bb.features[:3](x)
        t2 = bb.features[3](t1)
        return t1, t2, net.SPG_A_3(t2)
    if arch == "efficientnet_lite0":
        t1 = _lite0_run(bb, _lite0_stem(bb, x), 0, 11)
        t2 = _lite0_run(bb, t1, 11, 15)
        return t1, t2, _lite0_head(bb, _lite0_run(bb, t2, 15, len(bb._blocks)))
    raise ValueError(f"SPG: no wiring for arch {arch!r}")


def _acol_trunk(net: "ACoLNet", x: Tensor) -> Tensor:
    """The feature map both ACoL heads read (per arch, wsolevaluation's)."""
    bb, arch = net.backbone, net.arch
    if arch == "vgg16":
        feats = bb.features
        if _vgg_is_large(feats):  # 'M2' (3x3, stride 1) after conv4_3
            k = _vgg_conv4_end(feats)
            x = feats[k:](F.max_pool2d(feats[:k](x), kernel_size=3, stride=1, padding=1))
        else:
            x = feats(x)
        x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)  # 'M2' after conv5_3
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
    if arch == "inceptionv3":
        return bb.Mixed_6e(bb.Mixed_6d(bb.Mixed_6c(bb.Mixed_6b(bb.Mixed_6a(bb.forward_to_mixed_5d(x))))))
    if arch in ("resnet50", "small", "efficientnet_lite0"):
        return bb.forward_features(x)
    raise ValueError(f"ACoL: no wiring for arch {arch!r}")


def _head_rule(arch: str, method: str) -> Callable[[str], bool]:
    """Which parameters train at the classifier rate: wsolevaluation's name patterns
    (vgg: outside ``features``, which for SPG ends at pool3; resnet: ``layer4``; inception:
    outside ``Mixed*`` / ``Conv2d_1-4``); small / lite0: everything outside the backbone."""
    if arch == "vgg16" and method == "spg":
        return lambda n: not (n.startswith("backbone.features.") and int(n.split(".")[2]) <= 16)
    if arch == "vgg16":
        return lambda n: not n.startswith("backbone.features.")
    if arch == "resnet50":
        return lambda n: "layer4." in n
    if arch == "inceptionv3":
        return lambda n: not _is_inception_backbone(n)
    return lambda n: not n.startswith("backbone.")


def _build_spg(bb: CAMNet, thresholds) -> SPGNet:
    arch = bb.arch
    bb.fc = None  # SPGNet.fc is SPG_A4
    if arch == "vgg16":
        k = _vgg_conv4_end(bb.features)
        if not _vgg_is_large(bb.features):
            bb.features[k] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # wsolevaluation's pool after SPG_A_1
        bb.conv6 = None
        net = SPGNet(bb, 512, 512, 512, 512, 512, thresholds)
        net.SPG_A_3 = nn.Sequential(*_conv_relu(512, 512), *_conv_relu(512, 512))
        _init_weights(net.SPG_A_3.modules(), "xavier")
        return net
    if arch == "resnet50":
        return SPGNet(bb, 1024, 1024, 2048, 1024, 512, thresholds)
    if arch == "inceptionv3":
        return SPGNet(bb, 288, 768, 1024, 512, 512, thresholds, dropout=0.5)
    if arch == "small":
        w = bb.feature_dim // 4
        net = SPGNet(bb, 2 * w, 4 * w, 4 * w, 2 * w, 2 * w, thresholds, bn=True)
        net.SPG_A_3 = nn.Sequential(nn.Conv2d(4 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w),
                                    nn.ReLU(inplace=True))
        _init_weights(net.SPG_A_3.modules(), "xavier")
        return net
    if arch == "efficientnet_lite0":
        return SPGNet(bb, 112, 192, 1280, 128, 128, thresholds)
    raise ValueError(f"SPG: no wiring for arch {arch!r}")


def _build_acol(bb: CAMNet, threshold: float) -> ACoLNet:
    arch = bb.arch
    bb.fc = None
    if arch == "vgg16":
        for i, m in enumerate(bb.features):
            if isinstance(m, nn.MaxPool2d):
                bb.features[i] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # wsolevaluation's 'M1'
        bb.conv6 = None
        return ACoLNet(bb, 512, 1024, threshold)
    if arch == "resnet50":
        return ACoLNet(bb, 2048, 1024, threshold, init="he")
    if arch == "inceptionv3":
        bb.SPG_A3_1b = bb.SPG_A3_2b = None  # wsolevaluation's InceptionAcol has no SPG_A3 convs
        return ACoLNet(bb, 768, 1024, threshold)
    if arch == "small":
        return ACoLNet(bb, bb.feature_dim, bb.feature_dim, threshold, bn=True)
    if arch == "efficientnet_lite0":
        return ACoLNet(bb, bb.feature_dim, 256, threshold)
    raise ValueError(f"ACoL: no wiring for arch {arch!r}")


def spg_thresholds(params: Dict[str, float]) -> Tuple[Tuple[float, float], ...]:
    return tuple((float(params[f"threshold_{i}h"]), float(params[f"threshold_{i}l"])) for i in (1, 2, 3))


def build_method_model(arch: str, num_classes: int, method: str = "cam", method_kwargs: Optional[Dict] = None, *,
                       large_feature_map: bool = False, pretrained: Optional[str] = None, **kwargs) -> CAMNet:
    """The model a method trains: the plain CAM model (:func:`cream_wsol.models.build_model`)
    for cam / has / adl / cutmix, the SPG / ACoL network around it for spg / acol (ImageNet
    weights, when given, load into the backbone first). ``method_kwargs`` overrides the
    method's defaults (:data:`cream_wsol.methods.METHOD_DEFAULTS`)."""
    from .methods import make_method

    m = make_method(method, **(method_kwargs or {}))
    bb = build_model(canonical_arch(arch), num_classes, large_feature_map=large_feature_map, pretrained=pretrained,
                     **kwargs)
    if m.name == "spg":
        return _build_spg(bb, spg_thresholds(m.params))
    if m.name == "acol":
        return _build_acol(bb, m.params["threshold"])
    return bb
