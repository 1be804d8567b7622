"""The model's floating-point operations per token, derived from its config.

Counted as matrix-multiply FLOPs (2 per multiply-add), as Megatron's throughput figure and
`torch.utils.flop_counter` count them: every GEMM of the forward (attention projections,
attention scores and values, dense MLP, router, shared experts, the top-k routed experts,
the output head), and twice that again for the backward (input and weight gradients), so a
training token costs 3x its forward. The attention scores are counted over the whole s x s
matrix, causal masking not subtracted (as the counter and Megatron's paper count them).
Norms, activations, softmax and the loss are elementwise and not counted; the embedding is a
lookup. Multi-token prediction adds, per depth, its projection of the concatenated embedding and
hidden state, its layer and the shared output head.
"""
from __future__ import annotations

from megadual.config import ModelConfig

FORWARD_AND_BACKWARD = 3  # the backward runs two GEMMs (input and weight gradient) per forward GEMM


def gemm(rows_in: int, rows_out: int) -> int:
    """FLOPs of one token through a [rows_out, rows_in] weight."""
    return 2 * rows_in * rows_out


def attention_flops(c: ModelConfig) -> int:
    """One token through MHA/GQA: the q, k, v, output projections, its scores over the sequence and
    the weighted sum of the values."""
    heads, groups, hd = c.num_attention_heads, c.num_query_groups, c.head_dim
    projections = gemm(c.hidden_size, heads * hd) + 2 * gemm(c.hidden_size, groups * hd)
    return projections + gemm(heads * hd, c.hidden_size) + 2 * c.seq_length * heads * 2 * hd


def mla_flops(c: ModelConfig) -> int:
    """One token through multi-head latent attention (model/mla.py)."""
    heads, qk = c.num_attention_heads, c.qk_head_dim + c.qk_pos_emb_head_dim
    if c.q_lora_rank:
        query = gemm(c.hidden_size, c.q_lora_rank) + gemm(c.q_lora_rank, heads * qk)
    else:
        query = gemm(c.hidden_size, heads * qk)
    key_value = (gemm(c.hidden_size, c.kv_lora_rank + c.qk_pos_emb_head_dim)
                 + gemm(c.kv_lora_rank, heads * (c.qk_head_dim + c.v_head_dim)))
    scores_and_values = 2 * c.seq_length * heads * (qk + c.v_head_dim)
    return query + key_value + scores_and_values + gemm(heads * c.v_head_dim, c.hidden_size)


def swiglu_flops(hidden_size: int, ffn_hidden_size: int) -> int:
    """One token through gate, up and down."""
    return 3 * gemm(hidden_size, ffn_hidden_size)


def moe_flops(c: ModelConfig) -> int:
    """One token through the router, its top-k routed experts and the shared experts."""
    routed = c.moe_router_topk * swiglu_flops(c.hidden_size, c.moe_ffn_hidden_size)
    shared = swiglu_flops(c.hidden_size, c.moe_shared_expert_intermediate_size)
    return gemm(c.hidden_size, c.num_experts) + routed + shared


def layer_flops(c: ModelConfig, layer_index: int) -> int:
    attention = mla_flops(c) if c.multi_latent_attention else attention_flops(c)
    mlp = moe_flops(c) if c.is_moe_layer(layer_index) else swiglu_flops(c.hidden_size, c.ffn_hidden_size)
    return attention + mlp


def forward_flops_per_token(c: ModelConfig) -> int:
    """One token's forward through every layer and the output head, and through each MTP depth
    (counted over the whole sequence, as the modules compute it)."""
    return stage_forward_flops_per_token(c, range(c.num_layers), True)


def stage_forward_flops_per_token(c: ModelConfig, layers: range, head: bool) -> int:
    """One token's forward through `layers` and, with `head`, the output head and the MTP depths
    beside it (a pipeline stage's share of forward_flops_per_token)."""
    flops = sum(layer_flops(c, i) for i in layers)
    if head:
        head_gemm = gemm(c.hidden_size, c.vocab_size)
        flops += head_gemm + sum(gemm(2 * c.hidden_size, c.hidden_size) + layer_flops(c, c.num_layers + k) + head_gemm
                                 for k in range(c.mtp_num_layers))
    return flops


def training_flops_per_iteration(c: ModelConfig, global_batch_size: int) -> int:
    """Forward and backward of one iteration's tokens (the whole global batch, all ranks)."""
    return FORWARD_AND_BACKWARD * forward_flops_per_token(c) * global_batch_size * c.seq_length
