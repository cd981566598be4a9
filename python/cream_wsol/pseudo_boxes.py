"""Pseudo boxes for CREAM_Reg (paper section 5, Table 6): ``cream-wsol pseudo-boxes``.

A trained CREAM_Base model (classifier + context embeddings) is applied to every
image of a split; the box of an image comes from the map of its ground-truth class
(training labels are known) at one tau, the val split's MaxBoxAccV2 tau at IoU 50
(``best_tau@50`` of :class:`~cream_wsol.metrics.BoxEvaluator` on that map type). The
box is extracted by the metrics' own code (:func:`cream_wsol.metrics.best_box`
on the :func:`~cream_wsol.metrics.normalize_scoremap` map); of the contours at tau the
largest one gives the box (a regressor needs one box per image; this is the
single-contour rule of MaxBoxAcc V1).

The output folder is a wsolevaluation metadata folder ``DIR/<split>/`` with
``image_ids.txt``, ``class_labels.txt``, ``image_sizes.txt`` (copied) and
``localization.txt`` (``<image_id>,x0,y0,x1,y1``, original image pixels), so
:class:`~cream_wsol.data.WSOLDataset` (and any tool) reads the boxes with the same
loader. ``DIR/pseudo_boxes.json`` records the checkpoint, tau, input size, the map
and, when the split has real boxes, the GT-known of the pseudo boxes.

The paper generates boxes at 448 x 448: ``input_size`` defaults to 448 for the
real-data presets (cub, ilsvrc, openimages) and to the training image size otherwise.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

from . import distributed
from .evaluate import MapSpec, _classifier_weight, compute_maps, evaluate, jsonable, model_cam_fn
from .metrics import best_box, box_metrics, normalize_scoremap

__all__ = ["REAL_DATASETS", "default_input_size", "choose_tau", "boxes_from_maps", "write_localization",
           "box_gt_known", "generate_pseudo_boxes", "PSEUDO_META"]

REAL_DATASETS = ("cub", "ilsvrc", "openimages")
PSEUDO_META = "pseudo_boxes.json"


def default_input_size(cfg) -> int:
    """448 (the paper's pseudo-box size) for the real-data presets, else the training size."""
    return 448 if str(cfg.dataset).lower() in REAL_DATASETS else int(cfg.image_size)


def choose_tau(model, emb, val_ds, spec: MapSpec, *, cam_threshold: float = 0.2,
               cam_curve_interval: float = 0.001, batch_size: int = 32, device: str = "cpu",
               progress: bool = True) -> Dict[str, Any]:
    """MaxBoxAccV2's tau at IoU 50 of map ``spec`` on the val split: ``{"tau", "metrics"}``."""
    if not val_ds.has_boxes:
        raise ValueError(f"choose_tau: {val_ds!r} has no boxes; the tau is chosen on a split with boxes")
    res = evaluate(model, val_ds, {"map": spec}, embeddings={"learned": emb}, batch_size=batch_size,
                   cam_threshold=cam_threshold, cam_curve_interval=cam_curve_interval, device=device,
                   progress=progress, desc="pseudo boxes: tau on val")
    m = res["metrics"]["map"]
    return {"tau": float(m["best_tau@50"]), "metrics": m}


@torch.no_grad()
def boxes_from_maps(model, dataset, spec: MapSpec, tau: float, *, embeddings: Optional[Mapping[str, Any]] = None,
                    cam_threshold: float = 0.2, batch_size: int = 32, device: str = "cpu",
                    progress: bool = True, desc: str = "pseudo boxes",
                    num_workers: Optional[int] = None) -> Dict[str, np.ndarray]:
    """{image_id: box [4] int64 (x0, y0, x1, y1) in the dataset's S x S frame}: the largest
    contour of the ground-truth class's map at ``tau``. Inside
    :func:`cream_wsol.distributed.sharded` under torchrun each rank maps its block of whole
    batches and every rank returns the boxes of the whole split. ``num_workers``: loader processes
    (None: :func:`cream_wsol.runs.default_num_workers`; the boxes do not depend on it)."""
    from .runs import loader_kwargs
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if not (0.0 <= float(tau) < 1.0):
        raise ValueError(f"tau must be in [0, 1); got {tau}")
    model.eval()
    out: Dict[str, np.ndarray] = {}
    mine = distributed.batch_shard(len(dataset), batch_size, *distributed.world())  # whole batches of this rank
    part = dataset if len(mine) == len(dataset) else torch.utils.data.Subset(dataset, mine)
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, **loader_kwargs(num_workers, device))
    for images, labels, ids in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True).long()
        logits, feats = model(images, return_features=True)
        maps = compute_maps(feats.float(), _classifier_weight(model), {"m": spec}, labels,
                            logits.argmax(1), embeddings, cam_threshold, cam_fn=model_cam_fn(model))["m"].cpu()
        size = int(images.shape[-1])
        for b, image_id in enumerate(ids):
            sm = normalize_scoremap(maps[b], size=size)
            out[image_id] = best_box(sm, float(tau)).box  # one box: the largest contour
    return distributed.merge_dicts(out)  # every rank's boxes, on every rank


