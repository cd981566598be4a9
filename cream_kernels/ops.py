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

K classes per image (``em_reactivate`` with labels [B, K] or a [B, K, h, w]
CAM) become R = B*K rows, row r = b*K + k, each an independent Op 2 run; how
each backend reads the features for them:
    reference  repeats each image's features K times (float64; clarity over memory)
    cpu        one OpenMP thread per image runs its K rows together: every pass
               (the in-kernel CAMs from classifier_weight, the training-free init,
               sigma="auto"'s logit gaps, each E-step and M-step) reads a feature
               row (NCHW) or pixel vector (channels_last) once for all K rows
    triton     d <= 64: one program runs up to KB of an image's rows from one
               read; larger d: one program per row (the multi-row form spilled
               registers at sm_90), an image's K programs adjacent in the grid
               so their repeated reads can hit L2 (not yet measured on a GPU);
               B*K rows under half the SMs (given CAM, centroids, numeric
               sigma): each row's pixels split over programs, 2T+1 launches
    cuda       generic kernel: one CTA per row, an image's K CTAs adjacent (the
               same L2 reasoning, not yet measured); see csrc/cuda

Non-finite inputs are not checked (that would cost a second read of the
features); they propagate: a NaN or Inf in an image's features or CAM makes
that image's output NaN at least at the affected pixels (usually everywhere,
once an M-step has mixed it in). Other images are unaffected. In the context
update a non-finite sample poisons the rows of its class.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _ext
from . import reference as _ref

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_BACKEND = "CREAM_KERNELS_BACKEND"
FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_POISON = os.environ.get("CREAM_KERNELS_DEBUG_POISON", "") == "1"
# Every integer dtype converts to int64 exactly (uint64 values >= 2**63 wrap to
# negative, which the range check then rejects); bool, float and the rest are not labels.
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32, torch.uint64)
MAX_NUM_ITERS = 1000  # T beyond this is a mistake (the paper uses T <= 4), and it must fit a C int
# The kernels hold sigma and 1/sigma in float32: sigma must be a normal float32.
SIGMA_MIN, SIGMA_MAX = float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max)
# Label range check: "host" (default: exact ValueError, one device-to-host sync on
# CUDA) or "device" (no sync: a device-side assert on CUDA, which is fatal to the
# CUDA context, so it is for checked pipelines and CUDA graphs). During CUDA graph
# capture the device form is used whatever this says.
ENV_LABEL_CHECK = "CREAM_KERNELS_LABEL_CHECK"


class FlatPosteriorWarning(UserWarning):
    """em_reactivate's posteriors all stayed within 0.45..0.55: the EM did next to nothing."""


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


def _check_number(name: str, value, lo: float, hi: float, lo_open: bool = False, why: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if math.isinf(hi) else ']'}"
    try:
        v = float(value)
    except OverflowError:  # a Python int too large for a double
        raise ValueError(f"{name} must be a finite number in {rng}{why}, got an int of {value.bit_length()} bits") from None
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        raise ValueError(f"{name} must be a finite number in {rng}{why}, got {value!r}")
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


def _check_cam(cam, features: Tensor, k_form: bool = False) -> Tensor:
    """cam [B, h, w] matching features; with k_form also [B, K, h, w] (em_reactivate)."""
    cam = _need_tensor("cam", cam)
    B, _, h, w = features.shape
    want = f"[B, h, w] = [{B}, {h}, {w}]" + (f" or [B, K, h, w] = [{B}, K, {h}, {w}]" if k_form else "")
    if not k_form and cam.dim() != 3:
        raise ValueError(f"cam must be 3-D {want}; got {_desc(cam)}")
    _check_float("cam", cam)
    if cam.dim() not in ((3, 4) if k_form else (3,)) or cam.shape[0] != B or tuple(cam.shape[-2:]) != (h, w):
        raise ValueError(f"cam must have shape {want} to match features {_desc(features)}; got {_desc(cam)}")
    if cam.dim() == 4 and cam.shape[1] < 1:
        raise ValueError(f"cam [B, K, h, w] needs K >= 1; got {_desc(cam)}")
    return cam


