"""CREAM_Reg (paper Fig. 3, Tables 2-5): a class-agnostic box regressor trained on pseudo
boxes, and its box-level evaluation.

* :func:`train_regressor` (``cream-wsol regress``): a separate network -- a backbone of
  models.py whose feature map is average-pooled to 4 x 4 cells, flattened, and mapped to the
  4 coordinates by a linear layer (:class:`BoxRegressor`) -- trained on the pseudo boxes of
  ``cream-wsol pseudo-boxes`` with the MSE on the four box coordinates, each divided by
  the image side (targets in [0, 1]). Input: the eval resize to S x S, a random
  horizontal flip (the box flipped with it). SGD as ``train`` (momentum 0.9, Nesterov,
  weight decay 1e-4, step schedule), the same atomic checkpoints with every rank's RNG
  streams (exact resume at an epoch boundary and mid-epoch: each sample's flip has its
  own seed, so any ``num_workers`` gives the same numbers),
  tqdm bars and DDP under torchrun.
* :func:`box_metrics`: boxes are not maps, so the metric is the direct one: an image is
  correct at delta when the IoU (the metrics' +1 pixel convention,
  :func:`~cream_wsol.metrics.calculate_multiple_iou`, best over its ground-truth boxes) of
  its one predicted box is >= delta / 100. BoxAcc@{30,50,70}, their mean (reported in the
  MaxBoxAccV2 column: there is no tau to maximise over), GT-known Loc (= BoxAcc@50), and
  Top-1 / Top-5 Loc (correct at 50 and the class among the top 1 / top 5).
* :func:`evaluate_cream_reg`: the class from the CAM classifier (the CREAM_Base
  checkpoint), the box from the regressor.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .metrics import box_metrics  # noqa: F401  (public here too: CREAM_Reg's metric)
from .runs import (ConfigMixin, deterministic_training, dist_setup, epoch_seed, load_checkpoint, load_trained,
                   make_loader, progress_bar, resolve_device, rng_state, save_checkpoint, seed_everything, set_rng_state)

__all__ = ["REGRESSOR_LR_NOTE", "regressor_lr", "RegressConfig", "BoxRegressor", "BoxDataset", "train_regressor", "load_regressor", "predict_boxes", "box_metrics",
           "evaluate_cream_reg", "REGRESSOR_CHECKPOINT"]

REGRESSOR_CHECKPOINT = "regressor.pt"
REGRESSOR_LR_NOTE = (
    "The regressor trains at a tenth of the classification lr with no head multiplier, whatever the backbone, "
    "from a zero-weight head (every backbone starts at the centred box). Chosen on the training loss only, "
    "before any test number of the regressor: on the synthetic default's pseudo boxes, the small CNN "
    "(old head init) at lr 0.02 (head x10 or x1) stayed at or above the constant-box baseline (0.038) after 3 "
    "epochs (x1: 14.2, 0.33, 0.08) and lr 0.002 went below it (0.039, 0.022, 0.020); with the zero head, "
    "lr 0.002: 0.034, 0.025, 0.023 (12 epochs: 0.018). Lite0 (ImageNet, 640 pseudo boxes, baseline 0.029, "
    "3 epochs; 2026-12-02): lr 0.01 x10 gave NaN in epoch 1 with either head init, lr 0.01 x1 135, 0.75, "
    "0.31, lr 0.001 x1 0.027, 0.016, 0.013.")


def regressor_lr(lr: float) -> tuple:
    """(lr, head multiplier) of a regressor whose CREAM_Base classifier trained at ``lr``
    (REGRESSOR_LR_NOTE)."""
    return 0.1 * float(lr), 1.0


@dataclass
class RegressConfig(ConfigMixin):
    """Everything a regressor run depends on (stored in its checkpoint)."""

    pseudo_root: str = ""  # metadata folder holding <split>/localization.txt (the pseudo boxes)
    data_root: str = ""  # folder the image ids are relative to
    split: str = "train"
    arch: str = "small"
    pretrained: Optional[str] = None
    large_feature_map: bool = False
    image_size: int = 224
    batch_size: int = 32
    lr: float = 0.001
    classifier_lr_mult: float = 1.0  # the head's lr multiplier (10 fits a new head on a pretrained backbone)
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 50
    lr_step: int = 15
    lr_gamma: float = 0.1
    seed: int = 0
    num_workers: int = 0
    out_dir: str = "runs/regress"
    ckpt_every_steps: int = 0
    max_steps_per_epoch: Optional[int] = None
    progress: bool = True
    device: str = "auto"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    head_init: str = "zeros"  # BoxRegressor's head (a checkpoint without it had normal(0, 0.01) weights)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RegressConfig":
        """The schedule, backbone and input size of a ``train`` preset."""
        from .train import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        p = PRESETS[name]
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in p.items() if k in names}
        kw["lr"], kw["classifier_lr_mult"] = regressor_lr(p.get("lr", 0.001))  # REGRESSOR_LR_NOTE
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


class BoxDataset(torch.utils.data.Dataset):
    """(image [3, S, S], target box [4] float32 = (x0, y0, x1, y1) / S, image_id) from a
    WSOLDataset split with boxes; ``flip``: random horizontal flip of image and box."""

    def __init__(self, base, flip: bool):
        if not base.has_boxes:
            raise ValueError(f"BoxDataset: {base!r} has no boxes (localization.txt with x0,y0,x1,y1)")
        self.base, self.flip = base, bool(flip)
        self.num_classes = base.num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image_id = self.base.image_ids[index]
        x = self.base.transform(self.base.load_image(image_id))  # base.train is False: resize to S
        s = float(self.base.image_size)
        box = self.base.gt_boxes(image_id)[0].astype(np.float64)
        if self.flip and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
            box = np.array([s - 1 - box[2], box[1], s - 1 - box[0], box[3]])
        return x, torch.tensor(box / s, dtype=torch.float32), image_id


class BoxRegressor(nn.Module):
    """A models.py backbone's feature map -> average-pooled to ``grid`` x ``grid`` cells ->
    flattened -> linear -> 4 box coordinates. The pooled grid keeps where the features are
    (a global average pool would throw position away, and a box is a position)."""

    def __init__(self, backbone, grid: int = 4):
        super().__init__()
        self.backbone = backbone
        self.grid = int(grid)
        self.arch = backbone.arch
        self.head = nn.Linear(backbone.feature_dim * self.grid * self.grid, 4)
        # Zero weights: every backbone starts at exactly the centred box, whatever its feature
        # scale (normal(0, 0.01) weights over Lite0's 1280 x 16 inputs gave initial outputs of
        # several units). What fixed the NaN losses of Lite0's first full run was the lr
        # (REGRESSOR_LR_NOTE: lr 0.01 x10 diverged with either init); this makes the start
        # the same for every backbone.
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():  # start at the centred box of half the side
            self.head.bias.copy_(torch.tensor([0.25, 0.25, 0.75, 0.75]))

    def forward(self, x):
        f = self.backbone.forward_features(x)
        return self.head(F.adaptive_avg_pool2d(f, self.grid).flatten(1))

    def param_groups(self, lr: float, head_lr_mult: float = 1.0, weight_decay: float = 1e-4):
        back = [p for n, p in self.backbone.named_parameters() if not n.startswith("fc.") and p.requires_grad]
        return [{"params": back, "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
                {"params": list(self.head.parameters()), "lr": lr * head_lr_mult, "weight_decay": weight_decay,
                 "name": "head"}]


def _build(cfg: RegressConfig, pretrained: Optional[str]):
    from .models import build_model

    backbone = build_model(cfg.arch, 1, large_feature_map=cfg.large_feature_map, pretrained=pretrained,
                           **cfg.model_kwargs)
    backbone.fc.requires_grad_(False)  # the backbone's classifier is not used
    if cfg.head_init != "zeros":
        raise ValueError(f"head_init: only 'zeros' is built (REGRESSOR_LR_NOTE); got {cfg.head_init!r}")
    return BoxRegressor(backbone)


@deterministic_training
def train_regressor(cfg: RegressConfig, resume: Optional[str] = "auto",
                    on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Train (or continue) the box regressor; ``resume`` as :func:`cream_wsol.train.train`.
    Returns {"checkpoint", "log", "time_s", "rank", "world_size", "model"}."""
    from .data import WSOLDataset
    device = resolve_device(cfg.device)
    rank, world, own_group = dist_setup(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        torch.cuda.set_device(device)
    is_main = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, REGRESSOR_CHECKPOINT)
    try:
        base = WSOLDataset(cfg.data_root, cfg.pseudo_root, cfg.split, train=False, image_size=cfg.image_size)
        dataset = BoxDataset(base, flip=True)
        if resume == "auto":
            resume = ckpt_path if os.path.isfile(ckpt_path) else None
        seed_everything(cfg.seed)
        model = _build(cfg, None if resume else cfg.pretrained).to(device)
        optimizer = torch.optim.SGD(model.param_groups(cfg.lr, cfg.classifier_lr_mult, cfg.weight_decay),
                                    lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                                    nesterov=cfg.sgd_momentum > 0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.lr_step), gamma=cfg.lr_gamma)
        start_epoch = start_step = global_step = 0
        log: List[Dict[str, Any]] = []
        rng_resume = None
        if resume:
            ck = load_checkpoint(resume, map_location=device)
            if ck.get("format") != "cream_wsol.regressor/1":
                raise ValueError(f"{resume} is not a regressor checkpoint (format {ck.get('format')!r})")
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            start_epoch, start_step, global_step = int(ck["epoch"]), int(ck["step_in_epoch"]), int(ck["global_step"])
            log = list(ck.get("log", []))
            states = ck.get("rng") or []
            if len(states) == world:
                rng_resume = states[rank]
            elif start_step:
                raise RuntimeError(f"checkpoint was written mid-epoch by {len(states)} ranks; "
                                   f"resume it with the same number of ranks (now {world})")
        ddp_model: nn.Module = model
        if world > 1:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        def checkpoint(epoch: int, step_in_epoch: int) -> None:
            rng = rng_state()
            states = [rng]
            if world > 1:
                states = [None] * world
                dist.all_gather_object(states, rng)
            if is_main:
                save_checkpoint({"format": "cream_wsol.regressor/1", "config": cfg.to_dict(), "arch": model.arch,
                                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "rng": states, "epoch": epoch,
                                 "step_in_epoch": step_in_epoch, "global_step": global_step, "world_size": world,
                                 "log": log}, ckpt_path)
            if world > 1:
                dist.barrier()

        t0 = time.time()
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_step if epoch == start_epoch else 0
            if rng_resume is not None and epoch == start_epoch and skip > 0:
                set_rng_state(rng_resume)
            else:
                seed_everything(epoch_seed(cfg.seed, epoch, rank))
            loader = make_loader(dataset, cfg, epoch, rank, world, skip=skip)
            ddp_model.train()
            t_epoch = time.time()
            loss_sum, nsteps = 0.0, 0
            step_in_epoch = skip
            bar = progress_bar(loader, total=len(loader), desc=f"regress {epoch + 1}/{cfg.epochs}",
                        disable=not (cfg.progress and is_main), leave=False)
            for images, target, _ in bar:
                images, target = images.to(device), target.to(device)
                pred = ddp_model(images)
                loss = F.mse_loss(pred, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lv = loss.item()
                if not math.isfinite(lv):
                    raise FloatingPointError(f"regressor loss is {lv} at epoch {epoch + 1} step "
                                             f"{step_in_epoch + 1}; lower --lr")
                step_in_epoch += 1
                global_step += 1
                loss_sum += lv
                nsteps += 1
                if is_main and cfg.progress:
                    bar.set_postfix(mse=f"{lv:.4f}")
                if cfg.ckpt_every_steps and global_step % cfg.ckpt_every_steps == 0 and step_in_epoch < len(loader) + skip:
                    checkpoint(epoch, step_in_epoch)
                if on_step is not None:
                    on_step({"epoch": epoch, "step": step_in_epoch, "global_step": global_step, "loss": lv})
            bar.close()
            epoch_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            entry = {"epoch": epoch + 1, "mse": loss_sum / max(1, nsteps), "lr": epoch_lr,
                     "epoch_s": round(time.time() - t_epoch, 2), "time_s": round(time.time() - t0, 2)}
            log.append(entry)
            if is_main:
                with open(os.path.join(cfg.out_dir, "regress_log.jsonl"), "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
            checkpoint(epoch + 1, 0)
        return {"checkpoint": ckpt_path, "log": log, "time_s": time.time() - t0, "rank": rank,
                "world_size": world, "model": model}
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def load_regressor(path: str, device: str = "cpu"):
    """(regressor in eval mode, RegressConfig) from a regressor checkpoint (file or folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, REGRESSOR_CHECKPOINT)
    ck = load_checkpoint(path, map_location=device)
    if ck.get("format") != "cream_wsol.regressor/1":
        raise ValueError(f"{path} is not a regressor checkpoint (format {ck.get('format')!r})")
    cfg = RegressConfig.from_dict(ck["config"])
    model = _build(cfg, None)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), cfg


def _to_pixel_box(pred: np.ndarray, size: int) -> np.ndarray:
    """Normalised (x0, y0, x1, y1) -> int64 box in the size x size frame (clipped, ordered)."""
    b = np.clip(np.nan_to_num(np.asarray(pred, dtype=np.float64), nan=0.0) * size, 0, size - 1)
    x0, x1 = sorted((b[0], b[2]))
    y0, y1 = sorted((b[1], b[3]))
    return np.array([round(x0), round(y0), round(x1), round(y1)], dtype=np.int64)


@torch.no_grad()
def predict_boxes(regressor, dataset, *, batch_size: int = 64, device: str = "cpu",
                  progress: bool = True) -> Dict[str, np.ndarray]:
    """{image_id: box [4] int64 in the dataset's S x S frame} (dataset: a WSOLDataset, train=False)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    regressor.eval()
    out = {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for images, _, ids in tqdm(loader, desc="regressor boxes", disable=not progress, leave=False):
        pred = regressor(images.to(device)).float().cpu().numpy()
        size = int(images.shape[-1])
        for b, image_id in enumerate(ids):
            out[image_id] = _to_pixel_box(pred[b], size)
    return out


@torch.no_grad()
def _classify(model, dataset, batch_size: int, device: str, progress: bool):
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model.eval()
    ok1, ok5, ids = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for images, labels, batch_ids in tqdm(loader, desc="classifier", disable=not progress, leave=False):
        logits = model(images.to(device))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices.cpu()
        ok1 += (top[:, 0] == labels).tolist()
        ok5 += (top == labels[:, None]).any(1).tolist()
        ids += list(batch_ids)
    return ids, ok1, ok5


def evaluate_cream_reg(classifier_checkpoint: str, regressor_checkpoint: str, *, split: str = "test",
                       data_root: Optional[str] = None, metadata_root: Optional[str] = None,
                       batch_size: int = 64, device: str = "cpu", progress: bool = True) -> Dict[str, Any]:
    """CREAM_Reg on ``split``: class from the CAM classifier, box from the regressor. The images are
    resized to the regressor's input size, the boxes scored in that frame."""
    from .data import WSOLDataset

    clf, _, ccfg = load_trained(classifier_checkpoint, device=device)
    reg, rcfg = load_regressor(regressor_checkpoint, device=device)
    droot, mroot = data_root or ccfg.data_root, metadata_root or ccfg.metadata_root
    ds_c = WSOLDataset(droot, mroot, split, train=False, image_size=ccfg.image_size)
    ds_r = WSOLDataset(droot, mroot, split, train=False, image_size=rcfg.image_size)
    if not ds_r.has_boxes:
        raise ValueError(f"evaluate_cream_reg: split {split!r} of {mroot} has no boxes")
    ids, ok1, ok5 = _classify(clf, ds_c, batch_size, device, progress)
    boxes = predict_boxes(reg, ds_r, batch_size=batch_size, device=device, progress=progress)
    m = box_metrics(np.stack([boxes[i] for i in ids]), [ds_r.gt_boxes(i) for i in ids], ok1, ok5)
    m.pop("iou")
    return {"metrics": m, "classification": {"top1": 100.0 * float(np.mean(ok1)), "top5": 100.0 * float(np.mean(ok5)),
                                             "num_images": len(ids)}, "split": split,
            "boxes": {i: boxes[i].tolist() for i in ids}}
