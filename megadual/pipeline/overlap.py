"""The paired forward/backward chunk: one micro-batch's forward fills the other's all-to-alls.

DualPipe pairs the forward of one micro-batch with the backward of another so that
each expert all-to-all of one runs while the other computes. Here the backward runs
as usual; each time it launches an all-to-all (`comm.BackwardOverlap`), the
forward advances by one step (`GPTChunk.forward_steps`), and each forward step ends
by launching its own all-to-all, which the backward's next compute then covers:

    backward: ... compute | a2a launched ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~| wait, compute ...
    forward:                  | wait, compute, a2a launched ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~|

With `overlap.forward_first` the forward takes its first step before the backward starts,
shifting that pairing by one step. The node-hierarchical dispatch asks for it: its layer
steps alternate long and short computes, and this phase puts each side's long ones against
the other's inter-node all-to-alls (moe/hierarchical.py). Forward steps still left when
the backward ends run afterwards. The forward's steps run under `step_context` (autocast
and grad mode as the caller's forward would have them; inside a backward, grad mode is
off by default).
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from contextlib import AbstractContextManager

import torch

from megadual.parallel import comm


def overlapped_forward_backward(forward_steps: Generator[None, None, torch.Tensor], backward: Callable[[], None],
                                step_context: Callable[[], AbstractContextManager],
                                overlap: comm.BackwardOverlap) -> torch.Tensor:
    """Run `backward()` with the forward's steps interleaved; return the forward's output.
    `overlap` is the one the backward's all-to-alls were started with."""
    output: list[torch.Tensor] = []

    def advance() -> None:
        if output:
            return
        with step_context(), torch.enable_grad():
            try:
                next(forward_steps)
            except StopIteration as done:
                output.append(done.value)

    if overlap.forward_first:
        advance()
    with overlap.filling(advance):
        backward()
    while not output:
        advance()
    return output[0]