def write_localization(out_root: str, split: str, dataset, boxes: Mapping[str, np.ndarray]) -> str:
    """Write ``out_root/<split>/`` (wsolevaluation format) with ``boxes`` given in the dataset's
    S x S frame, converted to original image pixels. Returns the split folder."""
    split_dir = os.path.join(out_root, split)
    os.makedirs(split_dir, exist_ok=True)
    missing = [i for i in dataset.image_ids if i not in boxes]
    if missing:
        raise ValueError(f"write_localization: no box for {len(missing)} image(s), e.g. {missing[0]}")
    for name in ("image_ids.txt", "class_labels.txt", "image_sizes.txt"):
        src = os.path.join(dataset.split_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(split_dir, name))
    s = float(dataset.image_size)
    lines = []
    sizes = []
    for image_id in dataset.image_ids:
        w, h = dataset.original_size(image_id)
        sizes.append(f"{image_id},{w},{h}")
        x0, y0, x1, y1 = (float(v) for v in np.asarray(boxes[image_id]).reshape(4))
        ox0, oy0 = int(round(x0 * w / s)), int(round(y0 * h / s))
        ox1, oy1 = max(ox0, int(round(x1 * w / s))), max(oy0, int(round(y1 * h / s)))
        lines.append(f"{image_id},{ox0},{oy0},{min(ox1, w - 1)},{min(oy1, h - 1)}")
    if not os.path.isfile(os.path.join(split_dir, "image_sizes.txt")):
        with open(os.path.join(split_dir, "image_sizes.txt"), "w") as fh:
            fh.write("\n".join(sizes) + "\n")
    tmp = os.path.join(split_dir, ".localization.txt.tmp")
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(split_dir, "localization.txt"))
    return split_dir


def box_gt_known(boxes: Mapping[str, np.ndarray], dataset, iou: float = 0.5) -> Optional[float]:
    """Share (x100) of images whose box has IoU >= ``iou`` with one of its real boxes
    (S x S frame, the metrics' +1 pixel IoU, through metrics.box_metrics); None when the
    split has no boxes."""
    if not dataset.has_boxes:
        return None
    ids = list(dataset.image_ids)
    m = box_metrics(np.stack([np.asarray(boxes[i]).reshape(4) for i in ids]), [dataset.gt_boxes(i) for i in ids])
    return 100.0 * float((m["iou"] >= iou).mean())


