"""Initialization that depends only on the seed and each parameter's global name.

Every parameter is drawn in full from a generator keyed by (seed, global name) and
then cut to this rank's shard, so the model's initial weights are the same under
any TP/EP/PP/DP layout. Layers mark their parameters with `init_std` and, when
sharded, `tp_shard = (dim, rank, size)`; `initialize_parameters` does the rest.
"""
from __future__ import annotations

import hashlib

import torch


def generator_for(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def full_shape(param: torch.Tensor) -> list[int]:
    shape = list(param.shape)
    if hasattr(param, "tp_shard"):
        dim, _, size = param.tp_shard
        shape[dim] *= size
    return shape


def init_parameter(param: torch.Tensor, seed: int, name: str) -> None:
    std = getattr(param, "init_std", None)
    if std is None:  # norms: ones
        param.data.fill_(1.0)
        return
    full = torch.empty(full_shape(param)).normal_(0.0, std, generator=generator_for(seed, name))
    if hasattr(param, "tp_shard"):
        dim, rank, size = param.tp_shard
        full = full.chunk(size, dim)[rank]
    param.data.copy_(full)


@torch.no_grad()
def initialize_parameters(module: torch.nn.Module, seed: int) -> None:
    """Initialize every parameter of `module`, whose parameter names must be global names."""
    for name, param in module.named_parameters():
        init_parameter(param, seed, name)
