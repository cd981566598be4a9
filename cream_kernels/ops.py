"""Validation, backend choice and the torch.library custom ops, in one place.

Every public entry point validates here (the kernels trust their callers),
chooses a backend here, and reaches the kernels through two custom ops,
``cream_kernels::em_reactivate`` and ``cream_kernels::update_context_embeddings``,
so ``torch.compile(fullgraph=True)`` sees one opaque op per call.

Backends (``backend=`` or the environment variable ``CREAM_KERNELS_BACKEND``):
    "auto"       CUDA tensors: "cuda", else "triton", else "reference";
                 CPU tensors: "cpu", else "reference".
    "cuda"       the CUDA C++ kernels of cream_kernels._C
    "triton"     the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
    "cpu"        the OpenMP C++ kernels of cream_kernels._C
    "reference"  cream_kernels/reference.py, SPEC.md in plain PyTorch (float64 inside)

Non-finite inputs are not checked (that would cost a second read of the
features); they propagate: a NaN or Inf in an image's features or CAM makes
that image's output NaN at least at the affected pixels (usually everywhere,
once an M-step has mixed it in). Other images are unaffected. In the context
update a non-finite sample poisons the rows of its class.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _ext
from . import reference as _ref

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_BACKEND = "CREAM_KERNELS_BACKEND"
FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_POISON = os.environ.get("CREAM_KERNELS_DEBUG_POISON", "") == "1"


class BackendUnavailable(RuntimeError):
    """Raised when the requested backend cannot run these inputs; the message lists why."""


# --------------------------------------------------------------------------- #
# Backends: what each can run, and why not
# --------------------------------------------------------------------------- #
def _triton_reasons(device: torch.device) -> list[str]:
    from . import triton as _tr

    reasons = []
    if _tr.IMPORT_ERROR:
        reasons.append(_tr.IMPORT_ERROR)
    if device.type == "cpu" and not _tr.INTERPRET:
        reasons.append("CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing cream_kernels")
    elif device.type not in ("cpu", "cuda"):
        reasons.append(f"Triton runs on CUDA devices, not {device.type}")
    return reasons


def backend_reasons(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """Why backend ``name`` cannot run on ``device`` with features of ``dtype`` ([] if it can)."""
    device = torch.device(device)
    reasons: list[str] = []
    if name == "reference":
        return reasons
    if name in ("cpu", "cuda") and not _ext.available():
        reasons.append(_ext.IMPORT_ERROR or "cream_kernels._C is missing")
    if name == "cpu":
        if device.type != "cpu":
            reasons.append(f"the cpu backend runs on CPU tensors, not {device.type}")
    elif name == "cuda":
        if _ext.available() and not _ext.with_cuda():
            reasons.append(
                "cream_kernels was built without CUDA (no nvcc at build time): reinstall with nvcc on PATH "
                "or CUDA_HOME set, or with CREAM_KERNELS_CUDA=1 to make a missing nvcc an error"
            )
        if device.type != "cuda":
            reasons.append(f"the cuda backend runs on CUDA tensors, not {device.type}")
        elif not torch.cuda.is_available():
            reasons.append("torch.cuda.is_available() is False")
        if dtype == torch.float64:
            reasons.append("float64 features run only on the cpu and reference backends")
    elif name == "triton":
        reasons += _triton_reasons(device)
        if dtype == torch.float64:
            reasons.append("float64 features run only on the cpu and reference backends")
    else:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    return reasons


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The one place a backend is chosen. Raises BackendUnavailable listing reasons."""
    requested = backend if backend is not None else os.environ.get(ENV_BACKEND, "auto") or "auto"
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a str or None, got {type(requested).__name__}")
    requested = requested.lower()
    if requested == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        for name in order:
            if not backend_reasons(name, device, dtype):
                return name
        raise BackendUnavailable(f"no backend can run on {device}")  # unreachable: reference always can
    if requested not in BACKENDS:
        source = "backend" if backend is not None else ENV_BACKEND
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {requested!r}")
    reasons = backend_reasons(requested, device, dtype)
    if reasons:
        raise BackendUnavailable(
            f"backend {requested!r} cannot run on {device} with {dtype} features:\n  - " + "\n  - ".join(reasons)
        )
    return requested


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def _desc(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} and dtype {t.dtype}"


def _need_tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_float(name: str, t: Tensor, allowed: Sequence[torch.dtype] = FEATURE_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(a) for a in allowed)
        raise TypeError(f"{name} must have a dtype in ({names}); got {_desc(t)}")


