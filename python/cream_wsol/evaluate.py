"""Localization maps (CAM, CREAM, training-free CREAM, calibrated map) and their
WSOL metrics, with one code path for every data set.

A map is described by a :class:`MapSpec`; :func:`evaluate` runs the model once per
batch and scores every requested map with wsolevaluation's rules
(:mod:`cream_wsol.metrics`): MaxBoxAccV2 (IoU 30/50/70 and mean), GT-known Loc,
Top-1 / Top-5 Loc, and PxAP when the split has masks. The CREAM maps come from
``cream_kernels.em_reactivate`` (the same public function any user calls):

* ``cam``: the raw CAM ``W[c] . f`` of the target class.
* ``cream``: ``em_reactivate`` with the learned ``[C, d]`` tables (Eq. 12, the
  calibrated map plus the normalised CAM).
* ``calibrated``: the calibrated posterior alone (Eq. 11, Table 5's middle
  column), i.e. ``z_fg`` if calibration picked the foreground branch, else ``1 - z_fg``.
* ``free`` / ``free_calibrated``: the same with the training-free centroids (the
  image's own CAM-masked means; no embeddings needed).

The target class is the ground-truth class (``target="gt"``: GT-known Loc, and
Top-1/Top-5 Loc through the classification flags, as wsolevaluation does) or the
predicted one (``target="pred"``: the map a user gets without labels). For a
correctly classified image both are the same map, so Top-1 Loc is identical
either way.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .models import class_activation_maps
from .runs import autocast, loader_kwargs

__all__ = [
    "MapSpec",
    "DEFAULT_SPECS",
    "compute_maps",
    "model_cam_fn",
    "evaluate",
    "evaluate_checkpoint",
    "time_per_image",
    "denormalize",
    "jsonable",
    "format_metrics_table",
    "EvaluationStopped",
    "BOX_COLUMNS",
    "DEFAULT_SIGMA_GRID",
    "select_on_split",
    "MapSaver",
]


class EvaluationStopped(Exception):
    """``evaluate(..., should_stop=...)`` was asked to stop (e.g. a signal during validation)."""


@dataclass(frozen=True)
class MapSpec:
    kind: str = "cream"  # cam | cream | calibrated | free | free_calibrated
    num_iters: int = 2  # T; 0 means the CAM itself
    sigma: float = 8.0
    similarity: str = "dot"  # dot | cosine
    tables: str = "learned"  # key into the ``embeddings`` mapping
    target: str = "gt"  # gt | pred

    def __post_init__(self):
        if self.kind not in ("cam", "cream", "calibrated", "free", "free_calibrated"):
            raise ValueError(f"unknown map kind {self.kind!r}")
        if self.target not in ("gt", "pred"):
            raise ValueError(f"target must be 'gt' or 'pred', got {self.target!r}")
        if self.num_iters < 0:
            raise ValueError("num_iters must be >= 0")


DEFAULT_SPECS: Dict[str, MapSpec] = {
    "CAM": MapSpec("cam"),
    "CREAM": MapSpec("cream"),
    "CREAM (training-free)": MapSpec("free"),
}


def _tables(emb) -> Tuple[Tensor, Tensor]:
    if isinstance(emb, (tuple, list)):
        return emb[0], emb[1]
    return emb.fg, emb.bg


def _em(features, cam, fg, bg, classes, spec: MapSpec, cam_threshold: float):
    from cream_kernels import em_reactivate

    return em_reactivate(features, cam, fg, bg, classes if fg is not None else None,
                         num_iters=spec.num_iters, sigma=spec.sigma, cam_threshold=cam_threshold,
                         similarity=spec.similarity, return_extras=True)


def model_cam_fn(model) -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """``model.cams`` for a model whose localisation map is not ``W[c] . f`` (ACoL's fused
    map, ``model.linear_cam`` False), else None (the CAM from ``model.classifier_weight``)."""
    return None if getattr(model, "linear_cam", True) else model.cams


def _classifier_weight(model) -> Optional[Tensor]:
    return model.classifier_weight.detach().float() if getattr(model, "linear_cam", True) else None


@torch.no_grad()
def compute_maps(features: Tensor, classifier_weight: Optional[Tensor], specs: Mapping[str, MapSpec],
                 labels: Tensor, preds: Tensor, embeddings: Optional[Mapping[str, Any]] = None,
                 cam_threshold: float = 0.2,
                 cam_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Dict[str, Tensor]:
    """Every requested map for one batch, at feature resolution ([B, h, w] float32). The base
    map of a class is ``cam_fn(features, classes)`` when given (ACoL's fused map: see
    :func:`model_cam_fn`), else the CAM ``W[c] . f`` with ``classifier_weight``; CREAM
    re-activates that map."""
    embeddings = embeddings or {}
    cams: Dict[str, Tensor] = {}
    em_cache: Dict[tuple, Any] = {}
    out: Dict[str, Tensor] = {}
    for name, spec in specs.items():
        classes = labels if spec.target == "gt" else preds
        if spec.target not in cams:
            cams[spec.target] = (cam_fn(features, classes).float() if cam_fn is not None
                                 else class_activation_maps(features, classifier_weight, classes))
        cam = cams[spec.target]
        if spec.kind == "cam" or spec.num_iters == 0:
            out[name] = cam
            continue
        free = spec.kind.startswith("free")
        if free:
            fg = bg = None
        else:
            if spec.tables not in embeddings:
                raise KeyError(f"map {name!r} needs embeddings {spec.tables!r}; have {sorted(embeddings)}")
            fg, bg = _tables(embeddings[spec.tables])
        key = (free, None if free else spec.tables, spec.target, spec.num_iters,
               spec.sigma if isinstance(spec.sigma, str) else float(spec.sigma), spec.similarity)  # "auto"
        if key not in em_cache:
            em_cache[key] = _em(features, cam, fg, bg, classes, spec, cam_threshold)
        res = em_cache[key]
        if spec.kind.endswith("calibrated"):
            pick = res.picked_fg.view(-1, 1, 1)
            out[name] = torch.where(pick, res.z_fg, 1.0 - res.z_fg)
        else:
            out[name] = res.output
    return out


def denormalize(image: Tensor) -> np.ndarray:
    """[3, H, W] ImageNet-normalised tensor -> uint8 [H, W, 3]."""
    from .data import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (image.detach().cpu().float() * std + mean).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _boxes_to_mask(boxes: np.ndarray, size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
        m[y0:y1 + 1, x0:x1 + 1] = True
    return m


def _default_metric_workers() -> int:
    """Threads for the per-image metric work: half the usable cores, 2..8 (OpenCV's contours
    and numpy release the GIL); a function of the machine, not of a timing."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        cores = os.cpu_count() or 1
    return max(2, min(8, cores // 2))


@torch.no_grad()
def evaluate(model, dataset, specs: Optional[Mapping[str, MapSpec]] = None, *,
             embeddings: Optional[Mapping[str, Any]] = None, batch_size: int = 32,
             cam_threshold: float = 0.2, cam_curve_interval: float = 0.001,
             iou_thresholds: Sequence[int] = (30, 50, 70), device: str = "cpu", progress: bool = True,
             histogram_specs: Sequence[str] = (), histogram_bins: int = 50,
             keep_examples: int = 0, max_images: Optional[int] = None, desc: str = "evaluate",
             should_stop: Optional[Callable[[], bool]] = None, loc_taus: Optional[Mapping[str, float]] = None,
             on_image: Optional[Callable[[Dict[str, Any]], None]] = None, num_workers: Optional[int] = None,
             metric_workers: Optional[int] = None, amp: Optional[str] = None) -> Dict[str, Any]:
    """Score every map of ``specs`` on ``dataset`` (a ``WSOLDataset`` with train=False).
    Box metrics need boxes (CUB, ILSVRC, synthetic), PxAP needs masks (OpenImages,
    synthetic); whatever the split has is scored.

    Returns ``{"metrics": {name: {...}}, "classification": {...}, "curves": {name:
    BoxAcc-vs-tau array [n_delta, n_tau]}, "thresholds": [...], "histograms": ...,
    "examples": [...]}``. ``histogram_specs`` collects histograms of the normalised
    map over ground-truth foreground / background pixels (Fig. 1; the mask, or the
    union of the boxes when the split has no masks); ``keep_examples`` keeps the
    first images with their maps (Fig. 5).

    ``loc_taus`` ({name: tau}) fixes the tau of the tau-dependent metrics (GT-known,
    Top-1 / Top-5 Loc) instead of taking this split's best tau@50 (``--select-on
    val``: the tau chosen on val). ``on_image`` is called once per image with
    ``{image_id, index, label, pred, boxes, maps: {name: normalised map [S, S]}}``
    (``--save-maps``). ``should_stop`` is polled once per batch; when it returns
    True, :class:`EvaluationStopped` is raised.

    ``num_workers``: loader processes (None: :func:`cream_wsol.runs.default_num_workers`;
    pinned memory on CUDA). ``metric_workers``: threads doing the per-image metric work
    (upsampling, contours over the thresholds) beside the model, two batches behind it
    (None: half the cores, 2..8; 0: in the loop); results are added in dataset order, so the numbers are
    the same for any value. ``amp``: ``"bf16"`` / ``"fp16"`` runs the network under
    ``torch.autocast`` (the maps are then computed in fp32 from the bf16 / fp16 features);
    on CUDA the images go in channels_last.

    Rows of predicted-class maps (``target="pred"``) carry no "GT-known Loc" and no
    "Top-5 Loc": both are defined on the ground-truth class's map.

    Inside :func:`cream_wsol.distributed.sharded` under torchrun, each rank scores its
    block of whole batches and every rank returns the merged result of the whole split,
    equal to the one-process one (:mod:`cream_wsol.distributed`)."""
    from torch.utils.data import DataLoader

    from .metrics import BoxEvaluator, MaskEvaluator, normalize_scoremap

    specs = dict(specs or DEFAULT_SPECS)
    model.eval()
    has_masks = bool(getattr(dataset, "has_masks", False))
    has_boxes = bool(getattr(dataset, "has_boxes", True))
    if not (has_masks or has_boxes):
        raise ValueError(f"{dataset!r} has neither boxes nor masks: nothing to evaluate localization against")
    box_ev = {n: BoxEvaluator(iou_thresholds=tuple(iou_thresholds), cam_curve_interval=cam_curve_interval)
              for n in specs} if has_boxes else {}
    mask_ev = {n: MaskEvaluator(cam_curve_interval=cam_curve_interval) for n in specs} if has_masks else {}
    edges = np.linspace(0.0, 1.0, histogram_bins + 1)
    hists = {n: {"fg": np.zeros(histogram_bins), "bg": np.zeros(histogram_bins)} for n in histogram_specs}
    examples: List[Dict[str, Any]] = []
    n_total = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    rank, world = distributed.world()  # under torchrun + distributed.sharded(): this rank's batches
    mine = distributed.batch_shard(n_total, batch_size, rank, world)
    subset = dataset if len(mine) == len(dataset) else torch.utils.data.Subset(dataset, mine)
    dev = torch.device(device)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, **loader_kwargs(num_workers, dev))
    top1 = top5 = seen = 0
    from tqdm.auto import tqdm

    def score(image_id: str, maps_b: Dict[str, Tensor], size: int, ok1: bool, ok5: bool):
        """The per-image metric work (no shared state: runs in the pool)."""
        gt_boxes = np.asarray(dataset.gt_boxes(image_id)) if has_boxes else np.zeros((0, 4), np.int64)
        gt_mask, ignore = dataset.gt_mask(image_id) if has_masks else (None, None)
        out = {}
        for name, m in maps_b.items():
            sm = normalize_scoremap(m, size=size)
            r = {"sm": sm}
            if has_boxes:
                r["box"] = box_ev[name].score(sm, gt_boxes)
            if has_masks:
                r["mask"] = mask_ev[name].score(sm, gt_mask, ignore)
            if name in hists:
                fgm = np.asarray(gt_mask, bool) if has_masks else _boxes_to_mask(gt_boxes, size)
                valid = ~np.asarray(ignore, bool) if (has_masks and ignore is not None) else np.ones_like(fgm)
                r["hist"] = (np.histogram(sm[fgm & valid], bins=edges)[0], np.histogram(sm[~fgm & valid], bins=edges)[0])
            out[name] = r
        return gt_boxes, gt_mask, out

    def add(item) -> None:
        """Add one scored image, in dataset order (the same sums as the serial loop)."""
        index, image_id, label, pred, ok1, ok5, image, (gt_boxes, gt_mask, scored) = item
        keep = len(examples) < keep_examples
        ex = {"image_id": image_id, "image": denormalize(image), "boxes": gt_boxes,
              "label": label, "pred": pred, "maps": {}} if keep else None
        for name, r in scored.items():
            if has_boxes:
                box_ev[name].add(r["box"], correct_top1=ok1, correct_top5=ok5)
            if has_masks:
                mask_ev[name].add(r["mask"])
            if name in hists:
                hists[name]["fg"] += r["hist"][0]
                hists[name]["bg"] += r["hist"][1]
            if keep:
                ex["maps"][name] = r["sm"]
        if on_image is not None:
            on_image({"image_id": image_id, "index": index, "label": label, "pred": pred, "boxes": gt_boxes,
                      "maps": {name: r["sm"] for name, r in scored.items()}})
        if keep:
            if has_masks:
                ex["mask"] = np.asarray(gt_mask, bool)
            examples.append(ex)

    # metric_workers threads score batch k while the model runs batch k + 1 (torch, OpenCV and
    # numpy release the GIL); results are added in order, so the sums are the serial loop's
    n_pool = _default_metric_workers() if metric_workers is None else int(metric_workers)
    pool = ThreadPoolExecutor(n_pool, thread_name_prefix="cream-metrics") if n_pool > 0 else None
    pending: "deque" = deque()

    def drain(keep_batches: int) -> None:
        while len(pending) > keep_batches:
            for meta, fut in pending.popleft():
                add(meta + (fut.result() if pool is not None else fut,))

    t0 = time.time()
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            if should_stop is not None and should_stop():
                raise EvaluationStopped(f"{desc}: stopped after {seen} images")
            images = batch[0].to(device, non_blocking=True)
            labels, ids = batch[1].to(device, non_blocking=True).long(), list(batch[2])
            if dev.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(amp, dev):
                logits, feats = model(images, return_features=True)
            logits = logits.float()
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            preds = topk[:, 0]
            ok1 = (preds == labels).cpu().numpy()
            ok5 = (topk == labels[:, None]).any(dim=1).cpu().numpy()
            top1 += int(ok1.sum())
            top5 += int(ok5.sum())
            maps = compute_maps(feats.float(), _classifier_weight(model), specs, labels, preds,
                                embeddings, cam_threshold, cam_fn=model_cam_fn(model))
            maps = {n: m.detach().float().cpu() for n, m in maps.items()}
            size = int(images.shape[-1])
            keep_img = seen < keep_examples  # the first keep_examples images are kept
            jobs = []
            for b, image_id in enumerate(ids):
                args = (image_id, {n: m[b] for n, m in maps.items()}, size, bool(ok1[b]), bool(ok5[b]))
                meta = (mine.start + seen + b, image_id, int(labels[b]), int(preds[b]), bool(ok1[b]), bool(ok5[b]),
                        images[b].cpu() if keep_img else None)
                jobs.append((meta, pool.submit(score, *args) if pool is not None else score(*args)))
            seen += len(ids)
            pending.append(jobs)
            drain(2 if pool is not None else 0)
        drain(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    box_ev, mask_ev, hists, examples, (top1, top5, seen) = distributed.merge_evaluation(
        box_ev, mask_ev, hists, examples, (top1, top5, seen), keep_examples)  # exact, in image order
    elapsed = time.time() - t0

    metrics: Dict[str, Dict[str, Any]] = {}
    curves: Dict[str, np.ndarray] = {}
    thresholds = None
    for name in specs:
        row: Dict[str, Any] = {"num_images": seen}
        if has_boxes:
            r = box_ev[name].compute(tau=(loc_taus or {}).get(name))
            curves[name] = r["curve"]
            thresholds = r["thresholds"]
            row.update({k: v for k, v in r.items() if k not in ("curve", "thresholds", "correct@50", "iou_thresholds")})
            if specs[name].target == "pred":  # defined on the ground-truth class's map only
                row.pop("GT-known Loc", None)
                row.pop("Top-5 Loc", None)
        if has_masks:
            row["PxAP"] = mask_ev[name].compute()["PxAP"]
        metrics[name] = row
    return {
        "metrics": metrics,
        "classification": {"top1": 100.0 * top1 / max(1, seen), "top5": 100.0 * top5 / max(1, seen),
                           "num_images": seen},
        "curves": curves,
        "thresholds": thresholds,
        "iou_thresholds": tuple(iou_thresholds),
        "histograms": {"edges": edges, **hists},
        "examples": examples,
        "has_masks": has_masks,
        "has_boxes": has_boxes,
        "specs": {n: dataclasses.asdict(s) for n, s in specs.items()},
        "time_s": elapsed,
    }


@torch.no_grad()
def time_per_image(model, dataset, embeddings, num_iters: Sequence[int] = (0, 1, 2, 3, 4), *,
                   n_images: int = 50, sigma: float = 8.0, similarity: str = "dot", cam_threshold: float = 0.2,
                   warmup: int = 3, device: str = "cpu") -> Dict[int, float]:
    """Milliseconds per image (batch 1) of CAM inference (forward + CAM of the
    predicted class, T=0) and of CAM + ``em_reactivate`` with T iterations, as in
    Table 7. The EM time is measured on the same forward output and added to the
    mean forward time."""
    from cream_kernels import em_reactivate

    model.eval()
    fg, bg = _tables(embeddings)
    n = min(len(dataset), int(n_images))
    t_cam: List[float] = []
    t_em: Dict[int, List[float]] = {t: [] for t in num_iters if t > 0}
    sync = (lambda: torch.cuda.synchronize()) if str(device).startswith("cuda") else (lambda: None)
    for i in range(-min(warmup, n), n):
        x = dataset[i % n][0].unsqueeze(0).to(device)
        sync()
        t0 = time.perf_counter()
        logits, feats = model(x, return_features=True)
        pred = logits.argmax(1)
        cam_fn = model_cam_fn(model)
        cam = cam_fn(feats, pred) if cam_fn is not None else class_activation_maps(feats, model.classifier_weight, pred)
        sync()
        t1 = time.perf_counter()
        if i >= 0:
            t_cam.append(t1 - t0)
        for t in t_em:
            sync()
            a = time.perf_counter()
            em_reactivate(feats, cam, fg, bg, pred, num_iters=t, sigma=sigma, cam_threshold=cam_threshold,
                          similarity=similarity)
            sync()
            if i >= 0:
                t_em[t].append(time.perf_counter() - a)
    base = float(np.median(t_cam)) * 1e3
    out = {0: base}
    for t, v in t_em.items():
        out[t] = base + float(np.median(v)) * 1e3
    return out


def jsonable(obj):
    """Convert numpy / torch values (recursively) into JSON-friendly ones."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# column labels, shared with report.md (cream_wsol.reproduce): wsolevaluation's names
BOX_COLUMNS = ("MaxBoxAccV2", "BoxAcc@30", "BoxAcc@50", "BoxAcc@70", "GT-known Loc", "Top-1 Loc", "Top-5 Loc")


def format_metrics_table(metrics: Mapping[str, Mapping[str, Any]], has_masks: bool, has_boxes: bool = True,
                         selection: Optional[Mapping[str, Mapping[str, Any]]] = None) -> str:
    """A Markdown table of the main metrics, one row per map ("-": not defined for
    that row, e.g. GT-known Loc of a predicted-class map). With ``selection`` (from
    :func:`select_on_split`) two more columns give the sigma and tau chosen there."""
    cols = list(BOX_COLUMNS) if has_boxes else []
    if has_masks:
        cols.append("PxAP")
    extra = []
    if selection:
        split = next(iter(selection.values()))["split"]
        extra = [f"sigma ({split})"] + ([f"tau ({split})"] if has_boxes else [])
    lines = ["| map | " + " | ".join(cols + extra) + " |", "|---" * (len(cols) + len(extra) + 1) + "|"]
    for name, row in metrics.items():
        cells = [f"{row[c]:.1f}" if isinstance(row.get(c), (int, float)) else "-" for c in cols]
        if selection:
            sel = selection.get(name, {})
            cells.append(f"{sel['sigma']:g}" if sel.get("sigma") is not None else "-")
            if has_boxes:
                cells.append(f"{sel['tau']:.3f}" if sel.get("tau") is not None else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DEFAULT_SIGMA_GRID = {"dot": (2.0, 4.0, 8.0, 16.0, 32.0), "cosine": (0.05, 0.1, 0.25, 1.0, 8.0)}


def select_on_split(model, dataset, specs: Mapping[str, MapSpec], *, sigma_grid: Optional[Sequence[float]] = None,
                    **evaluate_kwargs) -> Tuple[Dict[str, MapSpec], Dict[str, Dict[str, Any]], Dict[str, Any]]:
    """wsolevaluation's protocol: choose the hyperparameters on a held-out split
    (its ``val``, "train-fullsup"), then report ``test`` with them.

    For every map of ``specs`` that runs the EM (not ``cam``, not T=0) each sigma of
    ``sigma_grid`` (default: :data:`DEFAULT_SIGMA_GRID` of the map's similarity) is
    scored on ``dataset``; the sigma with the highest MaxBoxAccV2 (PxAP on a split
    with masks only) wins, the earlier one on a tie. Every map's tau is its best
    tau@50 there (the tau of GT-known / Top-1 / Top-5 Loc on test). Returns
    ``(specs with the chosen sigmas, {name: {split, metric, sigma, tau, value,
    grid}}, the raw evaluate() result)``."""
    specs = dict(specs)
    flat: Dict[str, MapSpec] = {}
    grid_of: Dict[str, List[Tuple[Optional[float], str]]] = {}
    for name, sp in specs.items():
        if sp.kind == "cam" or sp.num_iters == 0:
            grid_of[name] = [(None, name)]
            flat[name] = sp
            continue
        grid = tuple(sigma_grid) if sigma_grid else DEFAULT_SIGMA_GRID[sp.similarity]
        grid_of[name] = []
        for sg in grid:
            key = f"{name} @ sigma={float(sg):g}"
            flat[key] = dataclasses.replace(sp, sigma=float(sg))
            grid_of[name].append((float(sg), key))
    res = evaluate(model, dataset, flat, **evaluate_kwargs)
    metric = "MaxBoxAccV2" if res["has_boxes"] else "PxAP"
    split = getattr(dataset, "split", "val")
    chosen: Dict[str, MapSpec] = {}
    selection: Dict[str, Dict[str, Any]] = {}
    for name, cands in grid_of.items():
        scores = [(res["metrics"][key][metric], sg, key) for sg, key in cands]
        best_i = max(range(len(scores)), key=lambda i: (scores[i][0], -i))
        value, sg, key = scores[best_i]
        chosen[name] = flat[key]
        selection[name] = {"split": split, "metric": metric, "sigma": sg, "value": value,
                           "tau": res["metrics"][key].get("loc_tau"),
                           "grid": {f"{g:g}": v for v, g, _ in scores if g is not None}}
    return chosen, selection, res


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "map"


def _jet(sm: np.ndarray) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["jet"]
    return (cmap(np.clip(sm, 0, 1))[..., :3] * 255).astype(np.uint8)


class MapSaver:
    """``evaluate --save-maps DIR``: per image and map, the normalised map the metrics
    score (``maps/<map>/<image id>.npy``, float32 [S, S] in [0, 1], S the evaluation
    frame; about 4 S^2 bytes each) and a PNG overlay (``overlays/<map>/<image
    id>.png``: the map in jet over the image, ground-truth boxes red, the best box at
    the map's tau green); ``boxes.json`` (per image and map the best box, its IoU and
    the tau used); and Figs. 1, 5, 6 (``fig1_histograms.png``, ``fig5_maps.png``,
    ``fig6_boxacc_tau.png``) drawn by :mod:`cream_wsol.figures`, the code
    ``reproduce`` uses."""

    def __init__(self, out_dir: str, names: Sequence[str]):
        self.out_dir = os.path.abspath(out_dir)
        self.names = list(names)
        self.dirs = {n: _safe(n) for n in self.names}
        self.items: List[Dict[str, Any]] = []

    def _rel(self, image_id: str, ext: str) -> str:
        stem = os.path.splitext(os.path.normpath(image_id).lstrip(os.sep).replace("..", "_"))[0]
        return stem + ext

    def __call__(self, info: Dict[str, Any]) -> None:
        rel = self._rel(info["image_id"], ".npy")
        for name, sm in info["maps"].items():
            path = os.path.join(self.out_dir, "maps", self.dirs[name], rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.save(path, np.asarray(sm, dtype=np.float32))
        self.items.append({k: info[k] for k in ("image_id", "index", "label", "pred", "boxes")})

    def finish(self, res: Mapping[str, Any], dataset, taus: Optional[Mapping[str, float]], tau_from: str,
               progress: bool = True) -> Dict[str, str]:
        from .metrics import best_box

        from PIL import Image, ImageDraw
        from tqdm.auto import tqdm

        from . import figures

        has_boxes = bool(res["has_boxes"])
        taus = dict(taus or {})
        images: Dict[str, Any] = {}
        for it in tqdm(self.items, desc="overlays", disable=not progress, leave=False, dynamic_ncols=True):
            img = denormalize(dataset[it["index"]][0])
            gt = np.asarray(it["boxes"]).reshape(-1, 4)
            rec = {"label": it["label"], "pred": it["pred"], "gt_boxes": gt.tolist(), "maps": {}}
            for name in self.names:
                sm = np.load(os.path.join(self.out_dir, "maps", self.dirs[name], self._rel(it["image_id"], ".npy")))
                over = Image.fromarray((0.5 * img + 0.5 * _jet(sm)).round().astype(np.uint8))
                draw = ImageDraw.Draw(over)
                for b in gt if has_boxes else ():
                    draw.rectangle([int(v) for v in b], outline=(255, 0, 0))
                if has_boxes and name in taus and len(gt):
                    box, iou = best_box(sm, taus[name], gt)
                    draw.rectangle([int(v) for v in box], outline=(0, 255, 0))
                    rec["maps"][name] = {"box": [int(v) for v in box], "iou": float(iou), "tau": float(taus[name])}
                path = os.path.join(self.out_dir, "overlays", self.dirs[name], self._rel(it["image_id"], ".png"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                over.save(path)
            images[it["image_id"]] = rec
        with open(os.path.join(self.out_dir, "boxes.json"), "w") as fh:
            json.dump(jsonable({"tau_from": tau_from, "taus": taus, "map_folders": self.dirs,
                                "box_format": "x0, y0, x1, y1 inclusive, in the evaluation frame "
                                              f"({getattr(dataset, 'image_size', '?')} x "
                                              f"{getattr(dataset, 'image_size', '?')})",
                                "images": images}), fh, indent=1)
        out = {"boxes": os.path.join(self.out_dir, "boxes.json")}
        out["fig1"] = figures.activation_histograms(res["histograms"], os.path.join(self.out_dir, "fig1_histograms.png"),
                                                    names=self.names[:4])
        out["fig5"] = figures.map_gallery(res["examples"], os.path.join(self.out_dir, "fig5_maps.png"),
                                          names=self.names[:4], taus=taus if has_boxes else None, n=6)
        if has_boxes:
            out["fig6"] = figures.boxacc_vs_tau(res["curves"], res["thresholds"],
                                                os.path.join(self.out_dir, "fig6_boxacc_tau.png"),
                                                iou_thresholds=res["iou_thresholds"], names=self.names[:4])
        return out


def _open_split(cfg, split: str, data_root, metadata_root, mask_root, checkpoint: str):
    from .data import WSOLDataset

    dr = data_root or cfg.data_root
    mr = metadata_root or cfg.metadata_root
    try:
        ds = WSOLDataset(dr, mr, split, train=False, image_size=cfg.image_size,
                         mask_root=mask_root or getattr(cfg, "mask_root", "") or None)
        first = ds.image_path(ds.image_ids[0])
        if not os.path.isfile(first):
            raise FileNotFoundError(f"image file not found: {first}")
        return ds
    except FileNotFoundError as exc:
        src = ("given" if data_root or metadata_root else f"stored in {checkpoint}")
        raise FileNotFoundError(
            f"{exc} (data root {dr!r}, metadata root {mr!r}, {src}); point --data-root / --metadata-root at the "
            f"data set (the folder the image ids are relative to, and the one holding {split}/image_ids.txt)"
        ) from exc


def evaluate_checkpoint(checkpoint: str, *, split: str = "test", data_root: Optional[str] = None,
                        metadata_root: Optional[str] = None, mask_root: Optional[str] = None,
                        specs: Optional[Mapping[str, MapSpec]] = None, batch_size: int = 32,
                        cam_curve_interval: float = 0.001, device: str = "cpu", progress: bool = True,
                        max_images: Optional[int] = None, select_on: Optional[str] = None,
                        sigma_grid: Optional[Sequence[float]] = None,
                        save_maps: Optional[str] = None, num_workers: Optional[int] = None,
                        amp: Optional[str] = None) -> Dict[str, Any]:
    """Load a training checkpoint and evaluate it on ``split`` (same data roots as
    training unless given; ``mask_root``: the folder the mask paths are relative
    to, e.g. OpenImages' mask folder).

    ``select_on="val"``: sigma and tau are chosen on that split first
    (:func:`select_on_split`), then ``split`` is scored with them (``res["selection"]``).
    ``save_maps=DIR``: per-image maps, overlays, boxes and figures (:class:`MapSaver`)."""
    from .runs import load_trained

    model, emb, cfg = load_trained(checkpoint, device=device)
    if torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)  # with the channels_last images evaluate() feeds it
    ds = _open_split(cfg, split, data_root, metadata_root, mask_root, checkpoint)
    specs = dict(specs or DEFAULT_SPECS)
    common = dict(embeddings={"learned": emb}, batch_size=batch_size, cam_threshold=cfg.cam_threshold,
                  cam_curve_interval=cam_curve_interval, device=device, progress=progress)
    run_kw = dict(num_workers=num_workers, amp=amp)
    selection = None
    loc_taus = None
    if select_on:
        if select_on == split:
            raise ValueError(f"select_on={select_on!r} is the evaluated split itself; choose on another split")
        sel_ds = _open_split(cfg, select_on, data_root, metadata_root, mask_root, checkpoint)
        specs, selection, _ = select_on_split(model, sel_ds, specs, sigma_grid=sigma_grid, max_images=max_images,
                                              desc=f"select on {select_on}", **common, **run_kw)
        loc_taus = {n: s["tau"] for n, s in selection.items() if s.get("tau") is not None}
    saver = MapSaver(save_maps, list(specs)) if save_maps else None
    gt_names = [n for n, s in specs.items() if s.target == "gt"] or list(specs)
    res = evaluate(model, ds, specs, max_images=max_images, desc=f"evaluate {split}", loc_taus=loc_taus,
                   on_image=saver, histogram_specs=gt_names[:4] if saver else (),
                   keep_examples=6 if saver else 0, **common, **run_kw)
    res["config"] = cfg.to_dict()
    res["split"] = split
    res["selection"] = selection
    if saver is not None:
        saver.items = [it for part in distributed.gather_objects(saver.items) for it in part]  # image order
    if saver is not None and distributed.world()[0] == 0:  # rank 0 draws (a shared folder across machines)
        taus = loc_taus if loc_taus is not None else {
            n: m["loc_tau"] for n, m in res["metrics"].items() if "loc_tau" in m}
        tau_from = (f"chosen on {select_on} (best tau@50)" if loc_taus is not None
                    else f"best tau@50 on {split} itself")
        res["saved"] = saver.finish(res, ds, taus, tau_from, progress=progress)
    return res
