"""Dropout whose masks do not depend on the parallel layout (Megatron's --hidden-dropout and
--attention-dropout).

An element is dropped when the uniform of (seed, site, global sample index, the element's
global position) falls below p (parallel/rng.py). The global position counts the whole
sequence (this TP rank's part starts at its offset under sequence parallelism), the whole
hidden size and, for attention probabilities, the global head index. So any TP/SP/EP/PP/DP
layout drops the same elements as one process, and running a forward twice drops the same.
Inactive in eval mode.
"""
from __future__ import annotations

import torch

from megadual.parallel.rng import stream_key, uniform
from megadual.parallel.tensor import TensorParallel

# Where in the model a mask is drawn: each (site, global layer index) has its own stream.
EMBEDDING, ATTENTION_PROBS, ATTENTION_OUTPUT, MLP_OUTPUT = range(4)


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device)


class _SiteDropout(torch.nn.Module):
    def __init__(self, p: float, seed: int, site: int, layer: int):
        super().__init__()
        self.p, self.key = p, stream_key(seed, site, layer)

    @property
    def active(self) -> bool:
        return self.training and self.p > 0

    def _drop(self, x: torch.Tensor, samples: torch.Tensor | None, sample_dim: int,
              counters: torch.Tensor) -> torch.Tensor:
        """`samples` lie along x's `sample_dim`; `counters` broadcast against x."""
        if samples is None:
            raise ValueError("dropout needs the global sample indices of the micro-batch (\"sample_ids\")")
        samples = samples.to(x.device).view([-1 if d == sample_dim else 1 for d in range(x.dim())])
        keep = uniform(self.key, samples, counters) >= self.p
        return x * keep / (1.0 - self.p)


class HiddenDropout(_SiteDropout):
    """On [sequence (this TP rank's part under sequence parallelism), batch, hidden] activations."""

    def __init__(self, p: float, seed: int, site: int, layer: int, tp: TensorParallel):
        super().__init__(p, seed, site, layer)
        self.tp = tp

    def forward(self, x: torch.Tensor, samples: torch.Tensor | None) -> torch.Tensor:
        if not self.active:
            return x
        s, _, h = x.shape
        offset = self.tp.rank * s if self.tp.sequence_parallel else 0
        counters = (offset + _arange(s, x))[:, None, None] * h + _arange(h, x)
        return self._drop(x, samples, 1, counters)


class AttentionDropout(_SiteDropout):
    """On [batch, heads (this TP rank's, the first being `head_offset`), query, key] probabilities."""

    def forward(self, probs: torch.Tensor, samples: torch.Tensor | None, head_offset: int) -> torch.Tensor:
        if not self.active:
            return probs
        _, heads, sq, sk = probs.shape
        heads = head_offset + _arange(heads, probs)
        counters = (heads[:, None, None] * sq + _arange(sq, probs)[:, None]) * sk + _arange(sk, probs)
        return self._drop(probs, samples, 0, counters)
