"""``cream-wsol reproduce`` on a user's wsolevaluation-format data set (issue 19): the
command end to end on a tiny generated CUB-format stand-in, its option errors, the paper's
numbers beside ours, and the ResNet50 fc rule. The embedded ``--quick`` run and its
committed fingerprint are in test_reproduce.py."""
import json
import os

import pytest

pytest.importorskip("cream_kernels")
torch = pytest.importorskip("torch")

from cream_wsol.cli import main  # noqa: E402
from cream_wsol.data import make_wsol_standin  # noqa: E402


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    return make_wsol_standin(str(root), "cub", seed=0, num_classes=4, n_train=16, n_val=8, n_test=8, image_size=64)


def _done_when(standin, out):
    """The issue's "Done when" command."""
    data_root, metadata_root, _ = standin
    return ["reproduce", "--data-root", data_root, "--metadata-root", metadata_root, "--dataset", "cub",
            "--arch", "small", "--no-pretrained", "--epochs", "2", "--image-size", "64", "--batch-size", "8",
            "--seeds", "0", "--out", out, "--no-progress", "--device", "cpu", "--threads", "1"]


def test_reproduce_on_a_wsolevaluation_folder(standin, tmp_path, capsys):
    out = str(tmp_path / "O")
    assert main(_done_when(standin, out)) == 0
    printed = capsys.readouterr().out
    assert "data: train 16 images, 4 classes, boxes; val 8 images, boxes; test 8 images, boxes" in printed
    assert "estimate: about" in printed and "timed training step of small at 64 px" in printed
    report = open(os.path.join(out, "report.md")).read()
    assert report.startswith("# CREAM reproduction on CUB (wsolevaluation format)")
    for title in ("## Table 1: CAM vs CREAM", "### Table 2/3 (CREAM_Reg)", "### Table 6 (pseudo boxes, train split)",
                  "## Table 5", "## Table 7", "## Table 8", "dot vs cosine"):
        assert title in report, title
    # the paper has no small CNN: the report says so instead of showing numbers
    assert "The paper has no Table 1 number for CUB with small" in report
    assert "The paper has no Table 6 number for CUB with small" in report
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["source"] == "folder" and res["configs"] == [["CUB", "small"]] and res["seeds"] == [0]
    (run,) = res["runs"]
    cfg = run["config"]
    assert (cfg["preset"], cfg["dataset"], cfg["epochs"], cfg["image_size"], cfg["crop_size"], cfg["batch_size"],
            cfg["pretrained"]) == ("cub-small", "cub", 2, 64, 64, 8, None)
    assert len(run["train_log"]) == 2 and run["selected_on_val"]["similarity"] in ("dot", "cosine")
    reg = run["paper_reg"]
    assert reg["_parts"] == ["pseudo", "reg"]  # no other methods on a folder unless --methods
    assert set(reg["Table 2/3 (CREAM_Reg)"]) == {"CAM", "CREAM_Base", "CREAM_Reg"}
    assert 0.0 <= reg["Table 2/3 (CREAM_Reg)"]["CREAM_Reg"]["GT-known Loc"] <= 100.0
    assert set(reg["Table 6 (pseudo boxes, train split)"]) == {"DDT (same backbone)", "CREAM_Base"}
    pseudo = json.load(open(os.path.join(out, "runs", "CUB-small-s0", "issue9", "run0", "pseudo_boxes",
                                         "pseudo_boxes.json")))
    assert pseudo["input_size"] == 128  # twice the training side, as the paper's 448 at 224
    # a second run reuses the finished one: same numbers, nothing retrained
    assert main(_done_when(standin, out)) == 0
    again = json.load(open(os.path.join(out, "results.json")))
    assert again["runs"][0]["reused"] and again["runs"][0]["metrics_test"] == run["metrics_test"]


