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
    full = torch.empty(record.full_shape).normal_(0.0, record.spec.init_std,
                                                  generator=generator_for(seed, record.name))
    record.param.copy_(record.local_piece(full))


def initialize_parameters(table: ParamTable, seed: int) -> None:
    """Initialize every parameter of `table`, whose names must be global names."""
    for record in table:
        init_parameter(record, seed)
