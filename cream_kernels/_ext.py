"""The thin bridge to the compiled module ``cream_kernels._C``.

The module never sees a torch type: this file hands it data pointers, sizes,
element strides, a dtype code and, for CUDA, the caller's current device and
stream. Inputs arrive validated and laid out by ``ops.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    from . import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the install
    import os
    import warnings

    _C = None
    _here = os.path.dirname(os.path.abspath(__file__))
    IMPORT_ERROR = (
        f"the compiled module cream_kernels._C is not importable from {_here} ({exc}). If that is a source "
        "checkout, build it in place with `pip install -e .` (or run from another directory so the installed "
        "package is imported); otherwise reinstall with `pip install --force-reinstall --no-deps cream_kernels`"
    )
    warnings.warn(IMPORT_ERROR + ". Only the reference (and Triton) backends can run.", RuntimeWarning, stacklevel=2)

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def available() -> bool:
    return _C is not None


def with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _feature_view(view, f3: Tensor) -> None:
    """Fill a _C.FeatureView from a [B, d, N] view of the features."""
    view.data = f3.data_ptr()
    view.dtype = DTYPE_CODES[f3.dtype]
    view.B, view.d, view.N = f3.shape
    view.stride_b, view.stride_d, view.stride_n = f3.stride()


def _launch(name: str, params, device: torch.device) -> None:
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device).cuda_stream
        getattr(_C, name + "_cuda")(params, device.index if device.index is not None else torch.cuda.current_device(), stream)
    else:
        getattr(_C, name + "_cpu")(params)


def em_reactivate(f3, cam, weight, v_fg, v_bg, labels, K, v_by_label, num_iters, sigma, sigma_auto, ratio, cosine,
                  outputs) -> None:
    """The backend contract (HELPERS/SPEC, same as cream_kernels.triton.em):
    f3 [B, d, N] (unit stride over N or d); cam float32 [B*K, N] or None (then
    weight float32 [C, d]); v_fg/v_bg float32 [C, d] tables (v_by_label) or
    [B*K, d] rows, or both None; labels int64 [B*K] or None; outputs (out, z_fg,
    fg_out, bg_out, mix, picked_u8, sigma_used), B*K rows, all written here."""
    p = _C.EMParams()
    _feature_view(p.f, f3)
    p.K = int(K)
    p.cam, p.weight = _ptr(cam), _ptr(weight)
    p.v_fg, p.v_bg, p.labels = _ptr(v_fg), _ptr(v_bg), _ptr(labels)
    p.v_by_label = bool(v_by_label)
    p.num_iters, p.sigma, p.sigma_auto = int(num_iters), float(sigma), bool(sigma_auto)
    p.ratio, p.cosine = float(ratio), bool(cosine)
    out, z, fg_out, bg_out, mix, picked, sigma_used = outputs
    p.out, p.z_fg, p.fg_out, p.bg_out, p.mix, p.picked_fg, p.sigma_used = map(
        _ptr, (out, z, fg_out, bg_out, mix, picked, sigma_used)
    )
    _launch("em_reactivate", p, f3.device)


def _context_params(f3, labels, cam, weight, ratio, means, nonempty, fg, bg, momentum):
    p = _C.ContextParams()
    _feature_view(p.f, f3)
    p.labels, p.cam, p.weight = _ptr(labels), _ptr(cam), _ptr(weight)
    p.ratio = float(ratio)
    p.means, p.nonempty = _ptr(means), _ptr(nonempty)
    p.fg_table, p.bg_table = _ptr(fg), _ptr(bg)
    p.C = 0 if fg is None else fg.shape[0]
    p.momentum = float(momentum)
    return p


def context_stats(f3, labels, cam, weight, ratio, means, nonempty) -> None:
    p = _context_params(f3, labels, cam, weight, ratio, means, nonempty, None, None, 0.0)
    _launch("context_stats", p, f3.device)


def context_apply(fg, bg, means, nonempty, labels, momentum) -> None:
    """means [B, 2, d], nonempty uint8 [B, 2], labels int64 [B]; tables [C, d]."""
    p = _C.ContextParams()
    p.f.B, p.f.d = means.shape[0], means.shape[2]
    p.labels, p.means, p.nonempty = _ptr(labels), _ptr(means), _ptr(nonempty)
    p.fg_table, p.bg_table = _ptr(fg), _ptr(bg)
    p.C, p.momentum = fg.shape[0], float(momentum)
    _launch("context_apply", p, means.device)


def context_update(fg, bg, f3, labels, cam, weight, ratio, momentum, means, nonempty) -> None:
    p = _context_params(f3, labels, cam, weight, ratio, means, nonempty, fg, bg, momentum)
    _launch("context_update", p, f3.device)


def build_info() -> str:
    return "" if _C is None else str(_C.build_info)


def cuda_em_variant() -> Optional[dict]:
    """The CUDA EM variant that ``CREAM_KERNELS_CUDA_VARIANT`` asks for (read at
    every call, as the dispatch reads it): ``{"variant": "generic" | "cluster",
    "why": ..., "cluster_verified_on_hardware": bool}``. ``auto`` (or unset) is
    generic until a device run has verified the cluster kernel; ``cluster`` opts
    in (it still runs only where its plan fits: :func:`cuda_em_plan`). A bad value
    raises ValueError. None when the compiled module is missing or too old."""
    if _C is None or not hasattr(_C, "cuda_em_variant"):
        return None
    return dict(_C.cuda_em_variant())


def cuda_em_plan(B, d, N, dtype, channels_last=False, K=1, *, num_iters=2, trainfree=False, cosine=False,
                 weight=False, sigma_auto=False, device=None):
    """What the CUDA EM dispatch runs for features [B, d, h*w = N] of `dtype` (a
    torch dtype or its code) with K rows per image: a dict with ``variant``
    ("cluster" or "generic"), ``why`` (the reason for generic), ``rule``, CTAs per
    image, shared memory per CTA, clusters resident at once, the slice rows kept
    in shared memory, the grid and the generic pixel tile. Needs a CUDA build and
    a device; None when the build has no CUDA. The variant follows
    ``CREAM_KERNELS_CUDA_VARIANT`` (:func:`cuda_em_variant`): under ``auto``
    it is generic, with that as the reason."""
    if not with_cuda() or not hasattr(_C, "cuda_em_plan"):
        return None
    code = DTYPE_CODES[dtype] if isinstance(dtype, torch.dtype) else int(dtype)
    if device is None:
        device = torch.cuda.current_device()
    elif not isinstance(device, int):
        device = torch.device(device).index or 0
    return dict(_C.cuda_em_plan(int(B), int(d), int(N), code, bool(channels_last), int(K), int(num_iters),
                                bool(trainfree), bool(cosine), bool(weight), bool(sigma_auto), int(device)))
