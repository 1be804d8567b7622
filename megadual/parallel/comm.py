"""Autograd-aware collectives for tensor, sequence and expert parallelism.

Each function takes the process group explicitly; `None` (or a group of size one)
makes it the identity, so the same model code runs on one process. Sequence-
parallel activations are split along dim 0 (the sequence dim of [s, b, h]). The
collectives themselves go through collectives.py, which checks the device contract.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megadual.parallel import collectives


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous()
    collectives.all_reduce(x, group)
    return x


def all_reduce_no_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group of a tensor that carries no gradient."""
    return _sum(x, group)


def coalesced(tensors: list[torch.Tensor], transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply `transform` to the tensors flattened into one buffer (one collective for all of
    them), and copy the result back in place."""
    if not tensors:
        return
    flat = transform(_flatten_dense_tensors(tensors))
    for tensor, result in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(result)


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    collectives.all_gather(parts, x.contiguous(), group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    parts = [p.contiguous() for p in x.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    collectives.reduce_scatter(out, parts, group)
    return out

def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(x.clone(), group)


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _all_gather(x, group, 0)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _reduce_scatter(x, group, 0)


def _my_sequence_part(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(group_size(group), dim=0)[group_rank(group)].contiguous()


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


def _collective(forward_op, backward_op, doc: str):
    def apply(x: torch.Tensor, group) -> torch.Tensor:
        return _apply(x, group, forward_op, backward_op)
    apply.__doc__ = doc
    return apply


# Each collective with its adjoint as the backward; sequences are split along dim 0.
copy_to_tp_region = _collective(
    _identity, _sum, "Entering a TP region with replicated input: identity, gradient all-reduced.")
reduce_from_tp_region = _collective(
    _sum, _identity, "Leaving a TP region with partial sums: all-reduce, gradient passed through.")
gather_sequence = _collective(
    _gather_seq, _reduce_scatter_seq,
    "Sequence parallel into a TP region: all-gather the sequence, gradient reduce-scattered.")
reduce_scatter_sequence = _collective(
    _reduce_scatter_seq, _gather_seq,
    "Sequence parallel out of a TP region: reduce-scatter the sequence, gradient all-gathered.")
split_sequence = _collective(
    _my_sequence_part, _gather_seq,
    "Replicated activations -> this rank's part of the sequence; the gradient is all-gathered.")
gather_split_sequence = _collective(
    _gather_seq, _my_sequence_part,
    "The inverse of split_sequence: all-gather the sequence; the gradient keeps this rank's part.")


class Codec:
    """How tensors travel: `encode` before sending (a list of tensors), `decode` after arrival."""

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def decode(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return parts[0]


class BackwardOverlap:
    """Work to run while a backward's all-to-all is in flight.

    A dispatcher hands this object to the exchanges it starts; whoever runs their
    backward (the pipeline's paired F&B chunk) says what to run with `filling`. On
    CUDA the backward runs on autograd's own thread, which sees the same object.
    """

    def __init__(self) -> None:
        self._work: Callable[[], None] | None = None
        # Whether the paired forward takes its first step before the backward starts; set by a
        # dispatcher whose layer steps alternate long and short computes (moe/hierarchical.py).
        self.forward_first = False

    @contextmanager
    def filling(self, work: Callable[[], None]):
        """Inside this block, every all-to-all launched by a backward runs `work` before it is waited for."""
        self._work = work
        try:
            yield
        finally:
            self._work = None

    def launched(self) -> None:
        if self._work is not None:
            self._work()


class Exchange:
    """An uneven all-to-all along dim 0 of tensors with the same rows, whose forward and backward
    each run as launch, then finish.

    Forward: `start(*tensors)` encodes each tensor with its codec (`codecs[i]`, plain when
    absent) and launches the async all-to-alls; `wait()` finishes them and returns the decoded
    tensors, as a tuple. Backward, the other way round: the gradients of the floating-point
    outputs launch the reverse all-to-alls together (in full precision), and the gradients of
    the `start` inputs wait for them. Whatever runs between the two halves - in the forward or
    in the backward - overlaps with the communication. With an `overlap`, the backward's launch
    runs its work once (`BackwardOverlap.launched`), however many tensors travel.
    """

    def __init__(self, group, output_splits: list[int], input_splits: list[int],
                 codecs: Sequence[Codec | None] = (), overlap: BackwardOverlap | None = None):
        self.group, self.codecs, self.overlap = group, list(codecs), overlap
        self.output_splits, self.input_splits = output_splits, input_splits
        self._pending = self._grad_pending = None
        self._link = None

    def start(self, *tensors: torch.Tensor) -> Exchange:
        self._link = _LaunchExchange.apply(self, *tensors)
        return self

    def wait(self) -> tuple[torch.Tensor, ...]:
        # Dropping the link breaks the cycle exchange -> link -> its autograd node -> exchange,
        # which would otherwise keep the group's work alive until a garbage collection; one
        # at interpreter exit, after the group is destroyed, aborts the process inside gloo.
        link, self._link = self._link, None
        return _FinishExchange.apply(link, self)

    def _codec(self, i: int) -> Codec:
        return (self.codecs[i] if i < len(self.codecs) else None) or _PLAIN

    def _launch(self, parts: list[torch.Tensor], output_splits: list[int], input_splits: list[int]):
        if group_size(self.group) == 1:
            return parts, []
        outs, works = [], []
        for part in parts:
            out = part.new_empty((sum(output_splits),) + tuple(part.shape[1:]))
            works.append(collectives.all_to_all_single(out, part.contiguous(), output_splits, input_splits,
                                                       self.group, async_op=True))
            outs.append(out)
        return outs, works

    def _launch_forward(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self._dtypes = [x.dtype for x in tensors]
        encoded = [self._codec(i).encode(x) for i, x in enumerate(tensors)]
        self._sizes = [len(parts) for parts in encoded]
        parts, works = self._launch([p for parts in encoded for p in parts], self.output_splits, self.input_splits)
        self._pending = (parts, works)

    def _finish_forward(self) -> tuple[torch.Tensor, ...]:
        parts, works = self._pending
        for work in works:
            work.wait()
        self._pending = None
        outputs, at = [], 0
        for i, (size, dtype) in enumerate(zip(self._sizes, self._dtypes)):
            outputs.append(self._codec(i).decode(parts[at:at + size], dtype))
            at += size
        return tuple(outputs)

    def _launch_backward(self, grads: list[torch.Tensor]) -> None:
        self._grad_pending = self._launch(grads, self.input_splits, self.output_splits)
        if self.overlap is not None:
            self.overlap.launched()

    def _finish_backward(self) -> list[torch.Tensor]:
        grads, works = self._grad_pending
        for work in works:
            work.wait()
        self._grad_pending = None
        return grads


_PLAIN = Codec()


def _differentiable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


class _LaunchExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, exchange, *tensors):
        ctx.exchange = exchange
        ctx.differentiable = [_differentiable(x.dtype) for x in tensors]
        exchange._launch_forward(tensors)
        return tensors[0].new_empty(0)  # carries the autograd edge from `start` to `wait`

    @staticmethod
    def backward(ctx, _):
        grads = iter(ctx.exchange._finish_backward())
        return None, *(next(grads) if differentiable else None for differentiable in ctx.differentiable)


class _FinishExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, link, exchange):
        ctx.exchange = exchange
        outputs = exchange._finish_forward()
        ctx.differentiable = [_differentiable(x.dtype) for x in outputs]
        ctx.mark_non_differentiable(*(x for x, d in zip(outputs, ctx.differentiable) if not d))
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        grads = [g for g, d in zip(grads, ctx.differentiable) if d]
        ctx.exchange._launch_backward(grads)
        return grads[0].new_empty(0), None


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """Row q of `send_counts` ([members, ...], on the device) to member q: each rank learns what every
    other rank will send it, still on the device."""
    if group_size(group) == 1:
        return send_counts
    recv = torch.empty_like(send_counts)
    collectives.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv
