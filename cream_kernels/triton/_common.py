"""Pieces shared by ``em.py`` and ``context.py``: block-size choice and the
per-tile math as ``@triton.jit`` helpers (the Triton twin of csrc/common.h).

Layout: every kernel reads one image's features as a [d, N] matrix through
element strides (``stride_d``, ``stride_n``), one of which is 1 (NCHW has unit
stride over pixels, channels_last over channels; ops.py guarantees one of the
two). Triton specialises an integer argument equal to 1, so the unit stride is
known at compile time and the loads are vectorised along that axis, whichever
it is; nothing is ever copied.

Tiles are "whole-d resident": a tile holds all d channels (BLOCK_D =
next_pow2(d)) of BLOCK_N pixels, so a per-pixel dot product over the channels
(logit, CAM, squared norm) is finished inside the tile and the posterior it
gives can weight the same registers at once. That is how one pass over F serves
an E-step and the M-step after it, without a scratch buffer and without reading
the tile twice.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import INTERPRET


def device_fn(fn):
    """``@triton.jit`` for a device function (one a kernel calls). Under
    TRITON_INTERPRET=1 the plain Python function is kept instead: the
    interpreter runs the kernel as Python with triton.language already
    patched, and Triton 3.9's interpreter re-patches the whole language
    module (inspect.getmembers over it) on every call of a jitted device
    function, ~15 ms each, which made a small test call take seconds. Only
    the interpreter path changes; compiled kernels are the same."""
    return fn if INTERPRET else triton.jit(fn)


EPS = 1e-12  # SPEC.md cosine eps (common.h kEps)

# Block sizes (issue 11: sized by the registers they cost and the bytes they
# load, not by a fixed element count). A tile [BLOCK_D, BLOCK_N] holds every
# channel of BLOCK_N pixels and is converted to float32 in registers, so its
# register cost is BLOCK_D * BLOCK_N / threads whatever the dtype; what it
# loads is that times the element size. Beside the tile a pass carries
# VEC_ROWS [BLOCK_D] vectors per EM row (the logit weight and the two M-step
# sums), for KB rows at once. Triton lays a tile out with its threads along
# the unit-stride axis first, so:
#   channels_last (unit stride over d): threads run along d and every
#     [BLOCK_D] vector has one copy per element; BLOCK_N pixels sit in each
#     thread's registers.
#   NCHW (unit stride over N): a pixel row is shared by BLOCK_N / VEC_N
#     threads and each [BLOCK_D] vector is replicated that many times.
# The rule (feature_blocks): BLOCK_N is the largest power of 2 <= N such that
#   tile registers    KB * BLOCK_D * BLOCK_N / threads   <= TILE_REGS
#   vector registers  VEC_ROWS * KB * BLOCK_D * replicas / threads <= VEC_REGS
# and, in NCHW, BLOCK_N >= VEC_N where the vector budget allows, so each
# channel row is read as whole 16-byte vectors (the old fixed 8192-element
# NCHW tile gave bf16 d=2048 4 pixels = 8-byte loads). VEC_N / VEC_D is the
# widest vector the row alignment allows; the kernels restate strides as
# (x // VEC) * VEC so Triton can use it (it only specialises divisibility by
# 16, and 14x14 = 196 is not, though 196 fp32 rows are 16-byte aligned).
# Measured register/spill figures at sm_90 are in em.py's docstring.
TILE_REGS = 32
VEC_REGS = 48
VEC_ROWS = 3
MIN_BLOCK = 16  # keeps every arange/reduction at least 16 wide (d=1, 1x1 maps)


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def _vec(f3, along: int) -> int:
    """Widest power-of-2 vector (<= 16 bytes) along unit-stride axis ``along``
    (1 = d, 2 = N) that every row start and the row length are multiples of."""
    B, d, N = f3.shape
    length = d if along == 1 else N
    other = f3.stride(2) if along == 1 else f3.stride(1)
    esize = f3.element_size()
    vec = 16 // esize
    while vec > 1:
        if (length % vec == 0 and other % vec == 0 and f3.stride(0) % vec == 0
                and f3.data_ptr() % (vec * esize) == 0):
            return vec
        vec //= 2
    return 1


def feature_blocks(f3, kb: int = 1) -> dict:
    """Launch parameters for a whole-d-resident [d, N] tile loop over f3 [B, d, N]
    carrying ``kb`` EM rows: BLOCK_D, BLOCK_N, VEC_D, VEC_N (constexpr) and num_warps."""
    B, d, N = f3.shape
    block_d = max(MIN_BLOCK, next_pow2(d))
    n_cap = max(MIN_BLOCK, next_pow2(N))
    cl = f3.stride(2) != 1  # channels_last: unit stride over d (ops.feature_view)
    vec_d, vec_n = (_vec(f3, 1), 1) if cl else (1, _vec(f3, 2))
    num_warps = 16 if block_d >= 512 else 8 if block_d >= 128 else 4
    threads = 32 * num_warps

    def cost(bn):
        replicas = 1 if cl else max(1, min(bn // vec_n, threads))
        # the KB-row products [KB, BLOCK_D, BLOCK_N] are KB tiles' worth of registers
        return kb * block_d * bn / threads, VEC_ROWS * kb * block_d * replicas / threads

    block_n = 2
    while block_n * 2 <= n_cap:
        tile_r, vec_r = cost(block_n * 2)
        if tile_r > TILE_REGS or vec_r > VEC_REGS:
            break
        block_n *= 2
    if not cl and block_n < vec_n <= n_cap and cost(vec_n)[0] <= 2 * TILE_REGS:
        block_n = vec_n  # whole 16-byte vectors per channel row
    block_n = min(block_n, n_cap)
    tile = block_d * block_n
    if tile < 2048:  # small problems: fewer warps, no idle lanes
        num_warps = 4 if tile < 1024 else min(num_warps, 8)
    return dict(BLOCK_D=block_d, BLOCK_N=block_n, VEC_D=vec_d, VEC_N=vec_n, num_warps=num_warps)


def line_block(n: int, cap: int = 1024) -> int:
    """Block for a 1-D loop over n values (a CAM row, a label vector)."""
    return max(MIN_BLOCK, min(next_pow2(n), cap))


@device_fn
def image_base(F, b, stride_b, VEC: tl.constexpr):
    """Start of image b; the stride is restated as a multiple of VEC (true by
    construction in feature_blocks) so vectorised loads stay provably aligned."""
    return F + b * ((stride_b // VEC) * VEC)


@device_fn
def load_raw(fb, stride_d, stride_n, offs_d, dmask, n0, N, BLOCK_N: tl.constexpr,
             VEC_D: tl.constexpr, VEC_N: tl.constexpr):
    """F[:, n0:n0+BLOCK_N] of one image [BLOCK_D, BLOCK_N] in the feature dtype;
    masked channels and pixels (all of them when n0 >= N: no memory access) read as 0.

    Offsets inside the image are int64 (issue 11): d * N, or a stride times a
    pixel index, may exceed 2^31 (d=2048 at 1024x1024). The unit stride is a
    compile-time 1 (Triton specialises it), so only the other axis pays for
    the 64-bit multiply, and its [BLOCK_D] or scalar part is loop-invariant."""
    offs_t = tl.arange(0, BLOCK_N)
    offs_n = n0 + offs_t
    # alignment hints (no-ops numerically, see feature_blocks)
    sd = (stride_d // VEC_N) * VEC_N
    sn = (stride_n // VEC_D) * VEC_D
    lmask = (offs_n < (N // VEC_N) * VEC_N)[None, :] & dmask[:, None]
    base = fb + (tl.full([], 0, tl.int64) + n0) * sn  # int64 * stride: 64-bit products
    ptrs = base + offs_d.to(tl.int64)[:, None] * sd + offs_t.to(tl.int64)[None, :] * sn
    return tl.load(ptrs, mask=lmask, other=0.0)


@device_fn
def load_tile(fb, stride_d, stride_n, offs_d, dmask, n0, N, BLOCK_N: tl.constexpr,
              VEC_D: tl.constexpr, VEC_N: tl.constexpr):
    """load_raw as float32, with (tile, pixel offsets, pixel mask)."""
    f = load_raw(fb, stride_d, stride_n, offs_d, dmask, n0, N, BLOCK_N, VEC_D, VEC_N).to(tl.float32)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    return f, offs_n, offs_n < N


@device_fn
def channel_mask(offs_d, d, VEC_D: tl.constexpr):
    """offs_d < d, written so that Triton sees d as a multiple of VEC_D."""
    return offs_d < (d // VEC_D) * VEC_D


@device_fn
def inv_norm(sumsq):
    """1 / max(||x||, eps) from the sum of squares (common.h inv_norm)."""
    return 1.0 / tl.maximum(tl.sqrt_rn(sumsq), 1e-12)


@device_fn
def sigmoid_pair(x):
    """(sigmoid(x), sigmoid(-x)) with one exp and no cancellation (common.h
    sigmoid): t = exp(-|x|) <= 1, so 1/(1+t) and t/(1+t) are both exact-ish.
    NaN in, NaN out; -inf gives (0, 1), +inf gives (1, 0)."""
    t = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + t)
    p = t / (1.0 + t)
    return tl.where(x >= 0, r, p), tl.where(x > 0, p, r)


@device_fn
def row_min_max(ptr, N, BLOCK: tl.constexpr):
    """(min, max) of the float32 row ptr[0:N] (SPEC.md's lo and hi)."""
    lo_v = tl.full([BLOCK], float("inf"), tl.float32)
    hi_v = tl.full([BLOCK], float("-inf"), tl.float32)
    for p0 in range(0, N, BLOCK):
        offs = p0 + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(ptr + offs, mask=m, other=0.0)
        lo_v = tl.minimum(lo_v, tl.where(m, x, float("inf")))
        hi_v = tl.maximum(hi_v, tl.where(m, x, float("-inf")))
    return tl.min(lo_v, axis=0), tl.max(hi_v, axis=0)


@device_fn
def sample_stats(
    fb, stride_d, stride_n, camb, W, y, d, N, ratio, offs_d, dmask,
    HAS_W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    VEC_D: tl.constexpr, VEC_N: tl.constexpr,
):
    """Masked fg/bg means of one sample: (mean_fg, mean_bg, count_fg, count_bg)."""
    if HAS_W:  # Eq. 1 in the kernel: cam_i = W[y] . f_i (bias ignored)
        w = tl.load(W + y * d + offs_d, mask=dmask, other=0.0)
        lo_v = tl.full([BLOCK_N], float("inf"), tl.float32)
        hi_v = tl.full([BLOCK_N], float("-inf"), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            f, offs_n, nmask = load_tile(fb, stride_d, stride_n, offs_d, dmask, n0, N, BLOCK_N, VEC_D, VEC_N)
            m = tl.sum(f * w[:, None], axis=0)
            lo_v = tl.minimum(lo_v, tl.where(nmask, m, float("inf")))
            hi_v = tl.maximum(hi_v, tl.where(nmask, m, float("-inf")))
        lo = tl.min(lo_v, axis=0)
        hi = tl.max(hi_v, axis=0)
    else:
        lo, hi = row_min_max(camb, N, BLOCK_P)
    thr = ratio * (hi - lo)
    s1 = tl.zeros([BLOCK_D], tl.float32)
    s2 = tl.zeros([BLOCK_D], tl.float32)
    cnt = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        f, offs_n, nmask = load_tile(fb, stride_d, stride_n, offs_d, dmask, n0, N, BLOCK_N, VEC_D, VEC_N)
        if HAS_W:
            m = tl.sum(f * w[:, None], axis=0)
        else:
            m = tl.load(camb + offs_n, mask=nmask, other=0.0)
        u = (((m - lo) >= thr) & nmask).to(tl.float32)
        ub = tl.where(nmask, 1.0 - u, 0.0)
        s1 += tl.sum(f * u[None, :], axis=1)
        s2 += tl.sum(f * ub[None, :], axis=1)
        cnt += u
    c_fg = tl.sum(cnt, axis=0)
    c_bg = N - c_fg
    # masked_mean: an empty mask gives 0 (its sums are 0), never NaN
    return s1 / tl.maximum(c_fg, 1.0), s2 / tl.maximum(c_bg, 1.0), c_fg, c_bg
