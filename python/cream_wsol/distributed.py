"""Evaluation and pseudo boxes across processes (``torchrun``), on ``torch.distributed``.

Under ``torchrun --nproc_per_node N`` (or several machines with torchrun's rendezvous
flags) ``cream-wsol evaluate`` and ``cream-wsol pseudo-boxes`` split the images of a split
across the ranks and gather the results, so that every number equals the one-process run
bit for bit:

* **Shards are whole batches, contiguous and in order.** The split's batches (the
  one-process run's ``batch_size`` batches: images ``[0, B)``, ``[B, 2B)``, ...) are dealt
  out in contiguous blocks, rank 0 the first block. Every image therefore goes through the
  model in the very batch it has in the one-process run (same neighbours, same batch
  size), so its map is the same tensor. A rank whose block is empty (a split with fewer
  batches than ranks) runs no batch and still takes part in the gather.
* **Accumulators are merged exactly, in rank order (= image order).** Box metrics: the
  integer ``num_correct`` counts and image counts are summed; the per-image bit rows
  (``correct@50``) and Top-1 / Top-5 flags are concatenated in rank order, which is image
  order. PxAP and the Fig. 1 histograms: the histograms hold whole pixel counts (float64,
  exact below 2**53), so their sums do not depend on the order. Classification counts are
  integers. The kept examples are the first ones of the concatenation.
* **Every rank gets the merged result** (``all_gather_object``), so choices made from it
  (``--select-on``'s sigma and tau, the pseudo boxes' tau) are the same on every rank;
  only rank 0 writes files and prints.

Sharding is opt-in: :func:`evaluate <cream_wsol.evaluate.evaluate>` and
:func:`~cream_wsol.pseudo_boxes.boxes_from_maps` shard only inside :func:`sharded` (the
CLI commands enter it), so training's rank-0 validation keeps running alone.

The process group comes from :func:`cream_wsol.runs.dist_setup` (the same set-up
training uses: ``gloo`` on CPU, ``nccl`` on CUDA, from torchrun's environment).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["setup", "sharded", "world", "batch_shard", "gather_objects", "merge_evaluation",
           "merge_dicts", "barrier", "is_main"]

_SHARDING = [0]  # depth of the active sharded() blocks


def setup(device: str) -> Tuple[str, int, int, bool]:
    """``(device, rank, world_size, we_initialised)``: joins torchrun's process group
    (:func:`cream_wsol.runs.dist_setup`) when ``WORLD_SIZE`` > 1; on CUDA each rank takes
    ``cuda:LOCAL_RANK`` (unless ``device`` names an index already)."""
    from .runs import dist_setup

    dev = torch.device(device)
    rank, size, own = dist_setup(dev)
    if size > 1 and dev.type == "cuda":
        if dev.index is None:
            local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    return str(dev), rank, size, own


@contextlib.contextmanager
def sharded() -> Iterator[None]:
    """Inside this block, evaluate() and boxes_from_maps() split their images across the
    ranks of the default process group (when one is initialised with more than one rank)."""
    _SHARDING[0] += 1
    try:
        yield
    finally:
        _SHARDING[0] -= 1


def world() -> Tuple[int, int]:
    """``(rank, world_size)`` the sharded loops use: ``(0, 1)`` outside :func:`sharded` or
    without an initialised process group."""
    if _SHARDING[0] > 0 and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a one-process run)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def batch_shard(n: int, batch_size: int, rank: int, size: int) -> range:
    """The image indices of ``rank``: a contiguous block of whole batches of the
    one-process run (batch ``k`` is images ``[k B, min((k+1) B, n))``); rank ``r`` of
    ``size`` gets batches ``[nb r // size, nb (r+1) // size)``. Empty when the split has
    fewer batches than ranks."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if size < 1 or not (0 <= rank < size):
        raise ValueError(f"rank {rank} outside a world of size {size}")
    n = max(0, int(n))
    nb = -(-n // batch_size)
    b0, b1 = nb * rank // size, nb * (rank + 1) // size
    return range(min(n, b0 * batch_size), min(n, b1 * batch_size))


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not sharded)."""
    size = world()[1]
    if size == 1:
        return [obj]
    out: List[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def merge_dicts(part: Mapping[Any, Any]) -> Dict[Any, Any]:
    """The union of every rank's dict (ranks hold disjoint keys), inserted in rank order."""
    merged: Dict[Any, Any] = {}
    for p in gather_objects(dict(part)):
        merged.update(p)
    return merged


def _merge_box(parts: Sequence[Any]):
    ev = parts[0]
    for other in parts[1:]:
        ev.num_correct = ev.num_correct + other.num_correct  # int64: exact
        ev.cnt += other.cnt
        ev._correct50 = list(ev._correct50) + list(other._correct50)  # rank order = image order
        ev._top1 = list(ev._top1) + list(other._top1)
        ev._top5 = list(ev._top5) + list(other._top5)
    return ev


def _merge_mask(parts: Sequence[Any]):
    ev = parts[0]
    for other in parts[1:]:
        # whole pixel counts held in float64: the sum is exact (below 2**53), whatever the order
        ev.gt_true_score_hist = ev.gt_true_score_hist + other.gt_true_score_hist
        ev.gt_false_score_hist = ev.gt_false_score_hist + other.gt_false_score_hist
        ev.cnt += other.cnt
    return ev


def merge_evaluation(box_ev: Dict[str, Any], mask_ev: Dict[str, Any], hists: Dict[str, Dict[str, np.ndarray]],
                     examples: List[Any], counts: Sequence[int], keep_examples: int):
    """evaluate()'s per-rank state -> the merged state of the whole split, on every rank:
    ``(box_ev, mask_ev, hists, examples, counts)``. Returns the inputs unchanged when
    not sharded."""
    if world()[1] == 1:
        return box_ev, mask_ev, hists, examples, list(counts)
    parts = gather_objects({"box": box_ev, "mask": mask_ev, "hists": hists, "examples": examples,
                            "counts": [int(c) for c in counts]})
    box = {n: _merge_box([p["box"][n] for p in parts]) for n in box_ev}
    mask = {n: _merge_mask([p["mask"][n] for p in parts]) for n in mask_ev}
    merged_hists = {n: {k: sum((p["hists"][n][k] for p in parts[1:]), parts[0]["hists"][n][k])
                        for k in hists[n]} for n in hists}
    ex: List[Any] = [e for p in parts for e in p["examples"]][:max(0, int(keep_examples))]
    tot = [sum(p["counts"][i] for p in parts) for i in range(len(counts))]
    return box, mask, merged_hists, ex, tot
