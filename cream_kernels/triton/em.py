"""EM re-activation (SPEC.md Op 2 and its issue-12 extensions) as one Triton
kernel launch per call.

Design
------
Rows: r = b*K + k is image b re-activating class k of its K classes (the
backend contract, csrc/kernels.h EMParams). Grid ``(ceil(K / KB), B)``:
program (g, b) owns rows b*K + g*KB ... + KB-1 of image b, KB =
min(next_pow2(K), KB_MAX = 4) for d <= 64 and 1 above, and everything about
them (CAM statistics, centroids, mixing weights, sigma, calibration), so nothing crosses programs: no host round
trip, no ``.item()``, no per-image Python loop, deterministic.

Every pass over the features walks pixel tiles of the image's [d, N] matrix;
a tile holds *all* d channels of BLOCK_N pixels (``_common.feature_blocks``),
so the dot products of a pixel with the KB rows' vectors (logits [KB,
BLOCK_N], the in-kernel CAM) are complete inside the tile, and the posteriors
they give weight the same registers at once for the KB rows' M-step sums
([KB, BLOCK_D] each). **One pass reads the tile once for all KB rows**; K <= 4
classes (top-1..top-4) are therefore read once per pass, K = 5..8 by two
programs of the same image (each reading it once per pass, concurrently, so
the second read mostly hits L2). That is for d <= 64; above it KB = 1 (the
K-row products cost too many registers: figures below), so each class is its
own program and reads the image itself, the K programs of an image running
side by side. Passes over F per row and call (T = num_iters):

    given CAM, tables/per-row centroids     T          (E+M fused; last E-step)
    + training-free init                    T + 1      (CAM-masked means)
    classifier weight W, tables             T          (the CAM W[y].f_i rides
                                                        on the first E-step pass)
    W, training-free                        T + 2      (CAM pass: lo/hi are needed
                                                        before the masked means)
    sigma = "auto"                          +1         (the gaps of the initial
                                                        centroids; with W and tables
                                                        the CAM rides on it)

plus sweeps over N floats per row (CAM min/max when given, the two auto-sigma
statistics, calibration, Eq. 12) that read the staged rows, not F. Staging:
the last E-step stores its logits in ``z_fg`` (and the in-kernel CAM is stored
in ``out``), then the calibration sweep and the Eq. 12 sweep turn them into
Z_fg and the output in place; the logit gaps for sigma = "auto" are staged
in ``z_fg`` too. The centroids wait in the fg/bg outputs between M-steps
(re-read once per iteration, d floats per row): in NCHW each [BLOCK_D]
vector is replicated over the threads that share a pixel row. All arithmetic
is float32 whatever the feature dtype.

sigma = "auto" (SPEC.md "Op 2 extensions"): Delta_i = (v_fg - v_bg) . f_i
with the initial centroids and the features as the E-step sees them
(normalised in cosine mode), staged per pixel; then mu = mean Delta,
s = sqrt(mean (Delta - mu)^2) (two sweeps: no cancellation),
sigma = s / 2; s <= 1e-6 * max |Delta| drops the similarity term (1/sigma = 0,
so Z = a) and reports sigma = +inf. ``sigma_used`` gets the sigma of every row.

Block sizes (``_common.feature_blocks``, issue 11): sized by registers and
bytes, not by a fixed element count. BLOCK_D = next_pow2(d); BLOCK_N the
largest power of 2 with the tile at <= 32 float32 registers per thread and
the 3 x KB row vectors at <= 48, and in NCHW at least one whole 16-byte
vector per channel row (the old fixed 8192-element NCHW tile gave bf16
d=2048 4 pixels = 8-byte loads; now 8 pixels = 16 bytes). Pipelining: the
next tile's loads are issued into registers before the current tile is
reduced (PREFETCH; Triton 3.9's num_stages pipeliner only stages loads that
feed tl.dot, and gave identical PTX with num_stages=3: no cp.async).

Compile-time figures (sm_90a, Triton 3.9, the ptxas Triton uses, -v, via
``scripts/triton_sm90.py``; no GPU here, so no timings). d=2048, 28x28,
tables, dot, K=1, 16 warps; "load" is the feature tile's per-thread run
(TTGIR sizePerThread along the unit-stride axis; PTX ld.global.v4 present):

    before (f4f3515..6574a19)        regs  spills  BLOCK_N  feature load
      fp32 NCHW / CL                 98 / 118   0 / 0    4 / 8   16 B / 16 B
      bf16 NCHW / CL                 98 / 128   0 / 0    4 / 8    8 B / 16 B
    after (this file)
      fp32 NCHW / CL (no prefetch)   124 / 123  0 / 0    8 / 8   16 B / 16 B
      bf16 NCHW / CL (prefetch)      128 / 128  0 / 8 B  8 / 8   16 B / 16 B

  so bf16 NCHW now loads 16-byte vectors (8 pixels per channel row) and keeps
  the next tile in flight; the fp32 tile doubles in NCHW (8 pixels, 64 KiB
  per program in flight). The hand prefetch is off for fp32: it spilled
  224 B (NCHW) / 24 B (CL) at d=2048. num_stages=3 gave the same PTX as 1
  (no cp.async). The K-row form (KB > 1, [KB, d, n] products) spilled
  13 KB at d=2048 and used 255 registers with spills at d=256, so KB > 1 is
  used only for d <= 64 (d=64, K=4, 28x28: 168 registers, 0 B spills fp32
  NCHW, 56 B bf16 channels_last); larger d run one row per program, the K
  programs of an image adjacent in the grid (axis 0), so they run at the same
  time and the image's second to K-th reads come from L2 rather than HBM
  (the number of HBM passes is to be measured with ncu on a GPU).

Small batches (issue 11 section 3): with R = B*K rows filling under half of
the SMs, the inference form (given CAM, learned centroids, numeric sigma)
runs the split path below instead: each row's pixels in P chunks of whole
tiles, a pass kernel per EM iteration on a (P, R) grid and a reduce kernel
that sums the P partial M-step sums in a fixed order (deterministic; 2T + 1
launches, F still read once per iteration). Batch 1 then spreads over about
one program per SM instead of one program in all. Verified under the
interpreter against the reference; its speed against this kernel at B = 1 is
for a GPU to measure (CREAM_KERNELS_TRITON_SPLIT=0 turns it off, =P forces P
chunks). The classifier-weight, training-free and sigma = "auto" forms are
not split (their extra passes would need more launch pairs). Compiled for
sm_90a (scripts/triton_sm90.py --kernels split --quick; d=2048, 28x28,
tiles_per_chunk = 3 as a runtime value, 2026-12-02): the pass kernel 86-128 registers, 0 B spills, 16-byte feature
loads (ld.global.v4) in fp32/bf16, NCHW and channels_last, E+M, last E-step
and cosine alike; the reduce kernel 40 registers, 0 B spills.
triton.autotune is not used: under TRITON_INTERPRET=1 it would run every
config on CPU (slow CI), and the choice above is set by the register budget
checked with ptxas.

Very large d (beyond ~8192) still computes correctly but the resident
d-vectors spill registers; SPEC.md's shapes are all d <= 2048.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ._common import (
    channel_mask, device_fn, feature_blocks, image_base, inv_norm, line_block, load_raw, sigmoid_pair,
)

# How many EM rows (classes of one image) one program carries; more rows go to
# more programs of the same image (grid axis 1), each reading the image once
# per pass. Bounded by the [KB, BLOCK_D] vectors a pass keeps in registers.
KB_MAX = 4
KB_MAX_D = 64  # above this BLOCK_D one program runs one row (KB > 1 spilled at d >= 256: see the doc)
# Software pipelining of the tile loop (see the module doc): Triton 3.9's
# num_stages pipeliner only stages loads that feed tl.dot, so the next tile is
# loaded by hand into registers while the current one is reduced.
PREFETCH_MAX_ESIZE = 2  # bf16/fp16 only: the raw next tile costs half the registers of fp32's (which spilled)

# Sweep modes: what one pass over an image's features computes for its KB rows.
_CAM = 0    # nothing but the CAM (DO_CAM): lo, hi, CAM staged in OUT
_STATS = 1  # CAM-masked fg/bg sums and counts (training-free init)
_DELTA = 2  # logit gaps (v_fg - v_bg) . f_i staged in ZOUT (sigma = "auto")
_EM = 3     # E-step + M-step: posteriors, their masses and weighted sums
_LAST = 4   # last E-step: logits staged in ZOUT


@device_fn
def _log_ratio(a_fg, a_bg):
    """log a_fg - log a_bg (common.h logit_bias); log 0 = -inf (NaN stays NaN),
    spelt out so the interpreter's numpy does not warn about it."""
    lf = tl.where(a_fg == 0, float("-inf"), tl.log(tl.where(a_fg == 0, 1.0, a_fg)))
    lb = tl.where(a_bg == 0, float("-inf"), tl.log(tl.where(a_bg == 0, 1.0, a_bg)))
    return lf - lb


