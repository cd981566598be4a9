"""Context embedding update (SPEC.md Op 1) as one Triton kernel.

Design
------
Grid ``(B,)``: program b computes sample b's statistics, exactly as the EM
kernel walks an image (whole-d-resident pixel tiles, see _common.py):

    cam given          pass over cam[b] (lo, hi), 1 pass over F: masked sums
    classifier weight  pass 1 over F: cam_i = W[y_b] . f_i -> lo, hi
                       pass 2 over F: the same dot recomputed from the same
                       tile (same instructions, same values), mask, sums

(The CAM is never stored: the workspace is O(B*d), and recomputing a
d-long dot per pixel is free next to reading the tile again.) Then
means[b] = S / count and nonempty[b] go to the O(B*d) workspace.

Sequential, deterministic update with no order-dependent atomics: the updates
of one class compose in batch order, and different classes are independent.
So the update is applied per class, by exactly one program, which walks that
class's samples in batch order with the table rows held in registers
(row <- lambda*row + (1-lambda)*mean per sample), which is SPEC.md's loop
bit for bit in float32. Who applies:

  * a label that occurs once in the batch (the usual case): its own program,
    straight from registers, with no atomic at all;
  * a repeated label: a per-class ticket. Each member program, after its
    statistics are stored (barrier + release), takes a ticket from the
    counter of the class's first batch index (atomic add, acq_rel); the one
    that draws the last ticket has seen every member's statistics (acquire,
    L1-bypassing .cg loads) and applies them all in batch order. The ticket
    decides only who applies, never the order, so the result is deterministic
    whatever the scheduling.

This keeps the stats fully parallel over the batch, and the serial part is
per class, as long as the multiplicity of the label (1-3 in a batch of 32
drawn from 200-1000 classes). The counters are an int32 [B] zero-filled
tensor (one memset beside the launch). The alternative the brief mentions,
a grid over channel tiles with every program walking all samples, needs no
counters, but its parallelism is d/BLOCK (32-128 programs) with a serial B
loop per program, and it cannot compute the CAM from the classifier weight
(a dot over all channels), so it was not chosen.

Offsets inside an image are int64 (``_common.load_raw``, issue 11): an image
of more than 2^31 elements is read correctly. Aliasing (features, CAM or
classifier weight sharing memory with the tables being updated): the fused
launch could update a row while another program still reads it, so
``context_update`` then runs ``context_stats`` and ``context_apply`` as two
launches (every read before any write; ops.py also rejects such inputs for
the public API).

``context_stats`` is the same kernel without the update; ``context_apply``
(distributed path: statistics gathered from all ranks) is a kernel over
samples where the program of each label's first occurrence applies that
class's updates in batch order, as above.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import channel_mask, device_fn, feature_blocks, image_base, line_block, next_pow2, sample_stats
from .em import _device_of


@device_fn
def _class_span(LABELS, y, lo, hi, BLOCK_B: tl.constexpr):
    """(first index j in [lo, hi) with LABELS[j] == y, or hi; number of such j)."""
    first_v = tl.full([BLOCK_B], hi, tl.int32)
    cnt_v = tl.zeros([BLOCK_B], tl.int32)
    for c0 in range(lo, hi, BLOCK_B):
        idx = c0 + tl.arange(0, BLOCK_B)
        lm = idx < hi
        hit = (tl.load(LABELS + idx, mask=lm, other=-1) == y) & lm
        first_v = tl.minimum(first_v, tl.where(hit, idx, hi))
        cnt_v += hit.to(tl.int32)
    return tl.min(first_v, axis=0), tl.sum(cnt_v, axis=0)


@device_fn
def _apply_class(FG, BG, MEANS, NONEMPTY, LABELS, y, first, B, d, lam,
                 BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    """SPEC.md's sequential update for class y: every j >= first with
    LABELS[j] == y, in batch order, rows held in registers. MEANS/NONEMPTY may
    have been written by other programs of this launch: read them from L2."""
    one_minus = 1.0 - lam
    for k0 in range(0, d, BLOCK_D):
        offs = k0 + tl.arange(0, BLOCK_D)
        dm = offs < d
        rf = tl.load(FG + y * d + offs, mask=dm, other=0.0)
        rb = tl.load(BG + y * d + offs, mask=dm, other=0.0)
        for c0 in range(first, B, BLOCK_B):
            idx = c0 + tl.arange(0, BLOCK_B)
            lm = idx < B
            hit = (tl.load(LABELS + idx, mask=lm, other=-1) == y) & lm
            prev = c0 - 1
            for _s in range(tl.sum(hit.to(tl.int32), axis=0)):
                j = tl.min(tl.where(hit & (idx > prev), idx, B), axis=0)  # next member, in order
                prev = j
                jj = j.to(tl.int64)
                ne_f = tl.load(NONEMPTY + 2 * jj, cache_modifier=".cg")
                ne_b = tl.load(NONEMPTY + 2 * jj + 1, cache_modifier=".cg")
                mf = tl.load(MEANS + jj * 2 * d + offs, mask=dm, other=0.0, cache_modifier=".cg")
                mb = tl.load(MEANS + jj * 2 * d + d + offs, mask=dm, other=0.0, cache_modifier=".cg")
                rf = tl.where(ne_f != 0, lam * rf + one_minus * mf, rf)
                rb = tl.where(ne_b != 0, lam * rb + one_minus * mb, rb)
        tl.store(FG + y * d + offs, rf, mask=dm)
        tl.store(BG + y * d + offs, rb, mask=dm)


@triton.jit
def _context_kernel(
    F, stride_b, stride_d, stride_n, LABELS, CAM, W, MEANS, NONEMPTY,
    FG, BG, TICKETS,
    B, d, N, ratio, lam,
    HAS_W: tl.constexpr, FUSED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    VEC_D: tl.constexpr, VEC_N: tl.constexpr, BLOCK_B: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    y = tl.load(LABELS + b)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = channel_mask(offs_d, d, VEC_D)
    mean_f, mean_b, c_fg, c_bg = sample_stats(
        image_base(F, b, stride_b, VEC_D * VEC_N), stride_d, stride_n, CAM + b * N, W, y, d, N, ratio, offs_d, dmask,
        HAS_W, BLOCK_D, BLOCK_N, BLOCK_P, VEC_D, VEC_N,
    )
    if FUSED:
        first, count = _class_span(LABELS, y, 0, B, BLOCK_B)
        if count == 1:  # the only sample of its class: update from registers
            one_minus = 1.0 - lam
            rf = tl.load(FG + y * d + offs_d, mask=dmask, other=0.0)
            rb = tl.load(BG + y * d + offs_d, mask=dmask, other=0.0)
            rf = tl.where(c_fg > 0, lam * rf + one_minus * mean_f, rf)
            rb = tl.where(c_bg > 0, lam * rb + one_minus * mean_b, rb)
            tl.store(FG + y * d + offs_d, rf, mask=dmask)
            tl.store(BG + y * d + offs_d, rb, mask=dmask)
        else:
            tl.store(MEANS + b * 2 * d + offs_d, mean_f, mask=dmask)
            tl.store(MEANS + b * 2 * d + d + offs_d, mean_b, mask=dmask)
            tl.store(NONEMPTY + 2 * b, (c_fg > 0).to(tl.uint8))
            tl.store(NONEMPTY + 2 * b + 1, (c_bg > 0).to(tl.uint8))
            tl.debug_barrier()  # every thread's stores precede the release below
            ticket = tl.atomic_add(TICKETS + first, 1, sem="acq_rel", scope="gpu")
            if ticket == count - 1:  # last member to finish: all stats are visible
                _apply_class(FG, BG, MEANS, NONEMPTY, LABELS, y, first, B, d, lam, BLOCK_D, BLOCK_B)
    else:
        tl.store(MEANS + b * 2 * d + offs_d, mean_f, mask=dmask)
        tl.store(MEANS + b * 2 * d + d + offs_d, mean_b, mask=dmask)
        tl.store(NONEMPTY + 2 * b, (c_fg > 0).to(tl.uint8))
        tl.store(NONEMPTY + 2 * b + 1, (c_bg > 0).to(tl.uint8))


@triton.jit
def _apply_kernel(FG, BG, MEANS, NONEMPTY, LABELS, B, d, lam,
                  BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    """Program b applies its class's updates iff b is the class's first sample."""
    b = tl.program_id(0)
    y = tl.load(LABELS + b)
    _, earlier = _class_span(LABELS, y, 0, b, BLOCK_B)
    if earlier == 0:
        _apply_class(FG, BG, MEANS, NONEMPTY, LABELS, y, b, B, d, lam, BLOCK_D, BLOCK_B)


def _launch_context(f3, labels, cam, weight, ratio, means, nonempty, fg, bg, momentum, fused):
    B, d, N = f3.shape
    dummy = means  # stands in for absent pointers; never read (constexpr-guarded)
    tickets = torch.zeros(B, dtype=torch.int32, device=f3.device) if fused else dummy
    with _device_of(f3):
        _context_kernel[(B,)](
            f3, f3.stride(0), f3.stride(1), f3.stride(2), labels,
            cam if cam is not None else dummy, weight if weight is not None else dummy, means, nonempty,
            fg if fused else dummy, bg if fused else dummy, tickets,
            B, d, N, float(ratio), float(momentum),
            HAS_W=weight is not None, FUSED=fused,
            BLOCK_P=line_block(N), BLOCK_B=line_block(B), num_stages=1, **feature_blocks(f3),
        )


def context_stats(f3, labels, cam, weight, ratio, means, nonempty) -> None:
    """means[b] = (fg mean, bg mean) float32 [B, 2, d], nonempty uint8 [B, 2]."""
    if f3.shape[0] == 0:
        return
    _launch_context(f3, labels, cam, weight, ratio, means, nonempty, None, None, 0.0, fused=False)


def context_apply(fg, bg, means, nonempty, labels, momentum) -> None:
    """SPEC.md's sequential update in batch order, in place on the [C, d] tables."""
    B, _, d = means.shape
    if B == 0:
        return
    block_d = max(16, min(next_pow2(d), 4096))
    with _device_of(means):
        _apply_kernel[(B,)](
            fg, bg, means, nonempty, labels, B, d, float(momentum),
            BLOCK_D=block_d, BLOCK_B=line_block(B), num_warps=4 if block_d <= 1024 else 8,
        )


