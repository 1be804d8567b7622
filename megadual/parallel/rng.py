"""Initialization that depends only on the seed and each parameter's global name.

Every parameter is drawn in full from a generator keyed by (seed, global name) and
then cut to this rank's piece, so the model's initial weights are the same under
any TP/EP/PP/DP layout. What to draw and how the piece is cut come from the
parameter's record (parallel/params.py).
"""
from __future__ import annotations

import hashlib

import torch

from megadual.parallel.params import ParamRecord, ParamTable


def generator_for(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def init_parameter(record: ParamRecord, seed: int) -> None:
    if record.spec.init_std is None:  # norms: ones
        record.param.fill_(1.0)
        return
    full = torch.zeros(record.full_shape)
    # Only the real vocabulary rows are drawn, so they do not depend on the padding (on TP).
    full[:record.spec.real_rows].normal_(0.0, record.spec.init_std, generator=generator_for(seed, record.name))
    record.param.copy_(record.local_piece(full))


def initialize_parameters(table: ParamTable, seed: int) -> None:
    """Initialize every parameter of `table`, whose names must be global names."""
    for record in table:
        init_parameter(record, seed)


# Dropout draws no generator state: each element's uniform is a hash (splitmix64's finalizer)
# of its coordinates, so a mask depends only on what the element is, never on which rank
# computes it, in what order, or how often (recomputation gets the same mask).
_GAMMA = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(value: int) -> int:
    """A 64-bit pattern as the signed int64 holding it (int64 arithmetic wraps modulo 2**64)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >> 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shift_right(x, 30)) * _int64(_MIX1)
    x = (x ^ _shift_right(x, 27)) * _int64(_MIX2)
    return x ^ _shift_right(x, 31)


def stream_key(seed: int, *ids: int) -> int:
    """The key of one random stream, e.g. (seed, layer, site)."""
    key = torch.tensor(_int64(seed), device="cpu")  # a number, even while a model is built on the meta device
    for i in ids:
        key = _mix(key + _int64(_GAMMA * (i + 1)))
    return int(key)


def uniform(key: int, samples: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Float32 uniforms in [0, 1), one per element of `samples` broadcast with `counters`
    (int64: the global sample index and the element's index within the sample), a pure
    function of (key, sample, counter)."""
    per_sample = _mix(samples * _int64(_GAMMA) + key)
    bits = _mix(per_sample + counters * _int64(_GAMMA))
    return _shift_right(bits, 40).float() * 2.0 ** -24
