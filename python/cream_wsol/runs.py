"""What every training loop of the harness shares, below ``train``, ``evaluate``,
``regress`` and ``reproduce`` (none of which this module imports):

* the configuration (:class:`TrainConfig`, :class:`ConfigMixin`) and the checkpoints
  (:func:`save_checkpoint`, written atomically; :func:`load_checkpoint`; :func:`load_trained`);
* the loop's building blocks: device and ``torch.distributed`` set-up, the seeds and RNG
  streams, the per-epoch loader (deterministic order, mid-epoch skip, step cap), the bar;
* the one rule deciding whether an existing checkpoint is continued or cleared
  (:func:`resume_point`), used by ``reproduce`` for the CREAM_Base run, the regressor and the
  other methods' runs alike.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from .models import build_model

__all__ = ["CHECKPOINT_NAME", "BEST_NAME", "ConfigMixin", "TrainConfig", "resolve_device", "dist_setup",
           "epoch_seed", "seed_everything", "rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint",
           "make_loader", "next_epoch", "SeededSamples", "progress_bar", "default_num_workers", "sample_seed", "loader_kwargs", "AMP_DTYPES", "autocast", "make_embeddings", "load_trained", "same_settings", "resume_point"]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"


class ConfigMixin:
    """replace / to_dict / from_dict for the harness's config dataclasses (TrainConfig,
    regress.RegressConfig); from_dict ignores keys the class does not have."""

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig(ConfigMixin):
    """Everything a training run depends on (stored in each checkpoint)."""

    dataset: str = "synthetic"  # a label for logs and reports
    preset: str = ""  # the preset name the config came from ("" when built by hand)
    data_root: str = ""
    metadata_root: str = ""
    mask_root: str = ""  # folder the val split's mask paths are relative to ("": data_root)
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
    num_workers: Optional[int] = None  # loader worker processes (None: default_num_workers(device))
    amp: Optional[str] = None  # mixed precision of the forward pass: None (fp32, the paper) | "bf16" | "fp16"
    out_dir: str = "runs/train"
    ckpt_every_steps: int = 0  # also checkpoint every N steps (0: off)
    ckpt_every_minutes: float = 10.0  # also checkpoint when this much time passed since the last (0: off)
    check_files: bool = True  # header-check every file of the splits before training
    val_split: Optional[str] = "val"  # validation split (None / "": no validation; skipped if absent)
    val_every_epochs: int = 1  # validate after every N-th epoch (0: never at epoch ends)
    val_every_steps: int = 0  # also validate every N steps (0: off)
    val_max_images: Optional[int] = None  # cap on the val images (None: all)
    val_curve_interval: float = 0.01  # tau step of the val MaxBoxAccV2 (evaluate uses 0.001)
    max_steps_per_epoch: Optional[int] = None  # cap for CI-size runs
    progress: bool = True
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    method: str = "cam"  # WSOL training method (methods.py, issues 9, 23): cam | has | adl | cutmix | spg | acol
    method_kwargs: Dict[str, float] = field(default_factory=dict)  # overrides of its defaults


# --------------------------------------------------------------------------- #
# the loop's building blocks
# --------------------------------------------------------------------------- #
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dist_setup(device: torch.device) -> tuple[int, int, bool]:
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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(rank) * 101 + 12345) % (2**31 - 1)


def seed_everything(s: int) -> None:
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


def rng_state() -> Dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
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


def default_num_workers(device: Any = "cpu") -> int:
    """The loader workers used when none are asked for: a function of the machine only
    (usable cores and the device type), never of a timing. CUDA: one worker per core but
    one, at most 8 (the GPU consumes several hundred images/s; one core decodes ~200).
    CPU: the model needs the cores, so a quarter of them, at least 1 and at most 4 (on
    2 cores: 1 worker, which moves the JPEG decoding off the training thread)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        cores = os.cpu_count() or 1
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        return max(1, min(8, cores - 1))
    return max(1, min(4, cores // 4))


def loader_kwargs(num_workers: Optional[int], device: Any = "cpu", persistent: bool = False) -> Dict[str, Any]:
    """DataLoader keywords for ``num_workers`` (None: :func:`default_num_workers`) on
    ``device``: pinned memory on CUDA (copy with ``non_blocking=True``), persistent
    workers when asked and there are workers, two batches prefetched per worker."""
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    n = default_num_workers(dev) if num_workers is None else int(num_workers)
    kw: Dict[str, Any] = {"num_workers": n, "pin_memory": dev.type == "cuda"}
    if n > 0:
        kw.update(persistent_workers=bool(persistent), prefetch_factor=2)
    return kw


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: Optional[str], device: Any):
    """The forward pass's mixed-precision context: ``torch.autocast`` in bf16 / fp16 on the
    device's type, or a no-op for ``amp=None`` (fp32)."""
    import contextlib

    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16'; got {amp!r}")
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    return torch.autocast(dev.type, dtype=AMP_DTYPES[amp])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` of a run seeded ``seed``:
    the same in the main process and in any worker, for any worker count and rank."""
    return (int(seed) * 1_000_003 + int(epoch) * 998_244_353 + int(index) * 10_007 + 54321) % (2**63 - 1)


class SeededSamples(torch.utils.data.Dataset):
    """``dataset`` read with keys ``(index, seed)``: item ``index`` is produced with the
    global torch RNG seeded to ``seed`` (forked, so the caller's streams are untouched).
    The training transforms draw their crop / flip from that RNG, so a sample's
    augmentation depends on (run seed, epoch, index) only, not on which process (main or
    worker) reads it or on what that process read before."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.dataset[int(index)]


class _EpochBatches(Sampler):
    """The batches of one rank in one epoch: DistributedSampler order, the per-epoch step
    cap, a mid-epoch ``skip``; each index paired with its :func:`sample_seed`. The epoch
    can be changed (:meth:`set_epoch`), so a loader with persistent workers is reused."""

    def __init__(self, n: int, cfg: "TrainConfig", rank: int, world: int, seed_offset: int = 0):
        self.n, self.cfg, self.rank, self.world = int(n), cfg, int(rank), int(world)
        self.seed = int(cfg.seed) + int(seed_offset)
        self.epoch, self.skip = 0, 0
        self.nb, self.drop_last = _batches_per_epoch(self.n, self.world, cfg.batch_size, cfg.max_steps_per_epoch)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    def __iter__(self) -> Iterator[List[Any]]:
        sampler = DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=False)
        sampler.set_epoch(self.epoch)
        for i, b in enumerate(BatchSampler(sampler, self.cfg.batch_size, drop_last=self.drop_last)):
            if i >= self.nb:
                return
            if i >= self.skip:
                yield [(j, sample_seed(self.seed, self.epoch, j)) for j in b]

    def __len__(self) -> int:
        return max(0, self.nb - self.skip)


def _batches_per_epoch(n: int, world: int, batch_size: int, cap: Optional[int]) -> tuple[int, bool]:
    per_rank = math.ceil(n / world)
    drop_last = per_rank >= batch_size
    nb = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    if cap is not None:
        nb = min(nb, int(cap))
    return nb, drop_last


def make_loader(dataset, cfg: TrainConfig, epoch: int, rank: int, world: int, skip: int = 0,
                seed_offset: int = 0, persistent: bool = False) -> DataLoader:
    """This rank's loader for ``epoch`` (from batch ``skip`` on). Order and augmentation
    depend on the seed, the epoch and the sample only (:class:`SeededSamples`), so any
    ``cfg.num_workers`` gives the same batches. ``persistent``: keep the workers between
    epochs; move the loader on with :func:`next_epoch` instead of building a new one."""
    bs = _EpochBatches(len(dataset), cfg, rank, world, seed_offset)
    bs.set_epoch(epoch, skip)
    gen = torch.Generator()  # the loader's own base seed draw (the caller's streams stay untouched)
    gen.manual_seed(epoch_seed(bs.seed, epoch, rank))
    return DataLoader(SeededSamples(dataset), batch_sampler=bs, generator=gen,
                      **loader_kwargs(cfg.num_workers, getattr(cfg, "device", "cpu"), persistent=persistent))


def next_epoch(loader: DataLoader, epoch: int, skip: int = 0) -> DataLoader:
    """The loader of :func:`make_loader` moved to ``epoch`` (its workers kept)."""
    loader.batch_sampler.set_epoch(epoch, skip)
    return loader


def progress_bar(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kw)


def make_embeddings(num_classes: int, dim: int, momentum: float, cam_threshold: float, init: str, seed: int):
    from cream_kernels import ContextEmbeddings

    # the same seed on every rank, so a random init is identical everywhere
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        return ContextEmbeddings(num_classes, dim, momentum=momentum, cam_threshold=cam_threshold, init=init)


def deterministic_training(fn):
    """Decorate a training entry point ``fn(cfg, ...)``: while it runs, torch uses only
    deterministic algorithms (``torch.use_deterministic_algorithms``), so a rerun of the same
    seed on the same machine gives the same weights bit for bit. On CUDA with
    ``warn_only=True``: global average pooling's backward has no deterministic CUDA kernel, so
    a CUDA run can still differ in the last bits between reruns. The process's previous
    setting is restored afterwards."""
    import functools

    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        before = (torch.are_deterministic_algorithms_enabled(),
                  torch.is_deterministic_algorithms_warn_only_enabled())
        on_cuda = str(getattr(cfg, "device", "cpu")).startswith("cuda") or (
            str(getattr(cfg, "device", "cpu")) == "auto" and torch.cuda.is_available())
        torch.use_deterministic_algorithms(True, warn_only=on_cuda)
        try:
            return fn(cfg, *args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])

    return wrapper


def load_trained(path: str, device: str = "cpu"):
    """(model in eval mode, ContextEmbeddings, TrainConfig) from a checkpoint. The model is the
    one the checkpoint's method trained (SPG / ACoL: their networks, rebuilt with the
    checkpoint's method parameters)."""
    ck = load_checkpoint(path, map_location=device)
    fmt = ck.get("format") if isinstance(ck, dict) else None
    if fmt != "cream_wsol.checkpoint/1":
        what = ("a box-regressor checkpoint (cream-wsol regress)" if fmt == "cream_wsol.regressor/1"
                else f"of format {fmt!r}" if fmt else "a plain state dict or another program's file")
        raise ValueError(f"{path} is {what}, not a training checkpoint (format 'cream_wsol.checkpoint/1'); "
                         "give the checkpoint.pt written by cream-wsol train")
    cfg = TrainConfig.from_dict(ck["config"])
    from .spg_acol import build_method_model  # SPG / ACoL: their networks, with the checkpoint's parameters

    model = build_method_model(cfg.arch, ck["num_classes"], cfg.method, cfg.method_kwargs,
                               large_feature_map=cfg.large_feature_map, **cfg.model_kwargs)
    model.load_state_dict(ck["model"])
    model.to(device).eval()
    emb = make_embeddings(ck["num_classes"], model.feature_dim, cfg.cream_momentum, cfg.cam_threshold,
                           cfg.embedding_init, cfg.seed)
    emb.load_state_dict(ck["embeddings"])
    return model, emb.to(device), cfg


# --------------------------------------------------------------------------- #
# continue or start over: the one rule
# --------------------------------------------------------------------------- #
# settings that may change between the run that wrote a checkpoint and the one continuing it
# without changing a number (the output folder may move with a copied run folder)
FREE_SETTINGS = ("progress", "out_dir")


def same_settings(saved: Mapping[str, Any], now: Mapping[str, Any], ignore: Iterable[str] = FREE_SETTINGS) -> bool:
    """Whether a config dict ``now`` asks for the run ``saved`` describes: every key of ``now``
    but those in ``ignore`` equal (a key an older ``saved`` lacks counts as None)."""
    skip = set(ignore)
    return all(saved.get(k) == v for k, v in now.items() if k not in skip)


def resume_point(path: str, config: Mapping[str, Any], *, restart: bool = False,
                 logs: Iterable[str] = ()) -> Optional[str]:
    """``path`` when that checkpoint exists and was written with ``config`` (:func:`same_settings`),
    so the run continues there (or, finished, does nothing); else None, after removing the
    stale checkpoint and the ``logs`` files beside it, so the run starts over. ``restart``:
    always start over."""
    if os.path.isfile(path) and not restart:
        if same_settings(load_checkpoint(path)["config"], config):
            return path
    for f in [path] + [os.path.join(os.path.dirname(path), name) for name in logs]:
        if os.path.isfile(f):
            os.remove(f)
    return None
