"""CREAM_Reg (issue 9): box-level metrics on hand-computed cases, DDT on a hand-made case whose
answer is known, pseudo boxes in localization.txt format read back by the loader, the box
regressor end to end with exact resume, the CLI, and the reproduce's parts."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("cream_kernels")

from cream_wsol.data import WSOLDataset, make_synthetic  # noqa: E402
from cream_wsol.ddt import DDTStats, ddt_box, ddt_fit, ddt_project  # noqa: E402
from cream_wsol.regress import (RegressConfig, box_metrics, evaluate_cream_reg, load_regressor,  # noqa: E402
                                train_regressor)
from cream_wsol.train import TrainConfig, load_checkpoint, train  # noqa: E402

IMAGE = 32


# --------------------------------------------------------------------------- box-level metric
def test_box_metrics_hand_computed():
    pred = [[0, 0, 9, 9]] * 4
    gt = [np.array([[0, 0, 9, 9]]),            # IoU 1
          np.array([[5, 0, 14, 9]]),           # inter 5x10 = 50, union 150: IoU 1/3
          np.array([[0, 0, 9, 19]]),           # inter 100, union 200: IoU 0.5 (counts at 50)
          np.array([[20, 20, 29, 29]])]        # IoU 0
    m = box_metrics(pred, gt, correct_top1=[True, True, False, True], correct_top5=[True] * 4)
    assert m["BoxAcc@30"] == pytest.approx(75.0)
    assert m["BoxAcc@50"] == pytest.approx(50.0)
    assert m["BoxAcc@70"] == pytest.approx(25.0)
    assert m["MaxBoxAccV2"] == pytest.approx(50.0)
    assert m["GT-known Loc"] == pytest.approx(50.0)
    assert m["Top-1 Loc"] == pytest.approx(25.0)  # correct at 50: images 0, 2; top-1 right: 0, 1, 3
    assert m["Top-5 Loc"] == pytest.approx(50.0)
    np.testing.assert_allclose(m["iou"], [1.0, 1 / 3, 0.5, 0.0])
    assert m["mean IoU"] == pytest.approx(100 * (1 + 1 / 3 + 0.5) / 4)


def test_box_metrics_best_of_several_gt_boxes_and_errors():
    m = box_metrics([[0, 0, 9, 9]], [np.array([[50, 50, 60, 60], [0, 0, 9, 9]])])
    assert m["GT-known Loc"] == 100.0 and "Top-1 Loc" not in m
    with pytest.raises(ValueError, match=r"pred_boxes must be \[N, 4\]"):
        box_metrics([[0, 0, 9]], [np.array([[0, 0, 9, 9]])])
    with pytest.raises(ValueError, match="ground-truth entries"):
        box_metrics([[0, 0, 9, 9]] * 2, [np.array([[0, 0, 9, 9]])])
    with pytest.raises(ValueError, match="flags"):
        box_metrics([[0, 0, 9, 9]], [np.array([[0, 0, 9, 9]])], correct_top1=[True, False])


# --------------------------------------------------------------------------- DDT
def _ddt_case(rng, obj_rows, obj_cols, size=8):
    """Descriptors [3, size, size]: background ~ (1, 0, 0), object ~ (0, 3, 1), small noise."""
    f = np.zeros((3, size, size))
    f[0] = 1.0
    m = np.zeros((size, size), bool)
    m[obj_rows[0]:obj_rows[1] + 1, obj_cols[0]:obj_cols[1] + 1] = True
    f[:, m] = np.array([0.0, 3.0, 1.0])[:, None]
    return torch.tensor(f + 0.05 * rng.standard_normal(f.shape), dtype=torch.float32), m


@pytest.mark.parametrize("big_object", [False, True])
def test_ddt_hand_made_case(big_object):
    """The first principal component separates the object descriptors from the background's; its
    positive side is the object (also when the object covers most of the image), and the box is
    the object's rectangle (contour box convention of the metrics: x1 + 1, y1 + 1, clipped)."""
    rng = np.random.default_rng(0)
    rows, cols = ((0, 6), (1, 7)) if big_object else ((2, 4), (3, 6))
    feats, masks = zip(*[_ddt_case(rng, rows, cols) for _ in range(5)])
    stats = DDTStats(num_classes=2, dim=3)
    stats.add(torch.stack(feats), torch.zeros(5, dtype=torch.long))
    comps = ddt_fit(stats)
    assert set(comps) == {0}  # class 1 never seen
    mean, v = comps[0]
    for f, m in zip(feats, masks):
        p = ddt_project(f, mean, v)
        assert np.array_equal(p > 0, m)
        box = ddt_box(p, 8)
        assert box.tolist() == [cols[0], rows[0], min(cols[1] + 1, 7), min(rows[1] + 1, 7)]
    # upsampled to 16 px: the box scales with it (bilinear edges fall between the pixels)
    big = ddt_box(ddt_project(feats[0], mean, v), 16)
    assert abs(big[0] - 2 * cols[0]) <= 1 and abs(big[1] - 2 * rows[0]) <= 1


