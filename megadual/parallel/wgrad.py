"""Deferred weight-gradient store: the zero-bubble split of a backward into B and W.

A linear layer's backward has two GEMMs: the input gradient, which the previous
pipeline stage is waiting for, and the weight gradient, which nobody waits for.
While a store is `deferring`, layers that were built with it hand their weight-
gradient work to `put` instead of running it; the backward then returns as soon as
the input gradients exist. The schedule later runs one W action per deferred
backward with `pop`, in the order the backwards ran.

The store is an explicit object owned by whoever runs the schedule (one per model
chunk), which also says where a deferred gradient goes (`accumulate`: into `param.grad`, as
autograd would put it, unless the optimizer keeps its own gradient buffers); layers capture
it at forward time, so it works wherever autograd runs the
backward (on CUDA that is a device thread, not the caller's). Only forwards run inside
`deferrable_forward` build the autograd node that can defer; the others use the plain
GEMM and autograd's own backward, which costs less per call, and their weight gradients
are computed in the backward even when it is split. A runtime knows from its schedule
which forwards will have a split backward.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

import torch


def stack_row(weight: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """(the parameter, None) for a parameter; for a row of a stacked parameter (the view a routed
    expert computes with, moe/experts.py), (the stack, the row): where its gradient goes."""
    stack = weight._base
    if stack is None:
        return weight, None
    return stack, (weight.storage_offset() - stack.storage_offset()) // stack.stride(0)


def add_to_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add a weight gradient into `param.grad` (a stack row's into its row of the stack's), as
    autograd accumulates one."""
    param, row = stack_row(param)
    if row is not None:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad[row].add_(grad)
    elif param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


class WeightGradStore:
    def __init__(self, accumulate: Callable[[torch.Tensor, torch.Tensor], None] = add_to_grad) -> None:
        self.accumulate = accumulate
        self.forward_deferrable = False
        self.deferring = False
        self._open: list[Callable[[], None]] = []
        self._ready: deque[list[Callable[[], None]]] = deque()

    def put(self, compute_weight_grad: Callable[[], None]) -> None:
        """Queue weight-gradient work for the W of the split backward now running."""
        if not self.deferring:
            raise RuntimeError("weight-gradient work queued outside split_backward()")
        self._open.append(compute_weight_grad)

    @contextmanager
    def deferrable_forward(self, enabled: bool = True):
        """Forwards run inside this block can have their weight gradients deferred."""
        self.forward_deferrable = enabled
        try:
            yield
        finally:
            self.forward_deferrable = False

    @contextmanager
    def split_backward(self):
        """Backward passes run inside this block leave their weight gradients queued as one W."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            self._ready.append(self._open)
            self._open = []

    @torch.no_grad()  # a gradient needs no graph (one would keep its GEMM's operands alive)
    def pop(self) -> None:
        """Run the oldest queued W (all weight-gradient work of one split backward)."""
        if not self._ready:
            raise RuntimeError("W action with no deferred weight gradients: schedule is inconsistent")
        # As inside a backward: no graph, which would keep the saved activations alive in .grad.
        with torch.no_grad():
            for compute in self._ready.popleft():
                compute()

    def __len__(self) -> int:
        return len(self._ready)


def store_for_forward(store: WeightGradStore | None) -> WeightGradStore | None:
    """The store this forward's backward may defer to: `store` inside its `deferrable_forward`, else None."""
    return store if store is not None and store.forward_deferrable else None
