"""Autograd-aware collectives for tensor, sequence and expert parallelism.

Each function takes the process group explicitly; `None` (or a group of size one)
makes it the identity, so the same model code runs on one process. Sequence-
parallel activations are split along dim 0 (the sequence dim of [s, b, h]).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    parts = [p.contiguous() for p in x.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    return x.chunk(group_size(group), dim=dim)[group_rank(group)].contiguous()


class _CopyToRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce: entering a TP region with replicated input."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce, backward identity: leaving a TP region with partial sums."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    """Forward all-gather along the sequence, backward reduce-scatter (sequence parallel)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, 0), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward reduce-scatter along the sequence, backward all-gather (sequence parallel)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, 0), None


class _ScatterSequence(torch.autograd.Function):
    """Forward keep this rank's sequence slice, backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, 0), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, -1), None


def copy_to_tp_region(x, group):
    return _CopyToRegion.apply(x, group) if group_size(group) > 1 else x


def reduce_from_tp_region(x, group):
    return _ReduceFromRegion.apply(x, group) if group_size(group) > 1 else x


def gather_sequence(x, group):
    return _GatherSequence.apply(x, group) if group_size(group) > 1 else x


def reduce_scatter_sequence(x, group):
    return _ReduceScatterSequence.apply(x, group) if group_size(group) > 1 else x


def scatter_sequence(x, group):
    return _ScatterSequence.apply(x, group) if group_size(group) > 1 else x


def gather_last_dim(x, group):
    return _GatherLastDim.apply(x, group) if group_size(group) > 1 else x


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.splits = group, (output_splits, input_splits)
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _AllToAll.apply(grad, ctx.group, input_splits, output_splits), None, None, None


def all_to_all(x: torch.Tensor, group, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
    """Uneven all-to-all along dim 0; its backward is the reverse all-to-all."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, output_splits, input_splits)


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """Each rank learns how many rows every other rank will send it."""
    if group_size(group) == 1:
        return send_counts
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv
