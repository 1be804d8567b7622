"""Ranks agreeing on the outcome of each checkpoint step, over the checkpoint's own gloo group.

A failure on one rank (a full disk, a missing file) must stop every rank at the same step,
or the others wait forever in the next collective: each step runs under `everywhere` or
`on_rank0`, which gather every rank's outcome and raise the first failure on all of them.
The group is the host's gloo group (CPU values, whatever the training device), so a checkpoint
step's collectives never interleave with training's on the default group.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megadual.parallel import collectives
from megadual.training.checkpoint.layout import CheckpointError


def expected(error: BaseException) -> bool:
    """Whether a checkpoint step may meet `error` without a bug: the file system's errors, ours,
    and DCP's (which gathers every rank's error into a CheckpointException, a BaseException)."""
    return isinstance(error, (OSError, CheckpointError)) or _from_dcp(error)


def _from_dcp(error: BaseException) -> bool:
    api = sys.modules.get("torch.distributed.checkpoint.api")  # no DCP imported, no DCP error
    return api is not None and isinstance(error, api.CheckpointException)


def describe(error: BaseException) -> str:
    """One line in plain words: `No space left on device`, `Permission denied (/ckpt/iter_0000100)`."""
    if _from_dcp(error):
        rank, (inner, _) = next(iter(error.failures.items()))
        return f"rank {rank}: {describe(inner)}"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({error.filename})" if error.filename else error.strerror
    return str(error)


class Coordination:
    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    @classmethod
    def new(cls) -> Coordination:
        """Over the host's gloo group of every rank (parallel/collectives.py; every rank must call
        this, at the same point)."""
        return cls(collectives.host_group())

    def gather(self, value) -> list:
        """Every rank's (picklable) `value`, in rank order, on every rank."""
        values = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def max(self, value: int) -> int:
        found = torch.tensor(value)
        dist.all_reduce(collectives.check(found, "all_reduce", host=True), op=dist.ReduceOp.MAX, group=self.group)
        return int(found)

    def everywhere(self, step):
        """`step()` on every rank; its value here. A failure on any rank raises CheckpointError on all."""
        return self._agreed(step, share=False)

    def on_rank0(self, step):
        """`step()` on rank 0 only; its value on every rank. A failure raises CheckpointError on all."""
        return self._agreed(step if self.rank == 0 else lambda: None, share=True)

    def _agreed(self, step, share: bool):
        value, error = None, None
        try:
            value = step()
        except BaseException as e:
            if not expected(e):
                if isinstance(e, Exception):  # a bug: raise it here, and let the other ranks stop too
                    self.gather((None, f"rank {self.rank}: {type(e).__name__}: {e}"))
                raise
            error = describe(e)
        outcomes = self.gather((value if share else None, error))
        failed = next((error for _, error in outcomes if error), None)
        if failed:
            raise CheckpointError(failed)
        return outcomes[0][0] if share else value
