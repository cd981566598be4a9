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
the seed, the epoch and the sample index: each sample's crop / flip is drawn from its
own seed, :func:`cream_wsol.runs.sample_seed`, so any ``num_workers`` gives the same
numbers and a resume in the middle of an epoch is exact with workers too).

Mixed precision: ``amp="bf16"`` / ``"fp16"`` runs the forward pass and the loss under
``torch.autocast`` (fp16 with a loss scaler); weights, optimizer and the context
embeddings stay fp32, and the embeddings are updated from the bf16 / fp16 features the
forward produced (docs/harness.md, "Mixed precision"). Off by default: the paper trains in fp32.

Input: ``num_workers`` loader processes (default :func:`cream_wsol.runs.default_num_workers`,
from the cores and the device type); on CUDA pinned memory, ``non_blocking`` copies and
workers that persist between epochs.

Long runs (docs/harness.md, "Training" and "A real-data session"):

* SIGINT (Ctrl-C) or SIGTERM finishes the current step, writes the exact-resume
  checkpoint and raises :class:`TrainingInterrupted` after one line saying where
  it was saved; a second signal stops at once (the last checkpoint stays).
* A checkpoint is also written every ``ckpt_every_minutes`` (default 10) and every
  ``ckpt_every_steps`` steps, so a crash loses minutes, not an epoch.
* Before training, every image (and mask) file of the splits is checked
  (:mod:`cream_wsol.preflight`, ``check_files=False`` skips it), and every bad
  file is listed at once.
* A resume prints ``resuming from <path> at epoch E step S`` and refuses settings
  that differ from the checkpoint's (:class:`ResumeMismatchError`).
* Validation on ``val_split`` (top-1 and the CAM's MaxBoxAccV2, or PxAP on a split
  with masks only) every ``val_every_epochs`` epochs and/or ``val_every_steps``
  steps, logged to ``train_log.jsonl`` and shown on the progress bar; the best
  checkpoint is kept as ``best.pt`` beside ``checkpoint.pt``. Validation saves and
  restores every RNG stream and leaves the model's state untouched, so it does not
  change the trained weights.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .models import CAMNet, build_model
from .runs import (BEST_NAME, CHECKPOINT_NAME, ConfigMixin, TrainConfig,  # noqa: F401 (public here too)
                   autocast, deterministic_training, dist_setup, epoch_seed, load_checkpoint, load_trained,
                   make_embeddings, make_loader, next_epoch, progress_bar, resolve_device, rng_state,
                   save_checkpoint, seed_everything, set_rng_state)

# the loop's helpers under their former private names (cream_wsol.runs has them now)
_resolve_device, _dist_setup, _epoch_seed, _seed_everything = resolve_device, dist_setup, epoch_seed, seed_everything
_rng_state, _set_rng_state, _make_loader, _tqdm, _make_embeddings = (rng_state, set_rng_state, make_loader,
                                                                     progress_bar, make_embeddings)

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
    "BEST_NAME",
    "RESUME_MUST_MATCH",
    "ResumeMismatchError",
    "TrainingInterrupted",
]

# Settings a resume must share with the checkpoint (everything that changes what the
# remaining steps compute). ``epochs`` may grow; progress, device, workers, checkpoint
# and validation settings may change freely.
RESUME_MUST_MATCH = (
    "preset", "dataset", "data_root", "metadata_root", "train_split", "arch", "pretrained",
    "large_feature_map", "image_size", "crop_size", "batch_size", "lr", "classifier_lr_mult",
    "sgd_momentum", "weight_decay", "lr_step", "lr_gamma", "cream_momentum", "cam_threshold",
    "embedding_init", "seed", "max_steps_per_epoch", "model_kwargs", "method", "method_kwargs", "amp",
)


