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



def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(x.clone(), group)


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _all_gather(x, group, 0)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _reduce_scatter(x, group, 0)


class _Collective(torch.autograd.Function):
    """A collective in the forward whose backward is its adjoint collective."""

    @staticmethod
    def forward(ctx, x, group, forward_op, backward_op):
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad, ctx.group), None, None, None


def _apply(x: torch.Tensor, group, forward_op, backward_op) -> torch.Tensor:
    return _Collective.apply(x, group, forward_op, backward_op) if group_size(group) > 1 else x


def copy_to_tp_region(x, group):
    """Entering a TP region with replicated input: identity, gradient all-reduced."""
    return _apply(x, group, _identity, _sum)


def reduce_from_tp_region(x, group):
    """Leaving a TP region with partial sums: all-reduce, gradient passed through."""
    return _apply(x, group, _sum, _identity)


def gather_sequence(x, group):
    """Sequence parallel into a TP region: all-gather the sequence, gradient reduce-scattered."""
    return _apply(x, group, _gather_seq, _reduce_scatter_seq)


def reduce_scatter_sequence(x, group):
    """Sequence parallel out of a TP region: reduce-scatter the sequence, gradient all-gathered."""
    return _apply(x, group, _reduce_scatter_seq, _gather_seq)


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
