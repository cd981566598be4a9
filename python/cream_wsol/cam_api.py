"""``cream_wsol.CREAM``: CREAM maps from a user's model in one call.

A CAM model ends in global average pooling (GAP) and a linear classifier, so the CAM
of class c is ``W[c] . f_i`` over the feature map f that GAP pools. :class:`CREAM`
hooks that feature map (the output of ``target_layer``), finds the classifier, and
runs :func:`cream_kernels.em_reactivate` once per batch for all the classes asked
(the op reads each image's features once for its K classes and computes the CAMs
from the classifier weight itself). The maps come back at the input image's size,
min-max normalised to [0, 1], with the classes and the logits.

Any other CAM can be the starting map instead of the classifier's (``cams=``):
Grad-CAM, Score-CAM, ... from torchcam or pytorch-grad-cam, at feature size or at
image size. See :class:`CREAM` for the rules, and ``boxes_from_map`` / ``best_box``
(``cream_wsol.metrics``, exported by ``cream_wsol``) for the boxes.
"""
from __future__ import annotations

import difflib
import inspect
import math
import warnings
from typing import Any, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CREAM", "CREAMOutput"]

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


class CREAMOutput(NamedTuple):
    """What :class:`CREAM` returns.

    maps     float32 [B, K, H, W]: the CREAM map of each image and class, at the
             input image's size (H, W), min-max normalised per map to [0, 1]
             (a non-finite map becomes all zeros, and so does one that is
             constant after the upsampling; a raw map that is constant at feature
             size usually is not: the bicubic resize leaves float32 rounding noise,
             which the min-max stretches to [0, 1], as in the metrics).
    classes  int64 [B, K]: the class of each map (the targets, or the top-k
             predicted classes in descending logit order).
    logits   [B, C]: the classifier's output for the batch (the model's dtype).
    raw      float32 [B, K, h, w]: the op's CREAM maps at feature size, in [0, 2]
             (calibrated posterior + normalised CAM, SPEC.md Eq. 12).
    extras   the op's :class:`cream_kernels.EMResult` (z_fg, centroids, mixing
             weights, calibration branch, sigma_used; each with a K axis after B)
             when ``return_extras=True``, else None.
    """

    maps: Tensor
    classes: Tensor
    logits: Tensor
    raw: Tensor
    extras: Optional[Any] = None


def _named(model: nn.Module, layer, what: str) -> Tuple[str, nn.Module]:
    """(name, module) of ``layer`` (a module of ``model`` or its dotted name)."""
    modules = dict(model.named_modules())
    if isinstance(layer, str):
        if layer not in modules:
            close = difflib.get_close_matches(layer, [n for n in modules if n], n=5)
            hint = f"; closest names: {close}" if close else ""
            raise ValueError(f"{what}={layer!r} is not a module of the model{hint} "
                             "(see model.named_modules())")
        return layer, modules[layer]
    if isinstance(layer, nn.Module):
        for name, m in modules.items():
            if m is layer:
                return name, m
        raise ValueError(f"{what} ({type(layer).__name__}) is not a submodule of the model")
    raise TypeError(f"{what} must be an nn.Module of the model or its dotted name; "
                    f"got {type(layer).__name__}")


def _first_tensor(out):
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def _desc(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} and dtype {t.dtype}"


def _version_or_copy(t):
    if not isinstance(t, Tensor):
        return None
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor tracks no version
        return t.clone()


def _changed(t: Tensor, seen) -> bool:
    if seen is None:
        return False
    if isinstance(seen, Tensor):
        return not torch.equal(seen, t)
    return t._version != seen


def _takes_return_features(model: nn.Module) -> bool:
    try:
        return "return_features" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


