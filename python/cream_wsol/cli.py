"""``cream-wsol``: train, evaluate and reproduce CREAM from the command line.

    cream-wsol reproduce --out runs/reproduce            # the README's main command
    cream-wsol reproduce --quick --out /tmp/smoke        # CI-size run, seconds
    cream-wsol reproduce --data-root CUB_200_2011/images --metadata-root metadata/CUB --dataset cub \\
        --arch vgg16 --pretrained vgg16-397923af.pth --out runs/cub-vgg16   # the same on your data
    cream-wsol train --preset synthetic --out runs/synth
    cream-wsol train --preset cub-resnet50 --data-root CUB_200_2011/images \\
        --metadata-root metadata/CUB --pretrained resnet50-19c8e357.pth --out runs/cub-r50
    cream-wsol evaluate runs/synth/checkpoint.pt --split test --maps cam,cream,free
    cream-wsol evaluate runs/cub-r50/best.pt --select-on val --save-maps runs/cub-r50/maps
    cream-wsol train --preset synthetic --method adl --out runs/synth-adl
    cream-wsol pseudo-boxes runs/synth/checkpoint.pt --split train --out runs/pseudo --ddt
    torchrun --standalone --nproc_per_node 8 -m cream_wsol evaluate runs/cub-r50/best.pt --split test
    cream-wsol regress --pseudo-boxes runs/pseudo --preset synthetic --out runs/reg \\
        --evaluate runs/synth/checkpoint.pt
    torchrun --nproc_per_node 2 -m cream_wsol train --preset synthetic --out runs/ddp

(``python -m cream_wsol ...`` is the same program.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import List, Optional

from . import _argcheck
from ._argcheck import ArgError, int_at_least, number_in, sigma_value

__all__ = ["main", "build_parser"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .train import PRESETS

    ap = argparse.ArgumentParser(prog="cream-wsol", description="CREAM (CVPR 2022) WSOL harness on cream_kernels")
    sub = ap.add_subparsers(dest="command", required=True)

    # ---- train --------------------------------------------------------------------
    t = sub.add_parser("train", help="train a CAM model and its context embeddings")
    t.add_argument("--preset", default="synthetic", choices=sorted(PRESETS),
                   help="schedule preset (paper: <dataset>-<arch>; default: synthetic)")
    t.add_argument("--data-root", help="folder the image ids are relative to")
    t.add_argument("--metadata-root", help="wsolevaluation metadata folder (holds train/, val/, test/)")
    t.add_argument("--synthetic-root", help="with the synthetic preset and no --data-root: generate the data "
                   "here (default: <out>/data)")
    t.add_argument("--arch", help="small | vgg16 | resnet50 | inceptionv3 | efficientnet_lite0")
    t.add_argument("--pretrained", help="ImageNet state dict (torchvision format), or 'package' for "
                   "efficientnet_lite0's pip weights; required by the cub-/ilsvrc-/openimages- presets of "
                   "vgg16, resnet50 and inceptionv3 unless --no-pretrained is given")
    t.add_argument("--no-pretrained", action="store_true", help="random init (even if the preset has weights)")
    t.add_argument("--large-feature-map", action="store_true", help="28x28 CAM at 224 instead of 14x14")
    t.add_argument("--epochs", type=int_at_least(1))
    t.add_argument("--lr", type=number_in(0, lo_open=True))
    t.add_argument("--lr-step", type=int_at_least(1))
    t.add_argument("--batch-size", type=int_at_least(1))
    t.add_argument("--image-size", type=int_at_least(1), help="eval frame S (S x S); alone it also sets the train crop")
    t.add_argument("--crop-size", type=int_at_least(1), help="train crop (default: the image size)")
    t.add_argument("--lambda", dest="cream_momentum", type=number_in(0, 1),
                   help="context embedding momentum (0.8)")
    t.add_argument("--embedding-init", choices=["zeros", "random"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--num-workers", type=int_at_least(0),
                   help="loader worker processes (default: from the machine; CUDA: cores - 1, at most 8; "
                        "CPU: cores / 4, 1..4). The numbers do not depend on it")
    t.add_argument("--amp", choices=["bf16", "fp16"],
                   help="mixed precision for the forward pass (default: off, fp32 as the paper; "
                        "docs/harness.md 'Mixed precision')")
    t.add_argument("--ckpt-every-minutes", type=number_in(0),
                   help="also checkpoint when this many minutes passed since the last checkpoint "
                        "(default 10; 0: off). SIGINT/SIGTERM always checkpoint before stopping")
    t.add_argument("--ckpt-every-steps", type=int_at_least(0), help="also checkpoint every N steps (default: off)")
    t.add_argument("--no-file-check", action="store_true",
                   help="skip the pre-flight header check of every image/mask file of the splits")
    t.add_argument("--mask-root", help="folder the val split's mask paths are relative to (default: --data-root)")
    t.add_argument("--val-split", help="split validated during training (default: val; skipped if absent)")
    t.add_argument("--val-every-epochs", type=int_at_least(0), help="validate after every N-th epoch (default 1; 0: never)")
    t.add_argument("--val-every-steps", type=int_at_least(0), help="also validate every N steps (default: off)")
    t.add_argument("--val-max-images", type=int_at_least(1), help="validate on the first N images of the split only")
    t.add_argument("--no-val", action="store_true", help="no validation during training")
    t.add_argument("--max-steps-per-epoch", type=int_at_least(1), help="cap the steps per epoch (smoke runs)")
    t.add_argument("--out", default="runs/train", help="output folder (checkpoint.pt, train_log.jsonl)")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    t.add_argument("--resume", help="resume from this checkpoint (default: <out>/checkpoint.pt if present)")
    # issue 9: WSOL training methods (methods.py)
    t.add_argument("--method", default="cam", choices=["cam", "has", "adl", "cutmix", "spg", "acol"],
                   help="WSOL training method, wsolevaluation's definitions and defaults (default: cam)")
    t.add_argument("--method-param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method default, e.g. drop_rate=0.5 (repeatable)")
    _add_common(t)

    # ---- pseudo-boxes (issue 9) ---------------------------------------------------------
    pb = sub.add_parser("pseudo-boxes", help="CREAM_Base pseudo boxes of a split, in localization.txt format")
    pb.add_argument("checkpoint", help="CREAM_Base checkpoint.pt (or its folder)")
    pb.add_argument("--split", default="train")
    pb.add_argument("--out", required=True, help="output metadata folder (gets <split>/localization.txt)")
    pb.add_argument("--input-size", type=int_at_least(16), help="image side (default: 448 for cub/ilsvrc/openimages, "
                    "else the training size)")
    pb.add_argument("--tau", type=number_in(0, 1), help="fixed threshold (default: val MaxBoxAccV2 tau at IoU 50)")
    pb.add_argument("--ddt", action="store_true", help="also write DDT's boxes to <out>/ddt (Table 6 baseline)")
    pb.add_argument("--data-root")
    pb.add_argument("--metadata-root")
    pb.add_argument("--batch-size", type=int_at_least(1), default=32)
    pb.add_argument("--curve-interval", type=number_in(0, 1, lo_open=True, hi_open=True), default=0.001)
    _add_common(pb)

    # ---- regress (issue 9) ----------------------------------------------------------------
    rg = sub.add_parser("regress", help="train the class-agnostic box regressor of CREAM_Reg on pseudo boxes")
    rg.add_argument("--pseudo-boxes", required=True, help="folder written by pseudo-boxes")
    rg.add_argument("--preset", default="synthetic", choices=sorted(PRESETS), help="schedule/backbone preset")
    rg.add_argument("--data-root", help="image folder (default: the one recorded by pseudo-boxes)")
    rg.add_argument("--arch")
    rg.add_argument("--pretrained")
    rg.add_argument("--no-pretrained", action="store_true")
    rg.add_argument("--epochs", type=int_at_least(1))
    rg.add_argument("--lr", type=number_in(0, lo_open=True))
    rg.add_argument("--lr-step", type=int_at_least(1))
    rg.add_argument("--batch-size", type=int_at_least(1))
    rg.add_argument("--image-size", type=int_at_least(16), help="regressor input side (default: the pseudo boxes' size)")
    rg.add_argument("--seed", type=int, default=0)
    rg.add_argument("--ckpt-every-steps", type=int_at_least(0))
    rg.add_argument("--max-steps-per-epoch", type=int_at_least(1))
    rg.add_argument("--out", default="runs/regress")
    rg.add_argument("--no-resume", action="store_true")
    rg.add_argument("--evaluate", metavar="CKPT", help="then score CREAM_Reg on --eval-split with this "
                    "CREAM_Base classifier checkpoint")
    rg.add_argument("--eval-split", default="test")
    rg.add_argument("--metadata-root", help="real metadata for --evaluate (default: the classifier's)")
    _add_common(rg)

    # ---- evaluate -----------------------------------------------------------------
    e = sub.add_parser("evaluate", help="localization metrics of CAM / CREAM maps from a checkpoint")
    e.add_argument("checkpoint", help="checkpoint.pt (or the folder holding it)")
    e.add_argument("--split", default="test")
    e.add_argument("--data-root")
    e.add_argument("--metadata-root")
    e.add_argument("--mask-root", help="folder the mask paths are relative to (default: --data-root)")
    e.add_argument("--maps", default="cam,cream,free",
                   help="comma list of cam, cream, calibrated, free, free_calibrated (default: cam,cream,free)")
    e.add_argument("--target", default="gt", choices=["gt", "pred", "both"],
                   help="class whose map is scored: ground truth, predicted, or both")
    e.add_argument("--iters", type=int_at_least(0), default=2, help="EM iterations T (default 2; 0: the CAM)")
    e.add_argument("--sigma", type=sigma_value, default=8.0,
                   help="similarity temperature: a number > 0, or 'auto' (fitted per image; default 8)")
    e.add_argument("--similarity", default="dot", choices=["dot", "cosine"])
    e.add_argument("--batch-size", type=int_at_least(1), default=32)
    e.add_argument("--curve-interval", type=number_in(0, 1, lo_open=True, hi_open=True), default=0.001,
                   help="tau step (wsolevaluation: 0.001)")
    e.add_argument("--max-images", type=int_at_least(1))
    e.add_argument("--select-on", metavar="SPLIT",
                   help="choose sigma and tau on this split (e.g. val), then score --split with them "
                        "(wsolevaluation's protocol)")
    e.add_argument("--sigma-grid", help="comma list of sigmas tried by --select-on (default: 2,4,8,16,32 for dot, "
                   "0.05,0.1,0.25,1,8 for cosine)")
    e.add_argument("--save-maps", metavar="DIR",
                   help="write per-image maps (.npy), PNG overlays, boxes.json and Figs. 1, 5, 6 to DIR")
    e.add_argument("--num-workers", type=int_at_least(0),
                   help="loader worker processes (default: from the machine; the numbers do not depend on it)")
    e.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision for the network (default: off, fp32)")
    e.add_argument("--out", help="write the metrics as JSON here")
    _add_common(e)

    # ---- reproduce ----------------------------------------------------------------
    r = sub.add_parser("reproduce", help="the paper's experiment, with its tables and figures: on the embedded "
                       "synthetic data, or on a wsolevaluation-format data set (--data-root)")
    r.add_argument("--out", default="cream_reproduce", help="output folder (default: ./cream_reproduce)")
    r.add_argument("--data-root", help="your data: the folder the image ids are relative to (then also "
                   "--metadata-root, --dataset, --arch)")
    r.add_argument("--metadata-root", help="wsolevaluation metadata folder holding train/, val/, test/")
    r.add_argument("--mask-root", help="folder the mask paths are relative to (OpenImages; default: --data-root)")
    r.add_argument("--dataset", help="with --data-root: cub | ilsvrc | openimages (the paper's protocol and "
                   "schedule: preset <dataset>-<arch>)")
    r.add_argument("--arch", help="with --data-root: vgg16 | resnet50 | inceptionv3 | efficientnet_lite0 | small")
    r.add_argument("--pretrained", metavar="FILE", help="with --data-root: ImageNet state dict (torchvision "
                   "format; 'package' for efficientnet_lite0's pip weights, its default); vgg16, resnet50 and "
                   "inceptionv3 need this or --no-pretrained")
    r.add_argument("--no-pretrained", action="store_true", help="with --data-root: train from random weights")
    r.add_argument("--methods", help="comma list of other WSOL methods to train and score with and without CREAM "
                   "(has, spg, adl, cutmix, acol; 'none'); default: has,spg on the embedded runs that carry the "
                   "CREAM_Reg parts, none with --data-root")
    r.add_argument("--seed", type=int, default=None, help="run this one seed only (same as --seeds N)")
    r.add_argument("--seeds", help="comma list of seeds (default 0,1,2; --quick: 0,1; --data-root: 0)")
    r.add_argument("--regimes", help="embedded data: comma list of synthetic regimes: cub,cluttered (default: both)")
    r.add_argument("--backbones", help="embedded data: comma list: small,lite0 (default: both)")
    r.add_argument("--quick", action="store_true", help="embedded data: CI-size run (well under a minute; 1 torch "
                   "thread)")
    r.add_argument("--jobs", type=int, default=None, help="runs at once, in worker processes with 1 torch thread "
                   "each (default: 2 on a machine with >= 2 cores, 1 with --quick or --data-root; per-stage bars "
                   "only with 1)")
    r.add_argument("--epochs", type=int, help="override the preset's epochs")
    r.add_argument("--image-size", type=int, help="override the input side (the pseudo boxes: twice it)")
    r.add_argument("--batch-size", type=int, help="override the preset's batch size")
    r.add_argument("--max-steps-per-epoch", type=int, help="cap the training steps per epoch (small runs)")
    r.add_argument("--retrain", action="store_true", help="train again even if <out>/runs has finished runs")
    _add_common(r)

    # ---- presets ------------------------------------------------------------------
    sub.add_parser("presets", help="list the training presets")
    return ap


MAP_KINDS = ("cam", "cream", "calibrated", "free", "free_calibrated")


def _check_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ArgError(f"--device: {name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


_TORCHVISION_FILES = {"vgg16": "vgg16-397923af.pth", "resnet50": "resnet50-0676ba61.pth",
                      "inceptionv3": "inception_v3_google-0cc3c7bd.pth"}


def _arch_name(arg: str, name: Optional[str]) -> Optional[str]:
    """The canonical architecture name, or ArgError listing the accepted ones."""
    from .models import _ALIASES, ARCHITECTURES, canonical_arch

    if name is None:
        return None
    try:
        return canonical_arch(name)
    except ValueError:
        raise ArgError(f"{arg}: unknown architecture {name!r}; expected one of {', '.join(sorted(ARCHITECTURES))} "
                       f"(aliases: {', '.join(sorted(_ALIASES))})") from None


def _check_pretrained(arg: str, path: Optional[str], arch: str, large_feature_map: bool, **model_kwargs) -> None:
    """A --pretrained file that exists and fits ``arch`` (checked on the meta device: no weights built)."""
    from .models import check_pretrained

    if not path:
        return
    if path == "package":
        if arch != "efficientnet_lite0":
            raise ArgError(f"{arg}: 'package' (the pip-shipped ImageNet weights) exists for efficientnet_lite0 "
                           f"only, not for {arch}; give a torchvision-format state dict file")
        from .models import efficientnet_lite0_weights_path

        try:
            efficientnet_lite0_weights_path()
        except ImportError as exc:
            raise ArgError(f"{arg}: {exc}") from None
        return
    _argcheck.existing_file(arg, path, f"ImageNet state dict of {arch} (torchvision format)")
    try:
        check_pretrained(arch, path, large_feature_map=large_feature_map, **model_kwargs)
    except ValueError as exc:
        raise ArgError(f"{arg}: {exc}") from None


def _check_data_roots(a, split: Optional[str]) -> None:
    """Given --data-root / --metadata-root / --mask-root are folders; the metadata holds ``split``."""
    _argcheck.existing_dir("--data-root", a.data_root, "folder the image ids are relative to")
    _argcheck.existing_dir("--metadata-root", a.metadata_root, "wsolevaluation metadata folder (holds train/, "
                           "val/, test/)")
    _argcheck.existing_dir("--mask-root", getattr(a, "mask_root", None), "folder the mask paths are relative to")
    if a.metadata_root and split:
        ids = os.path.join(a.metadata_root, split, "image_ids.txt")
        if not os.path.isfile(ids):
            have = sorted(d for d in os.listdir(a.metadata_root)
                          if os.path.isfile(os.path.join(a.metadata_root, d, "image_ids.txt")))
            raise ArgError(f"--metadata-root: {a.metadata_root!r} has no {split}/image_ids.txt (split {split!r}); "
                           f"its splits: {', '.join(have) or 'none'}")


def _cmd_train(a) -> int:
    from .preflight import BadFilesError
    from .train import NEEDS_PRETRAINED_ARCHS, PRESETS, ResumeMismatchError, TrainingInterrupted, preset, train

    # cheap checks first (names, counts, pairs), then paths and files, then data and training
    arch = _arch_name("--arch", a.arch)
    method_kw = None
    if a.method != "cam" or a.method_param:
        from .methods import METHOD_DEFAULTS, make_method

        method_kw = _argcheck.key_values("--method-param", a.method_param, sorted(METHOD_DEFAULTS[a.method]))
        try:
            make_method(a.method, **method_kw)  # its ranges
        except ValueError as exc:
            raise ArgError(f"--method-param: {exc}") from None
    if a.no_pretrained and a.pretrained:
        raise ArgError("--pretrained / --no-pretrained: give --pretrained FILE or --no-pretrained, not both")
    if a.no_resume and a.resume:
        raise ArgError("--resume / --no-resume: give --resume CHECKPOINT or --no-resume, not both")
    over = dict(arch=arch, epochs=a.epochs, lr=a.lr, lr_step=a.lr_step, batch_size=a.batch_size,
                image_size=a.image_size, crop_size=a.crop_size, cream_momentum=a.cream_momentum,
                embedding_init=a.embedding_init, num_workers=a.num_workers, ckpt_every_steps=a.ckpt_every_steps,
                ckpt_every_minutes=a.ckpt_every_minutes, val_split=a.val_split, val_every_epochs=a.val_every_epochs,
                val_every_steps=a.val_every_steps, val_max_images=a.val_max_images,
                max_steps_per_epoch=a.max_steps_per_epoch, large_feature_map=a.large_feature_map or None,
                amp=a.amp)
    cfg = preset(a.preset, **over).replace(seed=a.seed, out_dir=a.out, progress=not a.no_progress,
                                           device=_device(a.device), check_files=not a.no_file_check)
    if a.no_val:
        cfg = cfg.replace(val_split=None)
    if a.no_pretrained:
        cfg = cfg.replace(pretrained=None)
    elif a.pretrained:
        cfg = cfg.replace(pretrained=a.pretrained)
    if (a.data_root or a.metadata_root) and not (a.data_root and a.metadata_root):
        raise ArgError("--data-root / --metadata-root: give both (the image folder and the metadata folder)")
    if not (a.data_root or cfg.dataset == "synthetic"):
        raise ArgError(f"--data-root / --metadata-root: preset {a.preset!r} needs both (presets that generate "
                       "their own data: synthetic, synthetic-quick)")
    real_data = PRESETS[a.preset]["dataset"] != "synthetic"
    if not (a.no_pretrained or a.pretrained) and cfg.pretrained is None and real_data \
            and cfg.arch in NEEDS_PRETRAINED_ARCHS:
        raise ArgError(f"--pretrained: preset {a.preset!r} fine-tunes ImageNet weights, as the paper does: give "
                       f"--pretrained FILE (a torchvision-format {cfg.arch} state dict, e.g. "
                       f"{_TORCHVISION_FILES[cfg.arch]}) or --no-pretrained to train from random weights")
    _check_data_roots(a, cfg.train_split)
    _check_pretrained("--pretrained", cfg.pretrained if not a.no_pretrained else None, cfg.arch,
                      cfg.large_feature_map, **cfg.model_kwargs)
    if a.resume:
        ck = _argcheck.training_checkpoint("--resume", a.resume)
        ck_arch = ck.get("arch") or ck.get("config", {}).get("arch")
        if ck_arch and ck_arch != cfg.arch:
            raise ArgError(f"--resume: {a.resume!r} was trained with arch {ck_arch!r}, this run's arch is "
                           f"{cfg.arch!r}; give --arch {ck_arch} (or --no-resume to start afresh)")
        del ck
    if a.data_root:
        cfg = cfg.replace(data_root=a.data_root, metadata_root=a.metadata_root, mask_root=a.mask_root or "")
    else:
        from .data import make_synthetic
        from .reproduce import DATA_FULL

        root = a.synthetic_root or os.path.join(a.out, "data")
        dkw = dict(DATA_FULL, image_size=cfg.image_size)
        data_root, metadata_root = make_synthetic(root, seed=a.seed, **dkw)
        cfg = cfg.replace(data_root=str(data_root), metadata_root=str(metadata_root))
    if method_kw is not None:
        cfg = cfg.replace(method=a.method, method_kwargs=method_kw)
    resume = None if a.no_resume else (a.resume or "auto")
    try:
        summary = train(cfg, resume=resume)
    except TrainingInterrupted as exc:  # the one line was printed by train()
        return 128 + exc.signum
    except ResumeMismatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BadFilesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a second Ctrl-C while the first was being handled
        print(f"stopped: {exc or 'interrupted'}; the last checkpoint in {a.out} (if any) is intact", file=sys.stderr)
        return 130
    if summary["rank"] == 0:
        last = summary["log"][-1] if summary["log"] else {}
        print(json.dumps({"checkpoint": summary["checkpoint"], "best_checkpoint": summary["best_checkpoint"],
                          "best": summary["best"], "world_size": summary["world_size"],
                          "time_s": round(summary["time_s"], 1), "last_epoch": last}))
    return 0


@contextlib.contextmanager
def _ranks(device: str):
    """``(device, rank)`` for a command that shards its split under torchrun
    (:mod:`cream_wsol.distributed`); one process: ``(device, 0)``."""
    import torch.distributed as dist

    from . import distributed

    dev, rank, _, own = distributed.setup(device)
    try:
        with distributed.sharded():
            yield dev, rank
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


def _cmd_evaluate(a) -> int:
    from .evaluate import MapSpec, evaluate_checkpoint, format_metrics_table, jsonable

    kinds = _argcheck.name_list("--maps", a.maps, MAP_KINDS)
    grid = _argcheck.number_list("--sigma-grid", a.sigma_grid) if a.sigma_grid else None
    if a.select_on and a.select_on == a.split:
        raise ArgError(f"--select-on: {a.select_on!r} is the evaluated --split itself; choose sigma and tau on "
                       "another split (e.g. --select-on val --split test)")
    _check_data_roots(a, a.split)
    if a.select_on:
        _check_data_roots(a, a.select_on)
    _argcheck.training_checkpoint("checkpoint", a.checkpoint)  # a file of the right kind, before the data
    targets = ["gt", "pred"] if a.target == "both" else [a.target]
    specs = {}
    for target in targets:
        for k in kinds:
            name = k if target == "gt" else f"{k} (predicted class)"
            specs[name] = MapSpec(k, num_iters=a.iters, sigma=a.sigma, similarity=a.similarity, target=target)
    try:
        with _ranks(_device(a.device)) as (device, rank):  # torchrun: split across ranks, merged exactly
            res = evaluate_checkpoint(a.checkpoint, split=a.split, data_root=a.data_root,
                                      metadata_root=a.metadata_root, mask_root=a.mask_root, specs=specs,
                                      batch_size=a.batch_size, cam_curve_interval=a.curve_interval, device=device,
                                      progress=not a.no_progress and rank == 0, max_images=a.max_images,
                                      select_on=a.select_on, sigma_grid=grid, save_maps=a.save_maps,
                                      num_workers=a.num_workers, amp=a.amp)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank != 0:  # rank 0 prints and writes the merged result
        return 0
    cls = res["classification"]
    print(f"{res['split']}: {cls['num_images']} images, top-1 {cls['top1']:.1f} %, top-5 {cls['top5']:.1f} %")
    if res["selection"]:
        sel = next(iter(res["selection"].values()))
        print(f"sigma and tau chosen on {sel['split']} by {sel['metric']} (wsolevaluation's protocol); "
              f"MaxBoxAccV2 and PxAP on {res['split']} are threshold-free, GT-known / Top-1 / Top-5 Loc use "
              f"the {sel['split']} tau")
    print(format_metrics_table(res["metrics"], res["has_masks"], res["has_boxes"], selection=res["selection"]))
    if res.get("saved"):
        print(f"maps, overlays, boxes.json and figures written to {os.path.abspath(a.save_maps)}")
    if a.out:
        keep = {k: res[k] for k in ("metrics", "classification", "split", "config", "specs", "has_masks",
                                    "has_boxes", "selection")}
        os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump(jsonable(keep), fh, indent=1)
        print(f"metrics written to {a.out}")
    return 0


def _cmd_reproduce(a) -> int:
    from .preflight import BadFilesError
    from .reproduce import PRETRAINED_PRESET, OptionError, reproduce
    from .train import TrainingInterrupted

    def _list(opt, text, conv=str):
        if text is None:
            return None
        try:
            return [conv(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise OptionError(f"{opt}: expected a comma list of integers, got {text!r}") from None

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # its stages are not rank-aware (README: torchrun)
        raise ArgError("reproduce runs as one process, not under torchrun (WORLD_SIZE="
                       f"{os.environ['WORLD_SIZE']}); shard `cream-wsol evaluate` / `pseudo-boxes` instead")
    try:
        if a.pretrained and a.no_pretrained:
            raise OptionError("--pretrained / --no-pretrained: give one of them, not both")
        seeds = _argcheck.int_list("--seeds", a.seeds) if a.seeds is not None else ([a.seed] if a.seed is not None else None)
        reproduce(a.out, seeds=seeds, regimes=_list("--regimes", a.regimes),
                  backbones=_list("--backbones", a.backbones), quick=a.quick, progress=not a.no_progress,
                  device=_device(a.device), epochs=a.epochs, retrain=a.retrain, jobs=a.jobs,
                  data_root=a.data_root, metadata_root=a.metadata_root, mask_root=a.mask_root, dataset=a.dataset,
                  arch=a.arch, pretrained=None if a.no_pretrained else (a.pretrained or PRETRAINED_PRESET),
                  methods=_list("--methods", a.methods), image_size=a.image_size, batch_size=a.batch_size,
                  max_steps_per_epoch=a.max_steps_per_epoch)
    except (OptionError, BadFilesError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:  # train() printed where the checkpoint is; the same command resumes
        return 128 + exc.signum
    return 0


def _cmd_pseudo_boxes(a) -> int:
    from .pseudo_boxes import generate_pseudo_boxes

    _check_data_roots(a, a.split)
    _argcheck.training_checkpoint("checkpoint", a.checkpoint)
    try:
        with _ranks(_device(a.device)) as (device, rank):  # torchrun: split across ranks, rank 0 writes
            meta = generate_pseudo_boxes(a.checkpoint, a.out, split=a.split, input_size=a.input_size,
                                         data_root=a.data_root, metadata_root=a.metadata_root, tau=a.tau,
                                         cam_curve_interval=a.curve_interval, batch_size=a.batch_size,
                                         device=device, progress=not a.no_progress and rank == 0, ddt=a.ddt)
    except (FileNotFoundError, ValueError) as exc:  # a wrong checkpoint, split or data folder
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    out = {k: meta[k] for k in ("split", "input_size", "tau", "num_images", "gt_known")}
    if "ddt" in meta:
        out["ddt_gt_known"] = meta["ddt"]["gt_known"]
    print(json.dumps(out))
    return 0


def _cmd_regress(a) -> int:
    from .pseudo_boxes import PSEUDO_META
    from .regress import RegressConfig, evaluate_cream_reg, train_regressor

    arch = _arch_name("--arch", a.arch)
    if a.no_pretrained and a.pretrained:
        raise ArgError("--pretrained / --no-pretrained: give --pretrained FILE or --no-pretrained, not both")
    _argcheck.existing_dir("--pseudo-boxes", a.pseudo_boxes, "folder written by `cream-wsol pseudo-boxes --out`")
    _argcheck.existing_dir("--data-root", a.data_root, "image folder")
    _argcheck.existing_dir("--metadata-root", a.metadata_root, "wsolevaluation metadata folder")
    meta_path = os.path.join(a.pseudo_boxes, PSEUDO_META)
    meta = {}
    if os.path.isfile(meta_path):
        with open(meta_path) as fh:
            meta = json.load(fh)
    data_root = a.data_root or meta.get("data_root")
    if not data_root:
        raise ArgError(f"--data-root: give the image folder ({meta_path} does not record one)")
    split = meta.get("split", "train")
    if not os.path.isfile(os.path.join(a.pseudo_boxes, split, "localization.txt")):
        raise ArgError(f"--pseudo-boxes: {a.pseudo_boxes!r} has no {split}/localization.txt; expected the folder "
                       "written by `cream-wsol pseudo-boxes --out`")
    if a.evaluate:
        _argcheck.training_checkpoint("--evaluate", a.evaluate)
    cfg = RegressConfig.from_preset(
        a.preset, arch=arch, epochs=a.epochs, lr=a.lr, lr_step=a.lr_step, batch_size=a.batch_size,
        image_size=a.image_size or meta.get("input_size"), ckpt_every_steps=a.ckpt_every_steps,
        max_steps_per_epoch=a.max_steps_per_epoch)
    cfg = cfg.replace(pseudo_root=a.pseudo_boxes, data_root=data_root, split=split,
                      seed=a.seed, out_dir=a.out, progress=not a.no_progress, device=_device(a.device))
    if a.no_pretrained:
        cfg = cfg.replace(pretrained=None)
    elif a.pretrained:
        cfg = cfg.replace(pretrained=a.pretrained)
    _check_pretrained("--pretrained", cfg.pretrained, cfg.arch, cfg.large_feature_map, **cfg.model_kwargs)
    summary = train_regressor(cfg, resume=None if a.no_resume else "auto")
    if summary["rank"] != 0:
        return 0
    out = {"checkpoint": summary["checkpoint"], "time_s": round(summary["time_s"], 1),
           "last_epoch": summary["log"][-1] if summary["log"] else {}}
    if a.evaluate:
        res = evaluate_cream_reg(a.evaluate, summary["checkpoint"], split=a.eval_split,
                                 metadata_root=a.metadata_root or meta.get("metadata_root"),
                                 device=_device(a.device), progress=not a.no_progress)
        out["cream_reg"] = res["metrics"]
        out["classification"] = res["classification"]
    print(json.dumps(out))
    return 0


def _cmd_presets(a) -> int:
    from .train import PRESETS

    for name, p in sorted(PRESETS.items()):
        print(f"{name:28s} " + ", ".join(f"{k}={v}" for k, v in p.items()))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["reproduce", "compare"]:  # its own small parser: a positional OUT beside reproduce's options
        from .compare import main as compare_main

        return compare_main(argv[2:])
    a = build_parser().parse_args(argv)
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)
    run = {"train": _cmd_train, "evaluate": _cmd_evaluate, "reproduce": _cmd_reproduce,
           "presets": _cmd_presets, "pseudo-boxes": _cmd_pseudo_boxes, "regress": _cmd_regress}[a.command]
    try:
        if hasattr(a, "device"):
            _check_device(a.device)
        return run(a)
    except ArgError as exc:  # a command-line mistake: one line, exit 2 (argparse's convention)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
