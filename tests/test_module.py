"""ContextEmbeddings: buffers, state_dict, the functional equivalence, and the
distributed sync (2 processes on gloo)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cream_kernels as ck
from cream_kernels import ContextEmbeddings
from _helpers import make_inputs


def test_buffers_and_state_dict_round_trip(tmp_path):
    m = ContextEmbeddings(5, 16, momentum=0.7, init="random", generator=torch.Generator().manual_seed(0))
    assert set(m.state_dict()) == {"fg", "bg"}
    f, cam, _, _, _ = make_inputs(4, 16, 4, 4, num_classes=5)
    m.update(f, torch.tensor([0, 4, 4, 1]), cam=cam)
    path = tmp_path / "emb.pt"
    torch.save(m.state_dict(), path)
    m2 = ContextEmbeddings(5, 16, momentum=0.7)
    m2.load_state_dict(torch.load(path))
    assert torch.equal(m.fg, m2.fg) and torch.equal(m.bg, m2.bg)
    assert "num_classes=5" in repr(m2)


def test_module_matches_functional():
    f, cam, _, _, labels = make_inputs(6, 10, 5, 5, num_classes=3)
    m = ContextEmbeddings(3, 10, momentum=0.6)
    fg, bg = torch.zeros(3, 10), torch.zeros(3, 10)
    m.update(f, labels, cam=cam)
    ck.update_context_embeddings(fg, bg, f, labels, cam=cam, momentum=0.6)
    assert torch.equal(m.fg, fg) and torch.equal(m.bg, bg)
    out = m.reactivate(f, cam, labels, num_iters=3)
    assert torch.equal(out, ck.em_reactivate(f, cam, fg, bg, labels, num_iters=3))
    w = torch.randn(3, 10)
    top2 = torch.stack([labels, (labels + 1) % 3], dim=1)
    out2 = m.reactivate(f, None, top2, classifier_weight=w, sigma="auto")
    assert out2.shape == (6, 2, 5, 5)
    assert torch.equal(out2, ck.em_reactivate(f, None, fg, bg, top2, classifier_weight=w, sigma="auto",
                                              cam_threshold=m.cam_threshold))


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="num_classes"):
        ContextEmbeddings(0, 4)
    with pytest.raises(ValueError, match="momentum"):
        ContextEmbeddings(2, 4, momentum=1.5)
    with pytest.raises(ValueError, match="init"):
        ContextEmbeddings(2, 4, init="ones")


def _rank_batch(rank):
    # different batch sizes per rank, repeated labels across ranks
    B = 3 if rank == 0 else 2
    f, cam, _, _, _ = make_inputs(B, 8, 4, 4, seed=10 + rank, num_classes=3)
    labels = torch.tensor([1, 0, 1][:B]) if rank == 0 else torch.tensor([1, 2])
    return f, cam, labels


def _worker(rank, world, init_file, out_dir, backend):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different random init per rank: the first update syncs them
        m = ContextEmbeddings(3, 8, momentum=0.75, init="random")
        for step in range(2):
            f, cam, labels = _rank_batch(rank)
            m.update(f * (step + 1), labels, cam=cam, backend=backend)
        torch.save({"fg": m.fg, "bg": m.bg}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_distributed_sync_gloo(tmp_path, backend):
    world = 2
    mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), backend), nprocs=world, join=True,
                       start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["fg"], r1["fg"]) and torch.equal(r0["bg"], r1["bg"]), "ranks diverged"
    # Same as one process applying the global batch in rank order, from rank 0's init.
    torch.manual_seed(0)
    m = ContextEmbeddings(3, 8, momentum=0.75, init="random")
    for step in range(2):
        parts = [_rank_batch(r) for r in range(world)]
        f = torch.cat([p[0] for p in parts]) * (step + 1)
        cam = torch.cat([p[1] for p in parts])
        labels = torch.cat([p[2] for p in parts])
        m.update(f, labels, cam=cam, backend=backend)
    assert torch.allclose(m.fg, r0["fg"], atol=1e-6) and torch.allclose(m.bg, r0["bg"], atol=1e-6)
