"""Every ``cream-wsol`` subcommand against the mistakes people make at the command
line: wrong paths, unknown names, non-positive counts, malformed numbers and
KEY=VALUE pairs, a checkpoint of another kind or arch.

Each row must give exit 2, exactly one ``error:`` line that names the argument and
the accepted values, no traceback, and leave nothing in ``--out`` (the checks run
before any data is generated or loaded, so the out folder is not even created).
The rows run ``cli.main`` in-process (an exception escaping it fails the test, as a
traceback would); two rows also run as a real process.

``reproduce``'s rows are kept apart (REPRODUCE_ROWS): its options are being
reshaped by the one-pipeline reproduce issue, and those rows are the checks that
must still hold after it.
"""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cream_kernels")

from cream_wsol.cli import main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_data):
    """Paths the rows refer to: real data, and wrong files of every kind."""
    root = tmp_path_factory.mktemp("cli-errors")
    data_root, meta_root = tiny_data
    p = {"data": str(data_root), "meta": str(meta_root), "missing": str(root / "no-such-thing")}
    empty = root / "empty"
    empty.mkdir()
    p["empty"] = str(empty)  # a folder without checkpoint.pt, splits or pseudo boxes
    p["regck"] = str(root / "regressor.pt")  # a box-regressor checkpoint, not a training one
    torch.save({"format": "cream_wsol.regressor/1", "arch": "small", "config": {}}, p["regck"])
    p["statedict"] = str(root / "resnet-like.pth")  # a plain ImageNet-style state dict of another arch
    torch.save({"layer1.0.conv1.weight": torch.zeros(2, 2, 1, 1), "fc.weight": torch.zeros(3, 2)}, p["statedict"])
    # the keys of torchvision's vgg16_bn (tiny tensors: only keys and ranks are read before the shapes)
    bn, i = {}, 0
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            i += 1
            continue
        bn[f"features.{i}.weight"], bn[f"features.{i}.bias"] = torch.zeros(1, 1, 1, 1), torch.zeros(1)
        for k in ("weight", "bias", "running_mean", "running_var"):
            bn[f"features.{i + 1}.{k}"] = torch.zeros(1)
        i += 3
    p["vgg16bn"] = str(root / "vgg16_bn.pth")
    torch.save(bn, p["vgg16bn"])
    p["otherarch"] = str(root / "resnet50-run.pt")  # a training checkpoint whose arch is resnet50
    torch.save({"format": "cream_wsol.checkpoint/1", "arch": "resnet50", "config": {"arch": "resnet50"}},
               p["otherarch"])
    pb = root / "pseudo"  # looks like pseudo-boxes' output (regress checks --evaluate before training)
    (pb / "train").mkdir(parents=True)
    (pb / "train" / "localization.txt").write_text("")
    (pb / "pseudo_boxes.json").write_text(json.dumps({"data_root": str(data_root), "split": "train"}))
    p["pseudo"] = str(pb)
    return p


TRAIN = ["train", "--preset", "synthetic-quick", "--no-progress"]
DATA = ["--data-root", "{data}", "--metadata-root", "{meta}"]
EVAL = ["evaluate", "{regck}", "--no-progress"]  # rows that must fail before the checkpoint is read
PSEUDO = ["pseudo-boxes", "{regck}", "--no-progress"]
REGRESS = ["regress", "--pseudo-boxes", "{empty}", "--data-root", "{data}", "--no-progress"]

