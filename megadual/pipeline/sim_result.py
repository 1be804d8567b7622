"""What a simulation returns (simulate.py), apart from the simulator, so that drawing it
(timeline.py) needs nothing of the simulator."""
from __future__ import annotations

from dataclasses import dataclass

from megadual.pipeline.actions import Action


@dataclass(frozen=True)
class Interval:
    start: float
    end: float
    action: Action


@dataclass(frozen=True)
class SimResult:
    makespan: float
    busy: list[float]  # compute time per rank
    peak_activations: list[int]  # per rank, in (micro-batch, chunk) units
    timeline: list[list[Interval]]  # compute actions per rank

    @property
    def bubble(self) -> list[float]:
        return [self.makespan - busy for busy in self.busy]

    @property
    def max_bubble(self) -> float:
        """The worst rank's bubble: what the DualPipe README's table gives."""
        return max(self.bubble)
