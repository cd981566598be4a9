"""EM re-activation (SPEC.md Op 2 and its issue-12 extensions) as one Triton
kernel launch per call.

Design
------
Rows: r = b*K + k is image b re-activating class k of its K classes (the
backend contract, csrc/kernels.h EMParams). Grid ``(ceil(K / KB), B)``:
program (g, b) owns rows b*K + g*KB ... + KB-1 of image b, KB =
min(next_pow2(K), KB_MAX = 4) for d <= 64 and 1 above, and everything about
them (CAM statistics, centroids, mixing weights, sigma, calibration), so nothing crosses programs: no host round
trip, no ``.item()``, no per-image Python loop, deterministic. CUDA caps grid
axis 1 at 65,535 (``GRID_AXIS1_MAX``): a larger batch is launched in slices of
at most that many images (``image_slices``; issue 17).

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
d=2048 4 pixels = 8-byte loads; now 8 pixels = 16 bytes).

Register shapes (issue 17): a one-row program (KB = 1, every d > 64) keeps
its d-vectors (logit weight, M-step sums, centroids) as 1-D [BLOCK_D] tensors,
its per-pixel values as [BLOCK_N] and its per-row values as scalars; only KB > 1
uses [KB, X] tensors (the ``_r*`` helpers pick the form). The older [1, BLOCK_D]
form made each tile reduction change layout before it was expanded, and Triton
3.6 to 3.8 put it in the tile's own layout, where a d-long vector is repeated
over the tile's pixel columns (1024 floats per thread at d=2048): every
config spilled (32-40 registers, 10-234 KB), and 3.9 spilled too in the forms
the old check did not compile (121 KB for bf16 channels_last cosine). In the
1-D form a d-vector is a tile reduction along pixels, or is broadcast back onto
the tile, so its layout is the tile's row slice and no such choice exists.
No hand prefetch in this kernel: holding the raw next tile (16 registers per
thread) on a live set at the 128-register cap spilled 100-650 B in the cosine,
classifier-weight and training-free forms with 16-bit features, on 3.6 to 3.9
alike (Triton's num_stages pipeliner only stages loads that feed tl.dot and
gave identical PTX with num_stages=3: no cp.async). The split path's pass
kernel, with a smaller live set, keeps it (PREFETCH for 16-bit features).

Compile-time figures: sm_90a, the ptxas each Triton uses, -v, via
``scripts/triton_sm90.py`` (no GPU); ``scripts/triton_matrix.sh`` runs it in a
venv per Triton version (torch 2.13.0 CPU beside it). The full matrix,
benchmarks/results/triton_sm90_matrix_full_2026-12-03.md (--set full: 112
_em_kernel configs over every SPEC.md shape, fp32/bf16/fp16, NCHW and channels_last and
every form, plus 36 context and 50 split-path configs; load average ~1); per
version, _em_kernel's max spills, registers, narrowest feature load, max compile
CPU seconds:

    Triton 3.6.0 (torch 2.11)   max 348 B spills, 104-255 registers, loads >= 8 B, <= 2.4 s
    Triton 3.7.1                max 176 B spills, 103-255 registers, loads >= 8 B, <= 2.6 s
    Triton 3.8.0 (torch 2.14)   max  56 B spills,  84-255 registers, loads >= 8 B, <= 2.6 s
    Triton 3.9.0                max 120 B spills,  64-255 registers, loads >= 8 B, <= 3.5 s

  (8 B loads only where a 14x14 row of 16-bit NCHW values allows no wider
  vector, as before). Context kernel <= 40 B, split pass <= 184 B, split reduce
  0 B on every version. The CI set + quick set of an earlier, loaded run is in
  benchmarks/results/triton_sm90_matrix_2026-12-03.md.

  Feature loads are as wide as at d78afad config by config (16 B, or 8 B where
  14x14 rows of 16-bit values allow no wider vector). Before (d78afad): Triton
  3.6-3.8 spilled in every config (32-40 registers, 10-234 KB, up to 71 s to
  compile one: issue 17's figures); 3.9 spilled up to 210 KB in the forms the
  old check did not compile (benchmarks/results/triton_sm90_baseline_d78afad_2026-12-03.md,
  the CI set at d78afad with this script).
  The K-row form (KB > 1, [KB, d, n] products) spilled 13 KB at d=2048 and
  used 255 registers with spills at d=256, so KB > 1 is used only for d <= 64;
  larger d run one row per program, the K programs of an image adjacent in the
  grid (axis 0), so they run at the same time and the image's second to K-th
  reads come from L2 rather than HBM (the number of HBM passes is to be
  measured with ncu on a GPU). Timings wait for a GPU.

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
tiles_per_chunk = 3 as a runtime value, 2026-12-02, Triton 3.9): the pass kernel 86-128 registers, 0 B spills, 16-byte feature
loads (ld.global.v4) in fp32/bf16, NCHW and channels_last, E+M, last E-step
and cosine alike; the reduce kernel 40 registers, 0 B spills. Its kernels run
one row each, so they use the 1-D forms too; the matrix above has them on
every Triton version.
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
# Software pipelining of the split path's tile loop (see the module doc): Triton's
# num_stages pipeliner only stages loads that feed tl.dot, so the next tile is
# loaded by hand into registers while the current one is reduced. _em_kernel does
# not (launch_config: PREFETCH=False; it spilled there, issue 17).
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


# Row-rank helpers. A program carries KB EM rows. With KB > 1 a per-row value is a [KB]
# vector, a per-row d-vector [KB, BLOCK_D] and a per-row pixel vector [KB, BLOCK_N]; with
# KB = 1 (every d > KB_MAX_D) they are a scalar, a [BLOCK_D] and a [BLOCK_N] vector, never
# a [1, X] tensor. That matters to the compiler: a [1, BLOCK_D] vector made by expanding a
# tile reduction ([BLOCK_D] along the tile's rows) has to change layout, and Triton 3.6 to
# 3.8 placed it in the tile's own layout, where the d-long vector is replicated over the
# tile's pixel columns: 1024 float32 per thread at d=2048, 10-234 KB of spills (issue 17).
# In the 1-D form every d-vector is a reduction of the tile along pixels or is broadcast
# back onto it, so its natural layout is the tile's row slice and there is no such choice.


@device_fn
def _rc(x, KB: tl.constexpr):
    """A per-row value against a per-row vector: x[:, None]; KB = 1: x (a scalar)."""
    if KB == 1:
        return x
    else:
        return x[:, None]


@device_fn
def _rp(x, KB: tl.constexpr):
    """A pixel/channel vector against per-row vectors: x[None, :]; KB = 1: x."""
    if KB == 1:
        return x
    else:
        return x[None, :]


@device_fn
def _rmask(kvalid, m, KB: tl.constexpr):
    """Per-row mask: row valid and m ([KB, X]). KB = 1: m alone (the program's one row
    always exists: the grid has exactly K programs per image, and the split kernels
    one per row; the interpreter also turns a scalar & vector of int1 into int32)."""
    if KB == 1:
        return m
    else:
        return kvalid[:, None] & m[None, :]


@device_fn
def _rsum(x, KB: tl.constexpr):
    """Per-row sum over the last axis: [KB, X] -> [KB]; KB = 1: [X] -> scalar."""
    if KB == 1:
        return tl.sum(x, axis=0)
    else:
        return tl.sum(x, axis=1)


@device_fn
def _rmin(x, KB: tl.constexpr):
    if KB == 1:
        return tl.min(x, axis=0)
    else:
        return tl.min(x, axis=1)


@device_fn
def _rmax(x, KB: tl.constexpr):
    if KB == 1:
        return tl.max(x, axis=0)
    else:
        return tl.max(x, axis=1)


@device_fn
def _rfull(X: tl.constexpr, value: tl.constexpr, KB: tl.constexpr):
    """float32 per-row vectors of length X filled with value ([KB, X]; KB = 1: [X])."""
    if KB == 1:
        return tl.full([X], value, tl.float32)
    else:
        return tl.full([KB, X], value, tl.float32)


@device_fn
def _rscalar(value: tl.constexpr, KB: tl.constexpr):
    """float32 per-row values ([KB]; KB = 1: a scalar)."""
    if KB == 1:
        return tl.full([], value, tl.float32)
    else:
        return tl.full([KB], value, tl.float32)


@device_fn
def _rows_dot(f, w2, KB: tl.constexpr):
    """Per-row pixel vectors: w2[k] . f_i for every row k and pixel i of the tile."""
    if KB == 1:
        return tl.sum(f * w2[:, None], axis=0)
    else:
        return tl.sum(w2[:, :, None] * f[None, :, :], axis=1)


@device_fn
def _rows_wsum(f, z, KB: tl.constexpr):
    """Per-row d-vectors: sum_i z[k, i] f_i for every row k."""
    if KB == 1:
        return tl.sum(f * z[None, :], axis=1)
    else:
        return tl.sum(f[None, :, :] * z[:, None, :], axis=2)


@device_fn
def _cos_normalize(v, KB: tl.constexpr):
    """Each row's d-vector divided by max(||row||, eps)."""
    return v * _rc(inv_norm(_rsum(v * v, KB)), KB)


