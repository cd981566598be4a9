"""WSOL localization metrics, following clovaai/wsolevaluation's definitions.

Everything here reproduces the numbers of wsolevaluation (``evaluation.py`` and
``inference.py`` at the commit in ``../shared/wsol-metadata/SOURCE_COMMIT``), see
the "Evaluation conventions" section of SPEC.md. The code is our own; the rules are:

* :func:`normalize_scoremap`: bicubic upsampling of the raw map to ``size x size``
  (``cv2.INTER_CUBIC``, computed in float64 as upstream, whose ``t2n`` casts the map
  to float64 first), then per-image min-max normalization; a map with a NaN
  (or any non-finite value) becomes all zeros, and so does a map that is constant
  *after* the upsampling. A constant raw map is usually not: the bicubic weights
  leave float64 rounding noise (a few ulps of the value) that the min-max
  normalization stretches to [0, 1] (exact zeros stay zeros). This is upstream's
  behaviour, kept for bit-exact metrics.
* :func:`boxes_from_map` (one threshold; public as ``cream_wsol.boxes_from_map``),
  :func:`compute_bboxes_from_scoremaps` (many) and :class:`BoxEvaluator` share one
  implementation of the box rule (``_box_groups``): the map is quantized with
  ``(map * 255).astype(uint8)``; at threshold ``tau`` the pixels strictly greater
  than ``int(tau * max(quantized))`` are kept, and every contour found by
  ``cv2.findContours(RETR_TREE, CHAIN_APPROX_SIMPLE)`` (outer borders *and* hole
  borders, as upstream's multi-contour evaluation) gives the box
  ``[x, y, min(x + w, W - 1), min(y + h, H - 1)]`` of its bounding rectangle.
  No contour gives the single box ``[0, 0, 0, 0]``. :func:`best_box` picks the box
  the evaluator scores (best IoU against the ground truth) or, without ground
  truth, the box of the largest contour.
* IoU uses the +1 pixel convention (a box ``[x0, y0, x1, y1]`` covers
  ``(x1 - x0 + 1) * (y1 - y0 + 1)`` pixels); a non-positive union gives IoU 0.
* :class:`BoxEvaluator`: an image is correct at ``(tau, delta)`` when the best IoU
  over (predicted boxes at tau) x (ground-truth boxes) is ``>= delta / 100``;
  BoxAcc@delta is the max over tau of the share of correct images (x100), and
  MaxBoxAccV2 the mean over delta in {30, 50, 70}. GT-known Loc is the share of
  images correct at delta = 50 at the best tau@50 (i.e. MaxBoxAcc@50) or at a fixed
  tau; Top-1 / Top-5 Loc additionally need the class among the top 1 / top 5.
* :class:`MaskEvaluator` (PxAP): histograms of the map over ground-truth foreground
  and background pixels (ignore regions left out) with bin right edges
  ``[tau..., 1, 2, 3]``; reverse cumulative sums give tp / fp; AP is
  ``sum(precision[1:] * diff(recall))`` over bins with ``tp + fp > 0``, x100.

Speed: the quantized map has at most 256 grey levels, so the binary image at a
threshold only changes when the threshold crosses a level that is present. The
contours are therefore computed once per distinct binary image (at most 256 per
map, usually far fewer) instead of once per tau (1000), and the IoUs are computed
once per distinct box set. This gives bit-identical results to the per-tau loop.

Precision note: :func:`normalize_scoremap` returns float32 by default (the
project's interface). Upstream quantizes a float64 map; for a pixel whose value x
satisfies ``x * 255`` within float32 rounding of an integer, the uint8 level can
differ by one. Pass ``dtype=np.float64`` for bit-exact upstream quantization.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Sequence

import numpy as np

__all__ = [
    "normalize_scoremap",
    "boxes_from_map",
    "best_box",
    "BestBox",
    "compute_bboxes_from_scoremaps",
    "calculate_multiple_iou",
    "box_metrics",
    "cam_thresholds",
    "BoxEvaluator",
    "MaskEvaluator",
]


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - cv2 is a declared dependency
        raise ImportError(
            "cream_wsol.metrics needs OpenCV: pip install opencv-python-headless"
        ) from exc
    return cv2


def cam_thresholds(cam_curve_interval: float = 0.001) -> np.ndarray:
    """The score-map thresholds tau: ``np.arange(0, 1, cam_curve_interval)``."""
    if not (0 < cam_curve_interval < 1):
        raise ValueError(
            f"cam_curve_interval must be in (0, 1); got {cam_curve_interval!r}")
    return np.arange(0, 1, cam_curve_interval)


# --------------------------------------------------------------------------------------
# Score maps
# --------------------------------------------------------------------------------------
def normalize_scoremap(cam, size: int = 224, dtype=np.float64) -> np.ndarray:
    """Upsample a raw map to ``size x size`` (bicubic) and min-max normalize it.

    Args:
        cam: array-like [h, w] (numpy or a torch tensor), any real dtype.
        size: the output frame (224 in the benchmark).
        dtype: output dtype (float64 by default, bit-exact with upstream, which
            quantizes a float64 map; float32 moves ~1 pixel per image by one grey level).

    Returns:
        np.ndarray [size, size] in [0, 1]; all zeros for a NaN/non-finite map
        or one that is constant after the upsampling. A constant input map
        (other than all zeros) usually comes back as rounding noise spread over
        [0, 1], as upstream's does: the bicubic resize is not exact.
    """
    if hasattr(cam, "detach"):  # torch tensor
        cam = cam.detach().cpu().numpy()
    cam = np.asarray(cam)
    if cam.ndim != 2:
        raise ValueError(f"normalize_scoremap expects a 2-D map [h, w]; got shape {cam.shape}")
    if cam.size == 0:
        raise ValueError("normalize_scoremap got an empty map")
    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be positive; got {size}")
    cam64 = np.ascontiguousarray(cam, dtype=np.float64)
    if not np.isfinite(cam64).all():
        return np.zeros((size, size), dtype=dtype)
    resized = _cv2().resize(cam64, (size, size), interpolation=_cv2().INTER_CUBIC)
    if resized.ndim != 2:  # a 1x1 map comes back 2-D anyway; guard for safety
        resized = resized.reshape(size, size)
    if not np.isfinite(resized).all():
        return np.zeros((size, size), dtype=dtype)
    lo = resized.min()
    hi = resized.max()
    if lo == hi:
        return np.zeros((size, size), dtype=dtype)
    resized = resized - lo
    resized /= resized.max()
    return resized.astype(dtype, copy=False)


def _as_numpy(x):
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return x


def _check_scoremap(scoremap) -> np.ndarray:
    if not isinstance(scoremap, np.ndarray):
        raise TypeError(f"scoremap must be a numpy array; got {type(scoremap).__name__}")
    if scoremap.ndim != 2:
        raise ValueError(f"scoremap must be 2-D [H, W]; got shape {scoremap.shape}")
    if not np.issubdtype(scoremap.dtype, np.floating):
        raise TypeError(f"scoremap must be a float array; got dtype {scoremap.dtype}")
    if np.isnan(scoremap).any():
        raise ValueError("scoremap contains NaN (normalize it with normalize_scoremap first)")
    if scoremap.size and (scoremap.min() < 0 or scoremap.max() > 1):
        raise ValueError(
            "scoremap must lie in [0, 1] (normalize it with normalize_scoremap first); "
            f"got min={scoremap.min()}, max={scoremap.max()}")
    return scoremap


def _check_boxes(boxes, what: str) -> np.ndarray:
    arr = np.asarray(boxes)
    if arr.ndim == 1 and arr.shape[0] == 4:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what} must have shape [k, 4] (x0, y0, x1, y1); got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{what} is empty; every image needs at least one box")
    if (arr < 0).any():
        raise ValueError(f"{what} has negative coordinates: {arr.tolist()}")
    if (arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any():
        raise ValueError(f"{what} does not follow the x0, y0, x1, y1 convention: {arr.tolist()}")
    return arr


def calculate_multiple_iou(box_a, box_b) -> np.ndarray:
    """IoU matrix [num_a, num_b] with the +1 pixel convention (x0, y0, x1, y1 boxes).

    A non-positive union (degenerate boxes) gives IoU 0, as upstream.
    """
    a = _check_boxes(box_a, "box_a")
    b = _check_boxes(box_b, "box_b")
    # float64 keeps integer-valued boxes exact and also serves float boxes.
    a = a.astype(np.float64)[:, None, :]
    b = b.astype(np.float64)[None, :, :]
    iw = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    bad = union <= 0
    ious = inter / np.where(bad, 1, union)
    ious[bad] = 0
    return ious


def box_metrics(pred_boxes: Sequence, gt_boxes: Sequence, correct_top1: Optional[Sequence[bool]] = None,
                correct_top5: Optional[Sequence[bool]] = None,
                iou_thresholds: Sequence[int] = (30, 50, 70)) -> Dict[str, Any]:
    """Box-level localization metrics (x100) of one predicted box per image.

    ``pred_boxes``: [N, 4]; ``gt_boxes``: N arrays [k_i, 4]; ``correct_top1/5``: N bools.
    Keys: ``BoxAcc@<delta>``, ``MaxBoxAccV2`` (mean over the deltas), ``GT-known Loc`` (IoU >= 0.5),
    ``Top-1 Loc`` / ``Top-5 Loc`` (when the flags are given), ``mean IoU``, ``num_images``."""
    pred = np.asarray(pred_boxes)
    if pred.ndim != 2 or pred.shape[1] != 4:
        raise ValueError(f"box_metrics: pred_boxes must be [N, 4]; got shape {pred.shape}")
    n = pred.shape[0]
    if n == 0:
        raise ValueError("box_metrics: no image")
    if len(gt_boxes) != n:
        raise ValueError(f"box_metrics: {len(gt_boxes)} ground-truth entries for {n} predicted boxes")
    ious = np.array([float(calculate_multiple_iou(pred[i:i + 1], gt_boxes[i]).max()) for i in range(n)])
    out: Dict[str, Any] = {"num_images": n, "mean IoU": 100.0 * float(ious.mean())}
    accs = []
    for d in iou_thresholds:
        if not (0 < int(d) <= 100):
            raise ValueError(f"box_metrics: iou_thresholds are percentages in (0, 100]; got {d}")
        out[f"BoxAcc@{int(d)}"] = 100.0 * float((ious >= int(d) / 100).mean())
        accs.append(out[f"BoxAcc@{int(d)}"])
    out["MaxBoxAccV2"] = float(np.mean(accs))
    ok = ious >= 0.5
    out["GT-known Loc"] = 100.0 * float(ok.mean())
    for key, flags in (("Top-1 Loc", correct_top1), ("Top-5 Loc", correct_top5)):
        if flags is not None:
            f = np.asarray(flags, dtype=bool).reshape(-1)
            if f.shape[0] != n:
                raise ValueError(f"box_metrics: {key} flags have {f.shape[0]} entries for {n} images")
            out[key] = 100.0 * float((ok & f).mean())
    out["iou"] = ious
    return out


def _contour_boxes(binary: np.ndarray) -> np.ndarray:
    """Boxes [n, 4] (int64) of every contour of a uint8 {0, 255} image."""
    cv2 = _cv2()
    found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    contours = found[0] if len(found) == 2 else found[1]  # OpenCV 3 returned 3 values
    if len(contours) == 0:
        return np.zeros((1, 4), dtype=np.int64)
    height, width = binary.shape
    lengths = np.fromiter((len(c) for c in contours), dtype=np.int64, count=len(contours))
    pts = np.concatenate([c.reshape(-1, 2) for c in contours], axis=0).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    x0 = np.minimum.reduceat(pts[:, 0], starts)
    y0 = np.minimum.reduceat(pts[:, 1], starts)
    # cv2.boundingRect gives w = max - min + 1, and upstream takes x1 = x + w.
    x1 = np.minimum(np.maximum.reduceat(pts[:, 0], starts) + 1, width - 1)
    y1 = np.minimum(np.maximum.reduceat(pts[:, 1], starts) + 1, height - 1)
    return np.stack([x0, y0, x1, y1], axis=1)


def _box_groups(scoremap: np.ndarray, thresholds, multi_contour: bool = True):
    """Distinct box sets of a score map over thresholds.

    Returns (groups, index): ``groups`` is a list of [n, 4] int64 arrays and
    ``index[t]`` the group of threshold t.
    """
    scoremap = _check_scoremap(_as_numpy(scoremap))
    quantized = (scoremap * 255).astype(np.uint8)
    peak = int(quantized.max()) if quantized.size else 0
    levels = np.unique(quantized)
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    # int(tau * peak) exactly as upstream (float64 product, truncation toward zero).
    cut = np.trunc(thr * peak).astype(np.int64)
    # The binary image (quantized > cut) only depends on how many levels are <= cut.
    keys = np.searchsorted(levels, cut, side="right")
    uniq, index = np.unique(keys, return_inverse=True)
    groups = []
    for key in uniq:
        if key >= len(levels):
            groups.append(np.zeros((1, 4), dtype=np.int64))
            continue
        # levels[key] is the smallest level kept: pixel > cut  <=>  pixel >= levels[key]
        binary = np.where(quantized >= levels[key], np.uint8(255), np.uint8(0))
        boxes = _contour_boxes(binary)
        if not multi_contour and len(boxes) > 1:
            boxes = _largest_contour_box(binary)
        groups.append(boxes)
    return groups, index.reshape(-1)


def _largest_contour_box(binary: np.ndarray) -> np.ndarray:
    """Single-contour variant (wsolevaluation's MaxBoxAcc V1): box of the largest contour."""
    cv2 = _cv2()
    found = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    contours = found[0] if len(found) == 2 else found[1]
    c = max(contours, key=cv2.contourArea)
    x, y, w, h = cv2.boundingRect(c)
    height, width = binary.shape
    return np.array([[x, y, min(x + w, width - 1), min(y + h, height - 1)]], dtype=np.int64)


def compute_bboxes_from_scoremaps(scoremap, thresholds, multi_contour: bool = True):
    """Boxes of a normalized score map at every threshold.

    Args:
        scoremap: np.ndarray [H, W], float, values in [0, 1].
        thresholds: iterable of tau in [0, 1).
        multi_contour: every contour gives a box (MaxBoxAccV2, default); False keeps
            only the largest contour (V1).

    Returns:
        list (one per threshold) of np.ndarray [n_boxes, 4] int64 (x0, y0, x1, y1).
        Entries for thresholds that yield the same binary image share one array.
    """
    groups, index = _box_groups(scoremap, thresholds, multi_contour)
    return [groups[i] for i in index]


def boxes_from_map(scoremap, tau: float, multi_contour: bool = True) -> np.ndarray:
    """The boxes wsolevaluation draws from one normalized score map at threshold ``tau``.

    This is the box rule of the metrics (the same code :class:`BoxEvaluator` and
    :func:`compute_bboxes_from_scoremaps` run): the map is quantized with
    ``(map * 255).astype(uint8)``, the pixels strictly greater than
    ``int(tau * max(quantized))`` are kept, and every contour of that binary image
    (``cv2.findContours``, ``RETR_TREE``: outer and hole borders) gives the box
    ``[x, y, min(x + w, W - 1), min(y + h, H - 1)]`` of its bounding rectangle.
    No contour (nothing above the threshold) gives the single box ``[0, 0, 0, 0]``.

    Args:
        scoremap: [H, W] float map with values in [0, 1], a numpy array or a torch
            tensor (e.g. one map of ``cream_wsol.CREAM``'s output, or
            :func:`normalize_scoremap`'s). float32 and float64 maps may quantize a
            pixel lying within rounding of a grey level differently (metrics docs).
        tau: threshold in [0, 1] (the metrics sweep ``arange(0, 1, 0.001)``).
        multi_contour: every contour gives a box (MaxBoxAccV2, the default);
            False keeps only the box of the largest contour (MaxBoxAcc V1).

    Returns:
        np.ndarray [n, 4] int64, one (x0, y0, x1, y1) box per contour, in pixels of
        the map (x along the width).

    Example:
        >>> import numpy as np
        >>> from cream_wsol import boxes_from_map
        >>> m = np.zeros((8, 10)); m[2:5, 3:7] = 1.0; m[6, 8] = 0.6
        >>> boxes_from_map(m, tau=0.5).tolist()       # the blob and the single pixel
        [[8, 6, 9, 7], [3, 2, 7, 5]]
        >>> boxes_from_map(m, tau=0.7).tolist()       # 0.6 is not above 0.7 * max
        [[3, 2, 7, 5]]
        >>> boxes_from_map(np.zeros((4, 4)), tau=0.2).tolist()
        [[0, 0, 0, 0]]
    """
    tau = _check_tau(tau)
    groups, index = _box_groups(scoremap, [tau], multi_contour)
    return groups[index[0]]


class BestBox(NamedTuple):
    """:func:`best_box`'s result: ``box`` np.ndarray [4] int64 (x0, y0, x1, y1) and
    ``iou`` (float: the box's best IoU against the ground truth; None without it)."""

    box: np.ndarray
    iou: Optional[float]


def best_box(scoremap, tau: float, gt_boxes=None, multi_contour: bool = True) -> BestBox:
    """The one box of a score map at ``tau`` under the wsolevaluation rule.

    With ``gt_boxes``: of the boxes :func:`boxes_from_map` gives, the one with the
    highest IoU (+1 pixel convention) against any ground-truth box, and that IoU:
    exactly what :class:`BoxEvaluator` counts for this image at this ``tau``
    (the image is correct at delta when ``iou >= delta / 100``; on a tie, the first
    box in ``boxes_from_map``'s order). Without ``gt_boxes``: the box of the
    largest contour (MaxBoxAcc V1's single box), the box to draw for a user's image;
    ``iou`` is None.

    Args:
        scoremap: [H, W] float map in [0, 1] (numpy or torch), as for
            :func:`boxes_from_map`.
        tau: threshold in [0, 1].
        gt_boxes: None, or [k, 4] (or [4]) ground-truth boxes (x0, y0, x1, y1) in the
            map's pixel frame.
        multi_contour: with ``gt_boxes``, choose among the boxes of every contour
            (MaxBoxAccV2, default) or of the largest one only (V1).

    Returns:
        :class:`BestBox` ``(box, iou)``.

    Example:
        >>> import numpy as np
        >>> from cream_wsol import best_box
        >>> m = np.zeros((8, 10)); m[2:5, 3:7] = 1.0; m[6, 8] = 0.6
        >>> best_box(m, tau=0.5).box.tolist()                 # the largest contour
        [3, 2, 7, 5]
        >>> box, iou = best_box(m, tau=0.5, gt_boxes=[[8, 6, 9, 7]])
        >>> box.tolist(), iou
        ([8, 6, 9, 7], 1.0)
    """
    tau = _check_tau(tau)
    if gt_boxes is None:
        groups, index = _box_groups(scoremap, [tau], multi_contour=False)
        return BestBox(groups[index[0]][0].copy(), None)
    gt = _check_boxes(gt_boxes, "gt_boxes")
    groups, index = _box_groups(scoremap, [tau], multi_contour)
    boxes = groups[index[0]]
    ious = calculate_multiple_iou(boxes, gt).max(axis=1)
    j = int(np.argmax(ious))
    return BestBox(boxes[j].copy(), float(ious[j]))


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float, np.integer, np.floating)):
        raise TypeError(f"tau must be a number in [0, 1]; got {type(tau).__name__} {tau!r}")
    tau = float(tau)
    if not (0.0 <= tau <= 1.0):
        raise ValueError(f"tau must be in [0, 1]; got {tau!r}")
    return tau


