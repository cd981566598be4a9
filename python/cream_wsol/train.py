"""CAM training with CREAM's context embeddings learned on the fly.

One step (SPEC.md, section 4.1 of the paper):

    logits, F = model(x)                      # F: the CAM feature map
    loss = cross_entropy(logits, y); loss.backward()
    embeddings.update(F.detach(), y, classifier_weight=W.detach())   # Eqs. 3-4, fused
    optimizer.step()

with SGD (momentum 0.9, Nesterov, weight decay 1e-4), the classifier layers at
10x the learning rate, and a step schedule per epoch. The context embeddings are a
``cream_kernels.ContextEmbeddings`` module, which also keeps them identical
across ranks under ``torch.distributed`` (``torchrun``; DDP on gloo for CPU,
NCCL for CUDA).

Checkpoints (``<out>/checkpoint.pt``, written atomically: temp file +
``os.replace``) hold the model, optimizer, scheduler, embeddings, every rank's
RNG states and the epoch / step, so ``resume`` continues exactly where the run
stopped: two epochs in one go and one epoch + resume + one epoch give the same
weights and embeddings bit for bit (data order and augmentation depend only on
the seed, the epoch and the rank; with ``num_workers=0`` this also holds for a
resume in the middle of an epoch).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from .models import CAMNet, build_model

__all__ = [
    "TrainConfig",
    "PRESETS",
    "preset",
    "train",
    "learn_embeddings",
    "load_checkpoint",
    "load_trained",
    "save_checkpoint",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in each checkpoint)."""

    dataset: str = "synthetic"  # a label for logs and reports
    data_root: str = ""
    metadata_root: str = ""
    train_split: str = "train"
    arch: str = "small"
    pretrained: Optional[str] = None  # path to an ImageNet state dict, "package" (Lite0), or None
    large_feature_map: bool = False
    image_size: int = 224  # eval resize / train crop size
    crop_size: Optional[int] = None  # passed to WSOLDataset (None: its default)
    batch_size: int = 32
    lr: float = 0.001
    classifier_lr_mult: float = 10.0
    sgd_momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 50
    lr_step: int = 15
    lr_gamma: float = 0.1
    cream_momentum: float = 0.8  # lambda of Eq. 4
    cam_threshold: float = 0.2
    embedding_init: str = "zeros"
    seed: int = 0
    num_workers: int = 0
    out_dir: str = "runs/train"
    ckpt_every_steps: int = 0  # 0: only at the end of each epoch
    max_steps_per_epoch: Optional[int] = None  # cap for CI-size runs
    progress: bool = True
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    method: str = "cam"  # WSOL training method (methods.py, issue 9): cam | has | adl | cutmix
    method_kwargs: Dict[str, float] = field(default_factory=dict)  # overrides of its defaults

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# The paper's schedules (section 4.1): batch 32, lr 1e-3 (classifier x10),
# epochs / lr-step 50/15 (CUB), 6/2 (ILSVRC), 10/3 (OpenImages); resize 256,
# random crop 224, horizontal flip.
_PAPER_SCHEDULES = {"cub": (50, 15), "ilsvrc": (6, 2), "openimages": (10, 3)}
PRESETS: Dict[str, Dict[str, Any]] = {}
for _ds, (_ep, _st) in _PAPER_SCHEDULES.items():
    for _arch in ("vgg16", "resnet50", "inceptionv3", "efficientnet_lite0"):
        PRESETS[f"{_ds}-{_arch}"] = dict(
            dataset=_ds, arch=_arch, batch_size=32, lr=0.001, classifier_lr_mult=10.0,
            epochs=_ep, lr_step=_st, image_size=224, crop_size=224,
            pretrained="package" if _arch == "efficientnet_lite0" else None,
        )
