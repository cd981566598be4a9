"""EM re-activation (SPEC.md Op 2) as one Triton kernel launch per call.

Design
------
Grid ``(B,)``: one program per image, which owns everything about that image
(its CAM statistics, both centroids, the mixing weights, the calibration), so
nothing crosses programs and there is no host round trip, no ``.item()`` and
no per-image Python loop.

Inside a program, every loop over the features walks pixel tiles of the
image's [d, N] matrix; a tile holds *all* d channels of BLOCK_N pixels
(``_common.feature_blocks``). With the whole channel axis in registers the
logit of a pixel (a dot product over d) is complete inside the tile, so the
posterior it gives weights the same registers for the M-step sums at once:

    pass over the CAM row        lo, hi, threshold                (N floats)
    [training-free] 1 pass on F  CAM-masked fg/bg means -> v_fg, v_bg
    T-1 passes on F              E-step + M-step fused: logits, Z, sum Z,
                                 sum Z f (and ||f_i|| in cosine mode, from the
                                 same tile, so normalised features are never
                                 stored)
    1 pass on F                  last E-step: Z_fg -> z_fg output, Z_bg ->
                                 ``out`` (staging), calibration sums over the
                                 CAM-fg pixels
    pass over the N outputs      out = (picked ? Z_fg : Z_bg) + normalised CAM

So F is read T times (T+1 training-free), the minimum for T E-steps. Only
w = (v_fg - v_bg)/sigma and the two M-step sums are [BLOCK_D] vectors live
during a pass; the centroids themselves wait in the fg_out/bg_out outputs
between M-steps (re-read once per iteration, d floats), because in NCHW each
[BLOCK_D] vector is replicated over the threads that share a pixel row and
registers are the limit. A scalar pair carries (a_fg, a_bg). All arithmetic
is float32 whatever the feature dtype.

Block sizes (``_common.feature_blocks``): BLOCK_D = next_pow2(d), 16 warps
for the benchmark shapes. channels_last: BLOCK_N = 16384 / BLOCK_D (d=1024
-> 16 pixels, d=2048 -> 8), each pixel a contiguous 4-8 KiB run. NCHW: one
16-byte vector per channel row and thread (d=2048 fp32: 4 pixels, bf16: 8;
d=1024: 8 pixels, two threads per row), the vector width proven from the row
alignment (14x14 rows are 16-byte aligned though 196 is no multiple of 16).
ptxas for sm_90 reports 98-128 registers and no spills (<= 16 bytes in two
cosine variants) for d in {1024, 2048} x {14x14, 28x28} x {fp32, bf16} x
{NCHW, channels_last}. num_stages=1: nothing to software-pipeline (no
tl.dot) and a tile's loads (32-64 KiB in flight per program) already cover
an SM's share of HBM bandwidth once B >= #SMs.

One program per image leaves SMs idle when B < #SMs (batch 1 uses one SM).
The alternative (split each image's pixels over several programs and reduce
the M-step sums across them) needs a grid-wide sync per EM iteration or one
launch per iteration; it is the thing to measure against this kernel at
batch 1 on a GPU. triton.autotune is not used: under TRITON_INTERPRET=1 it
would run every config on CPU (slow CI), and the choice above is set by the
register budget, checked with ptxas, rather than by timing.

Very large d (beyond ~8192) still computes correctly but the resident
d-vectors spill registers; SPEC.md's shapes are all d <= 2048.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    channel_mask, feature_blocks, image_base, inv_norm, line_block, load_tile, row_min_max, sample_stats,
    sigmoid_pair,
)


@triton.jit
def _log_ratio(a_fg, a_bg):
    """log a_fg - log a_bg (common.h logit_bias); log 0 = -inf (NaN stays NaN),
    spelt out so the interpreter's numpy does not warn about it."""
    lf = tl.where(a_fg == 0, float("-inf"), tl.log(tl.where(a_fg == 0, 1.0, a_fg)))
    lb = tl.where(a_bg == 0, float("-inf"), tl.log(tl.where(a_bg == 0, 1.0, a_bg)))
    return lf - lb