def _best_iou_per_threshold(scoremap, gt_boxes, thresholds, multi_contour=True) -> np.ndarray:
    groups, index = _box_groups(scoremap, thresholds, multi_contour)
    counts = np.array([len(g) for g in groups], dtype=np.int64)
    ious = calculate_multiple_iou(np.concatenate(groups, axis=0), gt_boxes).max(axis=1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    best_per_group = np.maximum.reduceat(ious, starts)
    return best_per_group[index]


# --------------------------------------------------------------------------------------
# Evaluators
# --------------------------------------------------------------------------------------
class BoxEvaluator:
    """MaxBoxAccV2 (and GT-known / Top-1 / Top-5 Loc) over a split.

    Usage::

        ev = BoxEvaluator()
        for scoremap, boxes in ...:
            ev.accumulate(scoremap, boxes, correct_top1=..., correct_top5=...)
        result = ev.compute()

    ``scoremap`` is a normalized map [S, S] (see :func:`normalize_scoremap`) and
    ``gt_boxes`` the ground-truth boxes [k, 4] in the same S x S frame.
    """

    def __init__(self, iou_thresholds=(30, 50, 70), cam_curve_interval: float = 0.001,
                 multi_contour: bool = True):
        deltas = tuple(int(d) for d in iou_thresholds)
        if not deltas:
            raise ValueError("iou_thresholds must not be empty")
        if any(not (0 < d <= 100) for d in deltas):
            raise ValueError(f"iou_thresholds are percentages in (0, 100]; got {deltas}")
        self.iou_thresholds = deltas
        self.cam_curve_interval = float(cam_curve_interval)
        self.thresholds = cam_thresholds(cam_curve_interval)
        self.multi_contour = bool(multi_contour)
        self.num_correct = np.zeros((len(deltas), len(self.thresholds)), dtype=np.int64)
        self.cnt = 0
        self._correct50 = []   # per image: np.packbits(best_iou >= 0.5) over tau
        self._top1 = []
        self._top5 = []

    def accumulate(self, scoremap, gt_boxes, correct_top1=None, correct_top5=None) -> np.ndarray:
        """Add one image; returns its best IoU at every tau (np.ndarray [n_tau])."""
        return self.add(self.score(scoremap, gt_boxes), correct_top1, correct_top5)

    def score(self, scoremap, gt_boxes) -> np.ndarray:
        """One image's best IoU at every tau, without adding it (the per-image work: the
        contours over the thresholds; safe to run in a thread beside the caller)."""
        return _best_iou_per_threshold(_as_numpy(scoremap), _check_boxes(gt_boxes, "gt_boxes"), self.thresholds,
                                       self.multi_contour)

    def add(self, best, correct_top1=None, correct_top5=None) -> np.ndarray:
        """Add one image scored by :meth:`score` (``accumulate`` = ``add(score(...))``)."""
        best = np.asarray(best)
        if best.shape != self.thresholds.shape:
            raise ValueError(f"best must be [{len(self.thresholds)}] (one IoU per tau); got shape {best.shape}")
        for store, flag, name in ((self._top1, correct_top1, "correct_top1"),
                                  (self._top5, correct_top5, "correct_top5")):
            if self.cnt > 0 and (flag is None) != (len(store) == 0):
                raise ValueError(
                    f"{name} must be given for every image or for none "
                    f"(image #{self.cnt} differs from the earlier ones)")
        for i, delta in enumerate(self.iou_thresholds):
            self.num_correct[i] += best >= (delta / 100)
        self._correct50.append(np.packbits(best >= 0.5))
        if correct_top1 is not None:
            self._top1.append(bool(correct_top1))
        if correct_top5 is not None:
            self._top5.append(bool(correct_top5))
        self.cnt += 1
        return best

    def _tau_index(self, tau):
        idx = int(round(float(tau) / self.cam_curve_interval))
        if not (0 <= idx < len(self.thresholds)):
            raise ValueError(f"tau={tau} outside [0, 1)")
        return idx

    def compute(self, tau=None) -> dict:
        """Metrics over the accumulated images (all x100).

        Keys: 'MaxBoxAccV2', 'BoxAcc@<delta>' (max over tau), 'best_tau@<delta>',
        'curve' ([n_delta, n_tau] BoxAcc vs tau), 'thresholds', 'iou_thresholds',
        'num_images', 'GT-known Loc', 'correct@50' (per image, bool, at the tau used
        for the Loc metrics: best tau@50, or ``tau`` when given), 'loc_tau', and
        'Top-1 Loc' / 'Top-5 Loc' when the flags were given to accumulate().
        """
        if self.cnt == 0:
            raise RuntimeError("BoxEvaluator.compute(): no image was accumulated")
        curve = self.num_correct * 100.0 / float(self.cnt)
        out = {}
        maxes = []
        for i, delta in enumerate(self.iou_thresholds):
            j = int(np.argmax(curve[i]))
            out[f"BoxAcc@{delta}"] = float(curve[i, j])
            out[f"best_tau@{delta}"] = float(self.thresholds[j])
            maxes.append(curve[i, j])
        out["MaxBoxAccV2"] = float(np.mean(maxes))
        out["curve"] = curve
        out["thresholds"] = self.thresholds.copy()
        out["iou_thresholds"] = self.iou_thresholds
        out["num_images"] = self.cnt

        bits = np.stack(self._correct50, axis=0)
        correct50_all = np.unpackbits(bits, axis=1, count=len(self.thresholds)).astype(bool)
        if tau is None:
            j = int(np.argmax(correct50_all.sum(axis=0)))
        else:
            j = self._tau_index(tau)
        correct = correct50_all[:, j]
        out["loc_tau"] = float(self.thresholds[j])
        out["correct@50"] = correct
        out["GT-known Loc"] = float(correct.sum() * 100.0 / self.cnt)
        if self._top1:
            out["Top-1 Loc"] = float((correct & np.array(self._top1)).sum() * 100.0 / self.cnt)
        if self._top5:
            out["Top-5 Loc"] = float((correct & np.array(self._top5)).sum() * 100.0 / self.cnt)
        return out


class MaskEvaluator:
    """PxAP (pixel average precision) over a split, with ignore regions."""

    def __init__(self, cam_curve_interval: float = 0.001):
        self.cam_curve_interval = float(cam_curve_interval)
        self.thresholds = cam_thresholds(cam_curve_interval)
        # Bins [0, bw), [bw, 2bw), ..., [1 - bw, 1), [1, 2), [2, 3].
        self.bin_edges = np.append(self.thresholds, [1.0, 2.0, 3.0])
        self.num_bins = len(self.bin_edges) - 1
        self.gt_true_score_hist = np.zeros(self.num_bins, dtype=np.float64)
        self.gt_false_score_hist = np.zeros(self.num_bins, dtype=np.float64)
        self.cnt = 0

    def accumulate(self, scoremap, gt_mask, ignore=None) -> None:
        """Add one image: a normalized map [S, S], its foreground mask and ignore mask."""
        self.add(self.score(scoremap, gt_mask, ignore))

    def add(self, hists) -> None:
        """Add one image's (foreground, background) score histograms from :meth:`score`."""
        self.gt_true_score_hist += hists[0]
        self.gt_false_score_hist += hists[1]
        self.cnt += 1

    def score(self, scoremap, gt_mask, ignore=None):
        """One image's (foreground, background) histograms over the bins, without adding them."""
        scoremap = _check_scoremap(_as_numpy(scoremap))
        mask = np.asarray(_as_numpy(gt_mask)).astype(bool)
        if mask.shape != scoremap.shape:
            raise ValueError(f"gt_mask shape {mask.shape} != scoremap shape {scoremap.shape}")
        keep_false = ~mask
        if ignore is not None:
            ign = np.asarray(_as_numpy(ignore)).astype(bool)
            if ign.shape != scoremap.shape:
                raise ValueError(f"ignore shape {ign.shape} != scoremap shape {scoremap.shape}")
            keep_false &= ~ign  # ignore = ignore box \ foreground: never removes fg pixels
        return (np.histogram(scoremap[mask], bins=self.bin_edges)[0],
                np.histogram(scoremap[keep_false], bins=self.bin_edges)[0])

    def compute(self) -> dict:
        """{'PxAP': AP x100, 'precision': [n_bins], 'recall': [n_bins], 'thresholds'}.

        precision/recall run from the highest bin ([2, 3]) down to [0, bw), as
        upstream; entries with no positive prediction are NaN in 'precision'.
        """
        if self.cnt == 0:
            raise RuntimeError("MaskEvaluator.compute(): no image was accumulated")
        num_true = self.gt_true_score_hist.sum()
        tp = self.gt_true_score_hist[::-1].cumsum()
        fn = num_true - tp
        fp = self.gt_false_score_hist[::-1].cumsum()
        if ((tp + fn) <= 0).all():
            raise RuntimeError("No positive ground truth in the eval set.")
        if ((tp + fp) <= 0).all():
            raise RuntimeError("No positive prediction in the eval set.")
        nonzero = (tp + fp) != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / (tp + fp)
            recall = tp / (tp + fn)
        ap = (precision[1:] * np.diff(recall))[nonzero[1:]].sum() * 100
        return {"PxAP": float(ap), "precision": precision, "recall": recall,
                "thresholds": self.thresholds.copy(), "num_images": self.cnt}
