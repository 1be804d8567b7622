"""A chunk at hop level: its compute pieces and the expert all-to-all hops between them, and
what a paired F&B of two such chunks takes when it runs as pipeline/overlap.py runs it.

A forward or backward of a chunk with MoE layers alternates compute and hops: the forward's
pieces are attention (with routing and permutation), then the dispatch hop, the experts, the
combine hop, the next layer's attention, ...; a backward walks the same in reverse. `Pieces`
holds that sequence: compute[0], hops[0], compute[1], ..., compute[-1].

A hop may be launched before its piece's compute ends (`lead`): the MoE layer launches its
dispatch, then computes the shared expert, then pauses; that compute runs while the hop is in
flight. And the next piece may start before it waits for the hop (`lag`): a backward launches an
all-to-all's gradient and autograd runs other branches before the node that waits for it. And a
piece may exchange something small and wait for it (`drain`): the token counts before a dispatch.
That message queues behind the hops in flight on the rank's link, so the piece stops until they
have left (collectives on one communicator run in order, on NCCL as on the emulated links).

Alone, a chunk takes its compute and each hop's remainder after its lead and lag (`exposed`). In
a paired F&B the backward runs, and at each hop it launches the forward advances one step: it
waits for its own previous hop, computes its next piece and launches its next hop. Hops
queue on one outbound link per rank (what the emulated links of parallel/emulate.py do), and
the compute runs one piece at a time. So a pair takes max(compute, communication) only while
every hop is shorter than the compute it is paired with; a long hop shows where it outlasts
the other side's step (the chunk-level model's optimism).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pieces:
    """One direction of a chunk on one micro-batch: seconds of each compute piece, of each hop
    between two pieces on the links (one fewer than the pieces), of each hop's lead: the end of
    the piece before it that computes while the hop is already in flight, and of its lag: the
    start of the piece after it that computes before waiting for it (default none)."""
    compute: tuple[float, ...]
    hops: tuple[float, ...] = ()
    lead: tuple[float, ...] = ()
    lag: tuple[float, ...] = ()
    drain: tuple[float | None, ...] = ()  # per piece: its compute before it waits for its link to drain

    def __post_init__(self):
        if len(self.hops) != len(self.compute) - 1:
            raise ValueError(f"{len(self.compute)} compute pieces need {len(self.compute) - 1} hops between "
                             f"them, got {len(self.hops)}")
        for name in ("lead", "lag"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.hops):
                raise ValueError(f"{len(self.hops)} hops need as many {name}s, got {len(getattr(self, name))}")
        if self.drain and len(self.drain) != len(self.compute):
            raise ValueError(f"{len(self.compute)} compute pieces need as many drains (None: none), "
                             f"got {len(self.drain)}")

    def lead_of(self, hop: int) -> float:
        return self.lead[hop] if self.lead else 0.0

    def lag_of(self, hop: int) -> float:
        return self.lag[hop] if self.lag else 0.0

    def drain_of(self, piece: int) -> float | None:
        return self.drain[piece] if self.drain else None

    def exposed(self) -> float:
        """Alone, the time spent waiting for hops: each waited for after its lag in the next piece."""
        rank, ready = _Rank(), 0.0
        for i, seconds in enumerate(self.compute):
            rank.piece(seconds, self.lag_of(i - 1) if i else 0.0, ready, self.drain_of(i))
            if i < len(self.hops):
                ready = rank.hop(self.hops[i], self.lead_of(i))
        return rank.clock - sum(self.compute)

    def alone(self) -> float:
        return sum(self.compute) + self.exposed()

    def scaled(self, factor: float) -> Pieces:
        """The compute pieces (and leads, lags and drains) times `factor` (the hops as they are)."""
        def times(values):
            return tuple(None if c is None else c * factor for c in values)
        return Pieces(times(self.compute), self.hops, times(self.lead), times(self.lag), times(self.drain))


class _Rank:
    """One rank's compute clock and its outbound link, on which hops queue."""

    def __init__(self) -> None:
        self.clock = self.link_free = 0.0

    def compute(self, seconds: float, ready: float) -> None:
        self.clock = max(self.clock, ready) + seconds

    def piece(self, seconds: float, lag: float, ready: float, drain: float | None = None) -> None:
        """A compute piece whose first `lag` seconds need not wait for `ready`, and which waits for
        the link to be free after its first `drain` seconds."""
        waits = [(min(lag, seconds), ready)]
        if drain is not None:
            waits.append((min(drain, seconds), None))
        done = 0.0
        for offset, until in sorted(waits, key=lambda wait: wait[0]):
            self.compute(offset - done, 0.0)
            self.clock = max(self.clock, self.link_free if until is None else until)
            done = offset
        self.compute(seconds - done, 0.0)

    def hop(self, seconds: float, lead: float = 0.0) -> float:
        """Launch a hop `lead` seconds before now; the time it arrives."""
        self.link_free = max(self.clock - lead, self.link_free) + seconds
        return self.link_free


def paired_seconds(forward: Pieces, backward: Pieces, forward_first: bool = False) -> float:
    """The time of a paired F&B (pipeline/overlap.py's order); `forward_first`: the forward takes
    its first step before the backward starts (the hierarchical dispatcher asks for it)."""
    rank = _Rank()
    step, forward_ready = 0, 0.0

    def forward_step() -> None:
        nonlocal step, forward_ready
        if step == len(forward.compute):
            return
        rank.piece(forward.compute[step], forward.lag_of(step - 1) if step else 0.0, forward_ready,
                   forward.drain_of(step))
        if step < len(forward.hops):
            forward_ready = rank.hop(forward.hops[step], forward.lead_of(step))
        step += 1

    if forward_first:
        forward_step()
    backward_ready = 0.0
    for i, seconds in enumerate(backward.compute):
        rank.piece(seconds, backward.lag_of(i - 1) if i else 0.0, backward_ready, backward.drain_of(i))
        if i < len(backward.hops):
            backward_ready = rank.hop(backward.hops[i], backward.lead_of(i))
            forward_step()
    while step < len(forward.compute):
        forward_step()
    return rank.clock