class ResumeMismatchError(ValueError):
    """The command line asks for settings that differ from the checkpoint's."""


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped training after an exact-resume checkpoint was written.

    ``signum``: the signal; ``checkpoint``: the path written; ``epoch`` / ``step``:
    where the run stopped (completed epochs, steps done in the next one)."""

    def __init__(self, message: str, signum: int, checkpoint: str, epoch: int, step: int):
        super().__init__(message)
        self.signum, self.checkpoint, self.epoch, self.step = signum, checkpoint, epoch, step


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
# The small CNN on the paper's data sets (``reproduce --arch small``): the data set's schedule and
# input (epochs, lr step, 224 crop) with the synthetic preset's optimiser settings, from scratch.
for _ds in _PAPER_SCHEDULES:
    PRESETS[f"{_ds}-small"] = dict(PRESETS[f"{_ds}-vgg16"], arch="small", pretrained=None,
                                   **{k: PRESETS["synthetic"][k] for k in ("batch_size", "lr", "classifier_lr_mult",
                                                                          "weight_decay")})


# presets that fine-tune ImageNet weights in the paper; without --pretrained they would
# silently start from random weights, so the CLI asks for --pretrained or --no-pretrained
NEEDS_PRETRAINED_ARCHS = ("vgg16", "resnet50", "inceptionv3")


def preset(name: str, **overrides) -> TrainConfig:
    """The preset's config with ``overrides`` (None values ignored). An ``image_size``
    given without ``crop_size`` also sets the train crop to it (a preset's 224 crop
    with a 112 eval frame would train and evaluate at different scales)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    over = {k: v for k, v in overrides.items() if v is not None}
    if "image_size" in over and "crop_size" not in over and PRESETS[name].get("crop_size") is not None:
        over["crop_size"] = over["image_size"]
    return TrainConfig(**{**PRESETS[name], "preset": name, **over})


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #

def _make_dataset(cfg: TrainConfig, split: str, train: bool):
    from .data import WSOLDataset

    kw = {"image_size": cfg.image_size}
    if cfg.crop_size is not None:
        kw["crop_size"] = cfg.crop_size
    return WSOLDataset(cfg.data_root, cfg.metadata_root, split, train=train, **kw)



def _unwrap(model: nn.Module) -> CAMNet:
    return model.module if hasattr(model, "module") else model



# --------------------------------------------------------------------------- #
# long-run helpers: messages, signals, resume checks, validation, the log file
# --------------------------------------------------------------------------- #
_clock = time.monotonic  # the checkpoint timer (a module attribute so tests can replace it)


def _say(msg: str) -> None:
    """One line on stdout that does not break a running tqdm bar."""
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


