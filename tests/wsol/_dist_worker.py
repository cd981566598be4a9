"""Worker of tests/wsol/test_distributed.py: one rank of a gloo process group, set up from
the environment torchrun gives each process (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
running ``cream-wsol`` commands through ``cli.main`` (importable by spawned processes)."""
import os


def run_rank(rank: int, world: int, port: int, commands) -> None:
    import torch
    import torch.distributed as dist

    from cream_wsol.cli import main

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo")  # one group for every command (cli reuses an initialised group)
    try:
        for argv in commands:
            rc = main([a.format(rank=rank) for a in argv])
            if rc != 0:
                raise SystemExit(f"rank {rank}: {argv} exited {rc}")
    finally:
        dist.destroy_process_group()
