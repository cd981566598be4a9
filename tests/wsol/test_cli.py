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


def test_reproduce_quick_command(tmp_path, capsys):
    """The CLI's options reach reproduce (one tiny run; tests/wsol/test_reproduce.py runs
    the whole --quick against its committed results)."""
    out = str(tmp_path / "repro")
    assert main(["reproduce", "--quick", "--out", out, "--no-progress", "--regimes", "cub", "--backbones", "small",
                 "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "estimate:" in printed and "## The paper's claims" in printed and "report:" in printed
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["quick"] is True and res["seeds"] == [3] and res["configs"] == [["cub", "small"]]
    assert os.path.isfile(os.path.join(out, "runs", "cub-small-s3", "run.json"))
    report = open(os.path.join(out, "report.md")).read()
    assert "inconclusive (1 seed)" in report
    assert "BoxAcc@30" in report and "IoU30" not in report  # the labels evaluate prints


def test_reproduce_rejects_unknown_names(tmp_path, capsys):
    # exit 2 with one error line (tests/wsol/test_cli_errors.py has every subcommand's mistakes)
    assert main(["reproduce", "--quick", "--out", str(tmp_path), "--regimes", "ilsvrc", "--no-progress"]) == 2
    assert "--regimes" in capsys.readouterr().err
    assert main(["reproduce", "--quick", "--out", str(tmp_path), "--backbones", "vgg", "--no-progress"]) == 2
    assert "--backbones" in capsys.readouterr().err


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
    """The whole reproduce (about 30 min on an idle 2-core CPU)."""
    out = str(tmp_path / "full")
    assert main(["reproduce", "--out", out, "--no-progress", "--jobs", "2"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    assert len(res["runs"]) == 12
    for agg in res["aggregate"].values():
        assert agg["classification_test"]["top1"]["mean"] > 80.0
