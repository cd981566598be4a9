"""``cream-wsol evaluate`` and ``pseudo-boxes`` on 2 CPU ranks over gloo give byte-identical
outputs to one process (cream_wsol.distributed): the same metrics JSON, the same
boxes.json of --save-maps, the same localization.txt; a split with fewer batches than
ranks (rank 0 gets no image) works."""
import json
import os
import socket
import sys

import pytest

pytest.importorskip("cream_kernels")
import torch.distributed as dist  # noqa: E402

from cream_wsol.cli import main  # noqa: E402
from cream_wsol.distributed import batch_shard  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_batch_shard_whole_batches_in_order():
    for n in range(0, 23):
        for bs in (1, 2, 3, 5, 32):
            for world in (1, 2, 3, 4, 7):
                parts = [batch_shard(n, bs, r, world) for r in range(world)]
                assert [i for p in parts for i in p] == list(range(n))
                for p in parts:  # every shard starts on a batch boundary of the one-process run
                    assert p.start % bs == 0 or len(p) == 0
                    assert len(p) % bs == 0 or p.stop == n
    assert [len(batch_shard(1, 4, r, 3)) for r in range(3)] == [0, 0, 1]
    with pytest.raises(ValueError, match="batch_size"):
        batch_shard(4, 0, 0, 1)
    with pytest.raises(ValueError, match="rank 2"):
        batch_shard(4, 1, 2, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    from cream_wsol.data import make_synthetic
    from cream_wsol.train import train

    from _tiny import tiny_cfg

    data = make_synthetic(str(tmp_path / "data"), seed=1, num_classes=3, n_train=16, n_val=5, n_test=7,
                          image_size=32)
    ckpt = train(tiny_cfg(data, tmp_path / "run", epochs=1))["checkpoint"]

    def commands(out):
        # batch 2: val has 3 batches, test 4, train 8 -> uneven shards; --max-images 1 -> rank 0 gets nothing
        return [
            ["evaluate", ckpt, "--split", "test", "--maps", "cam,cream,calibrated,free", "--target", "both",
             "--batch-size", "2", "--curve-interval", "0.01", "--out", f"{out}/plain.json", "--no-progress",
             "--device", "cpu"],
            ["evaluate", ckpt, "--split", "test", "--maps", "cam,cream", "--select-on", "val", "--sigma-grid", "4,8",
             "--batch-size", "2", "--curve-interval", "0.05", "--save-maps", f"{out}/maps", "--out",
             f"{out}/selected.json", "--no-progress", "--device", "cpu"],
            ["evaluate", ckpt, "--split", "val", "--maps", "cam,free", "--max-images", "1", "--batch-size", "2",
             "--curve-interval", "0.01", "--out", f"{out}/one.json", "--no-progress", "--device", "cpu"],
            ["pseudo-boxes", ckpt, "--split", "train", "--out", f"{out}/pseudo", "--batch-size", "3",
             "--curve-interval", "0.01", "--no-progress", "--device", "cpu"],
        ]

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for argv in commands(one):
        assert main(argv) == 0
    sys.path.insert(0, HERE) if HERE not in sys.path else None
    from _dist_worker import run_rank

    mp.spawn(run_rank, args=(2, _free_port(), commands(two)), nprocs=2, join=True)

    for rel in ("plain.json", "selected.json", "one.json", "maps/boxes.json", "pseudo/train/localization.txt",
                "pseudo/train/image_ids.txt"):
        assert _read(os.path.join(one, rel)) == _read(os.path.join(two, rel)), rel
    assert json.loads(_read(os.path.join(one, "one.json")))["classification"]["num_images"] == 1
    assert json.loads(_read(os.path.join(two, "plain.json")))["classification"]["num_images"] == 7
    meta1, meta2 = (json.loads(_read(os.path.join(d, "pseudo", "pseudo_boxes.json"))) for d in (one, two))
    for m in (meta1, meta2):
        m.pop("time_s")
    assert meta1 == meta2 and meta1["num_images"] == 16
    # per-image maps written by both ranks land in one folder, the same arrays as one process's; rank 0's
    # overlays (drawn from the gathered image list) and figures are the same files too
    def listing(d):
        return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)

    files = listing(os.path.join(one, "maps"))
    assert files == listing(os.path.join(two, "maps"))
    assert sum(f.startswith("maps" + os.sep) for f in files) == 14
    assert sum(f.startswith("overlays" + os.sep) for f in files) == 14
    for rel in files:
        assert _read(os.path.join(one, "maps", rel)) == _read(os.path.join(two, "maps", rel)), rel


def test_reproduce_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["reproduce", "--quick", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: reproduce runs as one process") and err.count("\n") == 1