def test_ddt_input_errors():
    stats = DDTStats(2, 3)
    with pytest.raises(ValueError, match=r"features must be \[B, 3"):
        stats.add(torch.zeros(1, 4, 2, 2), torch.zeros(1))
    with pytest.raises(ValueError, match="labels must be in"):
        stats.add(torch.zeros(1, 3, 2, 2), torch.tensor([5]))
    with pytest.raises(ValueError, match="NaN"):
        stats.add(torch.full((1, 3, 2, 2), float("nan")), torch.tensor([0]))


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reg")
    data = make_synthetic(str(root / "data"), seed=2, num_classes=3, n_train=12, n_val=6, n_test=6,
                          image_size=IMAGE)
    cfg = TrainConfig(dataset="synthetic", data_root=str(data[0]), metadata_root=str(data[1]), arch="small",
                      model_kwargs={"width": 8}, image_size=IMAGE, batch_size=6, lr=0.01, epochs=1, lr_step=1,
                      seed=1, out_dir=str(root / "base"), progress=False)
    train(cfg)
    return root, data, os.path.join(cfg.out_dir, "checkpoint.pt")


def test_pseudo_boxes_written_and_read_back(base_run, tmp_path):
    from cream_wsol.pseudo_boxes import generate_pseudo_boxes

    root, data, ckpt = base_run
    meta = generate_pseudo_boxes(ckpt, str(tmp_path / "pb"), ddt=True, cam_curve_interval=0.01, progress=False)
    assert meta["input_size"] == IMAGE  # a synthetic preset: the training size (448 for cub/ilsvrc/openimages)
    assert 0.0 <= meta["tau"]["tau"] < 1.0 and meta["tau"]["source"] == "val best_tau@50"
    assert 0.0 <= meta["gt_known"] <= 100.0 and 0.0 <= meta["ddt"]["gt_known"] <= 100.0
    with open(tmp_path / "pb" / "pseudo_boxes.json") as fh:
        assert json.load(fh)["num_images"] == 12
    ds = WSOLDataset(data[0], str(tmp_path / "pb"), "train", train=False, image_size=IMAGE)
    real = WSOLDataset(data[0], data[1], "train", train=False, image_size=IMAGE)
    assert ds.has_boxes and ds.image_ids == real.image_ids and ds.labels == real.labels
    for d in (ds, WSOLDataset(data[0], str(tmp_path / "pb" / "ddt"), "train", train=False, image_size=IMAGE)):
        for i in d.image_ids:
            b = d.gt_boxes(i)
            assert b.shape == (1, 4) and (b[0, 2:] >= b[0, :2]).all() and b.max() < IMAGE


def _rcfg(data, pseudo, out, **kw):
    base = dict(pseudo_root=str(pseudo), data_root=str(data[0]), arch="small", model_kwargs={"width": 8},
                image_size=IMAGE, batch_size=4, lr=0.01, classifier_lr_mult=1.0, epochs=2, lr_step=1, seed=4,
                out_dir=str(out), progress=False)
    base.update(kw)
    return RegressConfig(**base)


