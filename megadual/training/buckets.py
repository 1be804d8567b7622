"""Parameters in flat buckets, each cut into equal contiguous shards over a data-parallel group.

A bucket lays its parameters end to end in one flat buffer padded to a multiple of the group
size D; rank r of the group owns the elements [r*S, (r+1)*S), S = padded size / D (Megatron's
layout). The parameters become views into the bucket's buffer, and their gradients are added
into the bucket's FP32 gradient buffer as autograd produces them, so one reduce-scatter leaves
each rank the reduced gradient of its shard and one all-gather hands the updated shards back
to every rank, with nothing packed or unpacked in between. (A pipeline's deferred weight
gradients, which autograd does not see, go to `main_grads` directly.) A parameter's `Piece` on a rank is
where it meets that rank's shard: nothing, part of it, or all of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import accumulate, pairwise

import torch

from megadual.parallel import collectives, comm
from megadual.parallel.params import ParamRecord


@dataclass(frozen=True)
class Piece:
    """shard[start:end] holds elements param_start.. of the bucket's parameter `index`, flattened."""
    index: int
    start: int
    end: int
    param_start: int


def shard_size(numels: list[int], group_size: int) -> int:
    """Elements per rank of a bucket of parameters of `numels` elements (padded to a multiple)."""
    return -(-sum(numels) // group_size)


def shard_pieces(numels: list[int], group_size: int, rank: int) -> list[Piece]:
    """Where the parameters of a bucket meet `rank`'s shard, in bucket order (empty pieces left out)."""
    size = shard_size(numels, group_size)
    first_kept, last_kept = rank * size, (rank + 1) * size
    pieces = []
    for index, (begin, end) in enumerate(pairwise([0, *accumulate(numels)])):
        first, last = max(begin, first_kept), min(end, last_kept)
        if first < last:
            pieces.append(Piece(index, first - first_kept, last - first_kept, first - begin))
    return pieces


def bucket_order(records: list[ParamRecord]) -> list[ParamRecord]:
    """By global name (so DualPipe's mirrored ranks lay out the same buckets), the rows of a stacked
    parameter together and in order, where its first row's name puts them: a stack is one view."""
    by_name = sorted(records, key=lambda r: r.name)
    first = {}
    for record in by_name:
        first.setdefault(id(record.owner), record.name)
    return sorted(by_name, key=lambda r: (first[id(r.owner)], r.row or 0))


def split_into_buckets(records: list[ParamRecord], bucket_numel: int) -> list[list[ParamRecord]]:
    """`records` in runs of consecutive parameters, each run closed once it holds `bucket_numel`
    elements (a parameter larger than that closes its own), never inside a stack's rows."""
    buckets: list[list[ParamRecord]] = []
    current: list[ParamRecord] = []
    size = 0
    for record, following in zip(records, [*records[1:], None]):
        current.append(record)
        size += record.param.numel()
        if size >= bucket_numel and (following is None or following.owner is not record.owner):
            buckets.append(current)
            current, size = [], 0
    return buckets + [current] if current else buckets


def _move_into(main_grad: torch.Tensor, param: torch.Tensor) -> None:
    """After autograd accumulated a gradient into `param.grad`: move it into the FP32 main gradient.
    (Autograd also calls this when a backward deferred the weight's gradient: then there is none.)"""
    if param.grad is not None:
        main_grad.add_(param.grad)
        param.grad = None


class Bucket:
    """`records`' parameters, replicated over the process `group`, stored in one flat buffer of
    `dtype`; FP32 master weights of this rank's shard (a view of the buffer when `dtype` is FP32,
    a copy taken from the parameters as they are now otherwise) and FP32 gradients."""

    def __init__(self, records: list[ParamRecord], group, dtype: torch.dtype):
        self.records, self.group = records, group
        self.size, rank = comm.group_size(group), comm.group_rank(group)
        numels = [r.param.numel() for r in records]
        self.offsets = [0, *accumulate(numels)]
        self.shard_size = shard_size(numels, self.size)
        shard = slice(rank * self.shard_size, (rank + 1) * self.shard_size)
        initial = torch.zeros(self.shard_size * self.size, dtype=torch.float32, device=records[0].param.device)
        for record, start in zip(records, self.offsets):
            initial[start:start + record.param.numel()] = record.param.detach().reshape(-1)
        self.params = initial.to(dtype)
        self.param_shard = self.params[shard]
        self.master = self.param_shard if dtype == torch.float32 else initial[shard].clone()
        self.grads = torch.zeros_like(initial)
        self.grad_shard = self.grads[shard]
        self.main_grads: dict[int, torch.Tensor] = {}  # by id of the parameter: its FP32 gradient
        for record, start in zip(records, self.offsets):
            param = record.owner
            if id(param) in self.main_grads:
                continue  # a stack's later row: the stack went in place at its first
            end = start + param.numel()
            param.data = self.params[start:end].view(param.shape)
            self.main_grads[id(param)] = main_grad = self.grads[start:end].view(param.shape)
            param.register_post_accumulate_grad_hook(partial(_move_into, main_grad))
        self.pieces = [(records[p.index], p) for p in shard_pieces(numels, self.size, rank)]

    def views(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        """A whole-bucket tensor cut into its parameters, shaped as they are."""
        return {r.name: full[start:start + r.param.numel()].view(r.param.shape)
                for r, start in zip(self.records, self.offsets)}

    def reduce_scatter_grads(self, scale: float) -> None:
        """Sum the gradients over the group into this rank's shard (in place), times `scale`."""
        if self.size > 1:
            collectives.reduce_scatter_single(self.grad_shard, self.grads, self.group)
        if scale != 1.0:
            self.grad_shard.mul_(scale)

    def all_gather_params(self) -> None:
        """Every rank's updated shard into the parameters (rounded to their dtype)."""
        if self.master is not self.param_shard:
            self.param_shard.copy_(self.master)
        if self.size > 1:
            collectives.all_gather_single(self.params, self.param_shard, self.group)

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The whole bucket of a per-rank shard tensor (master weights, a moment)."""
        if self.size == 1:
            return shard.clone()
        full = shard.new_empty(self.shard_size * self.size)
        collectives.all_gather_single(full, shard, self.group)
        return full

    def fill_shard(self, shard: torch.Tensor, whole: dict[str, torch.Tensor]) -> None:
        """Set this rank's `shard` from whole tensors by parameter name (a checkpoint's)."""
        for record, piece in self.pieces:
            flat = whole[record.name].reshape(-1)
            shard[piece.start:piece.end] = flat[piece.param_start:piece.param_start + piece.end - piece.start]
