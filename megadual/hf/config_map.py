"""ModelConfig <-> Hugging Face `DeepseekV3Config` (config.json), and where the two would compute
differently.

Import turns config.json into megadual's architecture flags (`architecture_flags`), its YaRN
`rope_scaling` included; what HF's config does not fix for training (sequence length, batch sizes,
layout, balancing) comes from the command line, and a later --load may change the sequence length
and YaRN (config.RESUME_MAY_CHANGE). Export writes the YaRN the checkpoint trained with. Export writes config.json from a checkpoint's ModelConfig (`hf_config`).

Two behaviours differ although the weights map one to one (`behaviour_differences`):
- group-limited routing: HF and DeepSeek's inference code rank a group of experts by the sum of its
  top 2 biased scores, megadual by the sum of its top K/M (the report's rule); they agree when
  K/M = 2 or when no group is dropped (M >= groups);
- the latent norms: HF builds `q_a_layernorm` and `kv_a_layernorm` with eps 1e-6 whatever
  `rms_norm_eps` says; megadual uses --norm-epsilon for every norm.
"""
from __future__ import annotations

from megadual.config import ModelConfig

HF_LATENT_NORM_EPS = 1e-6
HF_GROUP_SCORE_TOPK = 2


class UnsupportedModel(ValueError):
    """A model one side cannot express; the message says what and why."""


def _rope_parameters(hf: dict) -> dict:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def _yarn_flags(rope: dict) -> list[str]:
    if rope["rope_type"] == "default":
        return []
    if rope["rope_type"] != "yarn":
        raise UnsupportedModel(f"config.json: rope type {rope['rope_type']!r}; megadual has plain RoPE and YaRN")
    if rope.get("attention_factor") is not None or rope.get("truncate") is False:
        raise UnsupportedModel("config.json: YaRN with attention_factor or truncate=false is not DeepSeek's YaRN")
    return ["--rope-scaling-factor", str(rope["factor"]),
            "--original-max-position-embeddings", str(rope["original_max_position_embeddings"]),
            "--beta-fast", str(rope.get("beta_fast", 32.0)), "--beta-slow", str(rope.get("beta_slow", 1.0)),
            "--mscale", str(rope.get("mscale", 1.0)), "--mscale-all-dim", str(rope.get("mscale_all_dim", 0.0))]


def _require_hf(ok: bool, message: str) -> None:
    if not ok:
        raise UnsupportedModel(f"config.json: {message}")


def architecture_flags(hf: dict, mtp_layers: int) -> list[str]:
    """megadual's flags for the architecture config.json describes, with `mtp_layers` MTP modules
    (the MTP layers present in the weights)."""
    _require_hf(hf.get("model_type") == "deepseek_v3", f"model_type {hf.get('model_type')!r}, expected 'deepseek_v3'")
    _require_hf(hf.get("hidden_act", "silu") == "silu", "hidden_act must be silu (SwiGLU)")
    _require_hf(not hf.get("attention_bias", False), "attention_bias is not supported")
    _require_hf(not hf.get("tie_word_embeddings", False), "tied embeddings are not supported")
    _require_hf(hf.get("norm_topk_prob", True), "norm_topk_prob=false is not supported (gates are normalized)")
    _require_hf(hf.get("scoring_func", "sigmoid") == "sigmoid", "scoring_func must be sigmoid")
    layers, experts = hf["num_hidden_layers"], hf.get("n_routed_experts") or 0
    flags = ["--num-layers", layers, "--hidden-size", hf["hidden_size"], "--ffn-hidden-size", hf["intermediate_size"],
             "--num-attention-heads", hf["num_attention_heads"], "--norm-epsilon", hf.get("rms_norm_eps", 1e-6),
             "--rotary-base", _rope_parameters(hf)["rope_theta"],
             "--init-method-std", hf.get("initializer_range", 0.02),
             "--attention-dropout", hf.get("attention_dropout", 0.0), "--vocab-size", hf["vocab_size"],
             "--multi-latent-attention", "--q-lora-rank", hf.get("q_lora_rank") or 0,
             "--kv-lora-rank", hf["kv_lora_rank"], "--qk-head-dim", hf["qk_nope_head_dim"],
             "--qk-pos-emb-head-dim", hf["qk_rope_head_dim"], "--v-head-dim", hf["v_head_dim"],
             "--mtp-num-layers", mtp_layers]
    first_dense = min(hf.get("first_k_dense_replace", 0), layers)
    if experts and first_dense < layers:
        flags += ["--num-experts", experts, "--moe-ffn-hidden-size", hf["moe_intermediate_size"],
                  "--moe-shared-expert-intermediate-size", (hf.get("n_shared_experts") or 0) * hf["moe_intermediate_size"],
                  "--moe-first-k-dense", first_dense, "--moe-router-topk", hf["num_experts_per_tok"],
                  "--moe-router-topk-scaling-factor", hf.get("routed_scaling_factor", 1.0),
                  "--moe-router-score-function", "sigmoid",
                  # Groups as virtual nodes, so that routing does not depend on the layout.
                  "--moe-router-num-groups", hf.get("n_group") or 1,
                  "--moe-router-max-nodes", hf.get("topk_group") or hf.get("n_group") or 1]
    return [str(f) for f in flags] + _yarn_flags(_rope_parameters(hf))