# The CPU default: a 4-layer CNN from scratch on the synthetic data set (minutes on 2 cores).
PRESETS["synthetic"] = dict(
    dataset="synthetic", arch="small", batch_size=32, lr=0.02, classifier_lr_mult=10.0,
    epochs=12, lr_step=8, image_size=64, crop_size=None, weight_decay=1e-4, pretrained=None,
)
PRESETS["synthetic-quick"] = dict(PRESETS["synthetic"], epochs=2, lr_step=1)


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dist_setup(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world_size, we_initialised). Initialises the default process group
    from torchrun's environment when it is not initialised yet."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(rank) * 101 + 12345) % (2**31 - 1)


def _seed_everything(s: int) -> None:
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def _rng_state() -> Dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(state: Dict[str, Any], path: str) -> None:
    """torch.save to a temp file in the same folder, then os.replace (atomic)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    # the checkpoint holds RNG states (numpy tuples) and the config dict
    return torch.load(path, map_location=map_location, weights_only=False)


class _SkipBatches(Sampler):
    """Yield the batches of ``batch_sampler`` from index ``skip`` on (mid-epoch resume)."""

    def __init__(self, batch_sampler: BatchSampler, skip: int):
        self.batch_sampler = batch_sampler
        self.skip = int(skip)

    def __iter__(self) -> Iterator[List[int]]:
        for i, b in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield b

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


def _make_dataset(cfg: TrainConfig, split: str, train: bool):
    from .data import WSOLDataset

    kw = {"image_size": cfg.image_size}
    if cfg.crop_size is not None:
        kw["crop_size"] = cfg.crop_size
    return WSOLDataset(cfg.data_root, cfg.metadata_root, split, train=train, **kw)


def _batches_per_epoch(n: int, world: int, batch_size: int, cap: Optional[int]) -> tuple[int, bool]:
    per_rank = math.ceil(n / world)
    drop_last = per_rank >= batch_size
    nb = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    if cap is not None:
        nb = min(nb, int(cap))
    return nb, drop_last


def _make_loader(dataset, cfg: TrainConfig, epoch: int, rank: int, world: int, skip: int = 0,
                 seed_offset: int = 0) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg.seed + seed_offset, drop_last=False)
    sampler.set_epoch(epoch)
    nb, drop_last = _batches_per_epoch(len(dataset), world, cfg.batch_size, cfg.max_steps_per_epoch)
    bs = BatchSampler(sampler, cfg.batch_size, drop_last=drop_last)
    capped = _Cap(bs, nb)
    gen = torch.Generator()
    gen.manual_seed(_epoch_seed(cfg.seed + seed_offset, epoch, rank))
    return DataLoader(dataset, batch_sampler=_SkipBatches(capped, skip), num_workers=cfg.num_workers,
                      generator=gen, persistent_workers=False)


class _Cap(Sampler):
    def __init__(self, bs, n):
        self.bs, self.n = bs, int(n)

    def __iter__(self):
        for i, b in enumerate(self.bs):
            if i >= self.n:
                return
            yield b

    def __len__(self):
        return self.n


def _tqdm(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kw)


def _unwrap(model: nn.Module) -> CAMNet:
    return model.module if hasattr(model, "module") else model


def _make_embeddings(num_classes: int, dim: int, momentum: float, cam_threshold: float, init: str, seed: int):
    from cream_kernels import ContextEmbeddings

    # the same seed on every rank, so a random init is identical everywhere
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        return ContextEmbeddings(num_classes, dim, momentum=momentum, cam_threshold=cam_threshold, init=init)


# --------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------- #
def train(cfg: TrainConfig, resume: Optional[str] = "auto",
          on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Train (or continue training) a CAM model and its context embeddings.

    ``resume``: a checkpoint path, ``"auto"`` (``<out_dir>/checkpoint.pt`` if it
    exists) or None (start fresh). Returns a summary dict with the checkpoint path,
    the per-epoch log, the wall time, and this rank's trained ``model`` and
    ``embeddings`` modules."""
    device = _resolve_device(cfg.device)
    rank, world, own_group = _dist_setup(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        torch.cuda.set_device(device)
    is_main = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
    try:
        dataset = _make_dataset(cfg, cfg.train_split, train=True)
        num_classes = int(dataset.num_classes)

        if resume == "auto":
            resume = ckpt_path if os.path.isfile(ckpt_path) else None
        # same init on every rank (DDP would broadcast anyway); a resumed run takes its
        # weights from the checkpoint, not from the ImageNet file
        _seed_everything(cfg.seed)
        model = build_model(cfg.arch, num_classes, large_feature_map=cfg.large_feature_map,
                            pretrained=None if resume else cfg.pretrained, **cfg.model_kwargs).to(device)
        from .methods import make_method  # issue 9 hook: the WSOL method (HaS / ADL / CutMix)
        method = make_method(cfg.method, **cfg.method_kwargs)
        method.wrap(model)
        emb = _make_embeddings(num_classes, model.feature_dim, cfg.cream_momentum, cfg.cam_threshold,
                               cfg.embedding_init, cfg.seed).to(device)
        optimizer = torch.optim.SGD(model.param_groups(cfg.lr, cfg.classifier_lr_mult, cfg.weight_decay),
                                    lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                                    nesterov=cfg.sgd_momentum > 0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.lr_step), gamma=cfg.lr_gamma)

        start_epoch, start_step, global_step, log = 0, 0, 0, []
        rng_resume = None
        if resume:
            ck = load_checkpoint(resume, map_location=device)
            model.load_state_dict(ck["model"])
            emb.load_state_dict(ck["embeddings"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            start_epoch, start_step = int(ck["epoch"]), int(ck["step_in_epoch"])
            global_step = int(ck["global_step"])
            log = list(ck.get("log", []))
            states = ck.get("rng") or []
            if len(states) == world:
                rng_resume = states[rank]
            elif start_step:  # an epoch boundary reseeds anyway; mid-epoch needs every rank's streams
                raise RuntimeError(f"checkpoint was written mid-epoch by {len(states)} ranks; "
                                   f"resume it with the same number of ranks (now {world})")

        ddp_model: nn.Module = model
        if world > 1:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        def checkpoint(epoch: int, step_in_epoch: int) -> None:
            rng = _rng_state()
            states = [rng]
            if world > 1:
                states = [None] * world
                dist.all_gather_object(states, rng)
            if is_main:
                save_checkpoint({
                    "format": "cream_wsol.checkpoint/1",
                    "config": cfg.to_dict(),
                    "arch": model.arch, "num_classes": num_classes, "feature_dim": model.feature_dim,
                    "model": model.state_dict(), "embeddings": emb.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": states, "epoch": epoch, "step_in_epoch": step_in_epoch,
                    "global_step": global_step, "world_size": world, "log": log,
                }, ckpt_path)
            if world > 1:
                dist.barrier()

        t0 = time.time()
        for epoch in range(start_epoch, cfg.epochs):
            skip = start_step if epoch == start_epoch else 0
            if rng_resume is not None and epoch == start_epoch and skip > 0:
                _set_rng_state(rng_resume)  # mid-epoch: continue the saved streams
            else:
                _seed_everything(_epoch_seed(cfg.seed, epoch, rank))
            loader = _make_loader(dataset, cfg, epoch, rank, world, skip=skip)
            ddp_model.train()
            t_epoch = time.time()
            loss_sum = torch.zeros((), dtype=torch.float64)
            correct = seen = 0
            bar = _tqdm(loader, total=len(loader), desc=f"train {epoch + 1}/{cfg.epochs}",
                        disable=not (cfg.progress and is_main), leave=False)
            step_in_epoch = skip
            for batch in bar:
                images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device).long()
                images, loss_fn, emb_labels = method.prepare(images, labels)  # issue 9 hook (cam: unchanged)
                logits, feats = ddp_model(images, return_features=True)
                loss = loss_fn(logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # Eqs. 3-4 with the weight this forward used (before the step), features detached
                with torch.no_grad():
                    emb.update(feats.detach(), emb_labels, classifier_weight=model.classifier_weight.detach())
                optimizer.step()
                step_in_epoch += 1
                global_step += 1
                loss_sum += loss.detach().double().cpu()
                correct += int((logits.argmax(1) == labels).sum())
                seen += int(labels.numel())
                if is_main and cfg.progress:
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / max(1, seen):.3f}",
                                    lr=f"{optimizer.param_groups[0]['lr']:.2g}")
                if cfg.ckpt_every_steps and global_step % cfg.ckpt_every_steps == 0 and step_in_epoch < len(loader) + skip:
                    checkpoint(epoch, step_in_epoch)
                if on_step is not None:
                    on_step({"epoch": epoch, "step": step_in_epoch, "global_step": global_step,
                             "loss": loss.item()})
            bar.close()
            epoch_lr = optimizer.param_groups[0]["lr"]  # the backbone lr this epoch ran with
            scheduler.step()
            nsteps = max(1, step_in_epoch - skip)
            entry = {"epoch": epoch + 1, "loss": float(loss_sum) / nsteps, "train_acc": correct / max(1, seen),
                     "lr": epoch_lr, "epoch_s": round(time.time() - t_epoch, 2), "time_s": round(time.time() - t0, 2)}
            log.append(entry)
            if is_main:
                with open(os.path.join(cfg.out_dir, "train_log.jsonl"), "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
                if cfg.progress:
                    from tqdm.auto import tqdm

                    tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['loss']:.4f} "
                               f"train acc {entry['train_acc']:.3f} ({entry['time_s']:.1f}s)")
            checkpoint(epoch + 1, 0)
        return {"checkpoint": ckpt_path, "log": log, "time_s": time.time() - t0, "num_classes": num_classes,
                "rank": rank, "world_size": world, "model": model, "embeddings": emb}
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------- #
# loading a trained model, re-learning embeddings with a frozen model
# --------------------------------------------------------------------------- #
def load_trained(path: str, device: str = "cpu"):
    """(model in eval mode, ContextEmbeddings, TrainConfig) from a checkpoint."""
    ck = load_checkpoint(path, map_location=device)
    cfg = TrainConfig.from_dict(ck["config"])
    model = build_model(cfg.arch, ck["num_classes"], large_feature_map=cfg.large_feature_map,
                        **cfg.model_kwargs)
    model.load_state_dict(ck["model"])
    model.to(device).eval()
    emb = _make_embeddings(ck["num_classes"], model.feature_dim, cfg.cream_momentum, cfg.cam_threshold,
                           cfg.embedding_init, cfg.seed)
    emb.load_state_dict(ck["embeddings"])
    return model, emb.to(device), cfg


