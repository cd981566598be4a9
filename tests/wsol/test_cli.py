"""The ``cream-wsol`` command line: ``reproduce --quick`` in a temp folder (seconds),
train / evaluate on a tiny synthetic set, ``python -m cream_wsol``; the full
reproduction is marked slow."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("cream_kernels")

from cream_wsol.cli import main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "python"), REPO, env.get("PYTHONPATH", "")])
    return env


def test_python_m_cream_wsol_help():
    out = subprocess.run([sys.executable, "-m", "cream_wsol", "--help"], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("train", "evaluate", "reproduce"):
        assert cmd in out.stdout


def test_presets_lists_paper_schedules(capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert "cub-vgg16" in text and "epochs=50" in text and "lr_step=15" in text
    assert "ilsvrc-resnet50" in text and "openimages-inceptionv3" in text and "synthetic" in text


def _check_reproduce_outputs(out):
    for f in ("report.md", "results.json", "figures/fig1_histograms.png", "figures/fig5_maps.png",
              "figures/fig6_boxacc_tau.png", "train/checkpoint.pt"):
        assert os.path.isfile(os.path.join(out, f)), f
    for f in os.listdir(os.path.join(out, "figures")):
        assert os.path.getsize(os.path.join(out, "figures", f)) < 200_000, f
    report = open(os.path.join(out, "report.md")).read()
    assert "BoxAcc@30" in report and "IoU30" not in report  # the labels evaluate prints
    for title in ("Table 1", "Table 5", "Table 7", "Table 8", "dot vs cosine", "training-free", "Fig. 1"):
        assert title in report, title
    res = json.load(open(os.path.join(out, "results.json")))
    for name in ("CAM", "CREAM", "Calibrated map", "CREAM (training-free)", "T=1", "T=4", "lambda=0.2",
                 "lambda=1", "cosine sigma=8", "dot sigma=8"):
        m = res["metrics_test"][name]
        assert 0 <= m["MaxBoxAccV2"] <= 100 and 0 <= m["PxAP"] <= 100, name
    assert set(res["time_per_image_ms"]) == {"0", "1", "2", "3", "4"}
    return res


def test_reproduce_quick(tmp_path, capsys):
    out = str(tmp_path / "repro")
    assert main(["reproduce", "--quick", "--out", out, "--no-progress", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Table 1" in printed and "report:" in printed
    res = _check_reproduce_outputs(out)
    assert res["quick"] is True and res["seed"] == 1


def test_train_and_evaluate_commands(tmp_path, capsys):
    from cream_wsol.data import make_synthetic

    data_root, meta_root = make_synthetic(str(tmp_path / "data"), seed=0, num_classes=3, n_train=16, n_val=4,
                                          n_test=6, image_size=32)
    run = str(tmp_path / "run")
    assert main(["train", "--preset", "synthetic-quick", "--data-root", data_root, "--metadata-root", meta_root,
                 "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--out", run, "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["checkpoint"].endswith("checkpoint.pt")
    metrics = str(tmp_path / "metrics.json")
    assert main(["evaluate", run, "--split", "val", "--maps", "cam,cream,calibrated,free", "--target", "both",
                 "--curve-interval", "0.01", "--out", metrics, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| cream |" in text and "| cam (predicted class) |" in text and "PxAP" in text
    saved = json.load(open(metrics))
    assert set(saved["metrics"]) == {"cam", "cream", "calibrated", "free", "cam (predicted class)",
                                     "cream (predicted class)", "calibrated (predicted class)",
                                     "free (predicted class)"}
    assert saved["classification"]["num_images"] == 4
    # sigma / tau chosen on val, test reported; per-image maps and figures written
    maps = str(tmp_path / "maps")
    assert main(["evaluate", run, "--split", "test", "--maps", "cam,cream", "--select-on", "val", "--sigma-grid",
                 "4,8", "--curve-interval", "0.05", "--save-maps", maps, "--out", metrics, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "chosen on val" in text and "sigma (val)" in text and "tau (val)" in text
    assert json.load(open(metrics))["selection"]["cream"]["sigma"] in (4.0, 8.0)
    for f in ("boxes.json", "fig1_histograms.png", "fig5_maps.png", "fig6_boxacc_tau.png"):
        assert os.path.isfile(os.path.join(maps, f)), f
    assert len(os.listdir(os.path.join(maps, "maps"))) == 2 and len(json.load(open(
        os.path.join(maps, "boxes.json")))["images"]) == 6


def test_train_needs_data_for_real_presets(tmp_path, capsys):
    assert main(["train", "--preset", "cub-resnet50", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--data-root" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_full(tmp_path):
    out = str(tmp_path / "full")
    assert main(["reproduce", "--out", out, "--no-progress"]) == 0
    res = _check_reproduce_outputs(out)
    assert res["classification"]["top1"] > 90.0
