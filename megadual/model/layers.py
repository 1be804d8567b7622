"""Building blocks of the decoder: RMSNorm, rotary embedding, attention (the MLP: parallel/mlp.py).

Activations are [sequence, batch, hidden], as in Megatron-LM, so sequence
parallelism splits dim 0.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megadual.config import ModelConfig
from megadual.data.documents import Documents
from megadual.model.dropout import ATTENTION_PROBS, AttentionDropout
from megadual.parallel.linear import InputCache, linear
from megadual.parallel.mlp import output_std
from megadual.parallel.params import ParamSpec
from megadual.parallel.recompute import NO_RECOMPUTE
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


def rotary_frequencies(head_dim: int, base: float, device=None) -> torch.Tensor:
    """RoPE's angle per position of each pair of channels, base^(-2i / head_dim), in float64."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))


def rotary_tables(seq_length: int, frequencies: torch.Tensor, device, magnitude: float = 1.0,
                  positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [s, 1, 1, 2 x pairs] of every position's angles, times `magnitude` (YaRN's);
    with `positions` [b, s] (--reset-position-ids), [s, b, 1, 2 x pairs] at those positions."""
    if positions is None:
        positions = torch.arange(seq_length, device=device)[None]
    angles = positions.t().to(torch.float64)[..., None] * frequencies.to(device)  # [s, b or 1, pairs]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [s, b or 1, 1, head_dim]
    return (angles.cos() * magnitude).float(), (angles.sin() * magnitude).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [s, b, heads, head_dim] by position (the half-split convention)."""
    first, second = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)


class Attention(torch.nn.Module):
    """Causal multi-head / grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, gemm: Callable = linear, layer_index: int = 0,
                 seed: int = 0):
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
        self.dropout = AttentionDropout(config.attention_dropout, seed, ATTENTION_PROBS, layer_index)
        self.recompute = NO_RECOMPUTE  # the chunk's (model/gpt.py): core_attn

    def forward(self, x: torch.Tensor, samples: torch.Tensor | None = None,
                documents: Documents | None = None) -> torch.Tensor:
        """`samples`: the micro-batch's global sample indices, for attention dropout; `documents`:
        its document boundaries (positions and attention restart at each), None: one sequence."""
        x = enter_tp_region(x, self.tp)
        s, b, _ = x.shape
        hd = self.config.head_dim
        cache = InputCache()  # q, k and v keep one copy of x
        q = self.q(x, cache).view(s, b, self.heads, hd)
        k = self.k(x, cache).view(s, b, self.groups, hd)
        v = self.v(x, cache).view(s, b, self.groups, hd)
        positions = documents and documents.position_ids
        cos, sin = rotary_tables(s, rotary_frequencies(hd, self.config.rotary_base, x.device), x.device,
                                 positions=positions)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, hd]
        allowed = documents and documents.attention_allowed()
        out = self.recompute.call("core_attn", self._core, q, k, v, samples, allowed)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * hd)
        return leave_tp_region(self.proj(out), self.tp)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, samples: torch.Tensor | None,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
        return causal_attention(q, k, v, self.config.head_dim ** -0.5, self.dropout, samples,
                                self.tp.rank * self.heads, allowed)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: AttentionDropout,
                     samples: torch.Tensor | None, first_head: int, allowed: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v over [b, heads, s, dim]; k and v may have fewer heads (GQA).
    `first_head` is the global index of this rank's first head (the dropout mask is keyed by it).
    `allowed` [b, 1, s, s]: which keys each query may see, in place of causal (Documents)."""
    if not dropout.active:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])
    # SDPA's own dropout draws from the global generator, whose state depends on the layout: the
    # probabilities are formed here and dropped with the layout-free mask.
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q.matmul(k.transpose(-2, -1)).float() * scale
    s = scores.shape[-1]
    hidden = torch.ones(s, s, dtype=torch.bool, device=scores.device).triu(1) if allowed is None else ~allowed
    probs = scores.masked_fill(hidden, float("-inf")).softmax(-1).to(v.dtype)
    return dropout(probs, samples, first_head).matmul(v)