# (id, argv, substrings of the one error line: the argument and what it accepts)
ROWS = [
    # train: counts, numbers, names, pairs
    ("train-epochs-neg", TRAIN + ["--epochs", "-1"], ["--epochs", "integer >= 1"]),
    ("train-epochs-zero", TRAIN + ["--epochs", "0"], ["--epochs", "integer >= 1"]),
    ("train-epochs-malformed", TRAIN + ["--epochs", "two"], ["--epochs", "integer >= 1"]),
    ("train-batch-zero", TRAIN + ["--batch-size", "0"], ["--batch-size", "integer >= 1"]),
    ("train-lr-neg", TRAIN + ["--lr", "-0.1"], ["--lr", "number > 0"]),
    ("train-lr-nan", TRAIN + ["--lr", "nan"], ["--lr", "number > 0"]),
    ("train-lambda-range", TRAIN + ["--lambda", "1.5"], ["--lambda", "[0, 1]"]),
    ("train-workers-neg", TRAIN + ["--num-workers", "-1"], ["--num-workers", "integer >= 0"]),
    ("train-amp-unknown", TRAIN + ["--amp", "fp8"], ["--amp", "bf16", "fp16"]),
    ("eval-amp-unknown", EVAL + ["--amp", "int8"], ["--amp", "bf16", "fp16"]),
    ("eval-workers-neg", EVAL + ["--num-workers", "-2"], ["--num-workers", "integer >= 0"]),
    ("train-threads-zero", TRAIN + ["--threads", "0"], ["--threads", "integer >= 1"]),
    ("train-unknown-preset", ["train", "--preset", "cub-vgg19"], ["--preset", "cub-vgg16"]),
    ("train-unknown-arch", TRAIN + ["--arch", "vgg19"], ["--arch", "vgg16", "resnet50", "small"]),
    ("train-unknown-method", TRAIN + ["--method", "spg2"], ["--method", "adl"]),
    ("train-method-param-malformed", TRAIN + ["--method", "adl", "--method-param", "drop_rate=abc"],
     ["--method-param", "drop_rate", "number"]),
    ("train-method-param-no-eq", TRAIN + ["--method", "adl", "--method-param", "drop_rate"],
     ["--method-param", "KEY=VALUE", "drop_rate", "threshold"]),
    ("train-method-param-unknown-key", TRAIN + ["--method", "adl", "--method-param", "rate=0.5"],
     ["--method-param", "drop_rate", "threshold"]),
    ("train-method-param-range", TRAIN + ["--method", "adl", "--method-param", "drop_rate=2"],
     ["--method-param", "[0, 1]"]),
    ("train-device", TRAIN + ["--device", "gpu0"], ["--device", "cpu", "cuda:N"]),
    ("train-pretrained-both", TRAIN + ["--pretrained", "{statedict}", "--no-pretrained"],
     ["--pretrained", "--no-pretrained"]),
    # train: paths
    ("train-data-root-missing", TRAIN + ["--data-root", "{missing}", "--metadata-root", "{meta}"],
     ["--data-root", "does not exist"]),
    ("train-metadata-root-missing", TRAIN + ["--data-root", "{data}", "--metadata-root", "{missing}"],
     ["--metadata-root", "does not exist"]),
    ("train-metadata-root-empty", TRAIN + ["--data-root", "{data}", "--metadata-root", "{empty}"],
     ["--metadata-root", "train/image_ids.txt", "splits"]),
    ("train-data-root-alone", TRAIN + ["--data-root", "{data}"], ["--data-root", "--metadata-root"]),
    ("train-real-preset-no-data", ["train", "--preset", "cub-resnet50"], ["--data-root", "synthetic"]),
    ("train-pretrained-missing", TRAIN + ["--pretrained", "{missing}"], ["--pretrained", "does not exist"]),
    ("train-pretrained-package-not-lite0", TRAIN + ["--pretrained", "package"],
     ["--pretrained", "efficientnet_lite0", "state dict file"]),
    # train: a checkpoint / state dict of another arch
    ("train-pretrained-vgg16bn-as-vgg16", TRAIN + ["--arch", "vgg16", "--pretrained", "{vgg16bn}"],
     ["--pretrained", "13 conv and 13 batch-norm", "vgg16"]),
    ("train-pretrained-other-arch", TRAIN + ["--pretrained", "{statedict}"], ["--pretrained", "small"]),
    ("train-resume-other-arch", TRAIN + DATA + ["--resume", "{otherarch}"], ["--resume", "resnet50", "--arch"]),
    ("train-resume-regressor", TRAIN + DATA + ["--resume", "{regck}"], ["--resume", "training checkpoint"]),
    ("train-resume-missing", TRAIN + DATA + ["--resume", "{missing}"], ["--resume", "does not exist"]),
    # evaluate
    ("evaluate-missing-checkpoint", ["evaluate", "{missing}"], ["checkpoint", "does not exist", "run folder"]),
    ("evaluate-folder-without-checkpoint", ["evaluate", "{empty}"], ["checkpoint", "checkpoint.pt"]),
    ("evaluate-regressor-checkpoint", ["evaluate", "{regck}"], ["checkpoint", "regressor", "cream-wsol train"]),
    ("evaluate-state-dict", ["evaluate", "{statedict}"], ["checkpoint", "state dict", "cream-wsol train"]),
    ("evaluate-unknown-map", EVAL + ["--maps", "cam,creams"], ["--maps", "creams", "free_calibrated"]),
    ("evaluate-sigma-neg", EVAL + ["--sigma", "-3"], ["--sigma", "'auto'", "number > 0"]),
    ("evaluate-sigma-malformed", EVAL + ["--sigma", "eight"], ["--sigma", "'auto'", "number > 0"]),
    ("evaluate-sigma-grid", EVAL + ["--sigma-grid", "4,x"], ["--sigma-grid", "numbers > 0"]),
    ("evaluate-sigma-grid-zero", EVAL + ["--sigma-grid", "0,4"], ["--sigma-grid", "numbers > 0"]),
    ("evaluate-iters-neg", EVAL + ["--iters", "-1"], ["--iters", "integer >= 0"]),
    ("evaluate-batch-zero", EVAL + ["--batch-size", "0"], ["--batch-size", "integer >= 1"]),
    ("evaluate-curve-interval", EVAL + ["--curve-interval", "0"], ["--curve-interval", "(0, 1)"]),
    ("evaluate-max-images-zero", EVAL + ["--max-images", "0"], ["--max-images", "integer >= 1"]),
    ("evaluate-target", EVAL + ["--target", "predicted"], ["--target", "gt", "pred", "both"]),
    ("evaluate-select-on-itself", EVAL + ["--select-on", "test"], ["--select-on", "--split"]),
    ("evaluate-metadata-root-missing", EVAL + ["--metadata-root", "{missing}"], ["--metadata-root", "does not exist"]),
    ("evaluate-split-unknown", EVAL + ["--metadata-root", "{meta}", "--split", "tset"],
     ["--metadata-root", "tset", "test", "train", "val"]),
    ("evaluate-select-on-unknown", EVAL + ["--metadata-root", "{meta}", "--select-on", "vla"],
     ["--metadata-root", "vla", "val"]),
    # pseudo-boxes
    ("pseudo-missing-checkpoint", ["pseudo-boxes", "{missing}", "--out", "{out}"], ["checkpoint", "does not exist"]),
    ("pseudo-regressor-checkpoint", ["pseudo-boxes", "{regck}", "--out", "{out}"], ["checkpoint", "regressor"]),
    ("pseudo-input-size", PSEUDO + ["--out", "{out}", "--input-size", "8"], ["--input-size", "integer >= 16"]),
    ("pseudo-tau", PSEUDO + ["--out", "{out}", "--tau", "1.5"], ["--tau", "[0, 1]"]),
    ("pseudo-batch-zero", PSEUDO + ["--out", "{out}", "--batch-size", "0"], ["--batch-size", "integer >= 1"]),
    ("pseudo-curve-malformed", PSEUDO + ["--out", "{out}", "--curve-interval", "fine"], ["--curve-interval", "(0, 1)"]),
    ("pseudo-data-root-missing", PSEUDO + ["--out", "{out}", "--data-root", "{missing}"],
     ["--data-root", "does not exist"]),
    ("pseudo-no-out", PSEUDO, ["--out", "required"]),
    # regress
    ("regress-pseudo-missing", ["regress", "--pseudo-boxes", "{missing}"], ["--pseudo-boxes", "does not exist"]),
    ("regress-pseudo-empty", REGRESS, ["--pseudo-boxes", "localization.txt", "pseudo-boxes --out"]),
    ("regress-no-data-root", ["regress", "--pseudo-boxes", "{empty}"], ["--data-root"]),
    ("regress-unknown-arch", REGRESS + ["--arch", "resnet18"], ["--arch", "resnet50", "small"]),
    ("regress-unknown-preset", REGRESS + ["--preset", "cub"], ["--preset", "cub-resnet50"]),
    ("regress-epochs-zero", REGRESS + ["--epochs", "0"], ["--epochs", "integer >= 1"]),
    ("regress-batch-neg", REGRESS + ["--batch-size", "-2"], ["--batch-size", "integer >= 1"]),
    ("regress-lr-malformed", REGRESS + ["--lr", "1e-3x"], ["--lr", "number > 0"]),
    ("regress-evaluate-regressor", ["regress", "--pseudo-boxes", "{pseudo}", "--evaluate", "{regck}"],
     ["--evaluate", "regressor", "cream-wsol train"]),
    ("regress-evaluate-missing", ["regress", "--pseudo-boxes", "{pseudo}", "--evaluate", "{missing}"],
     ["--evaluate", "does not exist"]),
    ("regress-pretrained-missing", ["regress", "--pseudo-boxes", "{pseudo}", "--pretrained", "{missing}"],
     ["--pretrained", "does not exist"]),
    ("regress-data-root-missing", ["regress", "--pseudo-boxes", "{empty}", "--data-root", "{missing}"],
     ["--data-root", "does not exist"]),
    # presets and the program itself
    ("presets-extra-argument", ["presets", "--all"], ["unrecognized arguments", "--all"]),
    ("unknown-command", ["trian"], ["invalid choice", "train", "evaluate"]),
]