class CREAM:
    """CREAM (Class RE-Activation Mapping) maps from a CNN with a GAP + linear head.

    ``cream = CREAM(model, target_layer)`` then ``out = cream(images)`` gives, for
    each image, the CREAM map of its top predicted class (or of ``targets``, or of
    its ``top_k`` classes) at the image's size, in [0, 1], plus the logits
    (:class:`CREAMOutput`). With no ``embeddings`` the EM runs in the training-free
    mode: it starts from each image's own CAM-masked foreground / background
    feature means, so any trained classifier works as it is.

    How it works: one forward pass of ``model`` under ``torch.no_grad()`` with a
    hook on ``target_layer`` (removed afterwards), then ONE call of
    :func:`cream_kernels.em_reactivate` with ``classifier_weight`` and labels
    [B, K]: the op computes each CAM ``W[c] . f_i`` in the kernel and reads each
    image's features once for all K classes. The result is upsampled to the input
    size (``interpolation``, bicubic by default as the wsolevaluation metrics do)
    and min-max normalised per map. Call ``model.eval()`` first (a model in
    training mode runs dropout and moves batch-norm statistics; CREAM warns).

    Args:
        model: the classifier, an ``nn.Module`` whose ``model(images)`` runs
            ``target_layer``, then global average pooling and a linear layer.
            Any other head (torchvision's VGG16: an MLP) works when each call
            gives both ``cams=`` and ``targets=``: the classifier weight is then
            never used, and the logits are the model's output.
        target_layer: the layer whose output [B, d, h, w] is the CAM feature map
            (the map GAP pools), a module of ``model`` or its dotted name (e.g.
            ``"layer4"`` for a torchvision-style ResNet). It must run once per
            forward, and its output must not be modified in place later (hook the
            ReLU after a conv, not the conv, when the ReLU is in place). None:
            ``model`` follows cream_wsol.models' interface,
            ``model(x, return_features=True) -> (logits, features)`` (the harness's
            VGG16 / EfficientNet-Lite0 apply their last ReLU as a function, so no
            module outputs the feature map).
        classifier: None (find it), an ``nn.Linear`` of ``model`` or its name, or a
            weight tensor [C, d] (e.g. ``conv1x1.weight.flatten(1)`` for a head of a
            1x1 convolution before GAP; the logits are then the model's output).
            Found automatically when exactly one ``nn.Linear`` runs once in the
            forward, takes the spatial mean of the target layer's output as its
            input, and gives the model's output (a tensor, or one in the tuple, list
            or dict the model returns); otherwise a ValueError lists every linear
            layer and why it does not fit (a model that applies softmax after the
            classifier needs ``classifier=``). The bias is ignored (it only shifts a CAM; SPEC.md).
        embeddings: None (training-free mode), a
            :class:`cream_kernels.ContextEmbeddings`, or a pair ``(fg, bg)`` of
            [C, d] tables (row c initialises class c's centroids).
        num_iters: T, the EM's E-steps (paper: 2).
        sigma: the similarity temperature, a number > 0 or ``"auto"`` (a
            scale-free temperature from each image's own logit gaps: SPEC.md,
            "Op 2 extensions"); None uses :func:`cream_kernels.em_reactivate`'s
            default. With dot similarity a fixed sigma suits one feature scale
            only: on a user's own model ``"auto"`` is the safe choice.
        cam_threshold: r in [0, 1] of the CAM foreground mask (paper: 0.2).
        similarity: ``"dot"`` or ``"cosine"``.
        interpolation: how maps reach the image size: ``"bicubic"`` (default),
            ``"bilinear"`` or ``"nearest"`` (``torch.nn.functional.interpolate``,
            ``align_corners=False``), before the min-max normalisation.
        backend: the op's backend (None: chosen by cream_kernels).

    Calling: ``cream(images, targets=None, top_k=1, cams=None, return_extras=False)``

        images: [B, 3, H, W] the model's input (batch dimension required).
        targets: None (the ``top_k`` predicted classes), an int (that class for
            every image), [B] (one class per image) or [B, K] (K classes per image),
            as a tensor, array or nested list; objects with an integer
            ``category`` attribute (pytorch-grad-cam's ``ClassifierOutputTarget``)
            are read as that class.
        top_k: K when ``targets`` is None (1 <= top_k <= C).
        cams: None (start from the classifier's CAM), or maps computed by another
            method, one per image and class: [B, K, h', w'], [B, h', w'] (K = 1),
            or [h', w'] when B = 1; a tensor or a numpy array (pytorch-grad-cam
            returns [B, H, W] numpy), or a one-element list (torchcam returns a list
            with one entry per target layer). Maps at another size than the
            feature map are resized to it: by area averaging
            (``interpolate(mode="area")``, i.e. adaptive average pooling) when they
            are larger in both dimensions, bilinearly otherwise. Only the map's
            shape matters to the EM (the CAM mask and the normalised CAM term are
            invariant to shift and positive scale), so normalised and raw maps give
            the same result. Give ``targets`` = the classes the maps were computed
            for (they pick the embedding rows and are reported); without them the
            maps are taken as those of the top-K predicted classes (what torchcam
            and pytorch-grad-cam use by default). With ``cams`` and ``targets``
            both given no GAP + linear head is needed (none is looked for when
            ``classifier`` is not given and none fits).
        return_extras: also return the op's extras (``CREAMOutput.extras``).

    Example:
        >>> import torch
        >>> from cream_wsol import CREAM
        >>> from cream_wsol.models import SmallCAM
        >>> model = SmallCAM(num_classes=5).eval()       # any CNN with a GAP + linear head
        >>> cream = CREAM(model, target_layer="features", sigma="auto")
        >>> out = cream(torch.rand(2, 3, 64, 64), top_k=3)
        >>> out.maps.shape, out.classes.shape, out.logits.shape
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 3]), torch.Size([2, 5]))
        >>> cream.classifier_name
        'fc'
        >>> bool(out.maps.min() >= 0 and out.maps.max() <= 1)
        True
        >>> cams = torch.rand(2, 16, 16)                 # e.g. a Grad-CAM at feature size
        >>> cream(torch.rand(2, 3, 64, 64), cams=cams, targets=[1, 4]).classes.tolist()
        [[1], [4]]
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: Union[nn.Module, str, None],
        classifier: Union[nn.Module, str, Tensor, None] = None,
        embeddings=None,
        *,
        num_iters: int = 2,
        sigma: Union[float, str, None] = None,
        cam_threshold: float = 0.2,
        similarity: str = "dot",
        interpolation: str = "bicubic",
        backend: Optional[str] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.model = model
        if target_layer is None:
            if not _takes_return_features(model):
                raise ValueError(
                    "target_layer=None needs a model with cream_wsol.models' interface "
                    "(forward(x, return_features=True) -> (logits, features)); "
                    f"{type(model).__name__}.forward has no return_features argument: give "
                    "the layer whose output is the CAM feature map (a module or its name)")
            self.target_name, self.target_layer = None, None
        else:
            self.target_name, self.target_layer = _named(model, target_layer, "target_layer")

        self._classifier_module: Optional[nn.Module] = None
        self._classifier_weight: Optional[Tensor] = None
        self.classifier_name: Optional[str] = None  # set when found or given as a module
        if classifier is None:
            pass
        elif isinstance(classifier, Tensor):
            if classifier.dim() != 2 or not classifier.dtype.is_floating_point:
                raise ValueError(f"classifier as a tensor must be a float weight [C, d]; got {_desc(classifier)}")
            self._classifier_weight = classifier
        else:
            name, module = _named(model, classifier, "classifier")
            if not isinstance(module, nn.Linear):
                raise TypeError(
                    f"classifier {name!r} is a {type(module).__name__}, not an nn.Linear; give the "
                    "linear layer that follows global average pooling, or its weight [C, d]")
            self._classifier_module, self.classifier_name = module, name

        self._fg_bg = self._check_embeddings(embeddings)
        self.embeddings = embeddings

        if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
            raise ValueError(f"num_iters must be an int >= 1; got {num_iters!r}")
        if sigma is not None and sigma != "auto":
            if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
                raise TypeError(f"sigma must be a number > 0, 'auto' or None; got {type(sigma).__name__} {sigma!r}")
            if not (math.isfinite(float(sigma)) and float(sigma) > 0):
                raise ValueError(f"sigma must be a finite number > 0, 'auto' or None; got {sigma!r}")
        if isinstance(cam_threshold, bool) or not isinstance(cam_threshold, (int, float)) \
                or not (0.0 <= float(cam_threshold) <= 1.0):
            raise ValueError(f"cam_threshold must be a number in [0, 1]; got {cam_threshold!r}")
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity must be 'dot' or 'cosine'; got {similarity!r}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}; got {interpolation!r}")
        self.num_iters = num_iters
        self.sigma = sigma
        self.cam_threshold = float(cam_threshold)
        self.similarity = similarity
        self.interpolation = interpolation
        self.backend = backend
        self._warned_training = False

    def __repr__(self) -> str:
        emb = "None (training-free)" if self._fg_bg is None else f"[{self._fg_bg[0].shape[0]}, {self._fg_bg[0].shape[1]}]"
        return (f"CREAM({type(self.model).__name__}, target_layer={self.target_name!r}, "
                f"classifier={self.classifier_name or ('weight' if self._classifier_weight is not None else None)!r}, "
                f"embeddings={emb}, num_iters={self.num_iters}, sigma={self.sigma!r}, "
                f"cam_threshold={self.cam_threshold}, similarity={self.similarity!r})")

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_embeddings(embeddings) -> Optional[Tuple[Tensor, Tensor]]:
        if embeddings is None:
            return None
        from cream_kernels import ContextEmbeddings

        if isinstance(embeddings, ContextEmbeddings):
            return embeddings.fg, embeddings.bg
        if isinstance(embeddings, (tuple, list)) and len(embeddings) == 2 \
                and all(isinstance(e, Tensor) for e in embeddings):
            fg, bg = embeddings
            for name, e in (("fg", fg), ("bg", bg)):
                if e.dim() != 2 or not e.dtype.is_floating_point:
                    raise ValueError(f"embeddings {name} table must be a float [C, d] tensor; got {_desc(e)}")
            if fg.shape != bg.shape:
                raise ValueError(f"embeddings fg and bg tables must have one shape; got "
                                 f"{tuple(fg.shape)} and {tuple(bg.shape)}")
            return fg, bg
        raise TypeError("embeddings must be None, a cream_kernels.ContextEmbeddings or a pair (fg, bg) "
                        f"of [C, d] tensors; got {type(embeddings).__name__}")

    def _run_model(self, images: Tensor, need_head: bool = True):
        """One forward; returns (features [B, d, h, w], logits [B, C], weight [C, d]).

        ``need_head=False`` (the caller gives the CAMs and the targets): a head that
        is not found is no error; the weight is then None and the logits are the
        model's output."""
        model = self.model
        feats: List[Tensor] = []
        versions: List[Optional[int]] = []
        linear_io = {}  # name -> [calls, input, output]
        handles = []

        def feature_hook(_m, _inp, out):
            feats.append(out)
            # to notice a later in-place change: the version counter, or (inference
            # tensors have none) a copy to compare with after the forward
            versions.append(_version_or_copy(out))

        def linear_hook(name):
            def hook(_m, inp, out):
                rec = linear_io.setdefault(name, [0, None, None])
                rec[0] += 1
                rec[1] = inp[0] if inp and isinstance(inp[0], Tensor) else None
                rec[2] = out
            return hook

        discover = self._classifier_module is None and self._classifier_weight is None
        if discover:
            linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        elif self._classifier_module is not None:
            linears = [(self.classifier_name, self._classifier_module)]
        else:
            linears = []
        try:
            if self.target_layer is not None:
                handles.append(self.target_layer.register_forward_hook(feature_hook))
            for n, m in linears:
                handles.append(m.register_forward_hook(linear_hook(n)))
            with torch.no_grad():
                if self.target_layer is None:
                    out = model(images, return_features=True)
                    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Tensor)):
                        raise ValueError("model(x, return_features=True) must return (logits, features); got "
                                         f"{type(out).__name__}")
                    feats.append(out[1])
                    out = out[0]
                else:
                    out = model(images)
        finally:
            for h in handles:
                h.remove()

        where = f"target_layer {self.target_name!r}" if self.target_name is not None else "the model's features"
        if not feats:
            raise ValueError(f"target_layer {self.target_name!r} did not run in model(images); "
                             "give a layer on the path to the classifier")
        if len(feats) > 1:
            raise ValueError(f"target_layer {self.target_name!r} ran {len(feats)} times in one forward "
                             "(a module reused, e.g. a shared ReLU); give a module that runs once and "
                             "outputs the CAM feature map (e.g. the last block)")
        f = feats[0]
        if not isinstance(f, Tensor) or f.dim() != 4 or not f.dtype.is_floating_point:
            got = _desc(f) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"the output of {where} must be a float feature map [B, d, h, w]; got {got}")
        if f.shape[2] * f.shape[3] == 1:
            raise ValueError(f"the output of {where} has shape {tuple(f.shape)}: a 1x1 map has no spatial "
                             "extent to localize (the maps would be 0.5 everywhere); give the layer before "
                             "global average pooling (the last feature map, e.g. 'layer4' of a ResNet, "
                             "'features' of a VGG)")
        if self.target_layer is not None and _changed(f, versions[0]):
            raise ValueError(f"the output of {where} was modified in place later in the forward (e.g. by "
                             "nn.ReLU(inplace=True)), so it is not the map the head pools; give the module "
                             "after it (the ReLU) as target_layer")
        B = images.shape[0]
        if f.shape[0] != B:
            raise ValueError(f"the output of {where} has batch {f.shape[0]} but images have {B}")
        d = f.shape[1]
        if discover:
            try:
                name = self._discover(f, linear_io, out, where)
            except ValueError:
                if need_head:
                    raise
                return f, self._model_logits(out, B), None  # cams and targets given: no head needed
            self._classifier_module = dict(model.named_modules())[name]
            self.classifier_name = name
        if self._classifier_module is not None:
            rec = linear_io.get(self.classifier_name)
            if rec is None or rec[2] is None:
                raise ValueError(f"classifier {self.classifier_name!r} did not run in model(images)")
            logits = rec[2]
            weight = self._classifier_module.weight
        else:
            logits = _first_tensor(out)
            weight = self._classifier_weight
            if logits is None:
                raise ValueError("with classifier given as a weight, model(images) must return the logits "
                                 f"[B, C] (or a tuple starting with them); got {type(out).__name__}")
        C = weight.shape[0]
        if weight.dim() != 2 or weight.shape[1] != d:
            raise ValueError(f"the classifier weight must be [C, d] with d = {d} (the channels of {where}, "
                             f"features {_desc(f)}); got {_desc(weight)}")
        if logits.dim() != 2 or tuple(logits.shape) != (B, C):
            raise ValueError(f"the logits must be [B, C] = [{B}, {C}]; got {_desc(logits)}")
        return f, logits, weight

    @staticmethod
    def _model_logits(out, B: int) -> Tensor:
        logits = _first_tensor(out)
        if isinstance(out, dict):
            logits = next((t for t in out.values() if isinstance(t, Tensor)), None)
        if logits is None or logits.dim() != 2 or logits.shape[0] != B:
            got = _desc(logits) if isinstance(logits, Tensor) else type(out).__name__
            raise ValueError(f"model(images) must return the logits [B, C] with B = {B} (or a tuple, list or "
                             f"dict holding them first); got {got}")
        return logits

    def _discover(self, f: Tensor, linear_io: dict, out, where: str) -> str:
        B, d = f.shape[:2]
        pooled = f.detach().float().mean(dim=(2, 3))
        tol = 1e-4 if f.dtype in (torch.float32, torch.float64) else 2e-2
        scale = float(pooled.abs().max()) if pooled.numel() else 0.0
        fits, notes = [], []
        # the classifier's output is the model's output (a tensor, or one in a tuple/list/dict)
        items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
        outputs = {id(t) for t in items if isinstance(t, Tensor)}
        modules = dict(self.model.named_modules())
        for name, m in modules.items():
            if not isinstance(m, nn.Linear):
                continue
            label = f"{name!r} (Linear {m.in_features} -> {m.out_features})"
            rec = linear_io.get(name)
            if rec is None:
                notes.append(f"{label}: did not run")
            elif m.in_features != d:
                notes.append(f"{label}: takes {m.in_features} features, the feature map has d = {d}")
            elif rec[0] != 1:
                notes.append(f"{label}: ran {rec[0]} times")
            elif rec[1] is None or tuple(rec[1].shape) != (B, d):
                got = tuple(rec[1].shape) if isinstance(rec[1], Tensor) else None
                notes.append(f"{label}: its input has shape {got}, not [B, d] = [{B}, {d}]")
            else:
                diff = float((rec[1].detach().float() - pooled).abs().max())
                if diff > tol * max(scale, 1e-30) + 1e-12:
                    notes.append(f"{label}: its input is not the global average of {where} "
                                 f"(max |difference| {diff:.3g}, largest mean {scale:.3g})")
                elif id(rec[2]) not in outputs:
                    notes.append(f"{label}: takes the global average of {where}, but its output is not "
                                 "the model's output (more layers follow it)")
                else:
                    fits.append(name)
        if len(fits) == 1:
            return fits[0]
        shape = f"[B, d, h, w] = {list(f.shape)}"
        if len(fits) > 1:
            raise ValueError(f"several linear layers take the global average of {where} ({shape}) and "
                             f"give the model's output: {fits}; pass classifier= the one of the logits")
        found = "; ".join(notes) if notes else "the model has no nn.Linear"
        train = (" The model is in training mode (dropout changes the classifier's input): call "
                 "model.eval()." if self.model.training else "")
        raise ValueError(
            f"CREAM needs a head of global average pooling + nn.Linear over the output of {where} "
            f"({shape}) to compute the CAMs and rank the classes, and found no such linear layer. Linear "
            f"layers: {found}.{train} Pass classifier= (an nn.Linear, its name, or a weight [C, d]) if the "
            "head is equivalent, or pick the target_layer whose output the head pools. A model with another "
            "head (e.g. torchvision's VGG, an MLP) needs none when you give both the starting maps and their "
            "classes: cream(images, cams=<Grad-CAM etc. from torchcam or pytorch-grad-cam>, targets=<classes>).")

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _classes(targets, logits: Tensor, top_k, K_from_cams: Optional[int]) -> Tensor:
        B, C = logits.shape
        dev = logits.device
        if targets is None:
            if isinstance(top_k, bool) or not isinstance(top_k, int):
                raise TypeError(f"top_k must be an int; got {type(top_k).__name__}")
            K = top_k
            if K_from_cams is not None:
                if top_k not in (1, K_from_cams):
                    raise ValueError(f"cams hold K = {K_from_cams} maps per image but top_k = {top_k}")
                K = K_from_cams
            if not (1 <= K <= C):
                raise ValueError(f"top_k must be in [1, C] = [1, {C}]; got {K}")
            return logits.detach().float().topk(K, dim=1).indices.to(torch.int64)
        if isinstance(targets, (list, tuple)):
            def category(t):
                return getattr(t, "category", t)
            targets = [[category(u) for u in t] if isinstance(t, (list, tuple)) else category(t)
                       for t in targets]
        if isinstance(targets, Tensor):
            t = targets.detach()
        else:
            try:
                t = torch.as_tensor(np.asarray(targets))
            except (TypeError, ValueError) as exc:
                raise TypeError(f"targets must be an int, [B] or [B, K] class indices; got {targets!r}") from exc
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"targets must be integer class indices; got {_desc(t)}")
        if t.dim() == 0:
            t = t.expand(B)
        if t.dim() == 1:
            if t.shape[0] != B:
                raise ValueError(f"targets [B] must have B = {B} entries (one class per image); got {_desc(t)}")
            t = t[:, None]
        if t.dim() != 2 or t.shape[0] != B or t.shape[1] < 1:
            raise ValueError(f"targets must be an int, [B] or [B, K] with B = {B}; got {_desc(t)}")
        if K_from_cams is not None and t.shape[1] != K_from_cams:
            raise ValueError(f"cams hold K = {K_from_cams} maps per image but targets have shape "
                             f"{tuple(t.shape)}; give one class per map")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= C:
            raise ValueError(f"targets must lie in [0, C) = [0, {C}) (the classifier's classes); "
                             f"found {lo if lo < 0 else hi}")
        return t.to(device=dev, dtype=torch.int64).contiguous()

    @staticmethod
    def _prepare_cams(cams, B: int, h: int, w: int, device) -> Tensor:
        if isinstance(cams, (list, tuple)):
            if len(cams) != 1:
                raise ValueError(
                    f"cams as a list must hold one entry (torchcam returns one per target layer); got "
                    f"{len(cams)} entries: pass the maps of one layer, [B, h, w] or [B, K, h, w]")
            cams = cams[0]
        if isinstance(cams, np.ndarray):
            cams = torch.from_numpy(np.ascontiguousarray(cams))
        if not isinstance(cams, Tensor):
            raise TypeError(f"cams must be a tensor or numpy array; got {type(cams).__name__}")
        if not cams.dtype.is_floating_point:
            raise TypeError(f"cams must be a float map; got {_desc(cams)}")
        c = cams.detach()
        if c.dim() == 2 and B == 1:
            c = c[None, None]
        elif c.dim() == 3:
            c = c[:, None]
        if c.dim() != 4 or c.shape[0] != B:
            raise ValueError(f"cams must be [B, K, h, w] or [B, h, w] with B = {B} (or [h, w] for one "
                             f"image); got {_desc(cams)}")
        if c.shape[1] < 1 or c.shape[2] < 1 or c.shape[3] < 1:
            raise ValueError(f"cams must not be empty; got {_desc(cams)}")
        c = c.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"cams contain NaN or Inf ({_desc(cams)})")
        K = c.shape[1]
        if tuple(c.shape[2:]) != (h, w):
            if c.shape[2] >= h and c.shape[3] >= w:
                c = F.interpolate(c, size=(h, w), mode="area")
            else:
                c = F.interpolate(c, size=(h, w), mode="bilinear", align_corners=False)
        return c.reshape(B, K, h, w).contiguous()

    # ------------------------------------------------------------------ call
    def __call__(self, images: Tensor, targets=None, top_k: int = 1, *, cams=None,
                 return_extras: bool = False) -> CREAMOutput:
        import cream_kernels as ck

        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W]; got {type(images).__name__}")
        if images.dim() != 4:
            hint = " (one image: images[None])" if images.dim() == 3 else ""
            raise ValueError(f"images must be [B, channels, H, W]{hint}; got {_desc(images)}")
        if self.model.training and not self._warned_training:
            warnings.warn("CREAM: the model is in training mode (dropout, batch-norm statistics move); "
                          "call model.eval() for inference maps", stacklevel=2)
            self._warned_training = True
        # with the starting maps and their classes given, the classifier weight is never
        # used: a model with any head (torchvision's VGG: an MLP) works
        f, logits, weight = self._run_model(images, need_head=cams is None or targets is None)
        B, d, h, w = f.shape
        C = weight.shape[0] if weight is not None else logits.shape[1]
        c = None if cams is None else self._prepare_cams(cams, B, h, w, f.device)
        classes = self._classes(targets, logits, top_k, None if c is None else c.shape[1])
        K = classes.shape[1]

        fg = bg = None
        if self._fg_bg is not None:
            fg, bg = self._fg_bg
            if fg.shape != (C, d):
                raise ValueError(f"embeddings must be [C, d] = [{C}, {d}] (the classifier's classes and the "
                                 f"feature channels); got {tuple(fg.shape)}")
            fg = fg.detach().to(f.device)
            bg = bg.detach().to(f.device)

        kw = dict(num_iters=self.num_iters, cam_threshold=self.cam_threshold, similarity=self.similarity,
                  return_extras=return_extras, backend=self.backend)
        if self.sigma is not None:
            kw["sigma"] = self.sigma
        if c is None:
            res = ck.em_reactivate(f, None, fg, bg, classes,
                                   classifier_weight=weight.detach().to(f.device), **kw)
        else:
            res = ck.em_reactivate(f, c, fg, bg, classes if fg is not None else None, **kw)
        raw = (res.output if return_extras else res).reshape(B, K, h, w)
        maps = self._to_image(raw, images.shape[-2:])
        return CREAMOutput(maps, classes, logits, raw, res if return_extras else None)

    def _to_image(self, raw: Tensor, size) -> Tensor:
        H, W = int(size[0]), int(size[1])
        x = raw
        if tuple(x.shape[-2:]) != (H, W):
            if self.interpolation == "nearest":
                x = F.interpolate(x, size=(H, W), mode="nearest")
            else:
                x = F.interpolate(x, size=(H, W), mode=self.interpolation, align_corners=False)
        finite = torch.isfinite(x).flatten(2).all(dim=2)  # [B, K]
        if not bool(finite.all()):
            bad = [tuple(i) for i in (~finite).nonzero().tolist()]
            warnings.warn(f"CREAM: non-finite values in the maps of (image, class) {bad[:8]} (NaN/Inf in the "
                          "features?); those maps are set to zeros", stacklevel=3)
            x = torch.where(finite[..., None, None], x, torch.zeros((), device=x.device))
        lo = x.amin(dim=(2, 3), keepdim=True)
        span = x.amax(dim=(2, 3), keepdim=True) - lo
        ok = span > 0
        return torch.where(ok, (x - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(x))
