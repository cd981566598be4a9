"""Loader workers change nothing but speed (issue 20): each sample's augmentation has its
own seed (run seed, epoch, index), so 0 and 2 workers give the same batches, the same
trained tensors and the same validation numbers, and a mid-epoch resume is exact with
workers; the default worker count is a function of the machine only."""
import pytest
import torch

cream_kernels = pytest.importorskip("cream_kernels")

from cream_wsol.data import WSOLDataset  # noqa: E402
from cream_wsol.runs import default_num_workers, loader_kwargs, make_loader, next_epoch, sample_seed  # noqa: E402
from cream_wsol.train import load_checkpoint, train  # noqa: E402

from _tiny import IMAGE, assert_same_weights, tiny_cfg as _cfg  # noqa: E402

_TIMES = ("time_s", "epoch_s", "val_s")


def _train_set(data):
    return WSOLDataset(data[0], data[1], "train", train=True, image_size=IMAGE)


def _batches(loader):
    return [(x.clone(), y.clone(), list(ids)) for x, y, ids in loader]


def test_default_num_workers_depends_on_the_machine_only(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert default_num_workers("cpu") == 1 and default_num_workers("cuda") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert default_num_workers("cpu") == 4 and default_num_workers(torch.device("cuda", 0)) == 8
    assert loader_kwargs(None, "cpu")["num_workers"] == 4
    kw = loader_kwargs(3, "cuda:0", persistent=True)
    assert kw["pin_memory"] and kw["persistent_workers"] and kw["num_workers"] == 3
    assert loader_kwargs(0, "cpu") == {"num_workers": 0, "pin_memory": False}


def test_sample_seed_separates_epochs_and_samples():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(4) for i in range(50)}
    assert len(seeds) == 3 * 4 * 50


def test_batches_identical_for_0_and_2_workers(tiny_data, tmp_path):
    ds = _train_set(tiny_data)
    got = {}
    for w in (0, 2):
        cfg = _cfg(tiny_data, tmp_path, num_workers=w)
        loader = make_loader(ds, cfg, epoch=0, rank=0, world=1, persistent=w > 0)
        got[w] = _batches(loader) + _batches(next_epoch(loader, 1)) + _batches(next_epoch(loader, 1, skip=1))
    assert len(got[0]) == len(got[2]) == 3 + 3 + 2
    for (xa, ya, ia), (xb, yb, ib) in zip(got[0], got[2]):
        assert ia == ib and torch.equal(ya, yb) and torch.equal(xa, xb)
    # epochs differ in order and augmentation; the skip gives the tail of the epoch
    assert [b[2] for b in got[0][3:6]] != [b[2] for b in got[0][0:3]]
    for a, b in zip(got[0][4:6], got[0][6:8]):
        assert torch.equal(a[0], b[0])
    # the main process's RNG streams are untouched by the augmentation
    torch.manual_seed(5)
    before = torch.get_rng_state()
    _batches(make_loader(ds, _cfg(tiny_data, tmp_path, num_workers=0), 0, 0, 1))
    assert torch.equal(before, torch.get_rng_state())


def _same_run(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert_same_weights(a, b)
    strip = (lambda log: [{k: v for k, v in e.items() if k not in _TIMES} for e in log])
    assert strip(a["log"]) == strip(b["log"])
    return strip(a["log"])


def test_training_identical_for_0_and_2_workers(tiny_data, tmp_path):
    r0 = train(_cfg(tiny_data, tmp_path / "w0", num_workers=0))
    r2 = train(_cfg(tiny_data, tmp_path / "w2", num_workers=2))
    log = _same_run(r0["checkpoint"], r2["checkpoint"])
    assert [e["epoch"] for e in log] == [1, 2] and "val_top1" in log[0]  # validation ran (through workers too)


def test_resume_mid_epoch_with_workers_is_exact(tiny_data, tmp_path):
    full = train(_cfg(tiny_data, tmp_path / "full", num_workers=0))

    class Crash(RuntimeError):
        pass

    def crash(info):  # global step 5, mid-epoch 2 (its checkpoint is the one after step 4)
        if info["epoch"] == 1 and info["step"] == 2:
            raise Crash

    cfg = _cfg(tiny_data, tmp_path / "crash", num_workers=2, ckpt_every_steps=1)
    with pytest.raises(Crash):
        train(cfg, on_step=crash)
    ck = load_checkpoint(str(tmp_path / "crash"))
    assert (ck["epoch"], ck["step_in_epoch"]) == (1, 1)
    resumed = train(cfg, resume="auto")
    _same_run(full["checkpoint"], resumed["checkpoint"])


def _eval_result(res):
    return {k: res[k] for k in ("metrics", "classification")}


def test_evaluate_identical_with_and_without_the_metric_pool(tiny_data, tmp_path):
    """Loader workers and the metric-work pool change no number: metrics, curves, histograms,
    examples and the per-image callback, against the serial loop (0 workers, no pool)."""
    import numpy as np

    from cream_wsol.evaluate import DEFAULT_SPECS, evaluate
    from cream_wsol.pseudo_boxes import boxes_from_maps
    from cream_wsol.train import load_trained

    r = train(_cfg(tiny_data, tmp_path / "run", epochs=1, num_workers=0))
    model, emb, _ = load_trained(r["checkpoint"])
    test = WSOLDataset(tiny_data[0], tiny_data[1], "test", train=False, image_size=IMAGE)
    assert test.has_boxes and test.has_masks
    runs = {}
    for workers, pool in ((0, 0), (2, 2), (2, 3)):
        seen = []
        res = evaluate(model, test, DEFAULT_SPECS, embeddings={"learned": emb}, batch_size=4, progress=False,
                       num_workers=workers, metric_workers=pool, histogram_specs=("CAM",), keep_examples=5,
                       on_image=lambda d: seen.append((d["index"], d["image_id"], {k: v.copy() for k, v in d["maps"].items()})))
        runs[(workers, pool)] = (res, seen)
    ref, ref_seen = runs[(0, 0)]
    assert len(ref["examples"]) == 5 and [s[0] for s in ref_seen] == list(range(len(test)))
    for key, (res, seen) in runs.items():
        assert _eval_result(res) == _eval_result(ref), key
        assert np.array_equal(res["thresholds"], ref["thresholds"])
        for n in ref["curves"]:
            assert np.array_equal(res["curves"][n], ref["curves"][n])
        for part in ("fg", "bg"):
            assert np.array_equal(res["histograms"]["CAM"][part], ref["histograms"]["CAM"][part])
        for a, b in zip(res["examples"], ref["examples"]):
            assert a["image_id"] == b["image_id"] and np.array_equal(a["image"], b["image"])
            assert all(np.array_equal(a["maps"][n], b["maps"][n]) for n in b["maps"])
        assert [(i, d) for i, d, _ in seen] == [(i, d) for i, d, _ in ref_seen]
        for (_, _, ma), (_, _, mb) in zip(seen, ref_seen):
            assert all(np.array_equal(ma[n], mb[n]) for n in mb)
    # pseudo boxes through workers: the same boxes
    spec = DEFAULT_SPECS["CAM"]
    b0 = boxes_from_maps(model, test, spec, 0.3, progress=False, num_workers=0)
    b2 = boxes_from_maps(model, test, spec, 0.3, progress=False, num_workers=2)
    assert b0.keys() == b2.keys() and all(np.array_equal(b0[k], b2[k]) for k in b0)