def _overlaps(a, b) -> bool:
    """Whether tensors a and b may share memory (their storages' byte spans intersect)."""
    if a is None or b is None:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    a0, b0 = sa.data_ptr(), sb.data_ptr()
    return a0 < b0 + sb.nbytes() and b0 < a0 + sa.nbytes()


def context_update(fg, bg, f3, labels, cam, weight, ratio, momentum, means, nonempty) -> None:
    """The fused op: statistics and the sequential update in one launch
    (``means``/``nonempty`` are the O(B*d) workspace for repeated labels).

    Aliasing (issue 11): in the fused launch a program may update a table row
    while another program still reads its features, CAM or classifier weight,
    so when any of those shares memory with the tables being updated the
    update runs as two launches instead, statistics of every sample first,
    then the update (read before write; the result is SPEC.md's, computed
    from the inputs as they were before the call). ops.py rejects such
    overlaps for the public API; this keeps a direct call correct too."""
    if f3.shape[0] == 0:
        return
    if any(_overlaps(x, t) for x in (f3, cam, weight) for t in (fg, bg)):
        context_stats(f3, labels, cam, weight, ratio, means, nonempty)
        context_apply(fg, bg, means, nonempty, labels, momentum)
        return
    _launch_context(f3, labels, cam, weight, ratio, means, nonempty, fg, bg, momentum, fused=True)