def _rope_config(m: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": m.rotary_base}
    if m.rope_scaling_factor > 1.0:
        rope.update(rope_type="yarn", factor=m.rope_scaling_factor,
                    original_max_position_embeddings=m.original_max_position_embeddings,
                    beta_fast=m.beta_fast, beta_slow=m.beta_slow, mscale=m.mscale, mscale_all_dim=m.mscale_all_dim)
    return rope


def _deepseek_rope_scaling(rope: dict) -> dict | None:
    """The YaRN the model trained with, as DeepSeek-V3's config.json writes it; None for plain RoPE."""
    if rope["rope_type"] == "default":
        return None
    return {"type": "yarn", **{k: v for k, v in rope.items() if k != "rope_theta"}}


def hf_config(m: ModelConfig, vocab_size: int) -> dict:
    """config.json of `DeepseekV3ForCausalLM` for the model `m`; `vocab_size`: the tokenizer's (unpadded)."""
    if not m.multi_latent_attention:
        raise UnsupportedModel(
            "only --multi-latent-attention models export (to DeepseekV3ForCausalLM): Hugging Face has no "
            "standard architecture with MHA/GQA attention and DeepSeek's MoE (sigmoid gates, expert bias, "
            "shared experts, group-limited routing), so an MHA/GQA megadual model is refused")
    if m.moe_router_score_function != "sigmoid":
        raise UnsupportedModel("--moe-router-score-function softmax: DeepseekV3ForCausalLM gates with sigmoid")
    moe = m.num_experts > 0
    if moe and m.moe_shared_expert_intermediate_size % m.moe_ffn_hidden_size:
        raise UnsupportedModel(f"--moe-shared-expert-intermediate-size ({m.moe_shared_expert_intermediate_size}) "
                               f"must be a multiple of --moe-ffn-hidden-size ({m.moe_ffn_hidden_size}): HF counts "
                               "shared experts (n_shared_experts)")
    rope = _rope_config(m)
    groups = m.moe_router_num_groups or 1
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "dtype": "float32",
        "vocab_size": vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_attention_heads, "hidden_act": "silu",
        "max_position_embeddings": max(m.seq_length, int(rope.get("factor", 1) * m.original_max_position_embeddings)),
        "initializer_range": m.init_method_std, "rms_norm_eps": m.norm_epsilon,
        "rope_theta": m.rotary_base, "rope_parameters": rope, "rope_interleave": True,
        # DeepSeek's own config.json key (read by its inference code and older transformers)
        "rope_scaling": _deepseek_rope_scaling(rope),
        "attention_bias": False, "attention_dropout": m.attention_dropout, "tie_word_embeddings": False,
        "q_lora_rank": m.q_lora_rank or None, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_head_dim,
        "qk_rope_head_dim": m.qk_pos_emb_head_dim, "v_head_dim": m.v_head_dim,
        "n_routed_experts": m.num_experts if moe else 1, "moe_intermediate_size": m.moe_ffn_hidden_size,
        "n_shared_experts": m.moe_shared_expert_intermediate_size // m.moe_ffn_hidden_size if moe else 0,
        "first_k_dense_replace": next((i for i in range(m.num_layers) if m.is_moe_layer(i)), m.num_layers),
        "num_experts_per_tok": m.moe_router_topk if moe else 1, "norm_topk_prob": True,
        "routed_scaling_factor": m.moe_router_topk_scaling_factor,
        "n_group": groups, "topk_group": min(m.moe_router_max_nodes, groups),
        "num_nextn_predict_layers": m.mtp_num_layers,
    }


def behaviour_differences(m: ModelConfig) -> list[str]:
    """Where HF's DeepseekV3ForCausalLM would compute something else than megadual with these weights."""
    found = []
    groups, kept = m.moe_router_num_groups or 1, m.moe_router_max_nodes
    if m.num_experts and kept < groups and m.moe_router_topk // kept != HF_GROUP_SCORE_TOPK:
        found.append(f"group-limited routing: megadual ranks each of the {groups} groups by its top "
                     f"--moe-router-topk / --moe-router-max-nodes = {m.moe_router_topk // kept} biased scores, "
                     f"Hugging Face and DeepSeek's inference code by its top {HF_GROUP_SCORE_TOPK}: "
                     "tokens may go to other experts")
    if m.multi_latent_attention and m.norm_epsilon != HF_LATENT_NORM_EPS:
        found.append(f"latent norms: Hugging Face's q_a_layernorm and kv_a_layernorm use eps "
                     f"{HF_LATENT_NORM_EPS} whatever rms_norm_eps says; megadual uses --norm-epsilon "
                     f"({m.norm_epsilon})")
    return found