def _check_label_dtype(labels: Tensor) -> None:
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"labels must be an integer tensor (int8/16/32/64 or uint8/16/32/64; bool masks and floats are not "
            f"labels); got {_desc(labels)}"
        )


def _check_labels(labels, B: int, k_form: bool = False) -> Tensor:
    """Integer labels [B]; with k_form also [B, K] (em_reactivate)."""
    labels = _need_tensor("labels", labels)
    _check_label_dtype(labels)
    if labels.dim() not in ((1, 2) if k_form else (1,)) or labels.shape[0] != B:
        raise ValueError(f"labels must have shape [B] = [{B}]" + (f" or [B, K] = [{B}, K]" if k_form else "") +
                         f"; got {_desc(labels)}")
    if labels.dim() == 2 and labels.shape[1] < 1:
        raise ValueError(f"labels [B, K] needs K >= 1; got {_desc(labels)}")
    return labels


def _check_label_range(labels: Tensor, *bounds: tuple) -> None:
    """Value check of int64 labels against each (what, num_rows) of ``bounds``, in
    order, run inside the op (it reads the data, so it stays out of traced code).
    The min and max are read once for all bounds: on CUDA one device-to-host sync,
    unless CREAM_KERNELS_LABEL_CHECK=device or a CUDA graph is being captured: then
    a device-side assert guards the kernels instead (no sync, but a failure is
    fatal to the CUDA context)."""
    bounds = tuple(b for b in bounds if b is not None)
    if labels.numel() == 0 or not bounds:
        return
    if labels.is_cuda and (os.environ.get(ENV_LABEL_CHECK, "host") == "device" or torch.cuda.is_current_stream_capturing()):
        for what, num_rows in bounds:
            ok = ((labels >= 0) & (labels < num_rows)).all()
            torch._assert_async(ok, f"cream_kernels: labels must lie in [0, {num_rows}) ({what} has {num_rows} rows)")
        return
    lo, hi = (int(v) for v in torch.aminmax(labels))
    for what, num_rows in bounds:
        if lo < 0 or hi >= num_rows:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels must lie in [0, {num_rows}) ({what} has {num_rows} rows); found {bad}")


def _rows(what: str, table: Optional[Tensor]):
    """A (what, num_rows) bound of _check_label_range, or None without a table."""
    return None if table is None else (what, table.shape[0])


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


def _cam_f32(cam: Optional[Tensor]) -> Optional[Tensor]:
    """cam rows [R, N] as float32 contiguous for the kernels. A float64 CAM is
    first min-max normalised per row in float64 ((m - lo) / (hi - lo), 0 for a
    constant row): the mask and Eq. 12's normalised CAM are invariant to that
    (SPEC.md), and it keeps a CAM beyond the float32 range finite."""
    if cam is None:
        return None
    if cam.dtype == torch.float64:
        cam = _ref.normalized_cam(cam)
    return cam.to(torch.float32).contiguous()


def _weight_f32(weight: Optional[Tensor]) -> Optional[Tensor]:
    """classifier_weight [C, d] as float32 contiguous. A float64 weight is first
    divided per row by its largest |entry| (a positive scale of a row scales
    its CAM, which leaves the mask and the normalised CAM unchanged), so a
    weight beyond the float32 range stays finite."""
    if weight is None:
        return None
    if weight.dtype == torch.float64:
        scale = weight.abs().amax(dim=1, keepdim=True)
        weight = weight / torch.where(scale > 0, scale, torch.ones_like(scale))
    return weight.to(torch.float32).contiguous()