class _StopSignals:
    """SIGINT / SIGTERM set ``signum`` (the loop checkpoints at the end of the step);
    a second one raises KeyboardInterrupt at once. Installed only in the main thread."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s)

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a new checkpoint")
        self.signum = int(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                try:
                    self._old[s] = signal.signal(s, self._handler)
                except (ValueError, OSError):  # pragma: no cover - e.g. an embedded interpreter
                    pass
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False


def _any_rank(flags: List[bool], world: int, device: torch.device) -> List[bool]:
    """Element-wise OR of boolean flags over the ranks (every rank must agree on
    whether to checkpoint / stop, since checkpointing is a collective)."""
    if world <= 1:
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _resume_differences(ck_cfg: Dict[str, Any], cfg: "TrainConfig") -> List[str]:
    now = cfg.to_dict()
    diffs = []
    for k in RESUME_MUST_MATCH:
        if k not in ck_cfg:  # a checkpoint older than the setting
            continue
        a, b = ck_cfg[k], now.get(k)
        if k in ("data_root", "metadata_root") and a and b:
            a, b = os.path.abspath(a), os.path.abspath(b)
        if a != b:
            diffs.append(f"  {k.replace('_', '-')}: checkpoint {a!r}, now {b!r}")
    return diffs


def _check_resume(ck: Dict[str, Any], cfg: "TrainConfig", path: str) -> None:
    diffs = _resume_differences(ck.get("config", {}), cfg)
    if diffs:
        raise ResumeMismatchError(
            f"refusing to resume from {path}: the run asks for settings that differ from the checkpoint's\n"
            + "\n".join(diffs)
            + f"\nEither start over in {cfg.out_dir} with --no-resume (its checkpoint is overwritten), "
              "or keep that run and train into a new folder with --out NEW_DIR (library: resume=None or "
              "another out_dir).")


def _write_log(out_dir: str, log: List[Dict[str, Any]]) -> None:
    """train_log.jsonl from the log the checkpoint holds (rewritten atomically, so a
    run that is resumed never has lines for steps it did again)."""
    path = os.path.join(out_dir, "train_log.jsonl")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        for e in log:
            fh.write(json.dumps(e) + "\n")
    os.replace(tmp, path)


class _Validator:
    """Top-1 and the CAM's MaxBoxAccV2 (PxAP when the split has masks only) on the val
    split, computed on rank 0 with every RNG stream saved and restored."""

    def __init__(self, cfg: "TrainConfig", device: torch.device):
        self.cfg, self.device, self.dataset, self.note = cfg, device, None, ""
        split = cfg.val_split
        if not split or not (cfg.val_every_epochs or cfg.val_every_steps):
            self.note = "validation off"
            return
        if not os.path.isdir(os.path.join(cfg.metadata_root, split)):
            self.note = (f"validation off: no {split!r} split in --metadata-root {cfg.metadata_root}")
            return
        from .data import WSOLDataset

        self.dataset = WSOLDataset(cfg.data_root, cfg.metadata_root, split, train=False, image_size=cfg.image_size,
                                   mask_root=cfg.mask_root or None)
        if not (self.dataset.has_boxes or self.dataset.has_masks):
            self.dataset, self.note = None, f"validation off: split {split!r} has neither boxes nor masks"
            return
        self.metric = "MaxBoxAccV2" if self.dataset.has_boxes else "PxAP"
        n = len(self.dataset) if cfg.val_max_images is None else min(len(self.dataset), cfg.val_max_images)
        self.note = f"validation on {split!r} ({n} images): top-1 and the CAM's {self.metric}"

    @property
    def enabled(self) -> bool:
        return self.dataset is not None

    def run(self, model: CAMNet, should_stop: Callable[[], bool]) -> Dict[str, float]:
        from .evaluate import MapSpec, evaluate

        rng = _rng_state()
        was_training = model.training
        try:
            res = evaluate(model, self.dataset, {"CAM": MapSpec("cam")}, batch_size=self.cfg.batch_size,
                           cam_threshold=self.cfg.cam_threshold, cam_curve_interval=self.cfg.val_curve_interval,
                           device=str(self.device), progress=self.cfg.progress, max_images=self.cfg.val_max_images,
                           desc=f"validate {self.cfg.val_split}", should_stop=should_stop,
                           num_workers=self.cfg.num_workers, amp=self.cfg.amp)
        finally:
            model.train(was_training)
            _set_rng_state(rng)
        m = res["metrics"]["CAM"]
        out = {"val_top1": res["classification"]["top1"]}
        for k in ("MaxBoxAccV2", "PxAP"):
            if k in m:
                out[f"val_{k}"] = m[k]
        return out


# --------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------- #
def _check_config(cfg: TrainConfig) -> None:
    """ValueError naming the setting for values the loop cannot use."""
    for name in ("epochs", "batch_size", "image_size"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r} ({type(v).__name__})")
    for name in ("ckpt_every_steps", "val_every_epochs", "val_every_steps"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: off), got {v!r} ({type(v).__name__})")
    v = cfg.ckpt_every_minutes
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"ckpt_every_minutes must be a finite number >= 0 (0: off), got {v!r}")
    if cfg.val_max_images is not None and (not isinstance(cfg.val_max_images, int) or cfg.val_max_images < 1):
        raise ValueError(f"val_max_images must be None or an integer >= 1, got {cfg.val_max_images!r}")
    if cfg.amp not in (None, "bf16", "fp16"):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16'; got {cfg.amp!r}")
    if not (isinstance(cfg.val_curve_interval, float) and 0 < cfg.val_curve_interval < 1):
        raise ValueError(f"val_curve_interval must be a float in (0, 1), got {cfg.val_curve_interval!r}")


def _absolute(cfg: TrainConfig) -> TrainConfig:
    """Data and output paths made absolute (a checkpoint then works from any cwd)."""
    ab = (lambda p: os.path.abspath(os.path.expanduser(p)) if p else p)
    return cfg.replace(data_root=ab(cfg.data_root), metadata_root=ab(cfg.metadata_root),
                       mask_root=ab(cfg.mask_root), out_dir=ab(cfg.out_dir))


def _preflight(datasets, cfg: TrainConfig, rank: int, world: int) -> None:
    """Rank 0 header-checks every file; every rank raises the same error."""
    from .preflight import BadFilesError, check_datasets

    report = None
    if rank == 0:
        report = check_datasets(datasets, progress=cfg.progress, report_dir=cfg.out_dir)
    if world > 1:
        obj = [report]
        dist.broadcast_object_list(obj, src=0)
        report = obj[0]
    if report["bad"]:
        raise BadFilesError(report["message"], report["bad"])
    if rank == 0:
        _say(report["message"])


def _input_sizes(model: CAMNet, dataset, cfg: TrainConfig, device: torch.device) -> str:
    with torch.no_grad():
        was = model.training
        model.eval()
        _, f = model(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device), return_features=True)
        model.train(was)
    return (f"input: train resize {dataset.resize_size}x{dataset.resize_size} -> random crop "
            f"{dataset.crop_size}x{dataset.crop_size} + flip; eval/val resize {cfg.image_size}x{cfg.image_size}; "
            f"CAM {f.shape[-2]}x{f.shape[-1]} x {f.shape[1]} channels at the eval size")


@deterministic_training
def train(cfg: TrainConfig, resume: Optional[str] = "auto",
          on_step: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Train (or continue training) a CAM model and its context embeddings.

    ``resume``: a checkpoint path, ``"auto"`` (``<out_dir>/checkpoint.pt`` if it
    exists) or None (start fresh). A checkpoint whose settings differ from ``cfg``
    (:data:`RESUME_MUST_MATCH`) raises :class:`ResumeMismatchError`. SIGINT /
    SIGTERM raise :class:`TrainingInterrupted` after writing a checkpoint; bad data
    files raise :class:`cream_wsol.preflight.BadFilesError` before any step.
    ``on_step`` is called after every step with ``{epoch, step, global_step, loss}``.
    Returns a summary dict with the checkpoint path, the log (one entry per epoch,
    plus one per step-level validation), the best validation result, the wall time,
    and this rank's trained ``model`` and ``embeddings`` modules."""
    _check_config(cfg)
    cfg = _absolute(cfg)
    device = _resolve_device(cfg.device)
    rank, world, own_group = _dist_setup(device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        torch.cuda.set_device(device)
    is_main = rank == 0
    say = _say if is_main else (lambda msg: None)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
    best_path = os.path.join(cfg.out_dir, BEST_NAME)
    try:
        dataset = _make_dataset(cfg, cfg.train_split, train=True)
        num_classes = int(dataset.num_classes)
        validator = _Validator(cfg, device)

        if resume == "auto":
            resume = ckpt_path if os.path.isfile(ckpt_path) else None
        ck = None
        if resume:
            ck = load_checkpoint(resume, map_location=device)
            _check_resume(ck, cfg, resume)  # before building anything: no state-dict key dump
        if cfg.check_files:
            _preflight([dataset] + ([validator.dataset] if validator.enabled else []), cfg, rank, world)
        # same init on every rank (DDP would broadcast anyway); a resumed run takes its
        # weights from the checkpoint, not from the ImageNet file
        _seed_everything(cfg.seed)
        from .methods import make_method  # issue 9 hook: the WSOL method (HaS / ADL / CutMix / SPG / ACoL)
        from .spg_acol import build_method_model

        method = make_method(cfg.method, **cfg.method_kwargs)
        model = build_method_model(cfg.arch, num_classes, cfg.method, cfg.method_kwargs,
                                   large_feature_map=cfg.large_feature_map,
                                   pretrained=None if resume else cfg.pretrained, **cfg.model_kwargs).to(device)
        method.wrap(model)
        emb = _make_embeddings(num_classes, model.feature_dim, cfg.cream_momentum, cfg.cam_threshold,
                               cfg.embedding_init, cfg.seed).to(device)
        # CUDA: channels_last activations (the CREAM kernels read them in place); fp16: a loss scaler
        channels_last = device.type == "cuda"
        if channels_last:
            model.to(memory_format=torch.channels_last)
        scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        optimizer = torch.optim.SGD(model.param_groups(cfg.lr, cfg.classifier_lr_mult, cfg.weight_decay),
                                    lr=cfg.lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                                    nesterov=cfg.sgd_momentum > 0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.lr_step), gamma=cfg.lr_gamma)

        start_epoch, start_step, global_step, log = 0, 0, 0, []
        best: Optional[Dict[str, Any]] = None
        rng_resume = None
        resumed_stats = None
        resumed = ck is not None
        if resumed:
            model.load_state_dict(ck["model"])
            emb.load_state_dict(ck["embeddings"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            start_epoch, start_step = int(ck["epoch"]), int(ck["step_in_epoch"])
            global_step = int(ck["global_step"])
            log = list(ck.get("log", []))
            best = ck.get("best")
            resumed_stats = ck.get("epoch_stats") if start_step else None
            states = ck.get("rng") or []
            if len(states) == world:
                rng_resume = states[rank]
            elif start_step:  # an epoch boundary reseeds anyway; mid-epoch needs every rank's streams
                raise RuntimeError(f"checkpoint was written mid-epoch by {len(states)} ranks; "
                                   f"resume it with the same number of ranks (now {world})")
            left = "nothing left to train" if start_epoch >= cfg.epochs else f"{start_epoch} of {cfg.epochs} epochs done"
            say(f"resuming from {os.path.abspath(resume)} at epoch {start_epoch + 1} step {start_step} "
                f"(global step {global_step}; {left})")
            del ck
        init = ("weights from the checkpoint" if resumed else
                f"ImageNet weights {cfg.pretrained}" if cfg.pretrained else "random init")
        say(f"training {cfg.arch} ({init}) on "
            f"{len(dataset)} images of {num_classes} classes, {cfg.epochs} epochs, batch {cfg.batch_size} x {world} "
            f"rank(s), lr {cfg.lr}; out {cfg.out_dir}")
        say(_input_sizes(model, dataset, cfg, device))
        say(validator.note)

        ddp_model: nn.Module = model
        if world > 1:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        last_ckpt = [_clock()]

        def checkpoint(epoch: int, step_in_epoch: int, also_best: bool = False) -> None:
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
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": states, "epoch": epoch, "step_in_epoch": step_in_epoch,
                    "global_step": global_step, "world_size": world, "log": log, "best": best,
                    "epoch_stats": epoch_stats if step_in_epoch else None,
                }, ckpt_path)
                if also_best:
                    _copy_atomic(ckpt_path, best_path)
            if world > 1:
                dist.barrier()
            last_ckpt[0] = _clock()

        stop = _StopSignals()

        def validate(epoch_no: int, step_no: int) -> Dict[str, Any]:
            """Rank 0 validates; every rank gets the result and whether it is the best so far."""
            nonlocal best
            val: Dict[str, Any] = {}
            if is_main:
                from .evaluate import EvaluationStopped

                try:
                    val = validator.run(model, lambda: stop.signum is not None)
                except EvaluationStopped:
                    val = {}
            if world > 1:
                obj = [val]
                dist.broadcast_object_list(obj, src=0)
                val = obj[0]
            key = f"val_{getattr(validator, 'metric', '')}"
            if key in val and (best is None or val[key] > best["value"]):
                best = {"metric": key, "value": val[key], "epoch": epoch_no, "step": step_no,
                        "global_step": global_step}
                val["best"] = True
            return val

        def interrupted(epoch: int, step_in_epoch: int) -> TrainingInterrupted:
            signum = stop.signum or int(signal.SIGTERM)
            name = signal.Signals(signum).name
            msg = (f"{name}: stopped at epoch {epoch + 1} step {step_in_epoch} (global step {global_step}); "
                   f"checkpoint saved to {ckpt_path}; run the same command again to resume")
            say(msg)
            return TrainingInterrupted(msg, signum, ckpt_path, epoch, step_in_epoch)

        # running sums of the current epoch (saved in mid-epoch checkpoints, so a resumed
        # epoch logs the same loss / accuracy as an uninterrupted one)
        epoch_stats: Dict[str, Any] = {}
        t0 = time.time()
        # the log's time_s counts the wall time of the earlier processes of a resumed run too
        done_s = next((float(e["time_s"]) for e in reversed(log) if "step" not in e and "time_s" in e), 0.0)
        done_s += float((resumed_stats or {}).get("epoch_s", 0.0))
        val_post: Dict[str, str] = {}
        # CUDA: the workers persist between epochs (the loader moves on with next_epoch)
        loader, persistent = None, device.type == "cuda"
        with stop:
            for epoch in range(start_epoch, cfg.epochs):
                skip = start_step if epoch == start_epoch else 0
                if rng_resume is not None and epoch == start_epoch and skip > 0:
                    _set_rng_state(rng_resume)  # mid-epoch: continue the saved streams
                else:
                    _seed_everything(_epoch_seed(cfg.seed, epoch, rank))
                if loader is None or not persistent:
                    loader = _make_loader(dataset, cfg, epoch, rank, world, skip=skip, persistent=persistent)
                else:
                    next_epoch(loader, epoch, skip)
                total = len(loader) + skip  # steps of this epoch
                ddp_model.train()
                t_epoch = time.time()
                st = resumed_stats if (epoch == start_epoch and skip and resumed_stats) else {}
                loss_sum = torch.tensor(float(st.get("loss_sum", 0.0)), dtype=torch.float64)
                correct, seen = int(st.get("correct", 0)), int(st.get("seen", 0))
                t_epoch -= float(st.get("epoch_s", 0.0))
                bar = _tqdm(loader, total=len(loader), desc=f"train {epoch + 1}/{cfg.epochs}",
                            disable=not (cfg.progress and is_main), leave=False)
                step_in_epoch = skip
                stop_now = False
                for batch in bar:
                    images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True).long()
                    if channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    images, loss_fn, emb_labels = method.prepare(images, labels)  # issue 9 hook (cam: unchanged)
                    emb_cam = None
                    with autocast(cfg.amp, device):  # no-op without --amp
                        if method.changes_model:  # SPG / ACoL: side outputs and their own loss (issue 23)
                            out = ddp_model(images, labels=labels, aux=True)
                            logits, feats = out["logits"], out["features"]
                            loss = model.loss(out, labels)
                            emb_cam = out.get("emb_cam")  # ACoL: the fused map masks the embedding update
                        else:
                            logits, feats = ddp_model(images, return_features=True)
                            loss = loss_fn(logits)
                    optimizer.zero_grad(set_to_none=True)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    # Eqs. 3-4 with the weight this forward used (before the step), features detached
                    # (under --amp the bf16 / fp16 features as they are; the tables stay fp32)
                    with torch.no_grad():
                        if emb_cam is not None:
                            emb.update(feats.detach(), emb_labels, cam=emb_cam.detach().float())
                        else:
                            emb.update(feats.detach(), emb_labels, classifier_weight=model.classifier_weight.detach())
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    step_in_epoch += 1
                    global_step += 1
                    loss_sum += loss.detach().double().cpu()
                    correct += int((logits.argmax(1) == labels).sum())
                    seen += int(labels.numel())
                    epoch_stats = {"loss_sum": float(loss_sum), "correct": correct, "seen": seen,
                                   "epoch_s": time.time() - t_epoch}
                    if on_step is not None:
                        on_step({"epoch": epoch, "step": step_in_epoch, "global_step": global_step,
                                 "loss": loss.item()})
                    # after the step: validation, checkpoints, signals (every rank decides alike)
                    mid = step_in_epoch < total
                    time_due = (is_main and cfg.ckpt_every_minutes > 0
                                and _clock() - last_ckpt[0] >= 60.0 * cfg.ckpt_every_minutes)
                    stop_now, time_due = _any_rank([stop.signum is not None, time_due], world, device)
                    saved = False
                    if (mid and validator.enabled and cfg.val_every_steps and not stop_now
                            and global_step % cfg.val_every_steps == 0):
                        val = validate(epoch + 1, step_in_epoch)
                        if val:
                            rec = {"epoch": epoch + 1, "step": step_in_epoch, "global_step": global_step,
                                   **{k: v for k, v in val.items() if k != "best"}}
                            log.append(rec)
                            val_post = _val_postfix(val)
                            if is_main:
                                _write_log(cfg.out_dir, log)
                            if val.get("best"):
                                checkpoint(epoch, step_in_epoch, also_best=True)
                                saved = True
                    if is_main and cfg.progress:
                        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / max(1, seen):.3f}",
                                        lr=f"{optimizer.param_groups[0]['lr']:.2g}", **val_post)
                    steps_due = bool(cfg.ckpt_every_steps) and global_step % cfg.ckpt_every_steps == 0
                    if mid and not saved and (stop_now or time_due or steps_due):
                        checkpoint(epoch, step_in_epoch)
                    if mid and stop_now:
                        bar.close()
                        raise interrupted(epoch, step_in_epoch)
                bar.close()
                epoch_lr = optimizer.param_groups[0]["lr"]  # the backbone lr this epoch ran with
                scheduler.step()
                nsteps = max(1, step_in_epoch - (0 if st else skip))
                entry = {"epoch": epoch + 1, "loss": float(loss_sum) / nsteps, "train_acc": correct / max(1, seen),
                         "lr": epoch_lr, "epoch_s": round(time.time() - t_epoch, 2),
                         "time_s": round(time.time() - t0 + done_s, 2)}
                stop_now = _any_rank([stop.signum is not None], world, device)[0]
                is_best = False
                if (validator.enabled and cfg.val_every_epochs and (epoch + 1) % cfg.val_every_epochs == 0
                        and not stop_now):
                    t_val = time.time()
                    val = validate(epoch + 1, step_in_epoch)
                    is_best = bool(val.pop("best", False))
                    entry.update(val)
                    val_post = _val_postfix(val)
                    entry["val_s"] = round(time.time() - t_val, 2)
                log.append(entry)
                if is_main:
                    _write_log(cfg.out_dir, log)
                    # one line per epoch, with or without progress bars
                    vtxt = "".join(f", {k[4:]} {entry[k]:.1f}" for k in ("val_top1", "val_MaxBoxAccV2", "val_PxAP")
                                   if k in entry)
                    _say(f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['loss']:.4f} "
                         f"train acc {entry['train_acc']:.3f}{vtxt and ' | val' + vtxt[1:]}"
                         f"{' (best)' if is_best else ''} ({entry['time_s']:.1f}s)")
                checkpoint(epoch + 1, 0, also_best=is_best)
                stop_now = stop_now or _any_rank([stop.signum is not None], world, device)[0]
                if stop_now and epoch + 1 < cfg.epochs:
                    raise interrupted(epoch + 1, 0)
        return {"checkpoint": ckpt_path, "best_checkpoint": best_path if best else None, "best": best,
                "log": log, "time_s": time.time() - t0, "num_classes": num_classes,
                "rank": rank, "world_size": world, "model": model, "embeddings": emb}
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _val_postfix(val: Dict[str, Any]) -> Dict[str, str]:
    out = {}
    if "val_top1" in val:
        out["val_top1"] = f"{val['val_top1']:.1f}"
    for k in ("val_MaxBoxAccV2", "val_PxAP"):
        if k in val:
            out[k] = f"{val[k]:.1f}"
    return out