def _check_number(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if math.isinf(hi) else ']'}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")
    return v


def _check_features(features) -> Tensor:
    features = _need_tensor("features", features)
    if features.dim() != 4:
        raise ValueError(f"features must be 4-D [B, d, h, w]; got {_desc(features)}")
    _check_float("features", features)
    B, d, h, w = features.shape
    if d < 1 or h < 1 or w < 1:
        raise ValueError(f"features must have d, h, w >= 1; got {_desc(features)}")
    return features


def _check_device(features: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != features.device:
            raise ValueError(f"{name} is on {t.device} but features are on {features.device}; put all tensors on one device")


def _check_cam(cam, features: Tensor) -> Tensor:
    cam = _need_tensor("cam", cam)
    B, _, h, w = features.shape
    if cam.dim() != 3:
        raise ValueError(f"cam must be 3-D [B, h, w] = [{B}, {h}, {w}]; got {_desc(cam)}")
    _check_float("cam", cam)
    if tuple(cam.shape) != (B, h, w):
        raise ValueError(f"cam must have shape [B, h, w] = [{B}, {h}, {w}] to match features {_desc(features)}; got {_desc(cam)}")
    return cam


def _check_labels(labels, B: int) -> Tensor:
    labels = _need_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (e.g. torch.int64); got {_desc(labels)}")
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must have shape [B] = [{B}]; got {_desc(labels)}")
    return labels


def _check_label_range(labels: Tensor, num_rows: int, what: str) -> None:
    """Value check, run inside the op (it reads the data, so it stays out of traced code)."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_rows:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels must lie in [0, {num_rows}) ({what} has {num_rows} rows); found {bad}")


def _check_embeddings(fg, bg, labels, features: Tensor) -> None:
    if (fg is None) != (bg is None):
        raise ValueError("fg_embedding and bg_embedding must both be given, or both be None (training-free mode)")
    if fg is None:
        if labels is not None:
            raise ValueError("labels select rows of the embedding tables; they need fg_embedding/bg_embedding")
        return
    B, d = features.shape[:2]
    for name, e in (("fg_embedding", fg), ("bg_embedding", bg)):
        _need_tensor(name, e)
        _check_float(name, e)
        if e.dim() != 2 or e.shape[1] != d:
            want = f"[B, d] = [{B}, {d}]" if labels is None else f"[C, d] = [C, {d}]"
            raise ValueError(f"{name} must have shape {want} to match features {_desc(features)}; got {_desc(e)}")
        if labels is None and e.shape[0] != B:
            raise ValueError(
                f"{name} without labels must be per image, shape [B, d] = [{B}, {d}]; got {_desc(e)} "
                "(pass labels to index a [C, d] table)"
            )
    if fg.shape != bg.shape:
        raise ValueError(f"fg_embedding and bg_embedding must have the same shape; got {tuple(fg.shape)} and {tuple(bg.shape)}")


# --------------------------------------------------------------------------- #
# Layout preparation (shared by all kernel backends)
# --------------------------------------------------------------------------- #
def feature_view(features: Tensor) -> Tensor:
    """A [B, d, N] view with unit stride over N (NCHW) or over d (channels_last),
    copying only when the input is neither."""
    B, d, h, w = features.shape
    try:
        f3 = features.view(B, d, h * w)
    except RuntimeError:
        f3 = None
    if f3 is not None and (f3.stride(2) == 1 or f3.stride(1) == 1):
        return f3
    return features.contiguous().view(B, d, h * w)


def _f32c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def _i64c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.int64).contiguous()


def _new(shape, dtype, device) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:  # debug: a kernel that leaves any output unwritten fails loudly
        t.fill_(float("nan") if dtype.is_floating_point else 0xAB)
    return t


# --------------------------------------------------------------------------- #
# Backend implementations behind the custom ops
# --------------------------------------------------------------------------- #
def _kernels(name: str, op: str):
    """The module holding backend ``name``'s kernels for ``op`` ("em" or "context"):
    the Triton modules and the _C bridge expose the same function names."""
    if name == "triton":
        from .triton import context, em

        return em if op == "em" else context
    return _ext


def _em_outputs(B, d, h, w, device):
    return (
        _new((B, h, w), torch.float32, device),
        _new((B, h, w), torch.float32, device),
        _new((B, d), torch.float32, device),
        _new((B, d), torch.float32, device),
        _new((B, 2), torch.float32, device),
        _new((B,), torch.uint8, device),
    )


def _em_kernel(name: str, features, cam, fg, bg, labels, num_iters, sigma, ratio, cosine):
    B, d, h, w = features.shape
    outs = _em_outputs(B, d, h, w, features.device)
    if B > 0:
        f3 = feature_view(features)
        cam2 = cam.to(torch.float32).reshape(B, h * w).contiguous()
        args = (f3, cam2, _f32c(fg), _f32c(bg), _i64c(labels), num_iters, sigma, ratio, cosine, outs)
        _kernels(name, "em").em_reactivate(*args)
    out, z, vf, vb, mix, picked = outs
    return out, z, vf, vb, mix, picked.view(torch.bool)


def _em_reference(features, cam, fg, bg, labels, num_iters, sigma, ratio, cosine):
    fg, bg = _f32c(fg), _f32c(bg)
    if labels is not None:
        fg, bg = fg[labels], bg[labels]
    r = _ref.em_reactivate(features, cam, fg, bg, num_iters, sigma, ratio, cosine)
    return tuple(r)


def _stats_kernel(name, features, labels, cam, weight, ratio):
    B, d, h, w = features.shape
    means = _new((B, 2, d), torch.float32, features.device)
    nonempty = _new((B, 2), torch.uint8, features.device)
    if B > 0:
        args = (feature_view(features), _i64c(labels), _f32c(None if cam is None else cam.reshape(B, h * w)), _f32c(weight), ratio, means, nonempty)
        _kernels(name, "context").context_stats(*args)
    return means, nonempty


def _apply_kernel(name, fg, bg, means, nonempty, labels, momentum):
    if means.shape[0] == 0:
        return
    args = (fg, bg, means.contiguous(), nonempty.to(torch.uint8).contiguous(), _i64c(labels), momentum)
    _kernels(name, "context").context_apply(*args)


def _update_kernel(name, fg, bg, features, labels, cam, weight, momentum, ratio):
    B, d, h, w = features.shape
    if B == 0:
        return
    # O(B*d) workspace for the per-sample means (never O(B*d*h*w)).
    means = _new((B, 2, d), torch.float32, features.device)
    nonempty = _new((B, 2), torch.uint8, features.device)
    args = (fg, bg, feature_view(features), _i64c(labels), _f32c(None if cam is None else cam.reshape(B, h * w)), _f32c(weight), ratio, momentum, means, nonempty)
    _kernels(name, "context").context_update(*args)


# --------------------------------------------------------------------------- #
# Custom ops
# --------------------------------------------------------------------------- #
@torch.library.custom_op("cream_kernels::em_reactivate", mutates_args=())
def _em_op(
    features: Tensor,
    cam: Tensor,
    fg_embedding: Optional[Tensor],
    bg_embedding: Optional[Tensor],
    labels: Optional[Tensor],
    num_iters: int,
    sigma: float,
    cam_threshold: float,
    cosine: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if labels is not None:
        _check_label_range(labels, fg_embedding.shape[0], "fg_embedding")
    if backend == "reference":
        return _em_reference(features, cam, fg_embedding, bg_embedding, labels, num_iters, sigma, cam_threshold, cosine)
    return _em_kernel(backend, features, cam, fg_embedding, bg_embedding, labels, num_iters, sigma, cam_threshold, cosine)


@_em_op.register_fake
def _(features, cam, fg_embedding, bg_embedding, labels, num_iters, sigma, cam_threshold, cosine, backend):
    B, d, h, w = features.shape
    new = features.new_empty
    return (
        new((B, h, w), dtype=torch.float32),
        new((B, h, w), dtype=torch.float32),
        new((B, d), dtype=torch.float32),
        new((B, d), dtype=torch.float32),
        new((B, 2), dtype=torch.float32),
        new((B,), dtype=torch.bool),
    )


@torch.library.custom_op("cream_kernels::update_context_embeddings", mutates_args=("fg_embedding", "bg_embedding"))
def _update_op(
    fg_embedding: Tensor,
    bg_embedding: Tensor,
    features: Tensor,
    labels: Tensor,
    cam: Optional[Tensor],
    classifier_weight: Optional[Tensor],
    momentum: float,
    cam_threshold: float,
    backend: str,
) -> None:
    _check_label_range(labels, fg_embedding.shape[0], "fg_embedding")
    if classifier_weight is not None:
        _check_label_range(labels, classifier_weight.shape[0], "classifier_weight")
    if backend == "reference":
        _ref.update_context_embeddings(fg_embedding, bg_embedding, features, labels, cam, classifier_weight, momentum, cam_threshold)
    else:
        _update_kernel(backend, fg_embedding, bg_embedding, features, labels, cam, classifier_weight, momentum, cam_threshold)


@_update_op.register_fake
def _(fg_embedding, bg_embedding, features, labels, cam, classifier_weight, momentum, cam_threshold, backend):
    return None


# --------------------------------------------------------------------------- #
# Public functions
# --------------------------------------------------------------------------- #
EMResult = _ref.EMResult  # one definition, shared with the oracle


def em_reactivate(
    features: Tensor,
    cam: Tensor,
    fg_embedding: Optional[Tensor],
    bg_embedding: Optional[Tensor],
    labels: Optional[Tensor] = None,
    *,
    num_iters: int = 2,
    sigma: float = 8.0,
    cam_threshold: float = 0.2,
    similarity: str = "dot",
    return_extras: bool = False,
    backend: Optional[str] = None,
):
    """CREAM's inference-time EM re-activation (SPEC.md Op 2, Eqs. 5-12).

    Args:
        features: [B, d, h, w] float32/float16/bfloat16 (float64 on the cpu and
            reference backends): the feature map the CAM is taken from. Any
            strides; NCHW and channels_last are read in place.
        cam: [B, h, w] raw CAM of the target class (ground truth for GT-known,
            the predicted class for top-1).
        fg_embedding, bg_embedding: initial centroids, either per image [B, d]
            (``labels`` None) or [C, d] tables indexed by ``labels``. Both None:
            training-free mode, starting from the image's own CAM-masked fg/bg
            feature means.
        labels: [B] integer class of each image, to index the tables.
        num_iters: T >= 1 E-steps (and T-1 M-steps).
        sigma: temperature > 0 dividing the similarities.
        cam_threshold: r in [0, 1] of the CAM foreground mask.
        similarity: "dot" (default) or "cosine".
        return_extras: also return z_fg, final centroids, mixing weights and the
            calibration branch, as an :class:`EMResult`.
        backend: None/"auto", "cuda", "triton", "cpu" or "reference"
            (default from ``CREAM_KERNELS_BACKEND``).

    Returns:
        float32 [B, h, w] in [0, 2], or an :class:`EMResult`.
    """
    features = _check_features(features)
    cam = _check_cam(cam, features)
    B = features.shape[0]
    if labels is not None:
        labels = _check_labels(labels, B)
    _check_embeddings(fg_embedding, bg_embedding, labels, features)
    _check_device(features, cam=cam, fg_embedding=fg_embedding, bg_embedding=bg_embedding, labels=labels)
    if isinstance(num_iters, bool) or not isinstance(num_iters, int):
        raise TypeError(f"num_iters must be an int, got {type(num_iters).__name__}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    sigma = _check_number("sigma", sigma, 0.0, math.inf, lo_open=True)
    cam_threshold = _check_number("cam_threshold", cam_threshold, 0.0, 1.0)
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
    name = resolve_backend(backend, features.device, features.dtype)
    res = torch.ops.cream_kernels.em_reactivate(
        features, cam, fg_embedding, bg_embedding, labels, num_iters, sigma, cam_threshold, similarity == "cosine", name
    )
    return EMResult(*res) if return_extras else res[0]


def _check_tables(fg_embedding, bg_embedding, d: int, features: Tensor) -> None:
    for name, e in (("fg_embedding", fg_embedding), ("bg_embedding", bg_embedding)):
        _need_tensor(name, e)
        if e.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 table [C, d] (it is updated in place); got {_desc(e)}")
        if e.dim() != 2 or e.shape[1] != d:
            raise ValueError(f"{name} must have shape [C, d] = [C, {d}] to match features {_desc(features)}; got {_desc(e)}")
        if not e.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place); got {_desc(e)}, strides {e.stride()}")
    if fg_embedding.shape != bg_embedding.shape:
        raise ValueError(f"fg_embedding and bg_embedding must have the same shape; got {tuple(fg_embedding.shape)} and {tuple(bg_embedding.shape)}")
    same = fg_embedding is bg_embedding or (
        not torch.compiler.is_compiling() and fg_embedding.numel() > 0 and fg_embedding.data_ptr() == bg_embedding.data_ptr()
    )
    if same:
        raise ValueError("fg_embedding and bg_embedding must be different tensors")


def _check_stats_inputs(features, labels, cam, classifier_weight, cam_threshold):
    features = _check_features(features)
    B, d = features.shape[:2]
    labels = _check_labels(labels, B)
    if (cam is None) == (classifier_weight is None):
        raise ValueError("give exactly one of cam ([B, h, w]) or classifier_weight ([C, d])")
    if cam is not None:
        cam = _check_cam(cam, features)
    else:
        classifier_weight = _need_tensor("classifier_weight", classifier_weight)
        _check_float("classifier_weight", classifier_weight)
        if classifier_weight.dim() != 2 or classifier_weight.shape[1] != d:
            raise ValueError(f"classifier_weight must have shape [C, d] = [C, {d}]; got {_desc(classifier_weight)}")
    _check_device(features, labels=labels, cam=cam, classifier_weight=classifier_weight)
    cam_threshold = _check_number("cam_threshold", cam_threshold, 0.0, 1.0)
    return features, labels, cam, classifier_weight, cam_threshold


def update_context_embeddings(
    fg_embedding: Tensor,
    bg_embedding: Tensor,
    features: Tensor,
    labels: Tensor,
    *,
    cam: Optional[Tensor] = None,
    classifier_weight: Optional[Tensor] = None,
    momentum: float = 0.8,
    cam_threshold: float = 0.2,
    backend: Optional[str] = None,
) -> None:
    """CREAM's training-time context embedding update (SPEC.md Op 1, Eqs. 3-4), in place.

    For each sample b in batch order, the CAM-masked fg and bg feature means of
    sample b move the rows ``labels[b]`` of the float32 [C, d] tables:
    ``emb <- momentum * emb + (1 - momentum) * mean``; an empty mask leaves its
    row untouched. Repeated labels compose exactly like that sequential loop,
    deterministically.

    Exactly one of ``cam`` ([B, h, w], the CAM of each sample's label class) or
    ``classifier_weight`` ([C, d]; the CAM W[y] . f is then computed inside the
    kernel) is given. Features are not differentiated through (call under
    no_grad or pass ``features.detach()``; gradients are never produced).
    """
    features, labels, cam, classifier_weight, cam_threshold = _check_stats_inputs(
        features, labels, cam, classifier_weight, cam_threshold
    )
    _check_tables(fg_embedding, bg_embedding, features.shape[1], features)
    _check_device(features, fg_embedding=fg_embedding, bg_embedding=bg_embedding)
    momentum = _check_number("momentum", momentum, 0.0, 1.0)
    name = resolve_backend(backend, features.device, features.dtype)
    torch.ops.cream_kernels.update_context_embeddings(
        fg_embedding, bg_embedding, features.detach(), labels, None if cam is None else cam.detach(),
        None if classifier_weight is None else classifier_weight.detach(), momentum, cam_threshold, name
    )


# Two halves of the update, for the distributed path of ContextEmbeddings:
# every rank computes its samples' statistics, gathers them, and applies the
# whole global batch in rank order.
def context_stats(features, labels, *, cam=None, classifier_weight=None, cam_threshold=0.2, num_classes: int, backend=None):
    """Per-sample masked means ([B, 2, d] float32) and non-empty flags ([B, 2] bool)."""
    features, labels, cam, classifier_weight, cam_threshold = _check_stats_inputs(
        features, labels, cam, classifier_weight, cam_threshold
    )
    _check_label_range(labels, num_classes, "the tables")
    if classifier_weight is not None:
        _check_label_range(labels, classifier_weight.shape[0], "classifier_weight")
    name = resolve_backend(backend, features.device, features.dtype)
    features = features.detach()
    if name == "reference":
        means, nonempty = _ref.context_stats(features, labels, cam, classifier_weight, cam_threshold)
    else:
        means, nonempty = _stats_kernel(name, features, labels, cam, classifier_weight, cam_threshold)
    return means, nonempty.to(torch.bool)


def context_apply(fg_embedding, bg_embedding, means, nonempty, labels, *, momentum=0.8, backend=None):
    """Apply gathered statistics to the tables in order (SPEC.md's sequential update)."""
    momentum = _check_number("momentum", momentum, 0.0, 1.0)
    _check_label_range(labels, fg_embedding.shape[0], "fg_embedding")
    name = resolve_backend(backend, means.device, torch.float32)
    if name == "reference":
        _ref.context_apply(fg_embedding, bg_embedding, means, nonempty.to(torch.bool), labels, momentum)
    else:
        _apply_kernel(name, fg_embedding, bg_embedding, means, nonempty, labels, momentum)