def _byte_range(t: Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (span + 1) * t.element_size()


def _overlaps(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    """Whether a and b may share memory (conservative: their byte spans intersect)."""
    if a is None or b is None or a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def _check_no_alias(tables: dict, **inputs: Optional[Tensor]) -> None:
    """The tables are updated in place: no input may share their memory (a view
    of a table as features would make the result depend on the update order)."""
    for tname, table in tables.items():
        for name, t in inputs.items():
            if _overlaps(t, table):
                raise ValueError(
                    f"{name} shares memory with {tname}, which is updated in place; pass a copy (e.g. {name}.clone())"
                )


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


def _em_outputs(R, d, h, w, device):
    return (
        _new((R, h, w), torch.float32, device),
        _new((R, h, w), torch.float32, device),
        _new((R, d), torch.float32, device),
        _new((R, d), torch.float32, device),
        _new((R, 2), torch.float32, device),
        _new((R,), torch.uint8, device),
        _new((R,), torch.float32, device),
    )


def _em_kernel(name: str, features, cam, weight, fg, bg, labels, K, num_iters, sigma, sigma_auto, ratio, cosine):
    """Lay out and launch one kernel backend; R = B*K rows (row r = b*K + k)."""
    B, d, h, w = features.shape
    R = B * K
    outs = _em_outputs(R, d, h, w, features.device)
    if R > 0:
        f3 = feature_view(features)
        cam2 = None if cam is None else _cam_f32(cam.reshape(R, h * w))
        v_by_label = fg is not None and labels is not None
        _kernels(name, "em").em_reactivate(f3, cam2, _weight_f32(weight), _f32c(fg), _f32c(bg), _i64c(labels), K,
                                           v_by_label, num_iters, sigma, sigma_auto, ratio, cosine, outs)
    out, z, vf, vb, mix, picked, sig = outs
    return out, z, vf, vb, mix, picked.view(torch.bool), sig


def _em_reference(features, cam, weight, fg, bg, labels, K, num_iters, sigma, sigma_auto, ratio, cosine):
    fg, bg = _f32c(fg), _f32c(bg)
    if fg is not None and labels is not None:
        fg, bg = fg[labels], bg[labels]
    r = _ref.em_reactivate(features, cam, fg, bg, num_iters, sigma, ratio, cosine, K=K, weight=_f32c(weight),
                           labels=labels, sigma_auto=sigma_auto)
    return tuple(r)


def _em_impl(features, cam, classifier_weight, fg_embedding, bg_embedding, labels, K, num_iters, sigma, sigma_auto,
             cam_threshold, cosine, backend):
    """The op's body (eager calls come here directly, see em_reactivate)."""
    if labels is not None:
        _check_label_range(labels, _rows("fg_embedding", fg_embedding), _rows("classifier_weight", classifier_weight))
    args = (features, cam, classifier_weight, fg_embedding, bg_embedding, labels, K, num_iters, sigma, sigma_auto,
            cam_threshold, cosine)
    if backend == "reference":
        return _em_reference(*args)
    return _em_kernel(backend, *args)


def _stats_kernel(name, features, labels, cam, weight, ratio):
    B, d, h, w = features.shape
    means = _new((B, 2, d), torch.float32, features.device)
    nonempty = _new((B, 2), torch.uint8, features.device)
    if B > 0:
        args = (feature_view(features), _i64c(labels), _cam_f32(None if cam is None else cam.reshape(B, h * w)), _weight_f32(weight), ratio, means, nonempty)
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
    args = (fg, bg, feature_view(features), _i64c(labels), _cam_f32(None if cam is None else cam.reshape(B, h * w)), _weight_f32(weight), ratio, momentum, means, nonempty)
    _kernels(name, "context").context_update(*args)


def _update_impl(fg, bg, features, labels, cam, classifier_weight, momentum, cam_threshold, backend) -> None:
    """The update op's body (eager calls come here directly, see em_reactivate)."""
    _check_no_alias({"fg_embedding": fg, "bg_embedding": bg}, features=features, cam=cam,
                    classifier_weight=classifier_weight, labels=labels)
    if _overlaps(fg, bg):
        raise ValueError("fg_embedding and bg_embedding must be different tensors (they share memory)")
    _check_label_range(labels, ("fg_embedding", fg.shape[0]), _rows("classifier_weight", classifier_weight))
    if backend == "reference":
        _ref.update_context_embeddings(fg, bg, features, labels, cam, classifier_weight, momentum, cam_threshold)
    else:
        _update_kernel(backend, fg, bg, features, labels, cam, classifier_weight, momentum, cam_threshold)


def _dispatch_modes() -> int:
    stack = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return 1 if stack is None else stack()  # unknown torch: always take the custom op


def _eager(*tensors: Optional[Tensor]) -> bool:
    """Whether a call can skip the custom-op dispatcher and run its body directly:
    not tracing (torch.compile / export go through the op and its fake), no
    dispatch mode active (make_fx, FakeTensorMode) and plain tensors only. Going
    straight to the body keeps torch._dynamo (seconds to import) out of eager use."""
    if torch.compiler.is_compiling() or _dispatch_modes() > 0:
        return False
    return all(t is None or type(t) is Tensor for t in tensors)


_FLAT = {"warned": False, "cuda_checked": False}
_FLAT_ADVICE = {
    False: "The temperature does not fit these features' scale: try sigma='auto' (or a sigma near the spread "
           "of (v_fg - v_bg) . f).",
    # sigma='auto' already scales the temperature to each image's logit gaps, so a flat
    # posterior means the foreground and background embeddings barely differ on these features
    True: "sigma='auto' is in use, so the temperature already follows these features' scale: the foreground and "
          "background centroids barely differ on them. Check that the features are the map the classifier pools "
          "(the CAM's layer) and that the CAM mask (cam_threshold) leaves both a foreground and a background.",
}


def _maybe_warn_flat(z: Tensor, sigma_auto: bool = False) -> None:
    """Warn once per process when every posterior of a batch lies in [0.45, 0.55].
    CPU tensors are checked on every eager call until it fires; CUDA tensors only
    on the first eager CUDA call (the check reads two numbers back, a sync), and
    never while a CUDA graph is captured. Compiled calls are not checked."""
    if _FLAT["warned"] or z.numel() == 0:
        return
    if z.is_cuda:
        if _FLAT["cuda_checked"] or torch.cuda.is_current_stream_capturing():
            return
        _FLAT["cuda_checked"] = True
    lo, hi = torch.aminmax(z)
    if float(lo) >= 0.45 and float(hi) <= 0.55:
        _FLAT["warned"] = True
        warnings.warn(
            f"em_reactivate: every foreground posterior of this batch lies within [0.45, 0.55] ({float(lo):.4f}.."
            f"{float(hi):.4f}): the EM barely separated foreground from background, and CREAM's map is then about the "
            "CAM + 0.5. " + _FLAT_ADVICE[bool(sigma_auto)] + " Shown once per process.",
            FlatPosteriorWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------- #
# Custom ops
# --------------------------------------------------------------------------- #
@torch.library.custom_op("cream_kernels::em_reactivate", mutates_args=())
def _em_op(
    features: Tensor,
    cam: Optional[Tensor],
    classifier_weight: Optional[Tensor],
    fg_embedding: Optional[Tensor],
    bg_embedding: Optional[Tensor],
    labels: Optional[Tensor],
    K: int,
    num_iters: int,
    sigma: float,
    sigma_auto: bool,
    cam_threshold: float,
    cosine: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """R = B*K rows: cam [R, h, w] or None (then classifier_weight [C, d]); labels
    int64 [R] or None; fg/bg_embedding [C, d] tables when labels are given, else
    per row [R, d], or None. Returns (out, z_fg, fg, bg, mix, picked, sigma_used), R rows."""
    return _em_impl(features, cam, classifier_weight, fg_embedding, bg_embedding, labels, K, num_iters, sigma,
                    sigma_auto, cam_threshold, cosine, backend)


@_em_op.register_fake
def _(features, cam, classifier_weight, fg_embedding, bg_embedding, labels, K, num_iters, sigma, sigma_auto,
      cam_threshold, cosine, backend):
    B, d, h, w = features.shape
    R = B * K
    new = features.new_empty
    return (
        new((R, h, w), dtype=torch.float32),
        new((R, h, w), dtype=torch.float32),
        new((R, d), dtype=torch.float32),
        new((R, d), dtype=torch.float32),
        new((R, 2), dtype=torch.float32),
        new((R,), dtype=torch.bool),
        new((R,), dtype=torch.float32),
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
    _update_impl(fg_embedding, bg_embedding, features, labels, cam, classifier_weight, momentum, cam_threshold, backend)


@_update_op.register_fake
def _(fg_embedding, bg_embedding, features, labels, cam, classifier_weight, momentum, cam_threshold, backend):
    return None


# --------------------------------------------------------------------------- #
# Public functions
# --------------------------------------------------------------------------- #
EMResult = _ref.EMResult  # one definition, shared with the oracle


def _check_classifier_weight(weight, d: int) -> Tensor:
    weight = _need_tensor("classifier_weight", weight)
    _check_float("classifier_weight", weight)
    if weight.dim() != 2 or weight.shape[1] != d or weight.shape[0] < 1:
        raise ValueError(f"classifier_weight must have shape [C, d] = [C, {d}]; got {_desc(weight)}")
    return weight


def _check_em_embeddings(fg, bg, labels, features: Tensor, K: int, k_form: bool):
    """Tables [C, d] when labels are given; else per image [B, d] (K = 1) or
    [B, K, d]. Returns them as [C, d] tables or [B*K, d] rows."""
    if (fg is None) != (bg is None):
        raise ValueError("fg_embedding and bg_embedding must both be given, or both be None (training-free mode)")
    if fg is None:
        return None, None
    B, d = features.shape[:2]
    for name, e in (("fg_embedding", fg), ("bg_embedding", bg)):
        _need_tensor(name, e)
        _check_float(name, e)
    if fg.shape != bg.shape:
        raise ValueError(f"fg_embedding and bg_embedding must have the same shape; got fg_embedding {_desc(fg)} "
                         f"and bg_embedding {_desc(bg)}")
    if labels is not None:
        if fg.dim() != 2 or fg.shape[1] != d:
            raise ValueError(f"fg_embedding must have shape [C, d] = [C, {d}] (a table indexed by labels) to match "
                             f"features {_desc(features)}; got {_desc(fg)}")
        return fg, bg
    per_image = [f"[B, d] = [{B}, {d}]"] if K == 1 else []
    if k_form:
        per_image.append(f"[B, K, d] = [{B}, {K}, {d}]")
    ok = (K == 1 and tuple(fg.shape) == (B, d)) or (k_form and tuple(fg.shape) == (B, K, d))
    if not ok:
        raise ValueError(
            f"fg_embedding without labels must be per image, shape {' or '.join(per_image)}, to match features "
            f"{_desc(features)}; got {_desc(fg)} (pass labels to index a [C, d] table)"
        )
    return fg.reshape(B * K, d), bg.reshape(B * K, d)


def em_reactivate(
    features: Tensor,
    cam: Optional[Tensor] = None,
    fg_embedding: Optional[Tensor] = None,
    bg_embedding: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    *,
    classifier_weight: Optional[Tensor] = None,
    num_iters: int = 2,
    sigma: Union[float, str] = 8.0,
    cam_threshold: float = 0.2,
    similarity: str = "dot",
    return_extras: bool = False,
    backend: Optional[str] = None,
):
    """CREAM's inference-time EM re-activation (SPEC.md Op 2, Eqs. 5-12, and its
    issue-12 extensions).

    Args:
        features: [B, d, h, w] float32/float16/bfloat16 (float64 on the cpu and
            reference backends): the feature map the CAM is taken from. Any
            strides; NCHW and channels_last are read in place.
        cam: [B, h, w] raw CAM of the target class (ground truth for GT-known,
            the predicted class for top-1), or [B, K, h, w] for K classes per
            image; None when ``classifier_weight`` is given (exactly one of the two).
        fg_embedding, bg_embedding: initial centroids, either [C, d] tables
            indexed by ``labels``, or (no labels) per image [B, d] / [B, K, d].
            Both None: training-free mode, starting from each row's own
            CAM-masked fg/bg feature means.
        labels: integer [B] (one class per image) or [B, K] (K classes per
            image), indexing the tables and/or ``classifier_weight``.
        classifier_weight: [C, d] linear classifier weight; the CAM of (image b,
            class labels[b, k]) is then ``W[labels[b, k]] . f_i``, computed inside
            the kernel (raw features, no bias: the mask and the normalised CAM
            are shift-invariant). Needs ``labels``.
        num_iters: T >= 1 E-steps (and T-1 M-steps).
        sigma: temperature > 0 dividing the similarities, or "auto": per image
            and class, sigma = s / 2 with s the population standard deviation over
            the image's pixels of the initial logit gap Delta_i = (v_fg - v_bg) . f_i
            (centroids and features as the first E-step sees them, normalised in
            cosine mode), so one standard deviation of the gap spans 2 logits and
            scaling the features leaves Z unchanged. Where s <= 1e-6 * max |Delta|
            (no spread) the similarity term is dropped: Z = a, sigma_used = inf.
        cam_threshold: r in [0, 1] of the CAM foreground mask.
        similarity: "dot" (default) or "cosine".
        return_extras: also return z_fg, final centroids, mixing weights, the
            calibration branch and the sigma used, as an :class:`EMResult`.
        backend: None/"auto", "cuda", "triton", "cpu" or "reference"
            (default from ``CREAM_KERNELS_BACKEND``).

    Returns:
        float32 [B, h, w] in [0, 2] ([B, K, h, w] when labels are [B, K] or cam
        is [B, K, h, w]), or an :class:`EMResult` whose fields carry the same
        leading axes.

    Shapes: ``cam`` [B, 1, h, w] is the K = 1 case of [B, K, h, w] (the result is
    then [B, 1, h, w]); a single image may come without the batch axis
    (features [d, h, w], cam [h, w] or [K, h, w], labels 0-d or [K], per-image
    centroids [d] or [K, d]), and the result drops it too.

    No gradient: the op is not differentiable. Inputs that require grad are
    read as if detached, and the result never has a ``grad_fn`` (take the
    gradient of the CAM or the features elsewhere; CREAM is inference-time).

    A batch whose posteriors z_fg all lie within [0.45, 0.55] (the temperature
    does not fit the features' scale: CREAM then adds ~0.5 to the CAM) raises a
    :class:`FlatPosteriorWarning`, once per process (eager calls; CUDA tensors
    are checked on the first call only, since the check reads back two numbers).

    Labels of any integer dtype are accepted (converted to int64 exactly). Their
    range is checked on the host: on CUDA that is one device-to-host sync per
    call; ``CREAM_KERNELS_LABEL_CHECK=device`` (and CUDA graph capture) checks
    on the device instead, without a sync, as a device-side assert.

    The K rows of an image are independent Op 2 runs: the result equals K
    separate calls. What each backend does with them:
        reference  repeats the image's features K times (float64, clarity first)
        cpu        one thread per image runs its K rows together, reading each
                   feature row once per pass for all K classes
        triton     d <= 64: a program's rows share one read; larger d: one
                   program per row, an image's programs adjacent (L2 reuse)
        cuda       one CTA per row, an image's CTAs adjacent (L2 reuse)
    """
    unbatched = isinstance(features, Tensor) and features.dim() == 3
    if unbatched:
        features, cam, fg_embedding, bg_embedding, labels = _add_batch_axis(features, cam, fg_embedding, bg_embedding, labels)
    features = _check_features(features)
    B, d, h, w = features.shape
    if (cam is None) == (classifier_weight is None):
        raise ValueError("give exactly one of cam ([B, h, w] or [B, K, h, w]) or classifier_weight ([C, d])")
    if labels is not None:
        labels = _check_labels(labels, B, k_form=True)
    if cam is not None:
        cam = _check_cam(cam, features, k_form=True)
    k_form = (labels is not None and labels.dim() == 2) or (cam is not None and cam.dim() == 4)
    K = labels.shape[1] if labels is not None and labels.dim() == 2 else (cam.shape[1] if cam is not None and cam.dim() == 4 else 1)
    if cam is not None and cam.dim() == 4 and cam.shape[1] != K:
        raise ValueError(f"cam [B, K, h, w] must have K = {K} to match labels {_desc(labels)}; got {_desc(cam)}")
    if labels is not None and labels.dim() == 1 and K != 1:
        raise ValueError(f"labels must have shape [B, K] = [{B}, {K}] to match cam {_desc(cam)}; got {_desc(labels)}")
    if cam is not None and cam.dim() == 3 and K != 1:
        raise ValueError(f"cam must have shape [B, K, h, w] = [{B}, {K}, {h}, {w}] to match labels {_desc(labels)}; "
                         f"got {_desc(cam)}")
    if classifier_weight is not None:
        classifier_weight = _check_classifier_weight(classifier_weight, d)
        if labels is None:
            raise ValueError("classifier_weight needs labels ([B] or [B, K]): the class whose CAM each row computes")
    if labels is not None and fg_embedding is None and classifier_weight is None:
        raise ValueError("labels select rows of the embedding tables or of classifier_weight; they need "
                         "fg_embedding/bg_embedding or classifier_weight")
    fg, bg = _check_em_embeddings(fg_embedding, bg_embedding, labels, features, K, k_form)
    _check_device(features, cam=cam, fg_embedding=fg, bg_embedding=bg, labels=labels, classifier_weight=classifier_weight)
    if isinstance(num_iters, bool) or not isinstance(num_iters, int):
        raise TypeError(f"num_iters must be an int, got {type(num_iters).__name__}")
    if not 1 <= num_iters <= MAX_NUM_ITERS:
        raise ValueError(f"num_iters must be in [1, {MAX_NUM_ITERS}] (MAX_NUM_ITERS), got {num_iters}")
    sigma_auto = isinstance(sigma, str)
    if sigma_auto:
        if sigma != "auto":
            raise ValueError(f"sigma must be a positive number or 'auto', got {sigma!r}")
        sigma = 1.0  # ignored by every backend when sigma_auto (a safe value for any 1/sigma a launcher computes)
    else:
        sigma = _check_number("sigma", sigma, SIGMA_MIN, SIGMA_MAX,
                              why=" (a normal float32: the kernels hold sigma and 1/sigma in float32) or 'auto'")
    cam_threshold = _check_number("cam_threshold", cam_threshold, 0.0, 1.0)
    if similarity not in ("dot", "cosine"):
        raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
    name = resolve_backend(backend, features.device, features.dtype)

    # No gradient: the op is not differentiable; inputs are detached so the
    # result never carries a grad_fn whose backward would fail.
    R = B * K
    args = (
        features.detach(),
        None if cam is None else cam.detach().reshape(R, h, w),
        None if classifier_weight is None else classifier_weight.detach(),
        None if fg is None else fg.detach(),
        None if bg is None else bg.detach(),
        None if labels is None else labels.detach().reshape(R).to(torch.int64),
        K, num_iters, sigma, sigma_auto, cam_threshold, similarity == "cosine", name,
    )
    if _eager(*args[:6]):
        res = _em_impl(*args)
        _maybe_warn_flat(res[1], sigma_auto)
    else:
        res = torch.ops.cream_kernels.em_reactivate(*args)
    lead = (B, K) if k_form else (B,)
    out, z, vf, vb, mix, picked, sig = res
    shapes = (lead + (h, w), lead + (h, w), lead + (d,), lead + (d,), lead + (2,), lead, lead)
    res = [t.reshape(sh) for t, sh in zip(res, shapes)]
    if unbatched:
        res = [t[0] for t in res]
    return EMResult(*res) if return_extras else res[0]


def _add_batch_axis(features: Tensor, cam, fg, bg, labels):
    """A single image without the batch axis: features [d, h, w], cam [h, w]
    (or [K, h, w]), labels a 0-d tensor (or [K]), per-image centroids [d] (or
    [K, d]) when there are no labels. Anything else is ambiguous: the error
    shows the expected shapes."""
    d, h, w = features.shape
    where = f"with unbatched features [d, h, w] (got {_desc(features)}; batched calls take [B, d, h, w])"
    if cam is not None:
        cam = _need_tensor("cam", cam)
        if cam.dim() not in (2, 3) or tuple(cam.shape[-2:]) != (h, w):
            raise ValueError(f"cam must have shape [h, w] = [{h}, {w}] or [K, h, w] = [K, {h}, {w}] {where}; got {_desc(cam)}")
        cam = cam.unsqueeze(0)
    if labels is not None:
        labels = _need_tensor("labels", labels)
        if labels.dim() > 1:
            raise ValueError(f"labels must be a 0-d tensor (one class) or [K] (K classes) {where}; got {_desc(labels)}")
        labels = labels.unsqueeze(0)
    elif fg is not None:
        for name, e in (("fg_embedding", fg), ("bg_embedding", bg)):
            if isinstance(e, Tensor) and e.dim() not in (1, 2):
                raise ValueError(f"{name} without labels must be per image, [d] = [{d}] or [K, d] = [K, {d}], {where}; "
                                 f"got {_desc(e)}")
        fg = fg.unsqueeze(0) if isinstance(fg, Tensor) else fg
        bg = bg.unsqueeze(0) if isinstance(bg, Tensor) else bg
    return features.unsqueeze(0), cam, fg, bg, labels


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
        raise ValueError(f"fg_embedding and bg_embedding must have the same shape; got fg_embedding "
                         f"{_desc(fg_embedding)} and bg_embedding {_desc(bg_embedding)}")
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
        classifier_weight = _check_classifier_weight(classifier_weight, d)
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
    kernel) is given. No gradient: features are read as if detached and the
    tables change in place outside autograd. No input may share memory with the
    tables (ValueError).
    """
    features, labels, cam, classifier_weight, cam_threshold = _check_stats_inputs(
        features, labels, cam, classifier_weight, cam_threshold
    )
    _check_tables(fg_embedding, bg_embedding, features.shape[1], features)
    _check_device(features, fg_embedding=fg_embedding, bg_embedding=bg_embedding)
    momentum = _check_number("momentum", momentum, 0.0, 1.0)
    name = resolve_backend(backend, features.device, features.dtype)
    args = (fg_embedding, bg_embedding, features.detach(), labels.to(torch.int64), None if cam is None else cam.detach(),
            None if classifier_weight is None else classifier_weight.detach(), momentum, cam_threshold, name)
    if _eager(*args[:6]):
        _update_impl(*args)
    else:
        torch.ops.cream_kernels.update_context_embeddings(*args)


# Two halves of the update, for the distributed path of ContextEmbeddings:
# every rank computes its samples' statistics, gathers them, and applies the
# whole global batch in rank order.
def context_stats(features, labels, *, cam=None, classifier_weight=None, cam_threshold=0.2, num_classes: int, backend=None):
    """Per-sample masked means ([B, 2, d] float32) and non-empty flags ([B, 2] bool)."""
    features, labels, cam, classifier_weight, cam_threshold = _check_stats_inputs(
        features, labels, cam, classifier_weight, cam_threshold
    )
    labels = labels.to(torch.int64)
    _check_label_range(labels, ("the tables", num_classes), _rows("classifier_weight", classifier_weight))
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
    labels = _check_labels(labels, means.shape[0]).to(torch.int64)
    _check_no_alias({"fg_embedding": fg_embedding, "bg_embedding": bg_embedding}, means=means, nonempty=nonempty,
                    labels=labels)
    _check_label_range(labels, ("fg_embedding", fg_embedding.shape[0]))
    name = resolve_backend(backend, means.device, torch.float32)
    if name == "reference":
        _ref.context_apply(fg_embedding, bg_embedding, means, nonempty.to(torch.bool), labels, momentum)
    else:
        _apply_kernel(name, fg_embedding, bg_embedding, means, nonempty, labels, momentum)