@pytest.mark.parametrize("change, names", [
    ({"--dataset": "imagenet"}, ["--dataset", "cub, ilsvrc, openimages"]),
    ({"--arch": "alexnet"}, ["--arch", "vgg16", "small"]),
    ({"--epochs": "-1"}, ["--epochs", ">= 1"]),
    ({"--batch-size": "0"}, ["--batch-size"]),
    ({"--max-steps-per-epoch": "0"}, ["--max-steps-per-epoch"]),
    ({"--image-size": "16"}, ["--image-size", ">= 32"]),
    ({"--seeds": "x"}, ["--seeds"]),
    ({"--seeds": "-1"}, ["--seeds"]),
    ({"--jobs": "0"}, ["--jobs"]),
    ({"--methods": "has,bogus"}, ["--methods", "adl"]),
    ({"--data-root": "/nonexistent/images"}, ["--data-root", "/nonexistent/images"]),
    ({"--metadata-root": "/nonexistent/meta"}, ["--metadata-root"]),
    ({"--mask-root": "/nonexistent/masks"}, ["--mask-root"]),
    ({"--regimes": "cub"}, ["--regimes", "--dataset"]),
    ({"--quick": None}, ["--quick"]),
    ({"--arch": "vgg16", "--no-pretrained": "drop"}, ["--pretrained", "--no-pretrained"]),
    ({"--arch": "vgg16", "--no-pretrained": "drop", "--pretrained": "/nonexistent/vgg16.pth"}, ["--pretrained"]),
    ({"--pretrained": "/tmp/x.pth"}, ["--pretrained", "--no-pretrained"]),  # both given
    ({"--dataset": "drop"}, ["--dataset", "required"]),
])
def test_reproduce_option_errors(standin, tmp_path, capsys, change, names):
    """Every mistake: exit 2, one ``error:`` line naming the option (and what it accepts), no
    traceback, and no --out folder a later run could take for a result."""
    args = _done_when(standin, str(tmp_path / "O"))
    for opt, val in change.items():
        if opt in args:
            i = args.index(opt)
            if val == "drop":
                del args[i:i + (1 if opt.startswith("--no-") else 2)]
            else:
                args[i + 1] = val
        elif val is None:
            args.append(opt)
        elif val != "drop":
            args += [opt, val]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in names:
        assert n in err[0], (n, err[0])
    assert not os.path.exists(tmp_path / "O")