def _copy_atomic(src: str, dst: str) -> None:
    import shutil

    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp.{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------- #
# loading a trained model, re-learning embeddings with a frozen model
# --------------------------------------------------------------------------- #
@torch.no_grad()
def learn_embeddings(model: CAMNet, dataset, momenta: Sequence[float], *, init: str = "random",
                     cam_threshold: float = 0.2, batch_size: int = 32, epochs: int = 1, seed: int = 0,
                     progress: bool = True, device: str = "cpu", num_workers: Optional[int] = 0) -> Dict[float, Any]:
    """Re-learn context embeddings with a trained, frozen model (eval mode): one
    pass (``epochs``) over the training data with training augmentation, feeding
    the same features to one ``ContextEmbeddings`` per momentum. Used for the
    lambda sweep (Table 8), where each lambda needs its own tables."""
    model.eval()
    tables = {float(m): _make_embeddings(model.num_classes, model.feature_dim, float(m), cam_threshold, init,
                                         seed).to(device)
              for m in momenta}
    cfg = TrainConfig(batch_size=batch_size, seed=seed, num_workers=num_workers, device=device)
    for epoch in range(epochs):
        _seed_everything(_epoch_seed(seed + 1, epoch, 0))
        loader = _make_loader(dataset, cfg, epoch, 0, 1, seed_offset=1)
        for batch in _tqdm(loader, desc=f"embeddings pass {epoch + 1}/{epochs}", disable=not progress, leave=False):
            images, labels = batch[0].to(device), batch[1].to(device).long()
            _, feats = model(images, return_features=True)
            if getattr(model, "method", "") == "acol":  # its map is not W . f (issue 23)
                cam = model.cams(feats, labels)
                for t in tables.values():
                    t.update(feats, labels, cam=cam)
                continue
            for t in tables.values():
                t.update(feats, labels, classifier_weight=model.classifier_weight)
    return tables
