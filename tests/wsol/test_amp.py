"""``--amp bf16|fp16`` (issue 20): training and evaluation run under torch.autocast on CPU,
give finite numbers close to fp32 but not identical to them (the forward pass really ran in
the low precision), and a resume must keep the precision."""
import math

import pytest
import torch

cream_kernels = pytest.importorskip("cream_kernels")

from cream_wsol.evaluate import evaluate_checkpoint  # noqa: E402
from cream_wsol.train import ResumeMismatchError, load_checkpoint, train  # noqa: E402

from _tiny import tiny_cfg as _cfg  # noqa: E402


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_and_evaluates_on_cpu(tiny_data, tmp_path, amp):
    ref = train(_cfg(tiny_data, tmp_path / "fp32", epochs=1, num_workers=0))
    r = train(_cfg(tiny_data, tmp_path / amp, epochs=1, num_workers=0, amp=amp))
    ck, ck_ref = load_checkpoint(r["checkpoint"]), load_checkpoint(ref["checkpoint"])
    assert ck["config"]["amp"] == amp and (ck["scaler"] is not None) == (amp == "fp16")
    # weights and tables stay fp32, finite, near the fp32 run but not equal to it
    for part in ("model", "embeddings"):
        for k, v in ck[part].items():
            if v.is_floating_point():
                assert v.dtype == torch.float32 and torch.isfinite(v).all(), (part, k)
    diffs = [float((ck["model"][k] - ck_ref["model"][k]).abs().max()) for k in ck["model"]
             if ck["model"][k].is_floating_point()]
    assert max(diffs) > 0 and max(diffs) < 0.05
    assert math.isfinite(ck["log"][0]["loss"]) and abs(ck["log"][0]["loss"] - ck_ref["log"][0]["loss"]) < 0.05
    res = evaluate_checkpoint(r["checkpoint"], split="test", progress=False, amp=amp, num_workers=0)
    res32 = evaluate_checkpoint(r["checkpoint"], split="test", progress=False, num_workers=0)
    for name, row in res["metrics"].items():
        for key in ("MaxBoxAccV2", "PxAP"):
            assert math.isfinite(row[key]) and abs(row[key] - res32["metrics"][name][key]) <= 25.0, (name, key)
    assert res["classification"]["num_images"] == res32["classification"]["num_images"]


def test_amp_is_a_resume_setting(tiny_data, tmp_path):
    train(_cfg(tiny_data, tmp_path / "run", epochs=1, num_workers=0, amp="bf16", val_split=None))
    with pytest.raises(ResumeMismatchError, match="amp"):
        train(_cfg(tiny_data, tmp_path / "run", epochs=2, num_workers=0, val_split=None))
    with pytest.raises(ValueError, match="amp"):
        train(_cfg(tiny_data, tmp_path / "bad", amp="fp8"))


def test_cli_train_and_evaluate_with_amp_bf16(tiny_data, tmp_path, capsys):
    import json

    from cream_wsol.cli import main

    run = str(tmp_path / "run")
    assert main(["train", "--preset", "synthetic-quick", "--data-root", str(tiny_data[0]), "--metadata-root",
                 str(tiny_data[1]), "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--amp", "bf16",
                 "--num-workers", "1", "--out", run, "--no-progress"]) == 0
    assert load_checkpoint(run)["config"]["amp"] == "bf16"
    capsys.readouterr()
    out = str(tmp_path / "m.json")
    assert main(["evaluate", run, "--split", "test", "--maps", "cam,cream", "--curve-interval", "0.05",
                 "--amp", "bf16", "--num-workers", "1", "--out", out, "--no-progress"]) == 0
    saved = json.load(open(out))
    assert math.isfinite(saved["metrics"]["cream"]["MaxBoxAccV2"]) and saved["classification"]["num_images"] == 9
