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
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .models import class_activation_maps

__all__ = [
    "MapSpec",
    "DEFAULT_SPECS",
    "compute_maps",
    "evaluate",
    "evaluate_checkpoint",
    "time_per_image",
    "denormalize",
    "jsonable",
    "format_metrics_table",
]


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


@torch.no_grad()
def compute_maps(features: Tensor, classifier_weight: Tensor, specs: Mapping[str, MapSpec],
                 labels: Tensor, preds: Tensor, embeddings: Optional[Mapping[str, Any]] = None,
                 cam_threshold: float = 0.2) -> Dict[str, Tensor]:
    """Every requested map for one batch, at feature resolution ([B, h, w] float32)."""
    embeddings = embeddings or {}
    cams: Dict[str, Tensor] = {}
    em_cache: Dict[tuple, Any] = {}
    out: Dict[str, Tensor] = {}
    for name, spec in specs.items():
        classes = labels if spec.target == "gt" else preds
        if spec.target not in cams:
            cams[spec.target] = class_activation_maps(features, classifier_weight, classes)
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


@torch.no_grad()
def evaluate(model, dataset, specs: Optional[Mapping[str, MapSpec]] = None, *,
             embeddings: Optional[Mapping[str, Any]] = None, batch_size: int = 32,
             cam_threshold: float = 0.2, cam_curve_interval: float = 0.001,
             iou_thresholds: Sequence[int] = (30, 50, 70), device: str = "cpu", progress: bool = True,
             histogram_specs: Sequence[str] = (), histogram_bins: int = 50,
             keep_examples: int = 0, max_images: Optional[int] = None, desc: str = "evaluate") -> Dict[str, Any]:
    """Score every map of ``specs`` on ``dataset`` (a ``WSOLDataset`` with train=False).
    Box metrics need boxes (CUB, ILSVRC, synthetic), PxAP needs masks (OpenImages,
    synthetic); whatever the split has is scored.

    Returns ``{"metrics": {name: {...}}, "classification": {...}, "curves": {name:
    BoxAcc-vs-tau array [n_delta, n_tau]}, "thresholds": [...], "histograms": ...,
    "examples": [...]}``. ``histogram_specs`` collects histograms of the normalised
    map over ground-truth foreground / background pixels (Fig. 1; the mask, or the
    union of the boxes when the split has no masks); ``keep_examples`` keeps the
    first images with their maps (Fig. 5)."""
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
    subset = dataset if n_total == len(dataset) else torch.utils.data.Subset(dataset, range(n_total))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0)
    top1 = top5 = seen = 0
    from tqdm.auto import tqdm

    t0 = time.time()
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        images, labels, ids = batch[0].to(device), batch[1].to(device).long(), list(batch[2])
        logits, feats = model(images, return_features=True)
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        preds = topk[:, 0]
        ok1 = (preds == labels).cpu().numpy()
        ok5 = (topk == labels[:, None]).any(dim=1).cpu().numpy()
        top1 += int(ok1.sum())
        top5 += int(ok5.sum())
        seen += len(ids)
        maps = compute_maps(feats.float(), model.classifier_weight.detach().float(), specs, labels, preds,
                            embeddings, cam_threshold)
        maps = {n: m.detach().float().cpu() for n, m in maps.items()}
        size = int(images.shape[-1])
        for b, image_id in enumerate(ids):
            gt_boxes = np.asarray(dataset.gt_boxes(image_id)) if has_boxes else np.zeros((0, 4), np.int64)
            if has_masks:
                gt_mask, ignore = dataset.gt_mask(image_id)
            else:
                gt_mask, ignore = None, None
            keep = len(examples) < keep_examples
            ex = {"image_id": image_id, "image": denormalize(images[b]), "boxes": gt_boxes,
                  "label": int(labels[b]), "pred": int(preds[b]), "maps": {}} if keep else None
            for name, m in maps.items():
                sm = normalize_scoremap(m[b], size=size)
                if has_boxes:
                    box_ev[name].accumulate(sm, gt_boxes, correct_top1=bool(ok1[b]), correct_top5=bool(ok5[b]))
                if has_masks:
                    mask_ev[name].accumulate(sm, gt_mask, ignore)
                if name in hists:
                    fgm = np.asarray(gt_mask, bool) if has_masks else _boxes_to_mask(gt_boxes, size)
                    valid = ~np.asarray(ignore, bool) if (has_masks and ignore is not None) else np.ones_like(fgm)
                    hists[name]["fg"] += np.histogram(sm[fgm & valid], bins=edges)[0]
                    hists[name]["bg"] += np.histogram(sm[~fgm & valid], bins=edges)[0]
                if keep:
                    ex["maps"][name] = sm
            if keep:
                if has_masks:
                    ex["mask"] = np.asarray(gt_mask, bool)
                examples.append(ex)
    elapsed = time.time() - t0

    metrics: Dict[str, Dict[str, Any]] = {}
    curves: Dict[str, np.ndarray] = {}
    thresholds = None
    for name in specs:
        row: Dict[str, Any] = {"num_images": seen}
        if has_boxes:
            r = box_ev[name].compute()
            curves[name] = r["curve"]
            thresholds = r["thresholds"]
            row.update({k: v for k, v in r.items() if k not in ("curve", "thresholds", "correct@50", "iou_thresholds")})
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
        cam = class_activation_maps(feats, model.classifier_weight, pred)
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


def format_metrics_table(metrics: Mapping[str, Mapping[str, Any]], has_masks: bool, has_boxes: bool = True) -> str:
    """A Markdown table of the main metrics, one row per map."""
    cols = ["MaxBoxAccV2", "BoxAcc@30", "BoxAcc@50", "BoxAcc@70", "GT-known Loc", "Top-1 Loc",
            "Top-5 Loc"] if has_boxes else []
    if has_masks:
        cols.append("PxAP")
    lines = ["| map | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in metrics.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row[c]:.1f}" if isinstance(row.get(c), (int, float)) else "-" for c in cols) + " |")
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str, *, split: str = "test", data_root: Optional[str] = None,
                        metadata_root: Optional[str] = None, mask_root: Optional[str] = None, specs: Optional[Mapping[str, MapSpec]] = None,
                        batch_size: int = 32, cam_curve_interval: float = 0.001, device: str = "cpu",
                        progress: bool = True, max_images: Optional[int] = None) -> Dict[str, Any]:
    """Load a training checkpoint and evaluate it on ``split`` (same data roots as
    training unless given; ``mask_root``: the folder the mask paths are relative
    to, e.g. OpenImages' mask folder)."""
    from .data import WSOLDataset
    from .train import load_trained

    model, emb, cfg = load_trained(checkpoint, device=device)
    ds = WSOLDataset(data_root or cfg.data_root, metadata_root or cfg.metadata_root, split, train=False,
                     image_size=cfg.image_size, mask_root=mask_root)
    res = evaluate(model, ds, specs, embeddings={"learned": emb}, batch_size=batch_size,
                   cam_threshold=cfg.cam_threshold, cam_curve_interval=cam_curve_interval, device=device,
                   progress=progress, max_images=max_images, desc=f"evaluate {split}")
    res["config"] = cfg.to_dict()
    res["split"] = split
    return res