def test_regressor_trains_resumes_and_evaluates(base_run, tmp_path):
    from cream_wsol.pseudo_boxes import generate_pseudo_boxes

    root, data, ckpt = base_run
    pb = tmp_path / "pb"
    generate_pseudo_boxes(ckpt, str(pb), tau=0.3, progress=False)
    straight = train_regressor(_rcfg(data, pb, tmp_path / "a"))
    assert len(straight["log"]) == 2 and np.isfinite(straight["log"][-1]["mse"])
    # one epoch, then resume for the second: the same weights bit for bit
    train_regressor(_rcfg(data, pb, tmp_path / "b", epochs=1))
    resumed = train_regressor(_rcfg(data, pb, tmp_path / "b"), resume="auto")
    # mid-epoch: checkpoint every step, stop after 4 of the 6 steps, resume
    stop = {"n": 0}

    def halt(info):
        stop["n"] += 1
        if stop["n"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_regressor(_rcfg(data, pb, tmp_path / "c", ckpt_every_steps=1), on_step=halt)
    assert load_checkpoint(str(tmp_path / "c" / "regressor.pt"))["global_step"] == 4
    mid = train_regressor(_rcfg(data, pb, tmp_path / "c", ckpt_every_steps=1), resume="auto")
    a = load_checkpoint(straight["checkpoint"])["model"]
    for other in (resumed, mid):
        b = load_checkpoint(other["checkpoint"])["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), k
    reg, rcfg = load_regressor(str(tmp_path / "a"))
    assert rcfg.image_size == IMAGE and not reg.training
    res = evaluate_cream_reg(ckpt, straight["checkpoint"], split="test", progress=False)
    m = res["metrics"]
    assert m["num_images"] == 6
    for k in ("Top-1 Loc", "Top-5 Loc", "GT-known Loc", "BoxAcc@30", "BoxAcc@70"):
        assert 0.0 <= m[k] <= 100.0
    assert m["Top-1 Loc"] <= m["Top-5 Loc"] <= m["GT-known Loc"]
    # the box-level metric recomputed from the returned boxes agrees
    ds = WSOLDataset(data[0], data[1], "test", train=False, image_size=IMAGE)
    again = box_metrics([res["boxes"][i] for i in ds.image_ids], [ds.gt_boxes(i) for i in ds.image_ids])
    assert again["GT-known Loc"] == pytest.approx(m["GT-known Loc"])
    with pytest.raises(ValueError, match="not a regressor checkpoint"):
        load_regressor(ckpt)


def test_cli_pseudo_boxes_and_regress(base_run, tmp_path, capsys):
    from cream_wsol.cli import main

    root, data, ckpt = base_run
    assert main(["pseudo-boxes", ckpt, "--out", str(tmp_path / "pb"), "--curve-interval", "0.05",
                 "--no-progress", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["split"] == "train" and out["num_images"] == 12
    assert main(["regress", "--pseudo-boxes", str(tmp_path / "pb"), "--preset", "synthetic-quick", "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--batch-size", "4", "--out", str(tmp_path / "reg"), "--no-progress",
                 "--device", "cpu", "--evaluate", ckpt]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert os.path.isfile(out["checkpoint"]) and 0.0 <= out["cream_reg"]["GT-known Loc"] <= 100.0
    assert main(["train", "--preset", "synthetic-quick", "--data-root", str(data[0]), "--metadata-root",
                 str(data[1]), "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "4", "--image-size",
                 str(IMAGE), "--method", "has", "--method-param", "drop_rate=0.25", "--out", str(tmp_path / "h"),
                 "--no-progress", "--device", "cpu"]) == 0
    ck = load_checkpoint(str(tmp_path / "h" / "checkpoint.pt"))
    assert ck["config"]["method"] == "has" and ck["config"]["method_kwargs"] == {"drop_rate": 0.25}


def test_reproduce_parts(base_run, tmp_path):
    from cream_wsol.paper_reg import run_reg_parts

    root, data, ckpt = base_run
    msgs = []
    r = run_reg_parts(os.path.dirname(ckpt), str(tmp_path / "parts"), quick=True, progress=False,
                      methods=("adl",), progress_cb=msgs.append)
    assert set(r["tables"]) == {"Table 2/3 (CREAM_Reg)", "Table 5", "Table 6 (pseudo boxes)", "Fig. 6 (right)",
                                "Table 1 deltas"}
    assert os.path.isfile(r["figures"]["fig6"]) and msgs
    t = r["numbers"]["Table 2/3 (CREAM_Reg)"]
    assert set(t) == {"CAM", "CREAM_Base", "CREAM_Reg"}
    assert r["numbers"]["Table 5"]["+ regressor (CREAM_Reg)"]["PxAP"] is None
    assert set(r["numbers"]["Fig. 6 (right)"]) == {"CAM", "ADL"}
    assert "| ADL |" in r["tables"]["Fig. 6 (right)"]
    deltas = r["numbers"]["Table 1 deltas"]  # ADL - CAM, paired on this one run
    adl, cam = r["numbers"]["Fig. 6 (right)"]["ADL"], r["numbers"]["Fig. 6 (right)"]["CAM"]
    assert deltas["ADL"]["MaxBoxAccV2 - CAM"]["mean"] == pytest.approx(
        adl["MaxBoxAccV2 (method)"]["mean"] - cam["MaxBoxAccV2 (method)"]["mean"])
    with pytest.raises(ValueError, match="needs part 'pseudo'"):
        run_reg_parts(ckpt, str(tmp_path / "x"), parts=("reg",))


def _ddp_regress_worker(rank, world, port, cfg_dict, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        summary = train_regressor(RegressConfig.from_dict(cfg_dict), resume=None)
        torch.save({k: v.clone() for k, v in summary["model"].state_dict().items()},
                   os.path.join(out_dir, f"reg_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10 s on an idle machine, minutes on a loaded one
def test_regressor_ddp_two_gloo_processes(base_run, tmp_path):
    import socket

    import torch.multiprocessing as mp
    from cream_wsol.pseudo_boxes import generate_pseudo_boxes

    root, data, ckpt = base_run
    generate_pseudo_boxes(ckpt, str(tmp_path / "pb"), tau=0.3, progress=False)
    cfg = _rcfg(data, tmp_path / "pb", tmp_path / "ddp", epochs=1, batch_size=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_regress_worker, args=(2, port, cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "reg_rank0.pt"), torch.load(tmp_path / "reg_rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]) or "running" in k or "num_batches" in k, k  # BN stats are per rank
    ck = load_checkpoint(str(tmp_path / "ddp" / "regressor.pt"))
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert ck["global_step"] == 2  # 12 images, 2 ranks, batch 3: 2 steps per rank


def test_pseudo_box_input_size_defaults():
    from cream_wsol.pseudo_boxes import default_input_size
    from cream_wsol.train import preset

    assert default_input_size(preset("cub-resnet50")) == 448  # the paper's pseudo-box size
    assert default_input_size(preset("ilsvrc-vgg16")) == 448
    assert default_input_size(preset("synthetic", image_size=64)) == 64


def test_regress_preset_lr_rule():
    from cream_wsol.train import PRESETS

    scratch = RegressConfig.from_preset("synthetic")
    assert scratch.lr == pytest.approx(0.1 * PRESETS["synthetic"]["lr"]) and scratch.classifier_lr_mult == 1.0
    lite0 = RegressConfig.from_preset("cub-efficientnet_lite0")  # pretrained: the same rule (REGRESSOR_LR_NOTE)
    assert lite0.lr == pytest.approx(0.1 * PRESETS["cub-efficientnet_lite0"]["lr"]) and lite0.classifier_lr_mult == 1.0
    assert RegressConfig.from_preset("synthetic", lr=0.5).lr == 0.5  # an explicit value wins


def test_regressor_head_starts_at_the_centred_box():
    from cream_wsol.models import build_model
    from cream_wsol.regress import BoxRegressor

    torch.manual_seed(0)
    reg = BoxRegressor(build_model("small", 1))
    x = torch.randn(3, 3, 64, 64) * 10  # whatever the feature scale
    assert torch.equal(reg(x), torch.tensor([[0.25, 0.25, 0.75, 0.75]]).expand(3, 4))


def test_regressor_config_head_init_is_checked():
    from cream_wsol.regress import _build

    with pytest.raises(ValueError, match="head_init"):
        _build(RegressConfig(arch="small", head_init="normal"), None)