@device_fn
def _rows_dot(f, w2, KB: tl.constexpr):
    """[KB, BLOCK_N]: w2[k] . f_i for every row k and pixel i of the tile.
    KB = 1 keeps the 2-D form (a [BLOCK_D] vector times the tile): the 3-D
    broadcast changes Triton's tile layout (fp32 NCHW loads fell to 8 bytes)."""
    if KB == 1:
        return tl.sum(f * tl.sum(w2, axis=0)[:, None], axis=0)[None, :]
    else:
        return tl.sum(w2[:, :, None] * f[None, :, :], axis=1)


@device_fn
def _rows_wsum(f, z, KB: tl.constexpr):
    """[KB, BLOCK_D]: sum_i z[k, i] f_i for every row k."""
    if KB == 1:
        return tl.sum(f * tl.sum(z, axis=0)[None, :], axis=1)[None, :]
    else:
        return tl.sum(f[None, :, :] * z[:, None, :], axis=2)


@device_fn
def _cos_normalize(v):
    """Each row of v [KB, BLOCK_D] divided by max(||row||, eps)."""
    return v * inv_norm(tl.sum(v * v, axis=1))[:, None]


@device_fn
def _sweep(
    fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
    w2, bias, wc, camrows, orows, zrows, lo, hi, ratio,
    MODE: tl.constexpr, DO_CAM: tl.constexpr, COSINE: tl.constexpr,
    KB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, VEC_D: tl.constexpr, VEC_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One pass over the image's features for its KB rows (see the module doc).

    Returns (s1, s2 [KB, BLOCK_D], m1, m2 [KB], lo, hi [KB]): the M-step or
    masked sums and their masses (zeros where MODE has none), and the CAM's
    min/max (computed here when DO_CAM, else the lo/hi given)."""
    s1 = tl.zeros([KB, BLOCK_D], tl.float32)
    s2 = tl.zeros([KB, BLOCK_D], tl.float32)
    m1 = tl.zeros([KB, BLOCK_N], tl.float32)
    m2 = tl.zeros([KB, BLOCK_N], tl.float32)
    lo_v = tl.full([KB, BLOCK_N], float("inf"), tl.float32)
    hi_v = tl.full([KB, BLOCK_N], float("-inf"), tl.float32)
    if MODE == 1:
        thr = ratio * (hi - lo)
    if PREFETCH:
        nxt = load_raw(fb, stride_d, stride_n, offs_d, dmask, 0, N, BLOCK_N, VEC_D, VEC_N)
    for n0 in range(0, N, BLOCK_N):
        if PREFETCH:  # software pipelining: tile n+1's loads are in flight during tile n's math
            f = nxt.to(tl.float32)
            nxt = load_raw(fb, stride_d, stride_n, offs_d, dmask, n0 + BLOCK_N, N, BLOCK_N, VEC_D, VEC_N)
        else:
            f = load_raw(fb, stride_d, stride_n, offs_d, dmask, n0, N, BLOCK_N, VEC_D, VEC_N).to(tl.float32)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        rmask = kvalid[:, None] & nmask[None, :]
        if DO_CAM:  # Eq. 1 in the kernel: cam_i = W[y] . f_i (raw features, no bias)
            c = _rows_dot(f, wc, KB)
            lo_v = tl.minimum(lo_v, tl.where(rmask, c, float("inf")))
            hi_v = tl.maximum(hi_v, tl.where(rmask, c, float("-inf")))
            tl.store(orows[:, None] + offs_n[None, :], c, mask=rmask)  # staged CAM
        if MODE == 1:  # _STATS
            # the given CAM, or (HAS_W) the one an earlier pass staged in OUT: camrows is orows then
            c = tl.load(camrows[:, None] + offs_n[None, :], mask=rmask, other=0.0)
            u = (((c - lo[:, None]) >= thr[:, None]) & rmask).to(tl.float32)
            ub = tl.where(rmask, 1.0 - u, 0.0)
            s1 += _rows_wsum(f, u, KB)
            s2 += _rows_wsum(f, ub, KB)
            m1 += u
            m2 += ub
        elif MODE >= 2:
            x = _rows_dot(f, w2, KB)
            if COSINE:  # the E-step sees g_i f_i, g_i = 1/||f_i||, never stored
                g = inv_norm(tl.sum(f * f, axis=0))
                x = x * g[None, :]
            if MODE == 2:  # _DELTA
                tl.store(zrows[:, None] + offs_n[None, :], x, mask=rmask)
            elif MODE == 4:  # _LAST
                tl.store(zrows[:, None] + offs_n[None, :], bias[:, None] + x, mask=rmask)
            else:  # _EM
                zf, zb = sigmoid_pair(bias[:, None] + x)
                zf = tl.where(rmask, zf, 0.0)
                zb = tl.where(rmask, zb, 0.0)
                m1 += zf
                m2 += zb
                if COSINE:  # M-step on the normalised features g_i f_i
                    zf = zf * g[None, :]
                    zb = zb * g[None, :]
                s1 += _rows_wsum(f, zf, KB)
                s2 += _rows_wsum(f, zb, KB)
    if DO_CAM:
        lo = tl.min(lo_v, axis=1)
        hi = tl.max(hi_v, axis=1)
    return s1, s2, tl.sum(m1, axis=1), tl.sum(m2, axis=1), lo, hi


@device_fn
def _rows_min_max(camrows, N, kvalid, KB: tl.constexpr, BLOCK_P: tl.constexpr):
    """(min, max) [KB] of each given CAM row (SPEC.md's lo and hi)."""
    lo_v = tl.full([KB, BLOCK_P], float("inf"), tl.float32)
    hi_v = tl.full([KB, BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = kvalid[:, None] & (offs < N)[None, :]
        x = tl.load(camrows[:, None] + offs[None, :], mask=pm, other=0.0)
        lo_v = tl.minimum(lo_v, tl.where(pm, x, float("inf")))
        hi_v = tl.maximum(hi_v, tl.where(pm, x, float("-inf")))
    return tl.min(lo_v, axis=1), tl.max(hi_v, axis=1)


@device_fn
def _auto_inv_sigma(zrows, N, kvalid, KB: tl.constexpr, BLOCK_P: tl.constexpr):
    """sigma = "auto" (SPEC.md Op 2 extensions) from the logit gaps staged in
    ZOUT: s = population std of Delta_i, sigma = s / 2; s <= 1e-6 max|Delta|
    drops the similarity term (1/sigma = 0, sigma reported +inf).
    Two sweeps (mean, then squared deviations) over N floats per row."""
    acc = tl.zeros([KB, BLOCK_P], tl.float32)
    amax = tl.zeros([KB, BLOCK_P], tl.float32)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = kvalid[:, None] & (offs < N)[None, :]
        x = tl.load(zrows[:, None] + offs[None, :], mask=pm, other=0.0)
        acc += x
        amax = tl.maximum(amax, tl.abs(x))
    mu = tl.sum(acc, axis=1) / N
    big = tl.max(amax, axis=1)
    acc2 = tl.zeros([KB, BLOCK_P], tl.float32)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = kvalid[:, None] & (offs < N)[None, :]
        x = tl.load(zrows[:, None] + offs[None, :], mask=pm, other=0.0)
        dev = tl.where(pm, x - mu[:, None], 0.0)
        acc2 += dev * dev
    s = tl.sqrt_rn(tl.sum(acc2, axis=1) / N)
    flat = s <= 1e-6 * big  # NaN stays NaN (comparison False)
    sig = tl.where(flat, float("inf"), 0.5 * s)
    inv = tl.where(flat, 0.0, 1.0 / tl.where(flat, 1.0, sig))
    return inv, sig


@device_fn
def _m_update(fgrows, bgrows, vmask, kvalid, s1, s2, mf, mb, N, COSINE: tl.constexpr):
    """M-step (Eq. 9) from the pass's sums; mass 0 keeps v. Returns (a_fg, a_bg)."""
    vf = tl.load(fgrows, mask=vmask, other=0.0)
    vb = tl.load(bgrows, mask=vmask, other=0.0)
    vf = tl.where(mf[:, None] > 0, s1 / tl.where(mf > 0, mf, 1.0)[:, None], vf)
    vb = tl.where(mb[:, None] > 0, s2 / tl.where(mb > 0, mb, 1.0)[:, None], vb)
    if COSINE:
        vf = _cos_normalize(vf)
        vb = _cos_normalize(vb)
    tl.debug_barrier()  # every thread has read the old centroids
    tl.store(fgrows, vf, mask=vmask)
    tl.store(bgrows, vb, mask=vmask)
    return tl.where(kvalid, mf / N, 0.5), tl.where(kvalid, mb / N, 0.5)  # (rows past K: never stored)


@device_fn
def _logit_weight(fgrows, bgrows, vmask, inv_sig):
    """w = (v_fg - v_bg) / sigma per row (common.h logit_weight), from the stored centroids."""
    tl.debug_barrier()  # the centroids were stored by other threads of this program
    vf = tl.load(fgrows, mask=vmask, other=0.0)
    vb = tl.load(bgrows, mask=vmask, other=0.0)
    return (vf - vb) * inv_sig[:, None]


@device_fn
def _calibrate_out(camrows, zrows, orows, lo, hi, ratio, N, kvalid, KB: tl.constexpr, BLOCK_P: tl.constexpr):
    """Calibration (Eqs. 10-11) over the CAM-foreground pixels, then Eq. 12, from the
    last E-step's logits staged in ZOUT: two sweeps over N floats per row (the same
    thread reads and rewrites each staged element, so the second sweep may overwrite
    in place). Leaves Z_fg in ZOUT and the map in OUT; returns picked [KB]."""
    thr = ratio * (hi - lo)
    cal_f = tl.zeros([KB, BLOCK_P], tl.float32)
    cal_b = tl.zeros([KB, BLOCK_P], tl.float32)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = kvalid[:, None] & (offs < N)[None, :]
        m = tl.load(camrows[:, None] + offs[None, :], mask=pm, other=0.0)
        zf, zb = sigmoid_pair(tl.load(zrows[:, None] + offs[None, :], mask=pm, other=0.0))
        fg = ((m - lo[:, None]) >= thr[:, None]) & pm
        cal_f += tl.where(fg, zf, 0.0)
        cal_b += tl.where(fg, zb, 0.0)
    picked = tl.sum(cal_f, axis=1) >= tl.sum(cal_b, axis=1)  # ties pick Z_fg
    rng = hi - lo
    safe = tl.where(rng > 0, rng, 1.0)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = kvalid[:, None] & (offs < N)[None, :]
        m = tl.load(camrows[:, None] + offs[None, :], mask=pm, other=0.0)
        zf, zb = sigmoid_pair(tl.load(zrows[:, None] + offs[None, :], mask=pm, other=0.0))
        cn = tl.where(rng[:, None] > 0, (m - lo[:, None]) / safe[:, None], 0.0)
        tl.store(zrows[:, None] + offs[None, :], zf, mask=pm)
        tl.store(orows[:, None] + offs[None, :], tl.where(picked[:, None], zf, zb) + cn, mask=pm)
    return picked


@triton.jit
def _em_kernel(
    F, stride_b, stride_d, stride_n,
    CAM, W, VFG, VBG, LABELS,
    OUT, ZOUT, FGOUT, BGOUT, MIX, PICKED, SIGMA_USED,
    K, d, N, T, sigma, inv_sigma, ratio,
    HAS_W: tl.constexpr, HAS_V: tl.constexpr, V_BY_LABEL: tl.constexpr, SIGMA_AUTO: tl.constexpr,
    COSINE: tl.constexpr, KB: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    VEC_D: tl.constexpr, VEC_N: tl.constexpr, PREFETCH: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)  # axis 0 = the row group: an image's programs are adjacent
    kk = tl.program_id(0) * KB + tl.arange(0, KB)  # classes k of image b this program runs
    kvalid = kk < K
    rows = b * K + kk.to(tl.int64)  # row r = b*K + k
    fb = image_base(F, b, stride_b, VEC_D * VEC_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = channel_mask(offs_d, d, VEC_D)
    vmask = kvalid[:, None] & dmask[None, :]
    orows = OUT + rows * N
    zrows = ZOUT + rows * N
    if HAS_W:
        camrows = orows  # the CAM is computed in a pass and staged in OUT
    else:
        camrows = CAM + rows * N
    fgrows = FGOUT + rows[:, None] * d + offs_d[None, :]
    bgrows = BGOUT + rows[:, None] * d + offs_d[None, :]
    if HAS_W or V_BY_LABEL:
        y = tl.load(LABELS + rows, mask=kvalid, other=0)
    if HAS_W:
        wc = tl.load(W + y[:, None] * d + offs_d[None, :], mask=vmask, other=0.0)
    else:
        wc = tl.zeros([KB, BLOCK_D], tl.float32)
    zero_v = tl.zeros([KB, BLOCK_D], tl.float32)
    zero_k = tl.zeros([KB], tl.float32)

    # CAM statistics: lo, hi (SPEC.md helper). With W they come from the first
    # pass over F that has to be made anyway (see the module doc).
    if HAS_W:
        lo = tl.full([KB], float("inf"), tl.float32)
        hi = tl.full([KB], float("-inf"), tl.float32)
    else:
        lo, hi = _rows_min_max(camrows, N, kvalid, KB, BLOCK_P)

    # Initial centroids.
    if HAS_V:
        if V_BY_LABEL:
            vrows = y
        else:
            vrows = rows
        vf = tl.load(VFG + vrows[:, None] * d + offs_d[None, :], mask=vmask, other=0.0)
        vb = tl.load(VBG + vrows[:, None] * d + offs_d[None, :], mask=vmask, other=0.0)
    else:  # training-free: CAM-masked means of the raw features (0 for an empty mask)
        if HAS_W:
            _a, _b, _c, _d, lo, hi = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                            zero_v, zero_k, wc, camrows, orows, zrows, lo, hi, ratio,
                                            0, True, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
            tl.debug_barrier()  # the staged CAM is read back by other threads
        s1, s2, c_fg, c_bg, _e, _f = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                            zero_v, zero_k, wc, camrows, orows, zrows, lo, hi, ratio,
                                            1, False, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
        vf = s1 / tl.maximum(c_fg, 1.0)[:, None]
        vb = s2 / tl.maximum(c_bg, 1.0)[:, None]
    if COSINE:
        vf = _cos_normalize(vf)
        vb = _cos_normalize(vb)
    # The centroids live in the fg/bg outputs between M-steps, not in registers:
    # in NCHW the d-vectors are replicated across the threads of a pixel row,
    # and only w and the two sums need to be live during a pass.
    tl.store(fgrows, vf, mask=vmask)
    tl.store(bgrows, vb, mask=vmask)

    # sigma: given, or "auto" from the initial logit gaps (one more pass).
    if SIGMA_AUTO:
        _g, _h, _i, _j, lo, hi = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                        vf - vb, zero_k, wc, camrows, orows, zrows, lo, hi, ratio,
                                        2, HAS_W and HAS_V, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
        tl.debug_barrier()  # the staged gaps are read by other threads
        inv_sig, sig_used = _auto_inv_sigma(zrows, N, kvalid, KB, BLOCK_P)
    else:
        inv_sig = zero_k + inv_sigma
        sig_used = zero_k + sigma

    a_fg = zero_k + 0.5
    a_bg = zero_k + 0.5
    t0 = tl.zeros([], tl.int32)
    if HAS_W and HAS_V and not SIGMA_AUTO:  # the CAM rides on the first E-step
        if T > 1:
            w2 = _logit_weight(fgrows, bgrows, vmask, inv_sig)
            s1, s2, mf, mb, lo, hi = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                            w2, _log_ratio(a_fg, a_bg), wc, camrows, orows, zrows, lo, hi, ratio,
                                            3, True, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
            a_fg, a_bg = _m_update(fgrows, bgrows, vmask, kvalid, s1, s2, mf, mb, N, COSINE)
            t0 += 1
    # The remaining E-step + M-step iterations, one pass over F each.
    for _t in range(t0, T - 1):
        w2 = _logit_weight(fgrows, bgrows, vmask, inv_sig)
        s1, s2, mf, mb, _k, _l = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                        w2, _log_ratio(a_fg, a_bg), wc, camrows, orows, zrows, lo, hi, ratio,
                                        3, False, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
        a_fg, a_bg = _m_update(fgrows, bgrows, vmask, kvalid, s1, s2, mf, mb, N, COSINE)

    # Last E-step: logits staged in ZOUT (and the CAM in OUT when T = 1 with W and tables).
    w2 = _logit_weight(fgrows, bgrows, vmask, inv_sig)
    bias = _log_ratio(a_fg, a_bg)
    if HAS_W and HAS_V and not SIGMA_AUTO:
        if T == 1:
            _m, _n, _o, _p, lo, hi = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                            w2, bias, wc, camrows, orows, zrows, lo, hi, ratio,
                                            4, True, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
        else:
            _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                   w2, bias, wc, camrows, orows, zrows, lo, hi, ratio,
                   4, False, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
    else:
        _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
               w2, bias, wc, camrows, orows, zrows, lo, hi, ratio,
               4, False, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
    tl.debug_barrier()  # logits (and CAM) were staged by other threads

    picked = _calibrate_out(camrows, zrows, orows, lo, hi, ratio, N, kvalid, KB, BLOCK_P)

    tl.store(MIX + 2 * rows, a_fg, mask=kvalid)
    tl.store(MIX + 2 * rows + 1, a_bg, mask=kvalid)
    tl.store(PICKED + rows, picked.to(tl.uint8), mask=kvalid)
    tl.store(SIGMA_USED + rows, sig_used, mask=kvalid)


# --------------------------------------------------------------------------------------
# Split path (issue 11): one EM row over several programs, for small batches
# --------------------------------------------------------------------------------------
# With R = B*K rows and R well under the SM count, _em_kernel runs R programs and leaves
# most of the GPU idle (batch 1: one SM of 132). The split path cuts each row's pixels
# into P chunks of whole tiles: a pass kernel on a (P, R) grid makes the E-step (and the
# M-step's partial sums, [R, P, 2, d] + masses [R, P, 2] in a float32 workspace) of one
# chunk, and a reduce kernel on R programs sums the P partials in a fixed order (so the
# result is deterministic) and applies the M-step; Triton has no grid-wide barrier, so
# each EM iteration is two launches: 2T + 1 in all (init, T - 1 x (pass + reduce), the
# last E-step's pass, the calibration). F is still read once per iteration. It covers
# the inference form only: given CAM rows, learned centroids (tables or per row) and a
# numeric sigma; the classifier-weight, training-free and sigma="auto" forms keep
# _em_kernel. The sums are grouped per chunk, so results differ from _em_kernel's in
# float32 rounding only (both are checked against the float64 reference).


@triton.jit
def _split_init(VFG, VBG, LABELS, FGOUT, BGOUT, MIX, d,
                V_BY_LABEL: tl.constexpr, COSINE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row r's initial centroids (normalised in cosine mode) into FGOUT/BGOUT; mix 1/2."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dm = (offs_d < d)[None, :]
    if V_BY_LABEL:
        vr = tl.load(LABELS + r)
    else:
        vr = r
    vf = tl.load(VFG + vr * d + offs_d[None, :], mask=dm, other=0.0)
    vb = tl.load(VBG + vr * d + offs_d[None, :], mask=dm, other=0.0)
    if COSINE:
        vf = _cos_normalize(vf)
        vb = _cos_normalize(vb)
    tl.store(FGOUT + r * d + offs_d[None, :], vf, mask=dm)
    tl.store(BGOUT + r * d + offs_d[None, :], vb, mask=dm)
    tl.store(MIX + 2 * r, 0.5)
    tl.store(MIX + 2 * r + 1, 0.5)


@triton.jit
def _split_pass(
    F, stride_b, stride_d, stride_n, FGOUT, BGOUT, MIX, ZOUT, WS, WM,
    K, d, N, P, tiles_per_chunk, inv_sigma,
    LAST: tl.constexpr, COSINE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, VEC_D: tl.constexpr, VEC_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Chunk p of row r: the E-step of its pixels with the current centroids and mix;
    LAST: the logits into ZOUT, else the partial M-step sums into WS / WM [r, p]."""
    p = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64)
    b = r // K
    start = p * tiles_per_chunk * BLOCK_N  # a multiple of BLOCK_N: the loads stay aligned
    n_loc = tl.minimum(N - start, tiles_per_chunk * BLOCK_N)
    fb = image_base(F, b, stride_b, VEC_D * VEC_N) + start * ((stride_n // VEC_D) * VEC_D)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = channel_mask(offs_d, d, VEC_D)
    kvalid = tl.full([1], 1, tl.int1)
    vmask = dmask[None, :]
    fgrows = FGOUT + r * d + offs_d[None, :]
    bgrows = BGOUT + r * d + offs_d[None, :]
    a_fg = tl.load(MIX + 2 * r + tl.zeros([1], tl.int64))
    a_bg = tl.load(MIX + 2 * r + 1 + tl.zeros([1], tl.int64))
    w2 = _logit_weight(fgrows, bgrows, vmask, tl.zeros([1], tl.float32) + inv_sigma)
    bias = _log_ratio(a_fg, a_bg)
    zrows = ZOUT + r * N + start + tl.zeros([1], tl.int64)
    zero_v = tl.zeros([1, BLOCK_D], tl.float32)
    zero_k = tl.zeros([1], tl.float32)
    s1, s2, mf, mb, _lo, _hi = _sweep(fb, stride_d, stride_n, offs_d, dmask, n_loc, kvalid,
                                      w2, bias, zero_v, zrows, zrows, zrows, zero_k, zero_k, 0.0,
                                      4 if LAST else 3, False, COSINE, 1, BLOCK_D, BLOCK_N, VEC_D, VEC_N,
                                      PREFETCH)
    if not LAST:
        base = (r * P + p) * 2
        tl.store(WS + base * d + offs_d[None, :], s1, mask=vmask)
        tl.store(WS + (base + 1) * d + offs_d[None, :], s2, mask=vmask)
        tl.store(WM + base + tl.zeros([1], tl.int64), mf)
        tl.store(WM + base + 1 + tl.zeros([1], tl.int64), mb)


@triton.jit
def _split_reduce(WS, WM, FGOUT, BGOUT, MIX, d, N, P, COSINE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row r's M-step (Eq. 9) from its P chunks' partial sums, summed in chunk order."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    vmask = (offs_d < d)[None, :]
    kvalid = tl.full([1], 1, tl.int1)
    s1 = tl.zeros([1, BLOCK_D], tl.float32)
    s2 = tl.zeros([1, BLOCK_D], tl.float32)
    mf = tl.zeros([1], tl.float32)
    mb = tl.zeros([1], tl.float32)
    for p in range(0, P):
        base = (r * P + p) * 2
        s1 += tl.load(WS + base * d + offs_d[None, :], mask=vmask, other=0.0)
        s2 += tl.load(WS + (base + 1) * d + offs_d[None, :], mask=vmask, other=0.0)
        mf += tl.load(WM + base + tl.zeros([1], tl.int64))
        mb += tl.load(WM + base + 1 + tl.zeros([1], tl.int64))
    fgrows = FGOUT + r * d + offs_d[None, :]
    bgrows = BGOUT + r * d + offs_d[None, :]
    a_fg, a_bg = _m_update(fgrows, bgrows, vmask, kvalid, s1, s2, mf, mb, N, COSINE)
    tl.store(MIX + 2 * r + tl.zeros([1], tl.int64), a_fg)
    tl.store(MIX + 2 * r + 1 + tl.zeros([1], tl.int64), a_bg)


@triton.jit
def _split_finish(CAM, ZOUT, OUT, PICKED, SIGMA_USED, N, sigma, ratio, BLOCK_P: tl.constexpr):
    """Row r's CAM statistics, calibration and Eq. 12 from the staged logits."""
    r = tl.program_id(0).to(tl.int64)
    kvalid = tl.full([1], 1, tl.int1)
    rows = r + tl.zeros([1], tl.int64)
    camrows = CAM + rows * N
    lo, hi = _rows_min_max(camrows, N, kvalid, 1, BLOCK_P)
    picked = _calibrate_out(camrows, ZOUT + rows * N, OUT + rows * N, lo, hi, ratio, N, kvalid, 1, BLOCK_P)
    tl.store(PICKED + rows, picked.to(tl.uint8))
    tl.store(SIGMA_USED + rows, tl.zeros([1], tl.float32) + sigma)


GRID_AXIS1_MAX = 65535
SPLIT_ENV = "CREAM_KERNELS_TRITON_SPLIT"  # "0": never split; N >= 1: N chunks per row whenever it applies
_SM_COUNT = {}


def _sm_count(device) -> int:
    if device not in _SM_COUNT:
        _SM_COUNT[device] = int(torch.cuda.get_device_properties(device).multi_processor_count)
    return _SM_COUNT[device]


def split_chunks(f3, R: int, blocks: dict, device=None) -> int:
    """How many pixel chunks the split path cuts each of R rows of f3 into (1 = no split),
    with ``blocks`` = feature_blocks(f3, 1).

    Chunks start at multiples of BLOCK_N, so a tile narrower than one vector (NCHW,
    VEC_N > BLOCK_N) is never split: its chunks' loads would not stay whole vectors.
    CREAM_KERNELS_TRITON_SPLIT=0 never splits, =P asks for P chunks (capped by the
    tiles a row has; how the tests run it on CPU). Default: on a GPU, when the R rows
    would fill under half of the SMs, enough chunks of whole tiles to give every SM about
    one program; on CPU (the interpreter), never."""
    if blocks["BLOCK_N"] % blocks["VEC_N"] != 0:
        return 1
    tiles = triton.cdiv(int(f3.shape[2]), int(blocks["BLOCK_N"]))
    env = os.environ.get(SPLIT_ENV, "").strip()
    if env:
        if not env.isdigit():
            raise ValueError(f"{SPLIT_ENV}={env!r}: expected 0 (never) or a number of chunks per row")
        want = int(env)
        if R > GRID_AXIS1_MAX:  # the pass kernel's grid is (P, R): CUDA caps grid axis 1
            return 1
        return max(1, min(want, tiles)) if want > 0 else 1
    if not f3.is_cuda:
        return 1
    sms = _sm_count(f3.device if device is None else device)
    if 2 * R > sms or tiles < 2:
        return 1
    return max(1, min(tiles, sms // max(R, 1)))


def _em_split(f3, cam, v_fg, v_bg, labels, K, v_by_label, num_iters, sigma, ratio, cosine, outputs, chunks,
              blocks):
    out, z, fg_out, bg_out, mix, picked, sigma_used = outputs
    B, d, N = f3.shape
    R = B * K
    bn = blocks["BLOCK_N"]
    tiles = triton.cdiv(N, bn)
    tpc = triton.cdiv(tiles, chunks)
    P = triton.cdiv(tiles, tpc)  # every chunk non-empty
    ws = torch.empty((R, P, 2, d), dtype=torch.float32, device=f3.device)
    wm = torch.empty((R, P, 2), dtype=torch.float32, device=f3.device)
    prefetch = _prefetch(f3)
    inv = 1.0 / float(sigma)
    lab = labels if labels is not None else out
    _split_init[(R,)](v_fg, v_bg, lab, fg_out, bg_out, mix, d, V_BY_LABEL=bool(v_by_label), COSINE=bool(cosine),
                      BLOCK_D=blocks["BLOCK_D"], num_warps=4)
    for t in range(int(num_iters)):
        last = t == int(num_iters) - 1
        _split_pass[(P, R)](f3, f3.stride(0), f3.stride(1), f3.stride(2), fg_out, bg_out, mix, z, ws, wm,
                            K, d, N, P, tpc, inv, LAST=last, COSINE=bool(cosine), PREFETCH=prefetch,
                            num_stages=1, **blocks)
        if not last:
            _split_reduce[(R,)](ws, wm, fg_out, bg_out, mix, d, N, P, COSINE=bool(cosine),
                                BLOCK_D=blocks["BLOCK_D"], num_warps=4 if blocks["BLOCK_D"] < 1024 else 8)
    _split_finish[(R,)](cam, z, out, picked, sigma_used, N, float(sigma), float(ratio), BLOCK_P=line_block(N),
                        num_warps=4)


def launch_config(f3, K: int) -> dict:
    """Rows per program (KB), the grid and the block sizes for f3 [B, d, N] with K rows per image."""
    kb_max = KB_MAX if triton.next_power_of_2(max(int(f3.shape[1]), 1)) <= KB_MAX_D else 1
    kb = min(int(triton.next_power_of_2(max(int(K), 1))), kb_max)
    blocks = feature_blocks(f3, kb)
    return dict(KB=kb, groups=triton.cdiv(int(K), kb), PREFETCH=_prefetch(f3), **blocks)


def _prefetch(f3) -> bool:
    """Whether the tile loop loads the next tile by hand (PREFETCH_MAX_ESIZE)."""
    return f3.element_size() <= PREFETCH_MAX_ESIZE


def em_reactivate(f3, cam, weight, v_fg, v_bg, labels, K, v_by_label,
                  num_iters, sigma, sigma_auto, ratio, cosine, outputs) -> None:
    """Launch the fused EM kernel (inputs validated and laid out by ops.py; the
    backend contract is csrc/kernels.h EMParams, row r = b*K + k).

    f3 [B, d, N] features (unit stride over N or d); cam float32 [B*K, N]
    contiguous or None when weight (float32 [C, d]) is given; v_fg/v_bg
    float32 [C, d] (v_by_label) or [B*K, d], or both None (training-free);
    labels int64 [B*K] (given whenever v_by_label or weight); outputs
    (out [B*K, N], z_fg [B*K, N], fg [B*K, d], bg [B*K, d], mix [B*K, 2],
    picked uint8 [B*K], sigma_used [B*K]), every element written."""
    out, z, fg_out, bg_out, mix, picked, sigma_used = outputs
    B, d, N = f3.shape
    K = int(K)
    if B == 0:
        return
    has_v = v_fg is not None
    has_w = weight is not None
    sigma_auto = bool(sigma_auto)
    sig = math.inf if sigma_auto else float(sigma)
    inv = 0.0 if sigma_auto else 1.0 / sig
    if has_v and not has_w and not sigma_auto and cam is not None:
        b1 = feature_blocks(f3, 1)
        chunks = split_chunks(f3, B * K, b1)
        if chunks > 1:
            with _device_of(f3):
                _em_split(f3, cam, v_fg, v_bg, labels, K, v_by_label, num_iters, sigma, ratio, cosine, outputs,
                          chunks, b1)
            return
    cfg = launch_config(f3, K)
    groups = cfg.pop("groups")
    dummy = out  # stands in for absent pointers; never read (constexpr-guarded)
    with _device_of(f3):
        _em_kernel[(groups, B)](
            f3, f3.stride(0), f3.stride(1), f3.stride(2),
            cam if cam is not None else dummy, weight if has_w else dummy,
            v_fg if has_v else dummy, v_bg if has_v else dummy, labels if labels is not None else dummy,
            out, z, fg_out, bg_out, mix, picked, sigma_used,
            K, d, N, int(num_iters), sig, inv, float(ratio),
            HAS_W=has_w, HAS_V=has_v, V_BY_LABEL=bool(v_by_label), SIGMA_AUTO=sigma_auto,
            COSINE=bool(cosine), BLOCK_P=line_block(N), num_stages=1, **cfg,
        )


def _device_of(t: torch.Tensor):
    """Launch on the tensor's device (Triton uses the current device's stream)."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
