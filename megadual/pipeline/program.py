"""The emitter a schedule builder writes one rank's action list with (schedules.py).

Receives, computes and sends each walk a chunk's micro-batches in order on their own
counter, so a receive can be posted early or a send late; those with no remote peer
(first/last stage, a neighbouring stage on the same rank) advance their counter but emit
nothing. Every deferred BI is completed by the W that `weights` emits later, oldest first.
"""
from __future__ import annotations

from collections import Counter, deque

from megadual.pipeline.actions import Action, Kind, Layout, paired


class RankProgram:
    """Emits one rank's actions (see the module's docstring)."""

    def __init__(self, layout: Layout, rank: int, split_backward: bool):
        self.layout, self.rank, self.split_backward = layout, rank, split_backward
        self.actions: list[Action] = []
        self._microbatches = {chunk: list(layout.microbatches[layout.locate(rank, chunk)[0]])
                              for chunk in layout.chunks(rank)}
        self._done: Counter[tuple[Kind, int]] = Counter()
        self.deferred: deque[Action] = deque()

    def _next(self, kind: Kind, chunk: int) -> int:
        """The next micro-batch of `chunk` that `kind` has not yet handled."""
        mb = self._microbatches[chunk][self._done[kind, chunk]]
        self._done[kind, chunk] += 1
        return mb

    def _comm(self, kind: Kind, chunk: int, step: int) -> None:
        mb = self._next(kind, chunk)
        place = self.layout.neighbour(self.rank, chunk, step)
        if place is not None and place[0] != self.rank:
            self.actions.append(Action(kind, chunk, mb, peer=place[0]))

    def recv_forward(self, chunk: int) -> None:
        self._comm(Kind.RECV_F, chunk, -1)

    def send_forward(self, chunk: int) -> None:
        self._comm(Kind.SEND_F, chunk, +1)

    def recv_backward(self, chunk: int) -> None:
        self._comm(Kind.RECV_B, chunk, +1)

    def send_backward(self, chunk: int) -> None:
        self._comm(Kind.SEND_B, chunk, -1)

    def _backward_action(self, chunk: int, defer_weights: bool) -> Action:
        if defer_weights and self.split_backward:
            action = Action(Kind.BI, chunk, self._next(Kind.B, chunk))
            self.deferred.append(action)
            return action
        return Action(Kind.B, chunk, self._next(Kind.B, chunk))

    def forward(self, chunk: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_forward(chunk)
        self.actions.append(Action(Kind.F, chunk, self._next(Kind.F, chunk)))
        if send:
            self.send_forward(chunk)

    def backward(self, chunk: int, defer_weights: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_backward(chunk)
        self.actions.append(self._backward_action(chunk, defer_weights))
        if send:
            self.send_backward(chunk)

    def forward_backward(self, f_chunk: int, b_chunk: int, recv_forward: bool = True) -> None:
        if recv_forward:
            self.recv_forward(f_chunk)
        self.recv_backward(b_chunk)
        self.pair(f_chunk, b_chunk)
        self.send_forward(f_chunk)
        self.send_backward(b_chunk)

    def pair(self, f_chunk: int, b_chunk: int) -> None:
        """The paired F&B of the next forward of `f_chunk` and full backward of `b_chunk`, alone."""
        forward = Action(Kind.F, f_chunk, self._next(Kind.F, f_chunk))
        self.actions.append(paired(forward, self._backward_action(b_chunk, defer_weights=False)))

    def weights(self) -> None:
        if self.split_backward:
            done = self.deferred.popleft()
            self.actions.append(Action(Kind.W, done.chunk, done.mb))