# reproduce's own options (reshaped by the one-pipeline reproduce issue; these must hold after it)
REPRODUCE_ROWS = [
    ("reproduce-unknown-backbone", ["reproduce", "--quick", "--backbones", "vgg"], ["--backbones", "small", "lite0"]),
    ("reproduce-unknown-regime", ["reproduce", "--quick", "--regimes", "ilsvrc"], ["--regimes", "cub", "cluttered"]),
    ("reproduce-epochs-neg", ["reproduce", "--quick", "--epochs", "-1"], ["--epochs", "integer >= 1"]),
    ("reproduce-epochs-zero", ["reproduce", "--quick", "--epochs", "0"], ["--epochs", "integer >= 1"]),
    ("reproduce-seeds-malformed", ["reproduce", "--quick", "--seeds", "0,one"], ["--seeds", "integers >= 0"]),
    ("reproduce-seed-neg", ["reproduce", "--quick", "--seed", "-1"], ["--seed", "integer >= 0"]),
    ("reproduce-jobs-zero", ["reproduce", "--quick", "--jobs", "0"], ["--jobs", "integer >= 1"]),
]


def _argv(template, files, out):
    argv = [a.format(out=out, **files) for a in template]
    if "--out" not in argv and argv[0] in ("train", "reproduce", "regress", "evaluate"):
        argv += ["--out", out if argv[0] != "evaluate" else os.path.join(out, "metrics.json")]
    return argv


