"""Multi-head latent attention (DeepSeek-V2/V3 report 2.1.1), sharded over tensor parallelism.

For each token's hidden state h, with H heads:

    c_Q        = RMSNorm(W_DQ h)            q_down, q_norm   (--q-lora-rank; 0: no c_Q, queries from h)
    [q_C; q_R] = W_UQ c_Q, per head         q_up (or q from h): per head qk_head_dim rows, then
                                            qk_pos_emb_head_dim rows
    [c_KV; k_R] = W_DKV h                   kv_down: kv_lora_rank rows, then qk_pos_emb_head_dim rows
    c_KV       = RMSNorm(c_KV)              kv_norm
    [k_C; v]   = W_UKV c_KV, per head       kv_up: per head qk_head_dim rows, then v_head_dim rows
    score      = [q_C; RoPE(q_R)] . [k_C; RoPE(k_R)] x softmax scale   (k_R: one per token, all heads)
    out        = proj(the heads' softmax(score) v)

The softmax scale is 1 / sqrt(qk_head_dim + qk_pos_emb_head_dim), times YaRN's
mscale(factor, --mscale-all-dim)^2 when RoPE is scaled (yarn.py).

Tensor parallelism: the heads are split over TP (q_up or q, and kv_up column-parallel, proj
row-parallel). The down-projections and latent norms are replicated and run before the TP
region on the tokens this rank holds, so that what enters the region (all-gathered under
sequence parallelism, copied without) is the small latents [c_Q; c_KV; k_R], not h (h
itself enters without query compression). Under sequence parallelism each rank's replicated
weights see only its tokens, so their gradients are summed over TP (`grad_partial_over_tp`);
without it, the copy's backward already sums the latents' gradients over the heads' ranks.

Hugging Face `DeepseekV3ForCausalLM` (model.layers.{i}.self_attn.*) holds the same matrices:

    q_down.weight  = q_a_proj.weight             q_norm.weight  = q_a_layernorm.weight
    q_up.weight    = q_b_proj.weight (*)         q.weight       = q_proj.weight (*)  (no q compression)
    kv_down.weight = kv_a_proj_with_mqa.weight (*, its last qk_pos_emb_head_dim rows)
    kv_norm.weight = kv_a_layernorm.weight       kv_up.weight   = kv_b_proj.weight
    proj.weight    = o_proj.weight

Names of the dims: our (Megatron's) qk_head_dim is HF's qk_nope_head_dim, qk_pos_emb_head_dim
its qk_rope_head_dim; HF's qk_head_dim is their sum. (*) RoPE channel order: HF (with
`rope_interleave`, its default for V3) and DeepSeek rotate the pairs (2i, 2i+1) of the RoPE
channels, we rotate (i, i + d/2). Reordering the RoPE rows of those projections evens-then-odds
(`interleaved_to_half_split`, and back with `half_split_to_interleaved`) makes the two compute
the same attention: q . k is the same sum over the channels, in another order. megadual/hf/names.py
applies them on conversion (without `rope_interleave` HF rotates halves too, and nothing moves).

Latent norm eps: HF builds q_a_layernorm and kv_a_layernorm with eps 1e-6 whatever the config's
rms_norm_eps; we use --norm-epsilon for every norm, so the two agree only at --norm-epsilon 1e-6
(DeepSeek-V3's value), and conversion refuses another without --force (megadual/hf/config_map.py).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from megadual.config import ModelConfig
from megadual.data.documents import Documents
from megadual.model.dropout import ATTENTION_PROBS, AttentionDropout
from megadual.model.layers import RMSNorm, apply_rotary, causal_attention, rotary_tables
from megadual.model.yarn import mla_rope_frequencies, rope_magnitude, yarn_mscale
from megadual.parallel.linear import InputCache, linear
from megadual.parallel.mlp import output_std
from megadual.parallel.recompute import NO_RECOMPUTE
from megadual.parallel.tensor import ShardedLinear, TensorParallel, enter_tp_region, leave_tp_region


def mla_softmax_scale(config: ModelConfig) -> float:
    scale = 1.0 / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim)
    return scale * yarn_mscale(config.rope_scaling_factor, config.mscale_all_dim) ** 2


def interleaved_to_half_split(rope_rows: torch.Tensor) -> torch.Tensor:
    """Rows [..., d, in] of a RoPE projection in the interleaved-pairs order (HF, DeepSeek) -> ours."""
    return rope_rows.unflatten(-2, (rope_rows.shape[-2] // 2, 2)).transpose(-3, -2).flatten(-3, -2)


def half_split_to_interleaved(rope_rows: torch.Tensor) -> torch.Tensor:
    """The inverse of `interleaved_to_half_split`."""
    return rope_rows.unflatten(-2, (2, rope_rows.shape[-2] // 2)).transpose(-3, -2).flatten(-3, -2)


class MultiLatentAttention(torch.nn.Module):
    """Causal MLA over [s(/TP under sequence parallelism), b, hidden]; heads split over `tp`."""

    def __init__(self, config: ModelConfig, tp: TensorParallel, gemm: Callable = linear, layer_index: int = 0,
                 seed: int = 0):
        super().__init__()
        self.config, self.tp = config, tp
        h, heads, std, sp = config.hidden_size, config.num_attention_heads, config.init_method_std, tp.sequence_parallel
        self.heads = heads // tp.size
        self.q_lora_rank = config.q_lora_rank
        q_head = config.qk_head_dim + config.qk_pos_emb_head_dim
        if self.q_lora_rank:
            self.q_down = ShardedLinear(h, self.q_lora_rank, tp, None, std, gemm, grad_partial_over_tp=sp)
            self.q_norm = RMSNorm(self.q_lora_rank, config.norm_epsilon, sp)
            self.q_up = ShardedLinear(self.q_lora_rank, heads * q_head, tp, 0, std, gemm)
        else:
            self.q = ShardedLinear(h, heads * q_head, tp, 0, std, gemm)
        self.kv_down = ShardedLinear(h, config.kv_lora_rank + config.qk_pos_emb_head_dim, tp, None, std, gemm,
                                     grad_partial_over_tp=sp)
        self.kv_norm = RMSNorm(config.kv_lora_rank, config.norm_epsilon, sp)
        self.kv_up = ShardedLinear(config.kv_lora_rank, heads * (config.qk_head_dim + config.v_head_dim), tp, 0,
                                   std, gemm)
        self.proj = ShardedLinear(heads * config.v_head_dim, h, tp, 1, output_std(config), gemm)
        self.softmax_scale = mla_softmax_scale(config)
        self.rope_frequencies, self.rope_magnitude = mla_rope_frequencies(config), rope_magnitude(config)
        self.dropout = AttentionDropout(config.attention_dropout, seed, ATTENTION_PROBS, layer_index)
        self.recompute = NO_RECOMPUTE  # the chunk's (model/gpt.py): core_attn, mla_up_proj

    def forward(self, x: torch.Tensor, samples: torch.Tensor | None = None,
                documents: Documents | None = None) -> torch.Tensor:
        """`samples`: the micro-batch's global sample indices, for attention dropout; `documents`:
        its document boundaries (RoPE positions and attention restart at each), None: one sequence.

        The down-projections share one cached copy of x. Under mla_up_proj one region runs from their
        outputs to the attention output (latent norms, up-projections, RoPE, core attention), keeping
        only those outputs; otherwise the latent norms recompute under layernorm, the core under core_attn."""
        cache = InputCache()
        c_kv, k_rope = self.kv_down(x, cache).split([self.config.kv_lora_rank, self.config.qk_pos_emb_head_dim], -1)
        query_input = self.q_down(x, cache) if self.q_lora_rank else x
        positions = documents and documents.position_ids
        allowed = documents and documents.attention_allowed()

        def attend(query_input, c_kv, k_rope, samples):
            latents = enter_tp_region(self._latents(query_input, c_kv, k_rope), self.tp)
            return self.recompute.call("core_attn", self._core, *self._up_project(latents, positions), samples, allowed)

        if "mla_up_proj" in self.recompute.modules:
            out = self.recompute.call("mla_up_proj", attend, query_input, c_kv, k_rope, samples)
        else:
            out = attend(query_input, c_kv, k_rope, samples)
        s, b = out.shape[2], out.shape[0]
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.config.v_head_dim)
        return leave_tp_region(self.proj(out), self.tp)

    def _latents(self, query_input: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """[query input; c_KV; k_R before RoPE] of this rank's tokens, the query input being c_Q (or x
        itself without query compression), the latent norms applied (recomputed under layernorm)."""
        if self.q_lora_rank:
            query_input, c_kv = self.recompute.call("layernorm", self._latent_norms, query_input, c_kv)
        else:
            c_kv = self.recompute.call("layernorm", self.kv_norm, c_kv)
        return torch.cat([query_input, c_kv, k_rope], -1)

    def _latent_norms(self, c_q: torch.Tensor, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(c_q), self.kv_norm(c_kv)

    def _up_project(self, latents: torch.Tensor, positions: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The latents [s, b, q input + c_KV + k_R] -> q, k, v [b, heads, s, dim], RoPE applied
        (at `positions` [b, s] when given)."""
        c = self.config
        s, b, _ = latents.shape
        query_input, c_kv, k_rope = latents.split(
            [self.q_lora_rank or c.hidden_size, c.kv_lora_rank, c.qk_pos_emb_head_dim], -1)
        q = (self.q_up if self.q_lora_rank else self.q)(query_input).view(s, b, self.heads, -1)
        q_nope, q_rope = q.split([c.qk_head_dim, c.qk_pos_emb_head_dim], -1)
        k_nope, v = self.kv_up(c_kv).view(s, b, self.heads, -1).split([c.qk_head_dim, c.v_head_dim], -1)
        cos, sin = rotary_tables(s, self.rope_frequencies, latents.device, self.rope_magnitude, positions)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin).expand(s, b, self.heads, -1)
        q = torch.cat([q_nope, apply_rotary(q_rope, cos, sin)], -1)
        k = torch.cat([k_nope, k_rope], -1)
        return tuple(t.permute(1, 2, 0, 3) for t in (q, k, v))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, samples: torch.Tensor | None,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
        # SDPA's fused kernels (which keep no s x s scores) need one head dim for q, k and v: the
        # values are zero-padded to the query/key head dim and the padding's output columns dropped.
        v_dim = v.shape[-1]
        v = torch.nn.functional.pad(v, (0, q.shape[-1] - v_dim))
        out = causal_attention(q, k, v, self.softmax_scale, self.dropout, samples, self.tp.rank * self.heads,
                               allowed)
        return out[..., :v_dim]
