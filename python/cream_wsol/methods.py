"""WSOL training methods besides plain CAM: HaS, ADL, CutMix (issue 9), SPG and ACoL (issue 23).

The definitions and default hyper-parameters follow clovaai/wsolevaluation
(``wsol/method/{has,adl,cutmix,spg,acol}.py``, ``config.py``, ``main.py::_wsol_training``);
the code is ours. SPG and ACoL change the network (side branches, a second classifier):
their models and losses are in :mod:`cream_wsol.spg_acol`, built by
:func:`cream_wsol.spg_acol.build_method_model`.

=========  ===================================================================  ==========================
method     what changes in a training step                                      defaults (wsolevaluation)
=========  ===================================================================  ==========================
cam        nothing                                                              -
has        Hide-and-Seek: the (normalised) image is cut into ``grid_size`` x    grid_size 4 (pixels),
           ``grid_size`` pixel patches, each set to 0 with prob ``drop_rate``   drop_rate 0.5
adl        Attention-based Dropout Layer after chosen feature stages (train     drop_rate 0.75,
           mode only): attention = channel mean; with prob ``drop_rate`` the    threshold (gamma) 0.9
           output is multiplied by the drop mask ``attention < gamma * max``,
           otherwise by the importance map ``sigmoid(attention)``
cutmix     with prob ``prob``: lam ~ Beta(beta, beta), a box of area            beta 1.0, prob 1.0
           ``(1 - lam)`` of the image is pasted from a permuted batch;
           loss ``lam' CE(y_a) + (1 - lam') CE(y_b)`` with lam' the exact
           kept area share
spg        Self-produced Guidance: side branches B1, B2, C learn masks made     threshold_1h/1l 0.7/0.01,
           from the CAM (B2), from sigmoid(B2) (B1) and from their mean (C);    threshold_2h/2l 0.5/0.05,
           pixels between a mask's high and low thresholds are ignored;         threshold_3h/3l 0.7/0.1
           loss CE + three BCEs, weights 1 (:mod:`cream_wsol.spg_acol`)
acol       Adversarial Complementary Learning: classifier B sees the features   threshold 0.7
           erased where classifier A's normalised map is >= threshold; loss
           CE(A) + CE(B); map max(norm A, norm B)
=========  ===================================================================  ==========================

ADL is parameter free, so it is attached with forward hooks on the model's own
modules: checkpoints keep the plain model's state dict, and evaluation (eval mode)
is the plain model. Its positions follow wsolevaluation's VGG16 (after
pool3, after conv4_3 and after conv5_3); for the other backbones ADL follows the last two feature
stages (documented in :data:`ADL_POSITIONS`).

The context embeddings are learned the same way whatever the method: the step's
own features (of the transformed images) with the image's label (for CutMix the
label of the image that keeps the larger share, ``y_a``). Their masks come from the
CAM, except for ACoL, where they come from its fused map (the step's two heads, max
of the normalised maps).

Randomness uses torch's and numpy's global generators, which the training loop
seeds per epoch and stores in its checkpoints, so resume stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["METHODS", "METHOD_DEFAULTS", "ADL_POSITIONS", "WSOLMethod", "make_method", "has", "cutmix",
           "ADL", "attach_adl"]

METHODS = ("cam", "has", "adl", "cutmix", "spg", "acol")
METHOD_DEFAULTS: Dict[str, Dict[str, float]] = {
    "cam": {},
    "has": {"grid_size": 4, "drop_rate": 0.5},
    "adl": {"drop_rate": 0.75, "threshold": 0.9},
    "cutmix": {"beta": 1.0, "prob": 1.0},
    # wsolevaluation config.py: --spg_threshold_{1,2,3}{h,l}, --acol_threshold
    "spg": {"threshold_1h": 0.7, "threshold_1l": 0.01, "threshold_2h": 0.5, "threshold_2l": 0.05,
            "threshold_3h": 0.7, "threshold_3l": 0.1},
    "acol": {"threshold": 0.7},
}

# module names (model.named_modules()) whose output goes through ADL, per arch
ADL_POSITIONS: Dict[str, Tuple[str, ...]] = {
    # VGG16 as wsolevaluation: after pool3 (features.16), after conv4_3's ReLU (22) and after
    # conv5_3's ReLU (29; 28 with large_feature_map, where the 4th pool is gone)
    "vgg16": ("features.16", "features.22", "features.29"),
    "vgg16-large": ("features.16", "features.22", "features.28"),
    "resnet50": ("layer3", "layer4"),
    "inceptionv3": ("Mixed_6e", "SPG_A3_1b"),
    "efficientnet_lite0": ("_blocks.10", "_blocks.14"),  # ends of the 112- and 192-channel stages
    "small": ("features.2", "features.3"),
}


def has(images: Tensor, grid_size: int = 4, drop_rate: float = 0.5) -> Tensor:
    """Hide-and-Seek on a batch [B, C, H, W]: every ``grid_size`` x ``grid_size`` patch is set
    to 0 with probability ``drop_rate`` (independently per image and patch). Returns a new tensor."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"has: images must be a [B, C, H, W] tensor; got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if int(grid_size) < 0:
        raise ValueError(f"has: grid_size must be >= 0; got {grid_size}")
    if not (0.0 <= float(drop_rate) <= 1.0):
        raise ValueError(f"has: drop_rate must be in [0, 1]; got {drop_rate}")
    g = int(grid_size)
    if g == 0:
        return images
    b, _, h, w = images.shape
    gh, gw = -(-h // g), -(-w // g)
    keep = (torch.rand(b, 1, gh, gw) > float(drop_rate)).to(images.dtype).to(images.device)
    keep = keep.repeat_interleave(g, dim=2).repeat_interleave(g, dim=3)[:, :, :h, :w]
    return images * keep


def cutmix(images: Tensor, labels: Tensor, beta: float = 1.0) -> Tuple[Tensor, Tensor, Tensor, float]:
    """CutMix (wsolevaluation's rule): returns (mixed images, y_a, y_b, lam) where lam is the share
    of the image that keeps its own content. The box is centred at a uniform pixel, with sides
    ``int(S * sqrt(1 - lam0))``, clipped to the image; lam0 ~ Beta(beta, beta) (numpy's generator)."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"cutmix: images must be a [B, C, H, W] tensor; got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if float(beta) <= 0:
        raise ValueError(f"cutmix: beta must be > 0; got {beta}")
    b, _, h, w = images.shape
    lam0 = float(np.random.beta(beta, beta))
    perm = torch.randperm(b).to(images.device)
    cut = np.sqrt(1.0 - lam0)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(np.random.randint(h)), int(np.random.randint(w))
    y0, y1 = int(np.clip(cy - ch // 2, 0, h)), int(np.clip(cy + ch // 2, 0, h))
    x0, x1 = int(np.clip(cx - cw // 2, 0, w)), int(np.clip(cx + cw // 2, 0, w))
    out = images.clone()
    out[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return out, labels, labels[perm], lam


class ADL(nn.Module):
    """Attention-based Dropout Layer (Choe & Shim 2019), identity in eval mode."""

    def __init__(self, drop_rate: float = 0.75, threshold: float = 0.9):
        super().__init__()
        if not (0.0 <= drop_rate <= 1.0):
            raise ValueError(f"ADL: drop_rate must be in [0, 1]; got {drop_rate}")
        if not (0.0 <= threshold <= 1.0):
            raise ValueError(f"ADL: threshold must be in [0, 1]; got {threshold}")
        self.drop_rate = float(drop_rate)
        self.threshold = float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        attention = x.mean(dim=1, keepdim=True)
        if float(torch.rand(())) < self.drop_rate:
            peak = attention.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
            sel = (attention < self.threshold * peak).to(x.dtype)
        else:
            sel = torch.sigmoid(attention)
        return x * sel

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, threshold={self.threshold}"


def attach_adl(model: nn.Module, drop_rate: float = 0.75, threshold: float = 0.9,
               positions: Optional[Tuple[str, ...]] = None) -> List[Any]:
    """Put an :class:`ADL` after each module named in ``positions`` (default:
    :data:`ADL_POSITIONS` of the model's arch) with forward hooks; the state dict is
    unchanged. ADL acts in training mode only (follows ``model.training``). Returns the
    hook handles (``h.remove()`` detaches)."""
    arch = getattr(model, "arch", "")
    if positions is None:
        key = arch
        if arch == "vgg16" and "features.29" not in dict(model.named_modules()):
            key = "vgg16-large"
        if key not in ADL_POSITIONS:
            raise ValueError(f"attach_adl: no default ADL positions for arch {arch!r}; pass positions")
        positions = ADL_POSITIONS[key]
    mods = dict(model.named_modules())
    missing = [p for p in positions if p not in mods]
    if missing:
        raise ValueError(f"attach_adl: {arch or type(model).__name__} has no module(s) {missing}")
    adl = ADL(drop_rate, threshold)
    handles = []
    for p in positions:
        def hook(module, inputs, output, _adl=adl):
            _adl.train(module.training)
            return _adl(output)
        handles.append(mods[p].register_forward_hook(hook))
    return handles


@dataclass
class WSOLMethod:
    """What a training step needs from a method: ``wrap(model)`` once, then per step
    ``images, loss_fn, emb_labels = prepare(images, labels)`` and ``loss = loss_fn(logits)``.
    For SPG / ACoL (``changes_model``) the step instead runs ``out = model(images,
    labels=labels, aux=True)`` and takes ``loss = model.loss(out, labels)``."""

    name: str = "cam"
    params: Dict[str, float] = field(default_factory=dict)

    @property
    def changes_model(self) -> bool:
        """SPG and ACoL train a different network (built by ``spg_acol.build_method_model``)."""
        return self.name in ("spg", "acol")

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.name == "adl":
            attach_adl(model, self.params["drop_rate"], self.params["threshold"])
        return model

    def prepare(self, images: Tensor, labels: Tensor) -> Tuple[Tensor, Callable[[Tensor], Tensor], Tensor]:
        if self.name == "has":
            images = has(images, int(self.params["grid_size"]), self.params["drop_rate"])
        elif self.name == "cutmix" and self.params["beta"] > 0 and self.params["prob"] > float(np.random.rand()):
            images, ya, yb, lam = cutmix(images, labels, self.params["beta"])
            return images, (lambda logits: lam * F.cross_entropy(logits, ya)
                            + (1.0 - lam) * F.cross_entropy(logits, yb)), ya
        return images, (lambda logits: F.cross_entropy(logits, labels)), labels


def make_method(name: str = "cam", **params) -> WSOLMethod:
    """A :class:`WSOLMethod` with wsolevaluation's defaults, overridden by ``params``."""
    key = str(name).lower()
    if key not in METHODS:
        raise ValueError(f"unknown WSOL method {name!r}; choose one of {list(METHODS)}")
    unknown = sorted(set(params) - set(METHOD_DEFAULTS[key]))
    if unknown:
        raise ValueError(f"method {key!r} has no parameter(s) {unknown}; it takes {sorted(METHOD_DEFAULTS[key])}")
    p = {**METHOD_DEFAULTS[key], **{k: float(v) for k, v in params.items()}}
    if key == "has" and (p["grid_size"] < 0 or not 0 <= p["drop_rate"] <= 1):
        raise ValueError(f"has: grid_size must be >= 0 and drop_rate in [0, 1]; got {p}")
    if key == "adl" and not (0 <= p["drop_rate"] <= 1 and 0 <= p["threshold"] <= 1):
        raise ValueError(f"adl: drop_rate and threshold must be in [0, 1]; got {p}")
    if key == "cutmix" and (p["beta"] < 0 or not 0 <= p["prob"] <= 1):
        raise ValueError(f"cutmix: beta must be >= 0 and prob in [0, 1]; got {p}")
    if key in ("spg", "acol"):
        bad = {k: v for k, v in p.items() if not 0 <= v <= 1}
        if bad:
            raise ValueError(f"{key}: thresholds must be in [0, 1]; got {bad}")
    return WSOLMethod(key, p)
