"""Input pipeline, evaluation and train-step timings on CUB-sized JPEGs (issue 20).

A script, not a pytest file (no speed assertion anywhere): it writes one JSON line per
measurement to ``--out`` (appending), each with the machine, the torch version and the
``uptime`` load average at that moment, so figures from a shared machine say how loaded
it was. Parts (``--parts``, comma list):

* ``input``: the training loader (resize 256, random crop 224, flip, normalise) over
  ``--images`` generated 500x375 JPEGs, images/s with 0, 1 and 2 workers; the first batch
  (worker start-up) is timed separately from the steady state.
* ``eval``: ``evaluate`` images/s at 224 for the CAM map alone and the CREAM map alone
  (small CNN, random weights: the network is cheap, so this measures the per-image
  metric work and the loader, wsolevaluation's 0.001 tau step). Run it once with this
  tree and once with an older tree on PYTHONPATH (``--label before``) for before/after:
  on a tree whose ``evaluate`` has no ``num_workers`` / ``metric_workers`` it runs the old
  serial loop.
* ``step``: one training step split into data wait, forward, backward, context update
  (``ContextEmbeddings.update``) and optimizer step, median over ``--steps`` steps.

Usage (from the repository root)::

    PYTHONPATH=$PWD:$PWD/python python benchmarks/pipeline_bench.py --out benchmarks/results/pipeline.jsonl
    PYTHONPATH=$PWD:/path/to/old/python python benchmarks/pipeline_bench.py --parts eval --label before ...
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count()
    return f"{cpu}, {cores} usable cores, {platform.system()}"


def load() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:  # pragma: no cover
        return "n/a"


def make_cub_sized(root: str, n: int, classes: int = 4, seed: int = 0):
    """``n`` 500x375 JPEGs (smooth colour noise and one ellipse, quality 90) with
    wsolevaluation metadata (train and test splits, one box each)."""
    from PIL import Image

    data, meta = os.path.join(root, "data"), os.path.join(root, "meta")
    if os.path.isfile(os.path.join(meta, "test", "localization.txt")):
        return data, meta
    os.makedirs(os.path.join(data, "img"), exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = 500, 375
    yy, xx = np.mgrid[0:h, 0:w]
    ids, labels, boxes = [], [], []
    for i in range(n):
        small = rng.random((12, 16, 3)).astype(np.float32)
        img = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
        cx, cy, a, b = rng.uniform(120, 380), rng.uniform(100, 275), rng.uniform(40, 110), rng.uniform(30, 90)
        inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        img[inside] = 0.5 * img[inside] + 0.5 * rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        name = f"img/{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(data, name), quality=90)
        ids.append(name)
        labels.append(i % classes)
        boxes.append((int(max(0, cx - a)), int(max(0, cy - b)), int(min(w - 1, cx + a)), int(min(h - 1, cy + b))))
    for split in ("train", "test"):
        d = os.path.join(meta, split)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "image_ids.txt"), "w") as fh:
            fh.write("\n".join(ids) + "\n")
        with open(os.path.join(d, "class_labels.txt"), "w") as fh:
            fh.write("\n".join(f"{i},{c}" for i, c in zip(ids, labels)) + "\n")
        with open(os.path.join(d, "image_sizes.txt"), "w") as fh:
            fh.write("\n".join(f"{i},{w},{h}" for i in ids) + "\n")
        with open(os.path.join(d, "localization.txt"), "w") as fh:
            fh.write("\n".join(f"{i},{x0},{y0},{x1},{y1}" for i, (x0, y0, x1, y1) in zip(ids, boxes)) + "\n")
    return data, meta


def emit(out, rec):
    rec.update(machine=machine(), load_avg=load(), torch=torch.__version__, threads=torch.get_num_threads(),
               time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")


def bench_input(data, meta, args):
    from cream_wsol.data import WSOLDataset
    from cream_wsol.runs import TrainConfig, make_loader

    ds = WSOLDataset(data, meta, "train", train=True, image_size=224)
    for r in range(args.rounds):
        for workers in (0, 1, 2):
            cfg = TrainConfig(batch_size=32, seed=0, num_workers=workers, device="cpu")
            loader = make_loader(ds, cfg, epoch=r, rank=0, world=1)
            t0 = time.perf_counter()
            it = iter(loader)
            first = next(it)
            t1 = time.perf_counter()
            n = 0
            for x, _, _ in it:
                n += x.shape[0]
            t2 = time.perf_counter()
            del it
            emit(args.out, {"part": "input", "label": args.label, "round": r, "workers": workers,
                            "image_size": 224, "source": "500x375 JPEG", "batch": 32,
                            "images": n + first[0].shape[0], "first_batch_s": round(t1 - t0, 4),
                            "steady_images_per_s": round(n / (t2 - t1), 1),
                            "images_per_s": round((n + first[0].shape[0]) / (t2 - t0), 1)})


def bench_eval(data, meta, args):
    from cream_wsol.data import WSOLDataset
    from cream_wsol.evaluate import MapSpec, evaluate
    from cream_wsol.models import build_model
    from cream_wsol.runs import make_embeddings

    ds = WSOLDataset(data, meta, "test", train=False, image_size=224)
    torch.manual_seed(0)
    model = build_model("small", ds.num_classes).eval()
    emb = make_embeddings(ds.num_classes, model.feature_dim, 0.8, 0.2, "random", 0)
    new_api = "metric_workers" in inspect.signature(evaluate).parameters
    n = min(len(ds), args.eval_images)
    for r in range(args.rounds):
        for name, spec in (("CAM", MapSpec("cam")), ("CREAM", MapSpec("cream"))):
            kw = dict(num_workers=args.eval_workers, metric_workers=args.metric_workers) if new_api else {}
            t0, c0 = time.perf_counter(), time.process_time()
            res = evaluate(model, ds, {name: spec}, embeddings={"learned": emb}, batch_size=32, progress=False,
                           max_images=n, **kw)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            emit(args.out, {"part": "eval", "label": args.label, "round": r, "map": name, "arch": "small",
                            "image_size": 224, "images": n, "tau_step": 0.001, "api": "new" if new_api else "old",
                            **{k: v for k, v in kw.items()}, "images_per_s": round(n / dt, 2),
                            "main_process_cpu_s": round(cpu, 2), "MaxBoxAccV2": round(res["metrics"][name]["MaxBoxAccV2"], 4)})


def bench_step(data, meta, args):
    from cream_wsol.data import WSOLDataset
    from cream_wsol.models import build_model
    from cream_wsol.runs import TrainConfig, make_embeddings, make_loader

    ds = WSOLDataset(data, meta, "train", train=True, image_size=224)
    for arch in args.step_archs.split(","):
        torch.manual_seed(0)
        model = build_model(arch, ds.num_classes).train()
        emb = make_embeddings(ds.num_classes, model.feature_dim, 0.8, 0.2, "zeros", 0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        cfg = TrainConfig(batch_size=args.step_batch, seed=0, num_workers=args.step_workers, device="cpu")
        times = {"data_wait": [], "forward": [], "backward": [], "context_update": [], "optimizer": []}
        steps = 0
        epoch = 0
        while steps < args.steps + 1:
            it = iter(make_loader(ds, cfg, epoch=epoch, rank=0, world=1))
            while steps < args.steps + 1:
                t0 = time.perf_counter()
                try:
                    x, y, _ = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                logits, feats = model(x, return_features=True)
                loss = torch.nn.functional.cross_entropy(logits, y.long())
                t2 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t3 = time.perf_counter()
                with torch.no_grad():
                    emb.update(feats.detach(), y.long(), classifier_weight=model.classifier_weight.detach())
                t4 = time.perf_counter()
                opt.step()
                t5 = time.perf_counter()
                if steps > 0:  # the first step warms up (and starts the workers)
                    for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                        times[k].append(v)
                steps += 1
            epoch += 1
        med = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
        emit(args.out, {"part": "step", "label": args.label, "arch": arch, "image_size": 224,
                        "batch": args.step_batch, "workers": args.step_workers, "steps": args.steps,
                        "median_ms": med, "total_ms": round(sum(med.values()), 2)})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="input,eval,step")
    p.add_argument("--root", default="/tmp/cream_pipeline_bench", help="where the JPEGs are generated (reused)")
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-workers", type=int, default=None,
                   help="evaluate's num_workers on a tree that has it (default: the machine's default)")
    p.add_argument("--metric-workers", type=int, default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--step-batch", type=int, default=32)
    p.add_argument("--step-workers", type=int, default=1)
    p.add_argument("--step-archs", default="small")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--label", default="after")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    data, meta = make_cub_sized(args.root, args.images)
    parts = args.parts.split(",")
    if "input" in parts:
        bench_input(data, meta, args)
    if "eval" in parts:
        bench_eval(data, meta, args)
    if "step" in parts:
        bench_step(data, meta, args)


if __name__ == "__main__":
    sys.exit(main())
