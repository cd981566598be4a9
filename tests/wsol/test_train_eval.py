"""Training and evaluation end to end on a tiny synthetic set (seconds): the
train -> evaluate path, exact resume (epoch boundary and mid-epoch), atomic
checkpoints, the embeddings re-learning pass, the map definitions, and DDP with
2 gloo processes whose context embeddings must stay bit-identical."""
import os
import socket

import pytest
import torch

cream_kernels = pytest.importorskip("cream_kernels")

from cream_wsol.data import WSOLDataset  # noqa: E402
from cream_wsol.evaluate import MapSpec, compute_maps, evaluate, evaluate_checkpoint, time_per_image  # noqa: E402
from cream_wsol.train import (TrainConfig, learn_embeddings, load_checkpoint, load_trained,  # noqa: E402
                              save_checkpoint, train)

from _tiny import IMAGE, tiny_cfg as _cfg  # noqa: E402


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_then_evaluate(tiny_data, tmp_path):
    summary = train(_cfg(tiny_data, tmp_path / "run"))
    assert os.path.isfile(summary["checkpoint"]) and len(summary["log"]) == 2
    ck = load_checkpoint(summary["checkpoint"])
    assert ck["epoch"] == 2 and ck["global_step"] == 6 and ck["step_in_epoch"] == 0
    assert {"model", "optimizer", "scheduler", "embeddings", "rng", "config"} <= set(ck)
    assert ck["embeddings"]["fg"].abs().sum() > 0  # learned every step
    assert not any(n.startswith(".") for n in os.listdir(tmp_path / "run"))  # no temp file left
    specs = {"CAM": MapSpec("cam"), "CREAM": MapSpec("cream"), "free": MapSpec("free"),
             "CREAM pred": MapSpec("cream", target="pred"), "cal": MapSpec("calibrated")}
    res = evaluate_checkpoint(summary["checkpoint"], split="test", specs=specs, progress=False,
                              cam_curve_interval=0.01)
    assert res["has_masks"]
    assert res["classification"]["num_images"] == 9
    for name in specs:
        m = res["metrics"][name]
        pred = specs[name].target == "pred"
        for key in ("MaxBoxAccV2", "BoxAcc@30", "BoxAcc@50", "BoxAcc@70", "Top-1 Loc", "PxAP") + (
                () if pred else ("GT-known Loc", "Top-5 Loc")):
            assert 0.0 <= m[key] <= 100.0, (name, key)
        assert m["MaxBoxAccV2"] == pytest.approx((m["BoxAcc@30"] + m["BoxAcc@50"] + m["BoxAcc@70"]) / 3)
        if pred:  # GT-known / Top-5 Loc are defined on the ground-truth class's map only
            assert "GT-known Loc" not in m and "Top-5 Loc" not in m
        else:
            assert m["Top-1 Loc"] <= m["Top-5 Loc"] <= m["GT-known Loc"] + 1e-9
    assert res["curves"]["CAM"].shape == (3, 100)


