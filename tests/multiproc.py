"""Run `pretrain` in N spawned processes (gloo on 127.0.0.1) and collect what rank 0 saw.

`spawn_pretrain` returns the losses; `spawn_run` also returns rank 0's log and the
first step's gradients of the whole model, gathered from every rank by global
parameter name (tensor-parallel shards concatenated), so any layout can be compared
with a one-process run; `spawn_runs` runs several configurations in the same processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import free_port


@dataclass
class Run:
    losses: list[float]
    grads: dict[str, torch.Tensor]
    log: list[str]
    grad_norms: list[float] = field(default_factory=list)
    differing_replicas: list[str] = field(default_factory=list)  # with check_replicas: weights whose copies differ


def _local_grads(model) -> dict:
    return {r.name: (None if r.spec.tp is None else (r.spec.tp.dim, r.spec.tp.rank), r.param.grad.detach().clone())
            for r in model.param_table if r.param.grad is not None}


def _assemble(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """Full gradients by name from every rank's (tp_shard, grad) entries."""
    shards: dict[str, dict[int, tuple]] = {}
    for grads in per_rank:
        for name, (tp_shard, grad) in grads.items():
            shards.setdefault(name, {})[tp_shard[1] if tp_shard else 0] = (tp_shard, grad)
    full = {}
    for name, parts in shards.items():
        tp_shard = parts[0][0]
        full[name] = torch.cat([parts[r][1] for r in sorted(parts)], tp_shard[0]) if tp_shard else parts[0][1]
    return full


def _local_weights(model) -> dict:
    """This rank's copy of every weight, by (global name, TP rank)."""
    return {(r.name, r.spec.tp.rank if r.spec.tp else 0): r.param.detach().float().clone() for r in model.param_table}


def _differing(per_rank: list[dict]) -> set[str]:
    """Names of the weights whose copies (over DP, TP where replicated, DualPipe's two) are not all equal."""
    first, differing = {}, set()
    for weights in per_rank:
        for key, weight in weights.items():
            if not torch.equal(first.setdefault(key, weight), weight):
                differing.add(key[0])
    return differing


def _worker(rank: int, world: int, port: int, arg_lists: list[list[str]], queue, with_grads: bool,
            check_replicas: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megadual.config import parse_args
    from megadual.training.loop import pretrain
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        runs = []
        for args in arg_lists:
            first_grads, lines, differing = [], [], set()

            def grad_hook(model, first_grads=first_grads, differing=differing):
                gathered = [None] * world
                if with_grads and not first_grads:
                    dist.all_gather_object(gathered, _local_grads(model))
                    first_grads.append(_assemble(gathered))
                if check_replicas:  # the weights after the previous step, before this one's update
                    dist.all_gather_object(gathered, _local_weights(model))
                    differing.update(_differing(gathered))

            run = pretrain(parse_args(args), torch.device("cpu"), log=lines.append, grad_hook=grad_hook)
            # numpy, not tensors: a tensor in a queue lives in shared memory this process frees on exit
            grads = {name: g.numpy() for name, g in (first_grads[0] if with_grads else {}).items()}
            runs.append(Run(run.losses, grads, lines, run.grad_norms, sorted(differing)))
        if rank == 0:
            queue.put(runs)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, arg_lists: list[list[str]], with_grads: bool, check_replicas: bool = False) -> list[Run]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    workers = mp.start_processes(_worker, args=(world, free_port(), arg_lists, queue, with_grads, check_replicas),
                                 nprocs=world, start_method="spawn", join=False)
    # Read before joining: a result larger than the pipe's buffer blocks its sender until read.
    # Poll so that a worker that failed (and so sends nothing) raises here instead of hanging.
    while queue.empty():
        if workers.join(timeout=0.5):
            raise RuntimeError("the workers exited without sending a result")
    runs = queue.get()
    while not workers.join():
        pass
    for run in runs:
        run.grads = {name: torch.from_numpy(g) for name, g in run.grads.items()}
    return runs


def spawn_pretrain(world: int, args: list[str]) -> list[float]:
    return _spawn(world, [args], with_grads=False)[0].losses


def spawn_run(world: int, args: list[str]) -> Run:
    """Losses, first-step gradients and rank 0's log lines of a `world`-process run."""
    return _spawn(world, [args], with_grads=True)[0]


def spawn_runs(world: int, arg_lists: list[list[str]], check_replicas: bool = False) -> list[Run]:
    """`spawn_run` of several configurations, one after another in the same processes
    (starting the processes is most of a small run's time). `check_replicas`: every step,
    list the weights whose copies on different ranks differ (`Run.differing_replicas`)."""
    return _spawn(world, arg_lists, with_grads=True, check_replicas=check_replicas)