@device_fn
def _sweep(
    fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
    w2, bias, wc, camrows, orows, zrows, lo, hi, ratio,
    MODE: tl.constexpr, DO_CAM: tl.constexpr, COSINE: tl.constexpr,
    KB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, VEC_D: tl.constexpr, VEC_N: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """One pass over the image's features for its KB rows (see the module doc).

    Returns (s1, s2, m1, m2, lo, hi): the M-step or masked sums (per-row d-vectors)
    and their masses (zeros where MODE has none), and the CAM's min/max (computed
    here when DO_CAM, else the lo/hi given)."""
    s1 = _rfull(BLOCK_D, 0.0, KB)
    s2 = _rfull(BLOCK_D, 0.0, KB)
    m1 = _rfull(BLOCK_N, 0.0, KB)
    m2 = _rfull(BLOCK_N, 0.0, KB)
    lo_v = _rfull(BLOCK_N, float("inf"), KB)
    hi_v = _rfull(BLOCK_N, float("-inf"), KB)
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
        rmask = _rmask(kvalid, nmask, KB)
        if DO_CAM:  # Eq. 1 in the kernel: cam_i = W[y] . f_i (raw features, no bias)
            c = _rows_dot(f, wc, KB)
            lo_v = tl.minimum(lo_v, tl.where(rmask, c, float("inf")))
            hi_v = tl.maximum(hi_v, tl.where(rmask, c, float("-inf")))
            tl.store(_rc(orows, KB) + _rp(offs_n, KB), c, mask=rmask)  # staged CAM
        if MODE == 1:  # _STATS
            # the given CAM, or (HAS_W) the one an earlier pass staged in OUT: camrows is orows then
            c = tl.load(_rc(camrows, KB) + _rp(offs_n, KB), mask=rmask, other=0.0)
            u = (((c - _rc(lo, KB)) >= _rc(thr, KB)) & rmask).to(tl.float32)
            ub = tl.where(rmask, 1.0 - u, 0.0)
            s1 += _rows_wsum(f, u, KB)
            s2 += _rows_wsum(f, ub, KB)
            m1 += u
            m2 += ub
        elif MODE >= 2:
            x = _rows_dot(f, w2, KB)
            if COSINE:  # the E-step sees g_i f_i, g_i = 1/||f_i||, never stored
                g = inv_norm(tl.sum(f * f, axis=0))
                x = x * _rp(g, KB)
            if MODE == 2:  # _DELTA
                tl.store(_rc(zrows, KB) + _rp(offs_n, KB), x, mask=rmask)
            elif MODE == 4:  # _LAST
                tl.store(_rc(zrows, KB) + _rp(offs_n, KB), _rc(bias, KB) + x, mask=rmask)
            else:  # _EM
                zf, zb = sigmoid_pair(_rc(bias, KB) + x)
                zf = tl.where(rmask, zf, 0.0)
                zb = tl.where(rmask, zb, 0.0)
                m1 += zf
                m2 += zb
                if COSINE:  # M-step on the normalised features g_i f_i
                    zf = zf * _rp(g, KB)
                    zb = zb * _rp(g, KB)
                s1 += _rows_wsum(f, zf, KB)
                s2 += _rows_wsum(f, zb, KB)
    if DO_CAM:
        lo = _rmin(lo_v, KB)
        hi = _rmax(hi_v, KB)
    return s1, s2, _rsum(m1, KB), _rsum(m2, KB), lo, hi


@device_fn
def _rows_min_max(camrows, N, kvalid, KB: tl.constexpr, BLOCK_P: tl.constexpr):
    """(min, max) of each given CAM row (SPEC.md's lo and hi)."""
    lo_v = _rfull(BLOCK_P, float("inf"), KB)
    hi_v = _rfull(BLOCK_P, float("-inf"), KB)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = _rmask(kvalid, offs < N, KB)
        x = tl.load(_rc(camrows, KB) + _rp(offs, KB), mask=pm, other=0.0)
        lo_v = tl.minimum(lo_v, tl.where(pm, x, float("inf")))
        hi_v = tl.maximum(hi_v, tl.where(pm, x, float("-inf")))
    return _rmin(lo_v, KB), _rmax(hi_v, KB)


@device_fn
def _auto_inv_sigma(zrows, N, kvalid, KB: tl.constexpr, BLOCK_P: tl.constexpr):
    """sigma = "auto" (SPEC.md Op 2 extensions) from the logit gaps staged in
    ZOUT: s = population std of Delta_i, sigma = s / 2; s <= 1e-6 max|Delta|
    drops the similarity term (1/sigma = 0, sigma reported +inf).
    Two sweeps (mean, then squared deviations) over N floats per row."""
    acc = _rfull(BLOCK_P, 0.0, KB)
    amax = _rfull(BLOCK_P, 0.0, KB)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = _rmask(kvalid, offs < N, KB)
        x = tl.load(_rc(zrows, KB) + _rp(offs, KB), mask=pm, other=0.0)
        acc += x
        amax = tl.maximum(amax, tl.abs(x))
    mu = _rsum(acc, KB) / N
    big = _rmax(amax, KB)
    acc2 = _rfull(BLOCK_P, 0.0, KB)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = _rmask(kvalid, offs < N, KB)
        x = tl.load(_rc(zrows, KB) + _rp(offs, KB), mask=pm, other=0.0)
        dev = tl.where(pm, x - _rc(mu, KB), 0.0)
        acc2 += dev * dev
    s = tl.sqrt_rn(_rsum(acc2, KB) / N)
    flat = s <= 1e-6 * big  # NaN stays NaN (comparison False)
    sig = tl.where(flat, float("inf"), 0.5 * s)
    inv = tl.where(flat, 0.0, 1.0 / tl.where(flat, 1.0, sig))
    return inv, sig


@device_fn
def _m_update(fgrows, bgrows, vmask, kvalid, s1, s2, mf, mb, N, COSINE: tl.constexpr, KB: tl.constexpr):
    """M-step (Eq. 9) from the pass's sums; mass 0 keeps v. Returns (a_fg, a_bg)."""
    vf = tl.load(fgrows, mask=vmask, other=0.0)
    vb = tl.load(bgrows, mask=vmask, other=0.0)
    vf = tl.where(_rc(mf > 0, KB), s1 / _rc(tl.where(mf > 0, mf, 1.0), KB), vf)
    vb = tl.where(_rc(mb > 0, KB), s2 / _rc(tl.where(mb > 0, mb, 1.0), KB), vb)
    if COSINE:
        vf = _cos_normalize(vf, KB)
        vb = _cos_normalize(vb, KB)
    tl.debug_barrier()  # every thread has read the old centroids
    tl.store(fgrows, vf, mask=vmask)
    tl.store(bgrows, vb, mask=vmask)
    return tl.where(kvalid, mf / N, 0.5), tl.where(kvalid, mb / N, 0.5)  # (rows past K: never stored)


@device_fn
def _logit_weight(fgrows, bgrows, vmask, inv_sig, KB: tl.constexpr):
    """w = (v_fg - v_bg) / sigma per row (common.h logit_weight), from the stored centroids."""
    tl.debug_barrier()  # the centroids were stored by other threads of this program
    vf = tl.load(fgrows, mask=vmask, other=0.0)
    vb = tl.load(bgrows, mask=vmask, other=0.0)
    return (vf - vb) * _rc(inv_sig, KB)


@device_fn
def _calibrate_out(camrows, zrows, orows, lo, hi, ratio, N, kvalid, KB: tl.constexpr, BLOCK_P: tl.constexpr):
    """Calibration (Eqs. 10-11) over the CAM-foreground pixels, then Eq. 12, from the
    last E-step's logits staged in ZOUT: two sweeps over N floats per row (the same
    thread reads and rewrites each staged element, so the second sweep may overwrite
    in place). Leaves Z_fg in ZOUT and the map in OUT; returns picked per row."""
    thr = ratio * (hi - lo)
    cal_f = _rfull(BLOCK_P, 0.0, KB)
    cal_b = _rfull(BLOCK_P, 0.0, KB)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = _rmask(kvalid, offs < N, KB)
        m = tl.load(_rc(camrows, KB) + _rp(offs, KB), mask=pm, other=0.0)
        zf, zb = sigmoid_pair(tl.load(_rc(zrows, KB) + _rp(offs, KB), mask=pm, other=0.0))
        fg = ((m - _rc(lo, KB)) >= _rc(thr, KB)) & pm
        cal_f += tl.where(fg, zf, 0.0)
        cal_b += tl.where(fg, zb, 0.0)
    picked = _rsum(cal_f, KB) >= _rsum(cal_b, KB)  # ties pick Z_fg
    rng = hi - lo
    safe = tl.where(rng > 0, rng, 1.0)
    for p0 in range(0, N, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        pm = _rmask(kvalid, offs < N, KB)
        m = tl.load(_rc(camrows, KB) + _rp(offs, KB), mask=pm, other=0.0)
        zf, zb = sigmoid_pair(tl.load(_rc(zrows, KB) + _rp(offs, KB), mask=pm, other=0.0))
        cn = tl.where(_rc(rng > 0, KB), (m - _rc(lo, KB)) / _rc(safe, KB), 0.0)
        tl.store(_rc(zrows, KB) + _rp(offs, KB), zf, mask=pm)
        tl.store(_rc(orows, KB) + _rp(offs, KB), tl.where(_rc(picked, KB), zf, zb) + cn, mask=pm)
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
    if KB == 1:
        kk = tl.program_id(0)  # class k of image b this program runs (the grid has exactly K)
    else:
        kk = tl.program_id(0) * KB + tl.arange(0, KB)  # classes k of image b this program runs
    kvalid = kk < K
    rows = b * K + kk.to(tl.int64)  # row r = b*K + k
    fb = image_base(F, b, stride_b, VEC_D * VEC_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = channel_mask(offs_d, d, VEC_D)
    vmask = _rmask(kvalid, dmask, KB)
    orows = OUT + rows * N
    zrows = ZOUT + rows * N
    if HAS_W:
        camrows = orows  # the CAM is computed in a pass and staged in OUT
    else:
        camrows = CAM + rows * N
    fgrows = _rc(FGOUT + rows * d, KB) + _rp(offs_d, KB)
    bgrows = _rc(BGOUT + rows * d, KB) + _rp(offs_d, KB)
    if HAS_W or V_BY_LABEL:
        y = tl.load(LABELS + rows, mask=kvalid, other=0)
    if HAS_W:
        wc = tl.load(_rc(W + y * d, KB) + _rp(offs_d, KB), mask=vmask, other=0.0)
    else:
        wc = _rfull(BLOCK_D, 0.0, KB)
    zero_v = _rfull(BLOCK_D, 0.0, KB)
    zero_k = _rscalar(0.0, KB)

    # CAM statistics: lo, hi (SPEC.md helper). With W they come from the first
    # pass over F that has to be made anyway (see the module doc).
    if HAS_W:
        lo = _rscalar(float("inf"), KB)
        hi = _rscalar(float("-inf"), KB)
    else:
        lo, hi = _rows_min_max(camrows, N, kvalid, KB, BLOCK_P)

    # Initial centroids.
    if HAS_V:
        if V_BY_LABEL:
            vrows = y
        else:
            vrows = rows
        vf = tl.load(_rc(VFG + vrows * d, KB) + _rp(offs_d, KB), mask=vmask, other=0.0)
        vb = tl.load(_rc(VBG + vrows * d, KB) + _rp(offs_d, KB), mask=vmask, other=0.0)
    else:  # training-free: CAM-masked means of the raw features (0 for an empty mask)
        if HAS_W:
            _a, _b, _c, _d, lo, hi = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                            zero_v, zero_k, wc, camrows, orows, zrows, lo, hi, ratio,
                                            0, True, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
            tl.debug_barrier()  # the staged CAM is read back by other threads
        s1, s2, c_fg, c_bg, _e, _f = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                            zero_v, zero_k, wc, camrows, orows, zrows, lo, hi, ratio,
                                            1, False, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
        vf = s1 / _rc(tl.maximum(c_fg, 1.0), KB)
        vb = s2 / _rc(tl.maximum(c_bg, 1.0), KB)
    if COSINE:
        vf = _cos_normalize(vf, KB)
        vb = _cos_normalize(vb, KB)
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
            w2 = _logit_weight(fgrows, bgrows, vmask, inv_sig, KB)
            s1, s2, mf, mb, lo, hi = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                            w2, _log_ratio(a_fg, a_bg), wc, camrows, orows, zrows, lo, hi, ratio,
                                            3, True, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
            a_fg, a_bg = _m_update(fgrows, bgrows, vmask, kvalid, s1, s2, mf, mb, N, COSINE, KB)
            t0 += 1
    # The remaining E-step + M-step iterations, one pass over F each.
    for _t in range(t0, T - 1):
        w2 = _logit_weight(fgrows, bgrows, vmask, inv_sig, KB)
        s1, s2, mf, mb, _k, _l = _sweep(fb, stride_d, stride_n, offs_d, dmask, N, kvalid,
                                        w2, _log_ratio(a_fg, a_bg), wc, camrows, orows, zrows, lo, hi, ratio,
                                        3, False, COSINE, KB, BLOCK_D, BLOCK_N, VEC_D, VEC_N, PREFETCH)
        a_fg, a_bg = _m_update(fgrows, bgrows, vmask, kvalid, s1, s2, mf, mb, N, COSINE, KB)

    # Last E-step: logits staged in ZOUT (and the CAM in OUT when T = 1 with W and tables).
    w2 = _logit_weight(fgrows, bgrows, vmask, inv_sig, KB)
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
# float32 rounding only (both are checked against the float64 reference). Every split
# kernel runs one row per program: the KB = 1 (1-D) forms of the helpers above.


@triton.jit
def _split_init(VFG, VBG, LABELS, FGOUT, BGOUT, MIX, d,
                V_BY_LABEL: tl.constexpr, COSINE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row r's initial centroids (normalised in cosine mode) into FGOUT/BGOUT; mix 1/2."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dm = offs_d < d
    if V_BY_LABEL:
        vr = tl.load(LABELS + r)
    else:
        vr = r
    vf = tl.load(VFG + vr * d + offs_d, mask=dm, other=0.0)
    vb = tl.load(VBG + vr * d + offs_d, mask=dm, other=0.0)
    if COSINE:
        vf = _cos_normalize(vf, 1)
        vb = _cos_normalize(vb, 1)
    tl.store(FGOUT + r * d + offs_d, vf, mask=dm)
    tl.store(BGOUT + r * d + offs_d, vb, mask=dm)
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
    kvalid = tl.full([], 1, tl.int1)
    fgrows = FGOUT + r * d + offs_d
    bgrows = BGOUT + r * d + offs_d
    a_fg = tl.load(MIX + 2 * r)
    a_bg = tl.load(MIX + 2 * r + 1)
    w2 = _logit_weight(fgrows, bgrows, dmask, tl.full([], 0.0, tl.float32) + inv_sigma, 1)
    bias = _log_ratio(a_fg, a_bg)
    zrows = ZOUT + r * N + start
    zero_v = tl.zeros([BLOCK_D], tl.float32)
    zero_k = tl.full([], 0.0, tl.float32)
    s1, s2, mf, mb, _lo, _hi = _sweep(fb, stride_d, stride_n, offs_d, dmask, n_loc, kvalid,
                                      w2, bias, zero_v, zrows, zrows, zrows, zero_k, zero_k, 0.0,
                                      4 if LAST else 3, False, COSINE, 1, BLOCK_D, BLOCK_N, VEC_D, VEC_N,
                                      PREFETCH)
    if not LAST:
        base = (r * P + p) * 2
        tl.store(WS + base * d + offs_d, s1, mask=dmask)
        tl.store(WS + (base + 1) * d + offs_d, s2, mask=dmask)
        tl.store(WM + base, mf)
        tl.store(WM + base + 1, mb)


@triton.jit
def _split_reduce(WS, WM, FGOUT, BGOUT, MIX, d, N, P, COSINE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row r's M-step (Eq. 9) from its P chunks' partial sums, summed in chunk order."""
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    vmask = offs_d < d
    kvalid = tl.full([], 1, tl.int1)
    s1 = tl.zeros([BLOCK_D], tl.float32)
    s2 = tl.zeros([BLOCK_D], tl.float32)
    mf = tl.full([], 0.0, tl.float32)
    mb = tl.full([], 0.0, tl.float32)
    for p in range(0, P):
        base = (r * P + p) * 2
        s1 += tl.load(WS + base * d + offs_d, mask=vmask, other=0.0)
        s2 += tl.load(WS + (base + 1) * d + offs_d, mask=vmask, other=0.0)
        mf += tl.load(WM + base)
        mb += tl.load(WM + base + 1)
    fgrows = FGOUT + r * d + offs_d
    bgrows = BGOUT + r * d + offs_d
    a_fg, a_bg = _m_update(fgrows, bgrows, vmask, kvalid, s1, s2, mf, mb, N, COSINE, 1)
    tl.store(MIX + 2 * r, a_fg)
    tl.store(MIX + 2 * r + 1, a_bg)


@triton.jit
def _split_finish(CAM, ZOUT, OUT, PICKED, SIGMA_USED, N, sigma, ratio, BLOCK_P: tl.constexpr):
    """Row r's CAM statistics, calibration and Eq. 12 from the staged logits."""
    r = tl.program_id(0).to(tl.int64)
    kvalid = tl.full([], 1, tl.int1)
    camrows = CAM + r * N
    lo, hi = _rows_min_max(camrows, N, kvalid, 1, BLOCK_P)
    picked = _calibrate_out(camrows, ZOUT + r * N, OUT + r * N, lo, hi, ratio, N, kvalid, 1, BLOCK_P)
    tl.store(PICKED + r, picked.to(tl.uint8))
    tl.store(SIGMA_USED + r, tl.full([], 0.0, tl.float32) + sigma)


GRID_AXIS1_MAX = 65535  # CUDA's grid y/z limit: _em_kernel's images, _split_pass's rows
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
    # No hand prefetch in the fused kernel (issue 17): it holds the raw next tile (16 more
    # registers per thread at 16 warps) on top of a live set already at the 128-register cap,
    # and spilled 100-650 B in the cosine, classifier-weight and training-free forms on every
    # Triton from 3.6 to 3.9. The split path's pass kernel keeps it (_prefetch).
    return dict(KB=kb, groups=triton.cdiv(int(K), kb), PREFETCH=False, **blocks)


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
    by_row = has_v and not v_by_label  # per-row centroids [B*K, d]: sliced with the images
    # Grid (groups, images): CUDA caps grid axis 1 at GRID_AXIS1_MAX, so a larger batch is
    # launched in slices of at most that many images (issue 17). Every image starts on a
    # multiple of the vector width (feature_blocks checks stride(0)), so each slice keeps
    # the blocks and load widths computed for the whole batch.
    with _device_of(f3):
        for b0, b1 in image_slices(B):
            r0, r1 = b0 * K, b1 * K
            _em_kernel[(groups, b1 - b0)](
                f3[b0:b1], f3.stride(0), f3.stride(1), f3.stride(2),
                cam[r0:r1] if cam is not None else dummy, weight if has_w else dummy,
                v_fg[r0:r1] if by_row else v_fg if has_v else dummy,
                v_bg[r0:r1] if by_row else v_bg if has_v else dummy,
                labels[r0:r1] if labels is not None else dummy,
                out[r0:r1], z[r0:r1], fg_out[r0:r1], bg_out[r0:r1], mix[r0:r1], picked[r0:r1], sigma_used[r0:r1],
                K, d, N, int(num_iters), sig, inv, float(ratio),
                HAS_W=has_w, HAS_V=has_v, V_BY_LABEL=bool(v_by_label), SIGMA_AUTO=sigma_auto,
                COSINE=bool(cosine), BLOCK_P=line_block(N), num_stages=1, **cfg,
            )


def image_slices(B: int):
    """[(b0, b1)]: the image ranges of the launches of a batch of B images, each at most
    GRID_AXIS1_MAX (read at call time, so a test can lower it)."""
    step = int(GRID_AXIS1_MAX)
    return [(b0, min(B, b0 + step)) for b0 in range(0, int(B), step)]


def _device_of(t: torch.Tensor):
    """Launch on the tensor's device (Triton uses the current device's stream)."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