@triton.jit
def _logit_weight(fgout, bgout, dmask, inv_sigma):
    """w = (v_fg - v_bg) / sigma (common.h logit_weight), from the stored centroids."""
    vf = tl.load(fgout, mask=dmask, other=0.0)
    vb = tl.load(bgout, mask=dmask, other=0.0)
    return (vf - vb) * inv_sigma


@triton.jit
def _tile_logits(f, w, bias, COSINE: tl.constexpr, BLOCK_N: tl.constexpr):
    """E-step logits of a tile: bias + g_i * (w . f_i), and g_i (1/||f_i|| for cosine, else 1)."""
    x = tl.sum(f * w[:, None], axis=0)
    if COSINE:
        g = inv_norm(tl.sum(f * f, axis=0))
        return bias + g * x, g
    else:
        return bias + x, tl.full([BLOCK_N], 1.0, tl.float32)


@triton.jit
def _em_kernel(
    F, stride_b, stride_d, stride_n,
    CAM, VFG, VBG, LABELS,
    OUT, ZOUT, FGOUT, BGOUT, MIX, PICKED,
    d, N, T, inv_sigma, ratio,
    HAS_V: tl.constexpr, HAS_LABELS: tl.constexpr, COSINE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    VEC_D: tl.constexpr, VEC_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    fb = image_base(F, b, stride_b, VEC_D * VEC_N)
    cam = CAM + b * N
    out = OUT + b * N
    zout = ZOUT + b * N

    # CAM statistics: lo, hi and the foreground threshold (SPEC.md helper).
    lo, hi = row_min_max(cam, N, BLOCK_P)
    thr = ratio * (hi - lo)

    offs_d = tl.arange(0, BLOCK_D)
    dmask = channel_mask(offs_d, d, VEC_D)

    # Initial centroids.
    if HAS_V:
        if HAS_LABELS:
            row = tl.load(LABELS + b)
        else:
            row = b
        vf = tl.load(VFG + row * d + offs_d, mask=dmask, other=0.0)
        vb = tl.load(VBG + row * d + offs_d, mask=dmask, other=0.0)
    else:  # training-free: CAM-masked means of the raw features (0 for an empty mask)
        vf, vb, c_fg, c_bg = sample_stats(fb, stride_d, stride_n, cam, cam, 0, d, N, ratio, offs_d, dmask,
                                          False, BLOCK_D, BLOCK_N, BLOCK_P, VEC_D, VEC_N)
    if COSINE:
        vf = vf * inv_norm(tl.sum(vf * vf, axis=0))
        vb = vb * inv_norm(tl.sum(vb * vb, axis=0))
    # The centroids live in the fg/bg outputs between M-steps, not in registers:
    # in NCHW the d-vectors are replicated across the threads of a pixel row,
    # and only w and the two sums need to be live during a pass.
    fgout = FGOUT + b * d + offs_d
    bgout = BGOUT + b * d + offs_d
    tl.store(fgout, vf, mask=dmask)
    tl.store(bgout, vb, mask=dmask)

    a_fg = tl.full([], 0.5, tl.float32)
    a_bg = tl.full([], 0.5, tl.float32)

    # T-1 iterations of (E-step + M-step), one pass over F each.
    for t in range(T - 1):
        tl.debug_barrier()  # the centroids were stored by other replicas of this program
        w = _logit_weight(fgout, bgout, dmask, inv_sigma)
        bias = _log_ratio(a_fg, a_bg)
        s1 = tl.zeros([BLOCK_D], tl.float32)
        s2 = tl.zeros([BLOCK_D], tl.float32)
        mass_f = tl.zeros([BLOCK_N], tl.float32)
        mass_b = tl.zeros([BLOCK_N], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            f, offs_n, nmask = load_tile(fb, stride_d, stride_n, offs_d, dmask, n0, N, BLOCK_N, VEC_D, VEC_N)
            logit, g = _tile_logits(f, w, bias, COSINE, BLOCK_N)
            zf, zb = sigmoid_pair(logit)
            zf = tl.where(nmask, zf, 0.0)
            zb = tl.where(nmask, zb, 0.0)
            mass_f += zf
            mass_b += zb
            if COSINE:  # M-step on the normalised features g_i * f_i
                zf = zf * g
                zb = zb * g
            s1 += tl.sum(f * zf[None, :], axis=1)
            s2 += tl.sum(f * zb[None, :], axis=1)
        mf = tl.sum(mass_f, axis=0)
        mb = tl.sum(mass_b, axis=0)
        vf = tl.load(fgout, mask=dmask, other=0.0)
        vb = tl.load(bgout, mask=dmask, other=0.0)
        vf = tl.where(mf > 0, s1 / tl.where(mf > 0, mf, 1.0), vf)  # mass 0 keeps v
        vb = tl.where(mb > 0, s2 / tl.where(mb > 0, mb, 1.0), vb)
        if COSINE:
            vf = vf * inv_norm(tl.sum(vf * vf, axis=0))
            vb = vb * inv_norm(tl.sum(vb * vb, axis=0))
        tl.debug_barrier()  # every replica has read the old centroids
        tl.store(fgout, vf, mask=dmask)
        tl.store(bgout, vb, mask=dmask)
        a_fg = mf / N
        a_bg = mb / N

    # Last E-step, with the calibration sums over CAM-foreground pixels.
    tl.debug_barrier()
    w = _logit_weight(fgout, bgout, dmask, inv_sigma)
    bias = _log_ratio(a_fg, a_bg)
    cal_f = tl.zeros([BLOCK_N], tl.float32)
    cal_b = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        f, offs_n, nmask = load_tile(fb, stride_d, stride_n, offs_d, dmask, n0, N, BLOCK_N, VEC_D, VEC_N)
        logit, g = _tile_logits(f, w, bias, COSINE, BLOCK_N)
        zf, zb = sigmoid_pair(logit)
        m = tl.load(cam + offs_n, mask=nmask, other=0.0)
        fg = ((m - lo) >= thr) & nmask
        cal_f += tl.where(fg, zf, 0.0)
        cal_b += tl.where(fg, zb, 0.0)
        tl.store(zout + offs_n, zf, mask=nmask)
        tl.store(out + offs_n, zb, mask=nmask)  # staged; the pass below finishes it
    picked = tl.sum(cal_f, axis=0) >= tl.sum(cal_b, axis=0)  # ties pick Z_fg

    # Eq. 12. Other threads of this program wrote the staged values.
    tl.debug_barrier()
    rng = hi - lo
    safe = tl.where(rng > 0, rng, 1.0)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = offs < N
        m = tl.load(cam + offs, mask=pm, other=0.0)
        zf = tl.load(zout + offs, mask=pm, other=0.0)
        zb = tl.load(out + offs, mask=pm, other=0.0)
        cn = tl.where(rng > 0, (m - lo) / safe, 0.0)
        tl.store(out + offs, tl.where(picked, zf, zb) + cn, mask=pm)

    tl.store(MIX + 2 * b, a_fg)
    tl.store(MIX + 2 * b + 1, a_bg)
    tl.store(PICKED + b, picked.to(tl.uint8))


def em_reactivate(f3, cam, v_fg, v_bg, labels, num_iters, sigma, ratio, cosine, outputs) -> None:
    """Launch the fused EM kernel (inputs validated and laid out by ops.py).

    f3: [B, d, N] features with unit stride over N or over d; cam: float32
    [B, N] contiguous; v_fg/v_bg: float32 [rows, d] contiguous or both None;
    labels: int64 [B] or None; outputs: (out [B,h,w], z_fg [B,h,w], fg [B,d],
    bg [B,d], mix [B,2], picked uint8 [B]), every element written."""
    out, z, fg_out, bg_out, mix, picked = outputs
    B, d, N = f3.shape
    if B == 0:
        return
    has_v = v_fg is not None
    dummy = cam  # stands in for absent pointers; never read (constexpr-guarded)
    with _device_of(f3):
        _em_kernel[(B,)](
            f3, f3.stride(0), f3.stride(1), f3.stride(2),
            cam, v_fg if has_v else dummy, v_bg if has_v else dummy, labels if labels is not None else dummy,
            out, z, fg_out, bg_out, mix, picked,
            d, N, int(num_iters), 1.0 / float(sigma), float(ratio),
            HAS_V=has_v, HAS_LABELS=labels is not None, COSINE=bool(cosine),
            BLOCK_P=line_block(N), num_stages=1, **feature_blocks(f3),
        )


def _device_of(t: torch.Tensor):
    """Launch on the tensor's device (Triton uses the current device's stream)."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
