"""A chunk at hop level: its compute pieces and the expert all-to-all hops between them, and
what a paired F&B of two such chunks takes when it runs as pipeline/overlap.py runs it.

A forward or backward of a chunk with MoE layers alternates compute and hops: the forward's
pieces are attention (with routing and permutation), then the dispatch hop, the experts, the
combine hop, the next layer's attention, ...; a backward walks the same in reverse. `Pieces`
holds that sequence: compute[0], hops[0], compute[1], ..., compute[-1].

Alone, a hop is waited for right after its launch, so a chunk takes the sum of everything. In
a paired F&B the backward runs, and at each hop it launches the forward advances one step:
it waits for its own previous hop, computes its next piece and launches its next hop. Hops
queue on one outbound link per rank (what the emulated links of parallel/emulate.py do), and
the compute runs one piece at a time. So a pair takes max(compute, communication) only while
every hop is shorter than the compute it is paired with; a long hop shows where it outlasts
the other side's step (the chunk-level model's optimism).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pieces:
    """One direction of a chunk on one micro-batch: seconds of each compute piece, and of each
    hop between two pieces on the links (one fewer than the pieces)."""
    compute: tuple[float, ...]
    hops: tuple[float, ...] = ()

    def __post_init__(self):
        if len(self.hops) != len(self.compute) - 1:
            raise ValueError(f"{len(self.compute)} compute pieces need {len(self.compute) - 1} hops between "
                             f"them, got {len(self.hops)}")

    def alone(self) -> float:
        return sum(self.compute) + sum(self.hops)

    def scaled(self, factor: float) -> Pieces:
        """The compute pieces times `factor` (the hops as they are)."""
        return Pieces(tuple(c * factor for c in self.compute), self.hops)


class _Rank:
    """One rank's compute clock and its outbound link, on which hops queue."""

    def __init__(self) -> None:
        self.clock = self.link_free = 0.0

    def compute(self, seconds: float, ready: float) -> None:
        self.clock = max(self.clock, ready) + seconds

    def hop(self, seconds: float) -> float:
        """Launch a hop now; the time it arrives."""
        self.link_free = max(self.clock, self.link_free) + seconds
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
        rank.compute(forward.compute[step], forward_ready)
        if step < len(forward.hops):
            forward_ready = rank.hop(forward.hops[step])
        step += 1

    if forward_first:
        forward_step()
    backward_ready = 0.0
    for i, seconds in enumerate(backward.compute):
        rank.compute(seconds, backward_ready)
        if i < len(backward.hops):
            backward_ready = rank.hop(backward.hops[i])
            forward_step()
    while step < len(forward.compute):
        forward_step()
    return rank.clock
