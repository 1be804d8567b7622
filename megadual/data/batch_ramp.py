"""The global batch size as training goes on: fixed, or ramped up as Megatron's
`--rampup-batch-size START INCREMENT RAMPUP_SAMPLES` ramps it.

The ramp has (global - START) / INCREMENT increments, each lasting RAMPUP_SAMPLES / increments
consumed samples: after c consumed samples the batch is START + INCREMENT * floor(c / that), up to
the global batch size (Megatron's RampupBatchsizeNumMicroBatchesCalculator). The batch depends on
the consumed samples only, so a resumed run takes the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchRamp:
    global_batch_size: int
    start: int | None = None  # None: no ramp
    increment: int = 0
    samples: int = 0

    @classmethod
    def from_flags(cls, global_batch_size: int, rampup: tuple[int, ...]) -> BatchRamp:
        return cls(global_batch_size, *rampup) if rampup else cls(global_batch_size)

    @property
    def samples_per_increment(self) -> float:
        return self.samples / ((self.global_batch_size - self.start) // self.increment)

    def batch_size(self, consumed_samples: int) -> int:
        """The global batch of the step taken after `consumed_samples` samples."""
        if self.start is None or consumed_samples > self.samples:
            return self.global_batch_size
        steps = int(consumed_samples / self.samples_per_increment)
        return min(self.start + self.increment * steps, self.global_batch_size)

    def sizes(self) -> range:
        """Every batch size the ramp can give."""
        start = self.global_batch_size if self.start is None else self.start
        return range(start, self.global_batch_size + 1, self.increment or 1)

    def iterations(self, train_samples: int, consumed_samples: int = 0) -> int:
        """Iterations that take a run from `consumed_samples` to `train_samples`: every step whose
        whole batch fits (a partial last batch is dropped, as Megatron drops it)."""
        consumed, iterations = consumed_samples, 0
        while self.start is not None and consumed <= self.samples:
            batch = self.batch_size(consumed)
            if consumed + batch > train_samples:
                return iterations
            consumed, iterations = consumed + batch, iterations + 1
        return iterations + max(0, train_samples - consumed) // self.global_batch_size