def generate_pseudo_boxes(checkpoint: str, out_dir: str, *, split: str = "train", input_size: Optional[int] = None,
                          data_root: Optional[str] = None, metadata_root: Optional[str] = None,
                          spec: Optional[MapSpec] = None, tau: Optional[float] = None,
                          cam_curve_interval: float = 0.001, batch_size: int = 32, device: str = "cpu",
                          progress: bool = True, ddt: bool = False,
                          log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """CREAM_Base pseudo boxes of ``split`` -> ``out_dir`` (and DDT's, in ``out_dir/ddt``, when
    ``ddt``). ``tau`` None: chosen on the val split. Returns the metadata written to
    ``out_dir/pseudo_boxes.json`` (tau, GT-known of the boxes when the split has boxes, times).

    Under torchrun (inside :func:`cream_wsol.distributed.sharded`) the tau and the boxes are
    computed across the ranks, rank 0 writes ``localization.txt`` (every rank waits for it),
    then rank 0 alone runs DDT and writes ``pseudo_boxes.json``; the other ranks return the
    metadata without the ``"ddt"`` entry."""
    from .data import WSOLDataset
    from .runs import load_trained

    spec = spec or MapSpec("cream")
    model, emb, cfg = load_trained(checkpoint, device=device)
    size = int(input_size) if input_size else default_input_size(cfg)
    if size < 16:
        raise ValueError(f"input_size must be >= 16; got {size}")
    droot, mroot = data_root or cfg.data_root, metadata_root or cfg.metadata_root
    t0 = time.time()
    tau_info: Dict[str, Any] = {"tau": tau, "source": "given"}
    if tau is None:
        val_ds = WSOLDataset(droot, mroot, "val", train=False, image_size=size)
        ch = choose_tau(model, emb, val_ds, spec, cam_threshold=cfg.cam_threshold,
                        cam_curve_interval=cam_curve_interval, batch_size=batch_size, device=device, progress=progress)
        tau_info = {"tau": ch["tau"], "source": "val best_tau@50", "val_MaxBoxAccV2": ch["metrics"]["MaxBoxAccV2"],
                    "val_BoxAcc@50": ch["metrics"]["BoxAcc@50"]}
    t_tau = time.time() - t0
    ds = WSOLDataset(droot, mroot, split, train=False, image_size=size)
    t1 = time.time()
    boxes = boxes_from_maps(model, ds, spec, tau_info["tau"], embeddings={"learned": emb},
                            cam_threshold=cfg.cam_threshold, batch_size=batch_size, device=device, progress=progress)
    main = distributed.world()[0] == 0  # under torchrun: rank 0 writes, the others return
    if main:
        write_localization(out_dir, split, ds, boxes)
    distributed.barrier()  # under torchrun: localization.txt exists for every rank from here on
    meta: Dict[str, Any] = {
        "format": "cream_wsol.pseudo_boxes/1", "checkpoint": os.path.abspath(checkpoint), "split": split,
        "input_size": size, "map": dataclasses.asdict(spec), "tau": tau_info,
        "data_root": droot, "metadata_root": mroot, "num_images": len(ds),
        "gt_known": box_gt_known(boxes, ds), "time_s": {"tau": t_tau, "boxes": time.time() - t1},
    }
    if not main:  # rank 0 alone runs DDT and writes pseudo_boxes.json
        return meta
    if ddt:  # DDT's float64 statistics are summed in one process (rank 0), never sharded
        from .ddt import ddt_pseudo_boxes

        t2 = time.time()
        dboxes = ddt_pseudo_boxes(model, ds, batch_size=batch_size, device=device, progress=progress)
        write_localization(os.path.join(out_dir, "ddt"), split, ds, dboxes)
        meta["ddt"] = {"gt_known": box_gt_known(dboxes, ds), "dir": os.path.join(out_dir, "ddt"),
                       "time_s": time.time() - t2}
    with open(os.path.join(out_dir, PSEUDO_META), "w") as fh:
        json.dump(jsonable(meta), fh, indent=1)
    if log is not None:
        log(f"pseudo boxes: {len(ds)} images of {split} at {size}px, tau {tau_info['tau']:.3f}, "
            f"GT-known {meta['gt_known']}" + (f"; DDT GT-known {meta['ddt']['gt_known']}" if ddt else ""))
    return meta
