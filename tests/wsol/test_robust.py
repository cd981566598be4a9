"""Long runs on real data without losing work or being misled (issue 13), on the tiny_data
synthetic set and the small CPU net (seconds): SIGINT / SIGTERM to a training
subprocess then resume is bit-exact, the time-based checkpoint, the pre-flight file
check, refused resumes, the pretrained requirement, the derived crop, absolute data
paths, validation during training, ``--save-maps``, ``--select-on val`` and the
metric labels."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("cream_kernels")

from cream_wsol import train as train_mod  # noqa: E402
from cream_wsol.cli import main  # noqa: E402
from cream_wsol.evaluate import MapSpec, evaluate_checkpoint, format_metrics_table  # noqa: E402
from cream_wsol.preflight import BadFilesError  # noqa: E402
from cream_wsol.train import (ResumeMismatchError, TrainConfig, load_checkpoint, load_trained,  # noqa: E402
                              preset, train)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _tiny import IMAGE, assert_same_weights, tiny_cfg as _cfg  # noqa: E402


def _same_run_state(a: dict, b: dict):
    assert_same_weights(a, b)
    assert a["scheduler"] == b["scheduler"] and a["global_step"] == b["global_step"]


def _env():
    """The children's environment; they also run with cwd "/", since `python -c` puts the cwd
    first on sys.path, which in a checkout would be the (possibly unbuilt) source tree."""
    env = dict(os.environ)
    # the child imports exactly the packages this process imported (the installed ones in CI,
    # the source tree with its in-place build in a checkout): the same kernels on both sides
    import cream_kernels
    import cream_wsol

    roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__))) for m in (cream_kernels, cream_wsol)]
    env["PYTHONPATH"] = os.pathsep.join(roots + [env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


_TRAIN_CHILD = r"""
import json, sys
from cream_wsol.train import TrainConfig, train
cfg = TrainConfig.from_dict(json.load(open(sys.argv[1])))
r = train(cfg, resume=sys.argv[2] or None)
print("RESULT " + json.dumps({"checkpoint": r["checkpoint"], "log": r["log"]}))
"""


def _train_child(cfg_file, resume=""):
    """train() in a fresh process (same environment as the signal child); its result and stdout."""
    r = subprocess.run([sys.executable, "-c", _TRAIN_CHILD, str(cfg_file), resume or ""], env=_env(),
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return dict(json.loads(line[len("RESULT "):]), stdout=r.stdout)


_CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from cream_wsol.train import TrainConfig, TrainingInterrupted, train
cfg = TrainConfig.from_dict(json.load(open(sys.argv[1])))
ready, go = sys.argv[2], sys.argv[3]

def on_step(info):
    if info["global_step"] == 4:  # epoch 2, step 1 of 3: mid-epoch
        open(ready, "w").close()
        t0 = time.time()
        while not os.path.exists(go) and time.time() - t0 < 60:
            time.sleep(0.01)

try:
    train(cfg, resume=None, on_step=on_step)
except TrainingInterrupted as exc:
    sys.exit(128 + exc.signum)
sys.exit(0)
"""


