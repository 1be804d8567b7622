"""Run `pretrain` in N spawned processes (gloo on 127.0.0.1) and collect rank 0's losses."""
from __future__ import annotations

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_port


def _worker(rank: int, world: int, port: int, args: list[str], queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from megadual.config import parse_args
    from megadual.training.loop import pretrain
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        losses = pretrain(parse_args(args), torch.device("cpu"), log=lambda line: None).losses
        if rank == 0:
            queue.put(losses)
    finally:
        dist.destroy_process_group()


def spawn_pretrain(world: int, args: list[str]) -> list[float]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, free_port(), args, queue), nprocs=world, start_method="spawn")
    return queue.get()
