"""Building blocks of the decoder: RMSNorm, rotary embedding, attention (the MLP: parallel/mlp.py).

Activations are [sequence, batch, hidden], as in Megatron-LM, so sequence
parallelism splits dim 0.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megadual.config import ModelConfig
from megadual.parallel.linear import linear
from megadual.parallel.mlp import output_std
from megadual.parallel.params import ParamSpec
from megadual.parallel.tensor import ShardedLinear, TensorParallel, enter_tp_region, leave_tp_region


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        # Under sequence parallelism each TP rank sees part of the sequence, so this
        # weight's gradient is a partial sum that must be all-reduced over TP.
        self.param_specs = {"weight": ParamSpec(None, grad_partial_over_tp=sequence_parallel)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight).to(x.dtype)


def rotary_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """RoPE's angle per position of each pair of channels, base^(-2i / head_dim), in float64."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def rotary_tables(seq_length: int, frequencies: torch.Tensor, device,
                  magnitude: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [s, 1, 1, 2 x pairs] of every position's angles, times `magnitude` (YaRN's)."""
    angles = torch.outer(torch.arange(seq_length, device=device, dtype=torch.float64), frequencies.to(device))
    angles = torch.cat([angles, angles], dim=-1)  # [s, head_dim]
    return ((angles.cos() * magnitude).float()[:, None, None, :],
            (angles.sin() * magnitude).float()[:, None, None, :])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [s, b, heads, head_dim] by position (the half-split convention)."""
    first, second = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)


class Attention(torch.nn.Module):
    """Causal multi-head / grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, gemm: Callable = linear):
        super().__init__()
        if config.num_query_groups % tp.size:
            raise ValueError(f"--num-query-groups ({config.num_query_groups}) not divisible by TP {tp.size}")
        self.config, self.tp = config, tp
        hd, std = config.head_dim, config.init_method_std
        self.heads = config.num_attention_heads // tp.size
        self.groups = config.num_query_groups // tp.size
        self.q = ShardedLinear(config.hidden_size, config.num_attention_heads * hd, tp, 0, std, gemm)
        self.k = ShardedLinear(config.hidden_size, config.num_query_groups * hd, tp, 0, std, gemm)
        self.v = ShardedLinear(config.hidden_size, config.num_query_groups * hd, tp, 0, std, gemm)
        self.proj = ShardedLinear(config.num_attention_heads * hd, config.hidden_size, tp, 1,
                                  output_std(config), gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tp_region(x, self.tp)
        s, b, _ = x.shape
        hd = self.config.head_dim
        q = self.q(x).view(s, b, self.heads, hd)
        k = self.k(x).view(s, b, self.groups, hd)
        v = self.v(x).view(s, b, self.groups, hd)
        cos, sin = rotary_tables(s, rotary_frequencies(hd, self.config.rotary_base), x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, hd]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.groups != self.heads)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * hd)
        return leave_tp_region(self.proj(out), self.tp)