# ------------------------------------------------------------------ signals
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_epoch_saves_and_resume_is_bit_exact(tiny_data, tmp_path, sig, capsys):
    """A real signal from another process while step 4 (of 6) runs: one line, an
    exact-resume checkpoint, exit code 128 + signal; the resumed run ends with the
    same weights, embeddings and optimizer state as an uninterrupted one."""
    # the uninterrupted run, the interrupted one and the resume each run in a fresh child
    # process with the same environment, so no state left by earlier tests of this
    # session (thread pools, imports) can tell them apart
    full_file = tmp_path / "full.json"
    full_file.write_text(json.dumps(_cfg(tiny_data, tmp_path / "full").to_dict()))
    full = _train_child(full_file)
    cfg = _cfg(tiny_data, tmp_path / "sig")
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(cfg_file), str(ready), str(go)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        t0 = time.time()
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.time() - t0 < 120, "the child never reached step 4"
            time.sleep(0.01)
        proc.send_signal(sig)  # queued before the child can see `go`: it arrives inside step 4
        go.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + int(sig), err
    lines = [ln for ln in out.splitlines() if ln.startswith(name)]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"{name}: stopped at epoch 2 step 1 (global step 4)")
    assert str(tmp_path / "sig" / "checkpoint.pt") in lines[0] and "resume" in lines[0]
    assert "Traceback" not in err
    ck = load_checkpoint(str(tmp_path / "sig"))
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 1, 4)
    assert not [n for n in os.listdir(tmp_path / "sig") if n.startswith(".")]  # no temp file left

    resumed = _train_child(cfg_file, resume="auto")
    printed = resumed["stdout"]
    assert f"resuming from {tmp_path / 'sig' / 'checkpoint.pt'} at epoch 2 step 1" in printed
    _same_run_state(load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"]))
    # the log of the resumed run is the uninterrupted run's (timings aside)
    strip = (lambda log: [{k: v for k, v in e.items() if not k.endswith("_s")} for e in log])
    assert strip(resumed["log"]) == strip(full["log"])


def test_signal_handler_sets_a_flag_then_a_second_signal_stops_at_once():
    stop = train_mod._StopSignals()
    with stop:
        assert signal.getsignal(signal.SIGINT) == stop._handler
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.parametrize("bad", [dict(ckpt_every_minutes=-1.0), dict(ckpt_every_minutes=float("nan")),
                                 dict(val_every_steps=-2), dict(ckpt_every_steps=1.5), dict(val_max_images=0)])
def test_bad_long_run_settings_name_the_setting(tiny_data, tmp_path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        train(_cfg(tiny_data, tmp_path / "x", **bad))
    assert not os.path.exists(tmp_path / "x")


def test_time_based_checkpoint(tiny_data, tmp_path, monkeypatch):
    """Default every 10 minutes: a clock that jumps 11 minutes during step 4 gives a
    mid-epoch checkpoint at step 4; without the jump the last one is the epoch end."""
    assert TrainConfig().ckpt_every_minutes == 10.0

    class Crash(RuntimeError):
        pass

    for jump, want in ((11 * 60.0, (1, 1, 4)), (0.0, (1, 0, 3))):
        now = [1000.0]
        monkeypatch.setattr(train_mod, "_clock", lambda: now[0])

        def on_step(info):
            if info["global_step"] == 4:
                now[0] += jump
            if info["global_step"] == 5:
                raise Crash

        out = tmp_path / f"t{int(jump)}"
        with pytest.raises(Crash):
            train(_cfg(tiny_data, out), on_step=on_step)
        ck = load_checkpoint(str(out))
        assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == want


# ------------------------------------------------------------------ pre-flight
def test_preflight_lists_every_bad_file_at_once(tiny_data, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(os.path.dirname(tiny_data[0]), root)
    data, meta = str(root / "data"), str(root / "metadata")
    ids = {s: open(os.path.join(meta, s, "image_ids.txt")).read().split() for s in ("train", "val")}
    missing = os.path.join(data, ids["train"][5])
    corrupt = os.path.join(data, ids["val"][2])
    os.remove(missing)
    with open(corrupt, "wb") as fh:
        fh.write(b"this is not a PNG file")
    out = tmp_path / "run"
    with pytest.raises(BadFilesError) as ei:
        train(_cfg((data, meta), out))
    msg = str(ei.value)
    assert missing in msg and corrupt in msg and "2 of the" in msg
    assert "missing" in msg and "not an image" in msg and "--no-file-check" in msg and "--data-root" in msg
    assert sorted(p for p, _ in ei.value.bad) == sorted([missing, corrupt])
    assert not os.path.exists(out / "checkpoint.pt")  # nothing trained
    assert len(open(out / "bad_files.txt").read().splitlines()) == 2
    # the CLI prints the same list and exits 2
    assert main(["train", "--preset", "synthetic-quick", "--data-root", data, "--metadata-root", meta,
                 "--image-size", str(IMAGE), "--out", str(tmp_path / "cli"), "--no-progress"]) == 2
    # skipping the check trains until the loader meets the missing file, which it names
    with pytest.raises(FileNotFoundError, match=ids["train"][5]):
        train(_cfg((data, meta), tmp_path / "nocheck", check_files=False, val_split=None))


# ------------------------------------------------------------------ resume
def test_mismatched_resume_is_refused_naming_each_difference(tiny_data, tmp_path, capsys):
    cfg = _cfg(tiny_data, tmp_path / "run", epochs=1)
    train(cfg)
    before = load_checkpoint(str(tmp_path / "run"))
    with pytest.raises(ResumeMismatchError) as ei:
        train(cfg.replace(epochs=2, lr=0.5, batch_size=4, model_kwargs={"width": 16}))
    msg = str(ei.value)
    for part in ("lr: checkpoint 0.01, now 0.5", "batch-size: checkpoint 8, now 4", "model-kwargs",
                 "--no-resume", "--out"):
        assert part in msg, part
    assert "epochs" not in msg  # more epochs is a legitimate resume
    with pytest.raises(ResumeMismatchError, match="arch: checkpoint 'small', now 'resnet50'"):
        train(cfg.replace(arch="resnet50", model_kwargs={}))  # refused before any state dict is loaded
    after = load_checkpoint(str(tmp_path / "run"))
    assert after["global_step"] == before["global_step"] and after["config"]["lr"] == 0.01
    # the CLI: exit 2 with the message; --no-resume starts over
    data, meta = tiny_data
    args = ["train", "--preset", "synthetic-quick", "--data-root", data, "--metadata-root", meta, "--image-size",
            str(IMAGE), "--batch-size", "8", "--epochs", "1", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "lr: checkpoint 0.02, now 0.5" in err and "--no-resume" in err and "--out" in err
    assert main(args + ["--lr", "0.5", "--no-resume"]) == 0
    assert load_checkpoint(str(tmp_path / "cli"))["config"]["lr"] == 0.5


def test_real_presets_need_pretrained_or_no_pretrained(tiny_data, tmp_path, capsys):
    data, meta = tiny_data
    for p in ("cub-vgg16", "ilsvrc-resnet50", "openimages-inceptionv3"):
        assert main(["train", "--preset", p, "--data-root", data, "--metadata-root", meta,
                     "--out", str(tmp_path / p), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "--pretrained FILE" in err and "--no-pretrained" in err, err
        assert not os.path.exists(tmp_path / p / "checkpoint.pt")
    assert main(["train", "--preset", "cub-vgg16", "--pretrained", "x.pth", "--no-pretrained", "--data-root", data,
                 "--metadata-root", meta, "--out", str(tmp_path / "both"), "--no-progress"]) == 2


def test_image_size_alone_sets_the_crop_and_sizes_are_printed(tiny_data, tmp_path, capsys):
    assert preset("cub-vgg16").crop_size == 224
    assert preset("cub-vgg16", image_size=112).crop_size == 112
    assert preset("cub-vgg16", image_size=112, crop_size=96).crop_size == 96
    assert preset("cub-vgg16", image_size=112).preset == "cub-vgg16"
    data, meta = tiny_data
    assert main(["train", "--preset", "synthetic-quick", "--data-root", data, "--metadata-root", meta,
                 "--image-size", "24", "--batch-size", "8", "--epochs", "1", "--out", str(tmp_path / "r"),
                 "--no-progress", "--no-val"]) == 0
    out = capsys.readouterr().out
    assert "input: train resize 27x27 -> random crop 24x24 + flip; eval/val resize 24x24; CAM 6x6" in out
    assert "validation off" in out


# ------------------------------------------------------------------ paths
def test_checkpoint_paths_are_absolute_and_evaluate_works_from_another_cwd(tiny_data, tmp_path, monkeypatch, capsys):
    data, meta = tiny_data
    base = os.path.dirname(data)
    monkeypatch.chdir(base)
    summary = train(_cfg(("data", "metadata"), "run-rel", epochs=1))  # relative paths on purpose
    ck = load_checkpoint(summary["checkpoint"])
    assert ck["config"]["data_root"] == data and ck["config"]["metadata_root"] == meta
    assert os.path.isabs(ck["config"]["out_dir"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = evaluate_checkpoint(os.path.join(base, "run-rel"), split="test", specs={"CAM": MapSpec("cam")},
                              progress=False, cam_curve_interval=0.05)
    assert res["classification"]["num_images"] == 9
    with pytest.raises(FileNotFoundError, match="--data-root / --metadata-root"):
        evaluate_checkpoint(os.path.join(base, "run-rel"), data_root=str(tmp_path / "nowhere"), progress=False)
    assert main(["evaluate", os.path.join(base, "run-rel"), "--metadata-root", str(tmp_path / "nowhere"),
                 "--no-progress"]) == 2
    assert "--metadata-root" in capsys.readouterr().err


# ------------------------------------------------------------------ validation
def test_validation_during_training_logs_and_keeps_the_best(tiny_data, tmp_path):
    out = tmp_path / "val"
    summary = train(_cfg(tiny_data, out, epochs=3, val_every_steps=2))
    log = summary["log"]
    epochs = [e for e in log if "step" not in e]
    steps = [e for e in log if "step" in e]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert [e["global_step"] for e in steps] == [2, 4, 8]  # 6 and 9 are epoch ends
    for e in log:
        assert 0 <= e["val_top1"] <= 100 and 0 <= e["val_MaxBoxAccV2"] <= 100 and 0 <= e["val_PxAP"] <= 100
    with open(out / "train_log.jsonl") as fh:
        assert [json.loads(ln) for ln in fh] == log
    best = summary["best"]
    assert best["metric"] == "val_MaxBoxAccV2"
    assert best["value"] == max(e["val_MaxBoxAccV2"] for e in log)
    bck = load_checkpoint(str(out / "best.pt"))
    assert bck["global_step"] == best["global_step"] and bck["best"]["value"] == best["value"]
    load_trained(str(out / "best.pt"))  # a full checkpoint
    # validation leaves training untouched: the same weights as a run without it
    plain = train(_cfg(tiny_data, tmp_path / "noval", epochs=3, val_split=None))
    assert plain["best"] is None and not os.path.exists(tmp_path / "noval" / "best.pt")
    _same_run_state(load_checkpoint(summary["checkpoint"]), load_checkpoint(plain["checkpoint"]))


# ------------------------------------------------------------------ evaluate
@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust-run")
    return train(_cfg(tiny_data, out, epochs=2))["checkpoint"]


def test_save_maps_writes_every_file(trained, tmp_path, tiny_data):
    d = tmp_path / "maps"
    specs = {"CAM": MapSpec("cam"), "CREAM": MapSpec("cream"), "CREAM (predicted class)": MapSpec("cream", target="pred")}
    res = evaluate_checkpoint(trained, split="test", specs=specs, progress=False, cam_curve_interval=0.05,
                              save_maps=str(d))
    ids = open(os.path.join(tiny_data[1], "test", "image_ids.txt")).read().split()
    folders = {"CAM": "CAM", "CREAM": "CREAM", "CREAM (predicted class)": "CREAM_predicted_class"}
    for name, folder in folders.items():
        for i in ids:
            stem = os.path.splitext(i)[0]
            m = np.load(d / "maps" / folder / f"{stem}.npy")
            assert m.shape == (IMAGE, IMAGE) and m.dtype == np.float32 and 0 <= m.min() <= m.max() <= 1
            assert os.path.getsize(d / "overlays" / folder / f"{stem}.png") > 0
    boxes = json.load(open(d / "boxes.json"))
    assert set(boxes["images"]) == set(ids)
    assert boxes["taus"]["CREAM"] == pytest.approx(res["metrics"]["CREAM"]["loc_tau"])
    for rec in boxes["images"].values():
        for name in folders:
            b = rec["maps"][name]["box"]
            assert len(b) == 4 and 0 <= b[0] <= b[2] < IMAGE and 0 <= b[1] <= b[3] < IMAGE
            assert 0 <= rec["maps"][name]["iou"] <= 1
    for f in ("fig1_histograms.png", "fig5_maps.png", "fig6_boxacc_tau.png"):
        assert 0 < os.path.getsize(d / f) < 200_000, f


def test_select_on_val_picks_sigma_and_tau_there(trained):
    specs = {"CAM": MapSpec("cam"), "CREAM": MapSpec("cream")}
    res = evaluate_checkpoint(trained, split="test", specs=specs, progress=False, cam_curve_interval=0.05,
                              select_on="val", sigma_grid=[2.0, 8.0, 32.0])
    sel = res["selection"]
    assert sel["CAM"]["sigma"] is None and sel["CAM"]["split"] == "val"
    grid = sel["CREAM"]["grid"]
    assert set(grid) == {"2", "8", "32"} and sel["CREAM"]["value"] == max(grid.values())
    assert sel["CREAM"]["sigma"] == float(next(k for k, v in grid.items() if v == max(grid.values())))
    assert res["specs"]["CREAM"]["sigma"] == sel["CREAM"]["sigma"]
    for n in specs:  # the tau-dependent metrics use the val tau
        assert res["metrics"][n]["loc_tau"] == pytest.approx(sel[n]["tau"])
    table = format_metrics_table(res["metrics"], res["has_masks"], res["has_boxes"], selection=sel)
    assert "sigma (val)" in table and "tau (val)" in table
    with pytest.raises(ValueError, match="the evaluated split itself"):
        evaluate_checkpoint(trained, split="val", specs=specs, progress=False, select_on="val")


def test_labels_match_and_predicted_rows_have_no_gt_known(trained):
    specs = {"cam": MapSpec("cam"), "cam (predicted class)": MapSpec("cam", target="pred")}
    res = evaluate_checkpoint(trained, split="test", specs=specs, progress=False, cam_curve_interval=0.05)
    table = format_metrics_table(res["metrics"], res["has_masks"], res["has_boxes"]).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[1:5] == ["MaxBoxAccV2", "BoxAcc@30", "BoxAcc@50", "BoxAcc@70"]
    pred = [c.strip() for c in table[3].strip("|").split("|")]
    assert pred[0] == "cam (predicted class)"
    assert pred[header.index("GT-known Loc")] == "-" and pred[header.index("Top-5 Loc")] == "-"
    assert pred[header.index("Top-1 Loc")] != "-"
    src = open(os.path.join(REPO, "python", "cream_wsol", "reproduce.py")).read()
    assert '"IoU30"' not in src and '"BoxAcc@30"' in src  # report.md uses evaluate's labels