def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, expect", [r[1:] for r in ROWS + REPRODUCE_ROWS],
                         ids=[r[0] for r in ROWS + REPRODUCE_ROWS])
def test_cli_mistake_gives_one_error_line(argv, expect, files, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, err = _run(_argv(argv, files, out), capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for s in expect:
        assert s in lines[0], f"{s!r} not in {lines[0]!r}"
    # the checks come before any slow work: nothing a later run or evaluate could mistake for a result
    assert not os.path.exists(out) or not os.listdir(out), os.listdir(out)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "python"), REPO, env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("argv", [["train", "--epochs", "-1"], ["reproduce", "--quick", "--epochs", "-1"],
                                  ["train", "--method", "adl", "--method-param", "drop_rate=abc"]],
                         ids=["train-epochs", "reproduce-epochs", "method-param"])
def test_cli_mistake_as_a_process(argv, tmp_path):
    out = str(tmp_path / "out")
    res = subprocess.run([sys.executable, "-m", "cream_wsol"] + argv + ["--out", out], capture_output=True,
                         text=True, env=_env(), timeout=300, cwd=str(tmp_path))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert len([ln for ln in res.stderr.splitlines() if "error:" in ln]) == 1
    assert not os.path.exists(out)


def test_train_config_rejects_non_positive_counts(tiny_data, tmp_path):
    """The API behind the CLI: train() refuses epochs / batch_size < 1 before writing anything
    (epochs=0 used to return the path of a checkpoint that was never written)."""
    from _tiny import tiny_cfg
    from cream_wsol.train import train

    for kw, name in (({"epochs": 0}, "epochs"), ({"epochs": -1}, "epochs"), ({"batch_size": 0}, "batch_size")):
        out = tmp_path / name
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            train(tiny_cfg(tiny_data, out, **kw), resume=None)
        assert not out.exists()


def test_reproduce_api_rejects_non_positive_epochs(tmp_path):
    from cream_wsol.reproduce import reproduce

    with pytest.raises(ValueError, match="epochs.* >= 1"):
        reproduce(str(tmp_path / "r"), quick=True, epochs=-1, progress=False, log=lambda *a, **k: None)
    assert not (tmp_path / "r").exists()


def test_evaluate_sigma_auto(tiny_data, tmp_path, capsys):
    """`cream-wsol evaluate RUN --sigma auto` works (argparse used to refuse it as a float,
    while the error for --sigma -3 named 'auto')."""
    from _tiny import IMAGE

    run = str(tmp_path / "run")
    assert main(["train", "--preset", "synthetic-quick", "--data-root", str(tiny_data[0]), "--metadata-root",
                 str(tiny_data[1]), "--image-size", str(IMAGE), "--batch-size", "8", "--epochs", "1", "--out", run,
                 "--no-progress"]) == 0
    metrics = str(tmp_path / "metrics.json")
    assert main(["evaluate", run, "--split", "val", "--maps", "cam,cream,free", "--sigma", "auto",
                 "--curve-interval", "0.05", "--out", metrics, "--no-progress"]) == 0
    assert "| cream |" in capsys.readouterr().out
    saved = json.load(open(metrics))
    assert saved["specs"]["cream"]["sigma"] == "auto" and saved["specs"]["free"]["sigma"] == "auto"
    for name in ("cream", "free"):
        assert 0.0 <= saved["metrics"][name]["MaxBoxAccV2"] <= 100.0