def test_embedded_option_errors(tmp_path, capsys):
    for args, name in ((["--regimes", "ilsvrc"], "--regimes"), (["--backbones", "vgg"], "--backbones"),
                       (["--dataset", "cub"], "--dataset"), (["--epochs", "0"], "--epochs"),
                       (["--methods", "foo"], "--methods"), (["--no-pretrained"], "--pretrained")):
        assert main(["reproduce", "--quick", "--out", str(tmp_path / "O"), "--no-progress"] + args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and name in err[0], err
    assert not os.path.exists(tmp_path / "O")


def test_metadata_problems_are_named_before_anything_slow(tmp_path, capsys):
    data_root, metadata_root, _ = make_wsol_standin(str(tmp_path / "d"), "cub", n_train=4, n_val=2, n_test=2,
                                                    image_size=32)
    os.remove(os.path.join(data_root, open(os.path.join(metadata_root, "val", "image_ids.txt")).readline().strip()))
    args = ["reproduce", "--data-root", data_root, "--metadata-root", metadata_root, "--dataset", "cub", "--arch",
            "small", "--out", str(tmp_path / "O"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data-root: image ") and " of val not found" in err
    assert not os.path.exists(tmp_path / "O")


def _agg(values):
    st = lambda v: {"mean": v, "std": None, "n": 1}  # noqa: E731
    return {"metrics_test": {n: {k: st(v) for k, v in m.items()} for n, m in values.items()},
            "time_per_image_ms": {str(t): st(1.0 + t) for t in range(5)},
            "paper_reg": {"Table 2/3 (CREAM_Reg)": {"CREAM_Reg": {"Top-1 Loc": st(61.0), "Top-5 Loc": st(70.0),
                                                                  "GT-known Loc": st(80.0)}},
                          "Table 6 (pseudo boxes, train split)": {"CREAM_Base": {"GT-known Loc": st(77.0)}}}}


def test_paper_numbers_beside_ours():
    from cream_wsol.reproduce import paper_tables

    maps = {n: {"MaxBoxAccV2": 50.0, "GT-known Loc": 60.0, "Top-1 Loc": 40.0}
            for n in ("CAM", "CREAM", "Calibrated map", "T=1", "T=3", "T=4", "lambda=0.2", "lambda=0.6",
                      "lambda=0.8", "lambda=0.99", "lambda=1", "CREAM (val-selected similarity, sigma)")}
    T = paper_tables({"CUB-vgg16": _agg(maps)}, [("CUB", "vgg16")], "cub")
    assert "| CAM | 50.0 | 63.7 |" in T["paper: table1"]
    assert "| CREAM (CREAM_Base) | 50.0 | 71.5 |" in T["paper: table1"]  # 63.7 + 7.8
    assert "| CREAM_Reg | 61.0 | 70.0 | 80.0 | 70.44 / 85.67 / 90.98 |" in T["paper: reg"]
    assert "| CREAM_Base | 77.0 | 86.7 |" in T["paper: table6"]
    assert "| 2 | 60.0 | 86.7 |" in T["paper: table7"] and "| 1 | 60.0 | 53.1 |" in T["paper: table8"]
    assert "67.4 / 86.7" in T["paper: table5"]
    # ResNet50 on ILSVRC: Tables 1, 2/3 and 6 exist, 5, 7 and 8 (VGG16 only) do not
    T = paper_tables({"ILSVRC-resnet50": _agg(maps)}, [("ILSVRC", "resnet50")], "ilsvrc")
    assert "| CAM | 50.0 | 63.7 |" in T["paper: table1"] and "55.66 / - / 69.31" in T["paper: reg"]
    assert "VGG16 on CUB and ILSVRC only" in T["paper: table7"]
    # OpenImages: PxAP in Table 1, no CREAM_Reg or pseudo-box numbers
    T = paper_tables({"OpenImages-inceptionv3": _agg({"CAM": {"PxAP": 55.0}})}, [("OpenImages", "inceptionv3")],
                     "openimages")
    assert "PxAP on test" in T["paper: table1"] and "| CAM | 55.0 | 63.2 |" in T["paper: table1"]
    assert T["paper: reg"].startswith("The paper has no Table 2/3")


def test_resnet50_keeps_the_imagenet_fc_only_when_it_fits(tmp_path):
    """wsolevaluation keeps ResNet50's ImageNet fc on ILSVRC (1000 classes) and drops it elsewhere."""
    from cream_wsol.models import build_model

    torch.manual_seed(0)
    imagenet = build_model("resnet50", 1000).state_dict()
    path = str(tmp_path / "r50.pth")
    torch.save(imagenet, path)
    ilsvrc = build_model("resnet50", 1000, pretrained=path)
    assert torch.equal(ilsvrc.fc.weight, imagenet["fc.weight"]) and torch.equal(ilsvrc.fc.bias, imagenet["fc.bias"])
    cub = build_model("resnet50", 200, pretrained=path)  # a new 200-way fc, the backbone loaded
    assert cub.fc.weight.shape == (200, 2048) and torch.equal(cub.conv1.weight, imagenet["conv1.weight"])


@pytest.mark.slow
def test_reproduce_cub_standin_vgg16_224(tmp_path):
    """docs/harness.md's CUB session on a CUB-format stand-in: VGG16 from random weights at the
    paper's 224 (pseudo boxes at 448), one epoch, on this CPU. Several minutes on 2 cores."""
    data_root, metadata_root, _ = make_wsol_standin(str(tmp_path / "d"), "cub", num_classes=4, n_train=16, n_val=4,
                                                    n_test=4, image_size=224)
    out = str(tmp_path / "O")
    assert main(["reproduce", "--data-root", data_root, "--metadata-root", metadata_root, "--dataset", "cub",
                 "--arch", "vgg16", "--no-pretrained", "--epochs", "1", "--batch-size", "8", "--out", out,
                 "--no-progress", "--device", "cpu"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    cfg = res["runs"][0]["config"]
    assert (cfg["preset"], cfg["image_size"], cfg["crop_size"]) == ("cub-vgg16", 224, 224)
    report = open(os.path.join(out, "report.md")).read()
    assert "| CAM | " in report and "63.7 |" in report  # the paper's CUB VGG16 CAM beside ours
    assert "70.44 / 85.67 / 90.98" in report and "### Table 6 (pseudo boxes, train split)" in report


def test_resume_point_is_the_one_rule(tmp_path):
    """Continue a checkpoint written with the same settings; clear a stale one and its logs."""
    from cream_wsol.runs import TrainConfig, resume_point, save_checkpoint

    cfg = TrainConfig(out_dir=str(tmp_path), epochs=3)
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint({"config": cfg.to_dict()}, path)
    (tmp_path / "train_log.jsonl").write_text("{}\n")
    assert resume_point(path, cfg.replace(progress=False, out_dir="/elsewhere").to_dict()) == path
    assert resume_point(path, cfg.to_dict(), restart=True, logs=("train_log.jsonl",)) is None
    assert not os.path.exists(path) and not (tmp_path / "train_log.jsonl").exists()
    save_checkpoint({"config": cfg.to_dict()}, path)
    assert resume_point(path, cfg.replace(lr=0.5).to_dict()) is None and not os.path.exists(path)
    assert resume_point(path, cfg.to_dict()) is None  # nothing there: start fresh


def test_train_and_evaluate_no_longer_import_each_other():
    """The harness's layering: runs <- evaluate <- train; regress uses runs' public helpers."""
    import ast

    import cream_wsol

    pkg = os.path.dirname(cream_wsol.__file__)

    def imports(name):
        tree = ast.parse(open(os.path.join(pkg, name + ".py")).read())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}

    assert "train" not in imports("evaluate") and "train" not in imports("runs") and "evaluate" not in imports("runs")
    src = open(os.path.join(pkg, "regress.py")).read()
    assert "from .train import (_" not in src and "import _" not in src