def test_resume_at_epoch_boundary_is_exact(tiny_data, tmp_path):
    full = train(_cfg(tiny_data, tmp_path / "full", epochs=2))
    cfg = _cfg(tiny_data, tmp_path / "split", epochs=1)
    train(cfg)
    resumed = train(cfg.replace(epochs=2), resume="auto")
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(a["embeddings"], b["embeddings"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and a["global_step"] == b["global_step"]


def test_resume_mid_epoch_after_a_crash_is_exact(tiny_data, tmp_path):
    full = train(_cfg(tiny_data, tmp_path / "full", epochs=2))

    class Crash(RuntimeError):
        pass

    def crash_after_4(info):  # on_step runs before that step's checkpoint: crash in step 5
        if info["epoch"] == 1 and info["step"] == 2:  # global step 5, mid-epoch 2
            raise Crash

    cfg = _cfg(tiny_data, tmp_path / "crash", epochs=2, ckpt_every_steps=1)
    with pytest.raises(Crash):
        train(cfg, on_step=crash_after_4)
    ck = load_checkpoint(str(tmp_path / "crash"))
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 1, 4)
    resumed = train(cfg, resume="auto")
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(a["embeddings"], b["embeddings"])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    save_checkpoint({"x": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["x"], torch.ones(3))  # the old checkpoint survives intact
    assert os.listdir(tmp_path) == ["c.pt"]


def test_learn_embeddings_one_table_per_lambda(tiny_data, tmp_path):
    summary = train(_cfg(tiny_data, tmp_path / "run", epochs=1))
    model, emb, cfg = load_trained(summary["checkpoint"])
    ds = WSOLDataset(cfg.data_root, cfg.metadata_root, "train", train=True, image_size=IMAGE)
    tables = learn_embeddings(model, ds, (0.2, 1.0), init="random", batch_size=8, progress=False, seed=5)
    again = learn_embeddings(model, ds, (0.2,), init="random", batch_size=8, progress=False, seed=5)
    assert torch.equal(tables[0.2].fg, again[0.2].fg)  # deterministic
    # lambda = 1 keeps the (shared) random init; lambda = 0.2 moves away from it
    fresh = learn_embeddings(model, ds, (1.0,), init="random", batch_size=8, progress=False, seed=5)
    assert torch.equal(tables[1.0].fg, fresh[1.0].fg)
    assert not torch.equal(tables[0.2].fg, tables[1.0].fg)


def test_compute_maps_definitions():
    torch.manual_seed(0)
    B, d, h, w, C = 3, 6, 5, 7, 4
    feats = torch.rand(B, d, h, w)
    W = torch.randn(C, d)
    labels = torch.tensor([0, 3, 1])
    preds = torch.tensor([0, 2, 1])
    fg, bg = torch.randn(C, d), torch.randn(C, d)
    specs = {"cam": MapSpec("cam"), "cream": MapSpec("cream"), "cal": MapSpec("calibrated"),
             "T0": MapSpec("cream", num_iters=0), "free": MapSpec("free"), "pred": MapSpec("cam", target="pred")}
    maps = compute_maps(feats, W, specs, labels, preds, {"learned": (fg, bg)})
    cam = torch.einsum("bdhw,bd->bhw", feats, W[labels])
    torch.testing.assert_close(maps["cam"], cam)
    torch.testing.assert_close(maps["T0"], cam)
    torch.testing.assert_close(maps["pred"], torch.einsum("bdhw,bd->bhw", feats, W[preds]))
    # Eq. 12: CREAM = calibrated map + min-max normalised CAM
    flat = cam.flatten(1)
    norm = ((flat - flat.min(1, keepdim=True).values) /
            (flat.max(1, keepdim=True).values - flat.min(1, keepdim=True).values)).view_as(cam)
    torch.testing.assert_close(maps["cream"], maps["cal"] + norm, rtol=1e-5, atol=1e-5)
    want = cream_kernels.em_reactivate(feats, cam, fg, bg, labels)
    torch.testing.assert_close(maps["cream"], want)
    assert maps["free"].shape == (B, h, w) and float(maps["free"].min()) >= 0 and float(maps["free"].max()) <= 2


def test_timing_has_every_T(tiny_data, tmp_path):
    summary = train(_cfg(tiny_data, tmp_path / "run", epochs=1))
    model, emb, cfg = load_trained(summary["checkpoint"])
    ds = WSOLDataset(cfg.data_root, cfg.metadata_root, "test", train=False, image_size=IMAGE)
    times = time_per_image(model, ds, emb, (0, 1, 2), n_images=2, warmup=1)
    assert set(times) == {0, 1, 2} and all(v > 0 for v in times.values())
    assert times[2] >= times[0]


# ------------------------------------------------------ real metadata, one code path
def _subset_metadata(src_split_dir, dst_split_dir, ids):
    os.makedirs(dst_split_dir, exist_ok=True)
    keep = set(ids)
    for name in os.listdir(src_split_dir):
        with open(os.path.join(src_split_dir, name)) as fh:
            lines = [ln for ln in fh if ln.split(",")[0].strip() in keep]
        with open(os.path.join(dst_split_dir, name), "w") as fh:
            fh.writelines(lines)


@pytest.mark.parametrize("dataset", ["CUB", "OpenImages"])
def test_evaluate_on_real_metadata(dataset, wsol_metadata, tmp_path, placeholder, openimages_sample_ids):
    """The same evaluate() serves CUB (boxes) and OpenImages (masks + ignore): real
    wsolevaluation metadata, placeholder images, a random small model."""
    from cream_kernels import ContextEmbeddings

    from cream_wsol.models import build_model

    src = os.path.join(wsol_metadata, dataset, "val")
    if dataset == "CUB":
        with open(os.path.join(src, "image_ids.txt")) as fh:
            ids = [ln.strip() for ln in fh][:: 200][:5]
        sizes = {}
        with open(os.path.join(src, "image_sizes.txt")) as fh:
            for ln in fh:
                p, w, h = ln.strip().split(",")
                sizes[p] = (int(w), int(h))
        mask_root = None
    else:
        ids = list(openimages_sample_ids)
        sizes = {i: (64, 48) for i in ids}
        mask_root = os.path.join(wsol_metadata, dataset, "masks-sample")
    meta = tmp_path / "meta"
    _subset_metadata(src, str(meta / "val"), ids)
    for k, i in enumerate(ids):
        placeholder(str(tmp_path / "images" / i), *sizes[i], seed=k)
    ds = WSOLDataset(str(tmp_path / "images"), str(meta), "val", train=False, image_size=64, mask_root=mask_root)
    torch.manual_seed(0)
    model = build_model("small", ds.num_classes, width=8).eval()
    emb = ContextEmbeddings(ds.num_classes, model.feature_dim, init="random")
    specs = {"CAM": MapSpec("cam"), "CREAM": MapSpec("cream"), "free": MapSpec("free")}
    res = evaluate(model, ds, specs, embeddings={"learned": emb}, progress=False, cam_curve_interval=0.01)
    # CUB has boxes (MaxBoxAccV2 ...), OpenImages masks (PxAP), as in wsolevaluation
    assert res["has_masks"] == (dataset == "OpenImages") and res["has_boxes"] == (dataset == "CUB")
    for name in specs:
        m = res["metrics"][name]
        assert m["num_images"] == len(ids)
        assert ("MaxBoxAccV2" in m) == (dataset == "CUB") and ("PxAP" in m) == (dataset == "OpenImages")
        for key in ("MaxBoxAccV2", "PxAP"):
            assert 0 <= m.get(key, 0) <= 100


# ---------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_dict, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from cream_wsol.train import TrainConfig, train

        cfg = TrainConfig.from_dict(cfg_dict)
        summary = train(cfg, resume=None)  # uses the process group it finds; rank 0 writes the checkpoint
        emb = summary["embeddings"]
        torch.save({"fg": emb.fg.clone(), "bg": emb.bg.clone(), "world": summary["world_size"],
                    "steps": summary["log"][-1]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_keep_embeddings_identical(tiny_data, tmp_path):
    import torch.multiprocessing as mp

    cfg = _cfg(tiny_data, tmp_path / "ddp", epochs=1, batch_size=4)
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == r1["world"] == 2
    assert torch.equal(r0["fg"], r1["fg"]) and torch.equal(r0["bg"], r1["bg"])  # bit-identical
    assert r0["fg"].abs().sum() > 0
    ck = load_checkpoint(str(tmp_path / "ddp"))
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    torch.testing.assert_close(ck["embeddings"]["fg"], r0["fg"], rtol=0, atol=0)
    # 24 images, 2 ranks, batch 4: 3 steps per rank, each update sees both ranks' samples
    assert ck["global_step"] == 3
