"""Megatron's learning-rate schedule, counted in iterations or, with --train-samples, in samples.

Warm-up to --lr, then to --min-lr by --lr-decay-style over the decay horizon (--lr-decay-iters or
--lr-decay-samples; default the run's length); WSD stays at --lr until the last
--lr-wsd-decay-iters/samples of the horizon and decays there by --lr-wsd-decay-style. The LR of an
update depends on the position before it (iterations or samples done), so a resumed run, or a new
phase loaded from a checkpoint, continues the schedule where the position stands.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megadual.config import OptimConfig, TrainConfig


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    style: str
    warmup: int  # in units: iterations, or samples when by_samples
    decay: int
    wsd_style: str
    wsd_decay: int | None
    by_samples: bool

    @classmethod
    def from_flags(cls, o: OptimConfig, t: TrainConfig) -> LRSchedule:
        if t.train_samples is not None:
            warmup, decay, wsd, default = o.lr_warmup_samples, o.lr_decay_samples, o.lr_wsd_decay_samples, \
                t.train_samples
        else:
            warmup, decay, wsd, default = o.lr_warmup_iters, o.lr_decay_iters, o.lr_wsd_decay_iters, t.train_iters
        return cls(o.lr, o.min_lr, o.lr_decay_style, warmup, default if decay is None else decay,
                   o.lr_wsd_decay_style, wsd, t.train_samples is not None)

    def lr(self, iteration: int, consumed_samples: int, batch: int) -> float:
        """The LR of the update made after `iteration` iterations and `consumed_samples` samples,
        the update taking `batch` samples."""
        done, size = (consumed_samples, batch) if self.by_samples else (iteration, 1)
        if self.warmup and done < self.warmup:  # the update's own step counts: the first LR is not 0
            return self.max_lr * min(done + size, self.warmup) / self.warmup
        if self.style == "constant":
            return self.max_lr
        return self.min_lr + self._coefficient(done) * (self.max_lr - self.min_lr)

    def _coefficient(self, done: int) -> float:
        if self.style == "WSD":
            anneal_start = self.decay - self.wsd_decay
            if done <= anneal_start:
                return 1.0
            return _decay_shape(self.wsd_style, min(1.0, (done - anneal_start) / self.wsd_decay))
        return _decay_shape(self.style, min(1.0, (done - self.warmup) / max(1, self.decay - self.warmup)))


def _decay_shape(style: str, r: float) -> float:
    """From 1 at r = 0 (decay starts) to 0 at r = 1 (decay done)."""
    if style == "linear":
        return 1.0 - r
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * r) + 1.0)
    if style == "exponential":
        return 2.0 * 0.5 ** r - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(r)
    raise ValueError(f"unknown decay style {style!r}")
