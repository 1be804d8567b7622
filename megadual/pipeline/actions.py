"""The vocabulary of pipeline schedules: actions, and where each stage lives.

A schedule is one list of `Action`s per pipeline rank, executed top to bottom.
Compute actions name a model chunk of the rank (0 or 1; 0..V-1 under the interleaved
schedule) and a micro-batch:

    F0.3        forward of micro-batch 3 on chunk 0
    B0.3        full backward (input and weight gradients)
    BI0.3       backward for the input only; its weight gradients wait for a W
    W0.3        weight gradients of BI0.3 (always the oldest deferred BI of the chunk)
    F0.3&B1.7   paired forward of (0, 3) and backward of (1, 7), interleaved by the runtime

Communication actions name the peer rank and the *local* chunk and micro-batch
the tensor belongs to:

    SEND_F0.3>r2   send the output activations of F0.3 to rank 2
    RECV_F0.3<r0   receive the input activations of F0.3 from rank 0
    SEND_B0.3>r0   send the input gradients of the backward of (0, 3) to rank 0
    RECV_B0.3<r2   receive the output gradients the backward of (0, 3) needs

A `Layout` says which (rank, chunk) holds each stage of each path a micro-batch
can take through the model, so a runtime knows which chunks read data (first
stage), compute the loss (last stage), or hand their output to a chunk of the
same rank instead of communicating.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    F = "F"
    B = "B"
    BI = "BI"
    W = "W"
    FB = "FB"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"


COMM_KINDS = frozenset({Kind.SEND_F, Kind.RECV_F, Kind.SEND_B, Kind.RECV_B})
BACKWARD_KINDS = frozenset({Kind.B, Kind.BI})


@dataclass(frozen=True)
class Action:
    kind: Kind
    chunk: int
    mb: int
    peer: int | None = None  # communication actions only
    b_chunk: int | None = None  # FB only: the backward half (chunk, mb is the forward half)
    b_mb: int | None = None

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    @property
    def is_send(self) -> bool:
        return self.kind in (Kind.SEND_F, Kind.SEND_B)

    @property
    def forward_of(self) -> tuple[int, int] | None:
        """(chunk, mb) whose forward this action computes."""
        return (self.chunk, self.mb) if self.kind in (Kind.F, Kind.FB) else None

    @property
    def backward_of(self) -> tuple[int, int] | None:
        """(chunk, mb) whose input-gradient backward this action computes."""
        if self.kind == Kind.FB:
            return (self.b_chunk, self.b_mb)
        return (self.chunk, self.mb) if self.kind in BACKWARD_KINDS else None

    def __str__(self) -> str:
        if self.kind == Kind.FB:
            return f"F{self.chunk}.{self.mb}&B{self.b_chunk}.{self.b_mb}"
        if self.is_comm:
            arrow = ">" if self.is_send else "<"
            return f"{self.kind.value}{self.chunk}.{self.mb}{arrow}r{self.peer}"
        return f"{self.kind.value}{self.chunk}.{self.mb}"

    __repr__ = __str__


def paired(forward: Action, backward: Action) -> Action:
    """The FB action overlapping a forward F with a full backward B."""
    return Action(Kind.FB, forward.chunk, forward.mb, b_chunk=backward.chunk, b_mb=backward.mb)


Place = tuple[int, int]  # (rank, chunk)


@dataclass(frozen=True)
class Layout:
    """Stage placement: `paths[d][s]` is the (rank, chunk) running stage s of path d;
    micro-batches `microbatches[d]` travel path d."""

    paths: tuple[tuple[Place, ...], ...]
    microbatches: tuple[range, ...]

    def locate(self, rank: int, chunk: int) -> tuple[int, int]:
        """(path, stage) held by this chunk of this rank."""
        for d, path in enumerate(self.paths):
            if (rank, chunk) in path:
                return d, path.index((rank, chunk))
        raise KeyError(f"rank {rank} holds no chunk {chunk}")

    def chunks(self, rank: int) -> list[int]:
        """The local chunks this rank holds, in order."""
        return sorted(chunk for path in self.paths for r, chunk in path if r == rank)

    def neighbour(self, rank: int, chunk: int, step: int) -> Place | None:
        """The place of the next (step=+1) or previous (step=-1) stage, None past either end."""
        d, s = self.locate(rank, chunk)
        path = self.paths[d]
        return path[s + step] if 0 <= s + step < len(path) else None

    def is_first_stage(self, rank: int, chunk: int) -> bool:
        return self.neighbour(rank, chunk, -1) is None

    def is_last_stage(self, rank: int, chunk: int) -> bool:
        return self.neighbour(rank, chunk, +1) is None


class ScheduleError(ValueError):
    """A schedule that no runtime could execute correctly."""


class UnmatchedCommError(ScheduleError):
    """A send without its receive (or the reverse), or a pair that disagrees."""


Message = tuple[tuple[int, int], tuple[int, int]]  # ((src rank, index), (dst rank, index))


def match_messages(schedules: list[list[Action]]) -> list[Message]:
    """Pair every send with its receive: between two ranks, the k-th send from src to dst
    is received by the k-th receive from src on dst, as NCCL (and gloo with one tag) match them."""
    sends: dict[tuple[int, int], list[int]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[int]] = defaultdict(list)
    for rank, actions in enumerate(schedules):
        for index, action in enumerate(actions):
            if not action.is_comm:
                continue
            if action.peer == rank or not 0 <= action.peer < len(schedules):
                raise UnmatchedCommError(f"rank {rank} action {index} {action}: bad peer {action.peer}")
            if action.is_send:
                sends[(rank, action.peer)].append(index)
            else:
                recvs[(action.peer, rank)].append(index)
    messages = []
    for src, dst in sorted(set(sends) | set(recvs)):
        out, into = sends[(src, dst)], recvs[(src, dst)]
        _check_same_messages(schedules, src, dst, out, into)
        for s_index, r_index in zip(out, into):
            send, recv = schedules[src][s_index], schedules[dst][r_index]
            if _message_key(send) != _message_key(recv):
                raise UnmatchedCommError(
                    f"rank {src} {send} is received by rank {dst} {recv}: sends and receives "
                    f"between ranks {src}->{dst} are in different orders")
            messages.append(((src, s_index), (dst, r_index)))
    return messages


def _message_key(action: Action) -> tuple[str, int]:
    """What a send and its receive agree on: activations or gradients, and the micro-batch."""
    return action.kind.value[-1], action.mb


def _check_same_messages(schedules: list[list[Action]], src: int, dst: int,
                         out: list[int], into: list[int]) -> None:
    sent = Counter(_message_key(schedules[src][i]) for i in out)
    received = Counter(_message_key(schedules[dst][i]) for i in into)
    for rank, indices, missing, what in ((src, out, sent - received, "receive"),
                                         (dst, into, received - sent, "send")):
        for index in indices:
            if _message_key(schedules[rank][index]) in missing:
                raise UnmatchedCommError(f"rank {rank} {schedules[rank][index]} has no matching {what} "
                                         f"(ranks {src}->{dst})")
