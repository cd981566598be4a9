"""The oracle: SPEC.md written as plain, batched PyTorch.

Every other backend is tested against these functions. They favour being
readable next to SPEC.md over being fast: the whole computation runs in
``compute_dtype`` (float64 by default, so the oracle is more accurate than any
float32 kernel it checks), with no per-image Python loop except the sequential
momentum update that SPEC.md defines as a loop.

Inputs are assumed valid (``cream_kernels.ops`` validates); the functions here
never mutate their inputs except ``context_apply``/``update_context_embeddings``,
which update the embedding tables in place, as the op does.

Symbols follow SPEC.md: F is [B, d, h, w], N = h*w, C classes.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

EPS = 1e-12  # SPEC.md: cosine normalisation eps
AUTO_SIGMA_REL_FLOOR = 1e-6  # SPEC.md sigma = auto: s <= 1e-6 * max |Delta| counts as no spread


class EMResult(NamedTuple):
    """What ``em_reactivate`` returns with ``return_extras=True``.

    Shapes are for the [B] label / [B, h, w] CAM call; a call with K classes per
    image ([B, K] labels or a [B, K, h, w] CAM) has a K axis after B in every
    field, and an unbatched call (features [d, h, w]) has no B axis.

    output      float32 [B, h, w]: calibrated map + min-max normalised CAM, in [0, 2]
    z_fg        float32 [B, h, w]: foreground posterior of the last E-step
    fg_centroid float32 [B, d]: centroid used by the last E-step (unit norm for cosine)
    bg_centroid float32 [B, d]
    mix         float32 [B, 2]: mixing weights (a_fg, a_bg) used by the last E-step
    picked_fg   bool [B]: True where calibration picked Z_fg, False where it picked Z_bg
    sigma_used  float32 [B]: the temperature each row used (the given sigma, or the
                one sigma="auto" chose; +inf where auto found no spread, Z = a)
    """

    output: Tensor
    z_fg: Tensor
    fg_centroid: Tensor
    bg_centroid: Tensor
    mix: Tensor
    picked_fg: Tensor
    sigma_used: Tensor


def cam_foreground_mask(cam: Tensor, ratio: float) -> Tensor:
    """SPEC.md shared helper. ``cam`` is [B, N]; returns a bool mask [B, N].

    fg_i = (m_i - lo) >= r * (hi - lo); a constant map is all foreground.
    """
    lo = cam.amin(dim=1, keepdim=True)
    hi = cam.amax(dim=1, keepdim=True)
    return (cam - lo) >= ratio * (hi - lo)


def normalized_cam(cam: Tensor) -> Tensor:
    """(cam - lo) / (hi - lo) per image, 0 where hi == lo. ``cam`` is [B, N]."""
    lo = cam.amin(dim=1, keepdim=True)
    hi = cam.amax(dim=1, keepdim=True)
    rng = hi - lo
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    return torch.where(rng > 0, (cam - lo) / safe, torch.zeros_like(cam))


def _masked_mean(f: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """f [B, d, N], mask [B, N] (float 0/1) -> (mean [B, d], non-empty [B] bool).

    An empty mask gives a zero mean (never NaN)."""
    count = mask.sum(dim=1)
    total = torch.einsum("bdn,bn->bd", f, mask)
    nonempty = count > 0
    mean = total / torch.where(nonempty, count, torch.ones_like(count)).unsqueeze(1)
    return mean, nonempty


def _l2_normalize(x: Tensor, dim: int) -> Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(EPS)


# --------------------------------------------------------------------------- #
# Op 1: context embedding update (SPEC.md, Eqs. 3-4)
# --------------------------------------------------------------------------- #
def context_stats(
    features: Tensor,
    labels: Tensor,
    cam: Optional[Tensor] = None,
    classifier_weight: Optional[Tensor] = None,
    cam_threshold: float = 0.2,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """Per-sample masked means.

    Returns ``means`` float32 [B, 2, d] (index 0 = fg, 1 = bg) and ``nonempty``
    bool [B, 2] (whether that mask had any pixel)."""
    B, d, h, w = features.shape
    f = features.reshape(B, d, h * w).to(compute_dtype)
    if cam is None:
        w = classifier_weight.to(compute_dtype)[labels]  # [B, d]
        cam_flat = torch.einsum("bdn,bd->bn", f, w)  # Eq. 1, bias ignored
    else:
        cam_flat = cam.reshape(B, h * w).to(compute_dtype)
    fg = cam_foreground_mask(cam_flat, cam_threshold).to(compute_dtype)
    mean_fg, ne_fg = _masked_mean(f, fg)
    mean_bg, ne_bg = _masked_mean(f, 1.0 - fg)
    means = torch.stack([mean_fg, mean_bg], dim=1).to(torch.float32)
    return means, torch.stack([ne_fg, ne_bg], dim=1)


def context_apply(
    fg_embedding: Tensor,
    bg_embedding: Tensor,
    means: Tensor,
    nonempty: Tensor,
    labels: Tensor,
    momentum: float,
) -> None:
    """The sequential momentum update, in batch order, in place.

    emb_m[y_b] <- lambda * emb_m[y_b] + (1 - lambda) * mean_m_b for each b whose
    mask m is non-empty. Done in float64 and stored back as float32 after each
    step, as a float32 table would hold it."""
    tables = (fg_embedding, bg_embedding)
    ys = labels.tolist()
    flags = nonempty.tolist()
    means64 = means.to(torch.float64)
    for b, y in enumerate(ys):
        for m in range(2):
            if flags[b][m]:
                row = tables[m][y].to(torch.float64)
                tables[m][y] = (momentum * row + (1.0 - momentum) * means64[b, m]).to(tables[m].dtype)


def update_context_embeddings(
    fg_embedding: Tensor,
    bg_embedding: Tensor,
    features: Tensor,
    labels: Tensor,
    cam: Optional[Tensor] = None,
    classifier_weight: Optional[Tensor] = None,
    momentum: float = 0.8,
    cam_threshold: float = 0.2,
) -> None:
    """Op 1 end to end: per-sample masked means, then the sequential update."""
    means, nonempty = context_stats(features, labels, cam, classifier_weight, cam_threshold)
    context_apply(fg_embedding, bg_embedding, means, nonempty, labels, momentum)


# --------------------------------------------------------------------------- #
# Op 2: EM re-activation (SPEC.md, Eqs. 5-12)
# --------------------------------------------------------------------------- #
def auto_sigma(f: Tensor, v_fg: Tensor, v_bg: Tensor) -> tuple[Tensor, Tensor]:
    """SPEC.md "sigma = auto" for rows of f [R, d, N] (as the E-step sees them)
    and initial centroids [R, d]. Returns (sigma [R], flat [R] bool): sigma = s / 2
    with s the population std of Delta_i = (v_fg - v_bg) . f_i over the row's
    pixels; ``flat`` where s <= 1e-6 * max_i |Delta_i| (the similarity term is then
    dropped and the sigma reported is +inf)."""
    delta = torch.einsum("rdn,rd->rn", f, v_fg - v_bg)
    mu = delta.mean(dim=1, keepdim=True)
    s = (delta - mu).square().mean(dim=1).sqrt()
    flat = s <= AUTO_SIGMA_REL_FLOOR * delta.abs().amax(dim=1)
    sigma = torch.where(flat, torch.full_like(s, math.inf), s / 2)
    return sigma, flat


def em_reactivate(
    features: Tensor,
    cam: Optional[Tensor],
    fg_centroid: Optional[Tensor],
    bg_centroid: Optional[Tensor],
    num_iters: int = 2,
    sigma: float = 8.0,
    cam_threshold: float = 0.2,
    cosine: bool = False,
    compute_dtype: torch.dtype = torch.float64,
    *,
    K: int = 1,
    weight: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    sigma_auto: bool = False,
) -> EMResult:
    """Op 2 with SPEC.md's extensions, on R = B*K rows (row r = b*K + k re-activates
    the k-th class of image b). ``cam`` is [R, h, w] (for K = 1 also [B, h, w]), or
    None with ``weight`` [C, d] and ``labels`` [R]: cam_r,i = weight[labels[r]] . f_i
    on the raw features. ``fg_centroid``/``bg_centroid`` are per row [R, d] (the
    caller gathers table rows by label), or both None for the training-free mode,
    where the initial centroids are the row's CAM-masked fg/bg feature means (a
    zero vector for an empty mask). ``sigma_auto`` replaces ``sigma`` by SPEC.md's
    per-row rule (see :func:`auto_sigma`). The result has R rows."""
    B, d, h, w = features.shape
    N = h * w
    R = B * K
    f = features.reshape(B, d, N).to(compute_dtype)
    if K > 1:
        f = f.repeat_interleave(K, dim=0)  # [R, d, N]: the oracle favours clarity over memory
    if cam is None:
        m = torch.einsum("rdn,rd->rn", f, weight.to(compute_dtype)[labels])  # Eq. 1, bias ignored
    else:
        m = cam.reshape(R, N).to(compute_dtype)
    fg_mask = cam_foreground_mask(m, cam_threshold).to(compute_dtype)

    if fg_centroid is None:
        v_fg, _ = _masked_mean(f, fg_mask)
        v_bg, _ = _masked_mean(f, 1.0 - fg_mask)
    else:
        v_fg = fg_centroid.to(compute_dtype)
        v_bg = bg_centroid.to(compute_dtype)

    if cosine:
        f = _l2_normalize(f, dim=1)
        v_fg = _l2_normalize(v_fg, dim=1)
        v_bg = _l2_normalize(v_bg, dim=1)

    if sigma_auto:
        sig, flat = auto_sigma(f, v_fg, v_bg)
        div = torch.where(flat, torch.ones_like(sig), sig).unsqueeze(1)  # [R, 1]
        keep = torch.where(flat, torch.zeros_like(sig), torch.ones_like(sig)).unsqueeze(1)
        sigma_used = sig
    else:
        div, keep = sigma, None
        sigma_used = torch.full((R,), float(sigma), dtype=compute_dtype, device=f.device)

    def similarity(v: Tensor) -> Tensor:
        s = torch.einsum("bdn,bd->bn", f, v) / div
        return s if keep is None else s * keep  # flat rows: Z = a (NaN features stay NaN)

    a_fg = torch.full((R,), 0.5, dtype=compute_dtype, device=f.device)
    a_bg = torch.full((R,), 0.5, dtype=compute_dtype, device=f.device)
    for t in range(1, num_iters + 1):
        # E-step (Eqs. 7-8)
        s_fg = torch.log(a_fg).unsqueeze(1) + similarity(v_fg)
        s_bg = torch.log(a_bg).unsqueeze(1) + similarity(v_bg)
        z_fg = torch.sigmoid(s_fg - s_bg)
        z_bg = torch.sigmoid(s_bg - s_fg)  # = 1 - z_fg, computed without cancellation
        if t == num_iters:
            break
        # M-step (Eq. 9)
        new = []
        for z, v in ((z_fg, v_fg), (z_bg, v_bg)):
            mass = z.sum(dim=1)  # [R]
            total = torch.einsum("bdn,bn->bd", f, z)
            has = (mass > 0).unsqueeze(1)
            v_new = torch.where(has, total / torch.where(has, mass.unsqueeze(1), torch.ones_like(total)), v)
            if cosine:
                v_new = _l2_normalize(v_new, dim=1)
            new.append((v_new, mass / N))
        (v_fg, a_fg), (v_bg, a_bg) = new

    # Calibration (Eqs. 10-11): compare the mean posteriors over CAM-fg pixels.
    # Both means share the denominator (the fg pixel count, never 0), so the
    # sums are compared directly.
    zbar_fg = (z_fg * fg_mask).sum(dim=1)
    zbar_bg = (z_bg * fg_mask).sum(dim=1)
    picked_fg = zbar_fg >= zbar_bg
    cal = torch.where(picked_fg.unsqueeze(1), z_fg, z_bg)
    out = cal + normalized_cam(m)  # Eq. 12

    f32 = torch.float32
    return EMResult(
        output=out.to(f32).reshape(R, h, w),
        z_fg=z_fg.to(f32).reshape(R, h, w),
        fg_centroid=v_fg.to(f32),
        bg_centroid=v_bg.to(f32),
        mix=torch.stack([a_fg, a_bg], dim=1).to(f32),
        picked_fg=picked_fg,
        sigma_used=sigma_used.to(f32),
    )