@torch.no_grad()
def learn_embeddings(model: CAMNet, dataset, momenta: Sequence[float], *, init: str = "random",
                     cam_threshold: float = 0.2, batch_size: int = 32, epochs: int = 1, seed: int = 0,
                     progress: bool = True, device: str = "cpu", num_workers: int = 0) -> Dict[float, Any]:
    """Re-learn context embeddings with a trained, frozen model (eval mode): one
    pass (``epochs``) over the training data with training augmentation, feeding
    the same features to one ``ContextEmbeddings`` per momentum. Used for the
    lambda sweep (Table 8), where each lambda needs its own tables."""
    model.eval()
    tables = {float(m): _make_embeddings(model.num_classes, model.feature_dim, float(m), cam_threshold, init,
                                         seed).to(device)
              for m in momenta}
    cfg = TrainConfig(batch_size=batch_size, seed=seed, num_workers=num_workers)
    for epoch in range(epochs):
        _seed_everything(_epoch_seed(seed + 1, epoch, 0))
        loader = _make_loader(dataset, cfg, epoch, 0, 1, seed_offset=1)
        for batch in _tqdm(loader, desc=f"embeddings pass {epoch + 1}/{epochs}", disable=not progress, leave=False):
            images, labels = batch[0].to(device), batch[1].to(device).long()
            _, feats = model(images, return_features=True)
            for t in tables.values():
                t.update(feats, labels, classifier_weight=model.classifier_weight)
    return tables
