"""Hugging Face names and configs against DeepSeek-V3's published layout, not against our own
export: the names of its released model.safetensors.index.json (written out below as data), its
config.json as shipped (no rope_interleave, rope_scaling, quantization_config), and an MTP module
computed from the HF tensors by DeepSeek's MTP formula."""
import json
from pathlib import Path

import pytest
import torch

from megadual.arguments import parse_args, parse_model_flags
from megadual.config import ModelConfig
from megadual.hf.config_map import hf_config
from megadual.hf.convert import model_shapes, read_hf
from megadual.hf.names import from_hf_rows, hf_name, mtp_copies, mtp_copy_of, our_name, to_hf_rows
from megadual.hf.safetensors_io import write_sharded
from megadual.parallel.recompute import run_steps
from megadual.pipeline.stage_model import build_full_model
from tests.helpers import TINY_MOE

V3_ARGS = Path(__file__).resolve().parents[1] / "examples" / "deepseek_v3_671b.args"

# DeepSeek-V3's released index (huggingface.co/deepseek-ai/DeepSeek-V3, model.safetensors.index.json),
# its FP8 weights' `.weight_scale_inv` entries left out: the names of one layer of each kind.
RELEASE_TOP = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
RELEASE_ATTENTION = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_a_proj.weight",
                     "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight",
                     "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
                     "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight"}
RELEASE_DENSE = {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
RELEASE_MOE = {"mlp.gate.weight", "mlp.gate.e_score_correction_bias", "mlp.shared_experts.gate_proj.weight",
               "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight"}
RELEASE_EXPERT = {"mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight",
                  "mlp.experts.{e}.down_proj.weight"}
RELEASE_MTP = {"embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
               "shared_head.head.weight"}  # model.layers.61: these beside an MoE layer's tensors
# Shapes in the release (BF16 or FP8, as [out, in]); {mtp}: 61 there, the layer after the last.
RELEASE_SHAPES = {"model.layers.{mtp}.eh_proj.weight": [7168, 14336], "model.layers.{mtp}.enorm.weight": [7168],
                  "model.layers.{mtp}.hnorm.weight": [7168], "model.layers.{mtp}.shared_head.norm.weight": [7168],
                  "model.layers.3.mlp.gate.weight": [256, 7168], "model.layers.3.mlp.gate.e_score_correction_bias": [256],
                  "model.layers.3.mlp.experts.255.down_proj.weight": [7168, 2048],
                  "model.layers.3.mlp.shared_experts.gate_proj.weight": [2048, 7168],
                  "model.layers.0.self_attn.q_b_proj.weight": [24576, 1536],
                  "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": [576, 7168],
                  "model.layers.0.self_attn.kv_b_proj.weight": [32768, 512],
                  "model.layers.0.self_attn.o_proj.weight": [7168, 16384],
                  "model.layers.0.mlp.gate_proj.weight": [18432, 7168]}


def release_names(layers: int, first_dense: int, experts: int, mtp: int) -> set[str]:
    """The release's names for a model of this shape: its patterns, MTP layers numbered after the last."""
    names = set(RELEASE_TOP)
    for i in range(layers + mtp):
        own = RELEASE_ATTENTION | (RELEASE_DENSE if i < first_dense else RELEASE_MOE)
        own |= {p.format(e=e) for p in RELEASE_EXPERT for e in range(experts)} if i >= first_dense else set()
        own |= RELEASE_MTP if i >= layers else set()
        names |= {f"model.layers.{i}.{n}" for n in own}
    return names


def exported(config) -> dict[str, list[int]]:
    """Export's names and shapes (the padded vocabulary rows aside)."""
    shapes = model_shapes(config)
    out = {hf_name(n, config.num_layers): list(s) for n, s in shapes.items()}
    return out | {n: list(shapes[ours]) for n, ours in mtp_copies(config.num_layers, config.mtp_num_layers).items()}


def test_export_names_equal_deepseek_v3s_release():
    """V3's flags with 4 of its 61 layers (its 3 dense and one MoE layer, then the MTP layer: building
    all 61 on the meta device takes a minute), and a small model of the same shape."""
    v3 = parse_model_flags([f"@{V3_ARGS}", "--num-layers", "4", "--pipeline-model-parallel-size", "1",
                            "--decoder-first-pipeline-num-layers", "0", "--decoder-last-pipeline-num-layers", "0"]).model
    names = exported(v3)
    assert set(names) == release_names(4, 3, 256, 1)
    assert {n.format(mtp=4): names[n.format(mtp=4)] for n in RELEASE_SHAPES} == \
        {n.format(mtp=4): shape for n, shape in RELEASE_SHAPES.items()}
    small = parse_args(TINY_MOE + ["--num-layers", "2", "--moe-first-k-dense", "1", "--mtp-num-layers", "1",
                                   "--multi-latent-attention", "--q-lora-rank", "16"]).model
    assert set(exported(small)) == release_names(2, 1, 8, 1)  # layer 2 is the MTP layer, as 61 is V3's


# DeepSeek-V3's names (2 layers here, so model.layers.2 is the MTP layer) -> ours; None: an MTP layer's
# copy of the embedding or head, which import checks against the tensor named second.
IMPORTED = {"model.embed_tokens.weight": "embedding.weight", "model.norm.weight": "final_norm.weight",
            "lm_head.weight": "output_layer.weight",
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": "layers.0.attention.kv_down.weight",
            "model.layers.1.mlp.gate.e_score_correction_bias": "layers.1.mlp.router.expert_bias",
            "model.layers.1.mlp.experts.17.up_proj.weight": "layers.1.mlp.experts.local.17.up.weight",
            "model.layers.1.post_attention_layernorm.weight": "layers.1.pre_mlp_norm.weight",
            "model.layers.2.enorm.weight": "mtp.0.enorm.weight", "model.layers.2.hnorm.weight": "mtp.0.hnorm.weight",
            "model.layers.3.eh_proj.weight": "mtp.1.eh_proj.weight",
            "model.layers.2.shared_head.norm.weight": "mtp.0.final_norm.weight",
            "model.layers.2.self_attn.q_b_proj.weight": "mtp.0.layer.attention.q_up.weight",
            "model.layers.3.mlp.experts.3.down_proj.weight": "mtp.1.layer.mlp.experts.local.3.down.weight",
            "model.layers.2.embed_tokens.weight": (None, "embedding.weight"),
            "model.layers.3.shared_head.head.weight": (None, "output_layer.weight")}


def test_imported_names_are_deepseeks_and_unknown_ones_are_named():
    for theirs, ours in IMPORTED.items():
        ours, copied = ours if isinstance(ours, tuple) else (ours, None)
        assert (our_name(theirs, 2), mtp_copy_of(theirs)) == (ours, copied), theirs
        if ours is not None:
            assert hf_name(ours, 2) == theirs
    assert mtp_copies(2, 2) == {n: ours[1] for n, ours in IMPORTED.items() if isinstance(ours, tuple)} | {
        "model.layers.2.shared_head.head.weight": "output_layer.weight",
        "model.layers.3.embed_tokens.weight": "embedding.weight"}
    for theirs in ("model.layers.1.mlp.unknown.weight", "model.layers.2.unknown.weight", "model.unknown.weight"):
        with pytest.raises(KeyError, match=f"^\"megadual has no tensor for Hugging Face's {theirs}\"$"):
            our_name(theirs, 2)
    for ours in ("layers.0.attention.unknown.weight", "mtp.0.unknown.weight", "unknown.weight"):
        with pytest.raises(KeyError, match=f"^'no Hugging Face name for megadual tensor {ours}'$"):
            hf_name(ours, 2)


def test_rope_rows_are_interleaved_in_hf_and_half_split_in_ours():
    """3 RoPE dims per half (6 rows): ours [x0 x1 x2 y0 y1 y2] is HF's [x0 y0 x1 y1 x2 y2] (rope_interleave),
    in the last 6 rows of kv_a_proj_with_mqa and of each head's rows of the query projection."""
    config = ModelConfig(num_attention_heads=2, qk_pos_emb_head_dim=6)
    to_hf = [0, 3, 1, 4, 2, 5]
    kv = torch.arange(10.0).unsqueeze(1).expand(10, 3)  # 4 latent rows, then 6 RoPE rows
    hf_kv = kv[[0, 1, 2, 3] + [4 + i for i in to_hf]]
    assert torch.equal(to_hf_rows("layers.0.attention.kv_down.weight", kv, config), hf_kv)
    assert torch.equal(from_hf_rows("layers.0.attention.kv_down.weight", hf_kv, config), kv)
    assert torch.equal(from_hf_rows("layers.0.attention.kv_down.weight", hf_kv, config, interleaved=False), hf_kv)
    q = torch.arange(16.0).unsqueeze(1)  # 2 heads of 8 rows: 2 without RoPE, then 6
    hf_q = q[[h * 8 + i for h in range(2) for i in [0, 1] + [2 + j for j in to_hf]]]
    for name in ("layers.1.attention.q_up.weight", "mtp.0.layer.attention.q.weight"):
        assert torch.equal(to_hf_rows(name, q, config), hf_q)
        assert torch.equal(from_hf_rows(name, hf_q, config), q)
    assert torch.equal(to_hf_rows("layers.0.attention.kv_up.weight", q, config), q)
    assert torch.equal(from_hf_rows("layers.0.attention.kv_up.weight", q, config), q)


# DeepSeek-V3's config.json as released, but for the sizes (its keys, its rope_scaling and
# quantization_config, and no rope_interleave: DeepSeek's RoPE rows are interleaved).
DEEPSEEK_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 1,
    "hidden_act": "silu", "initializer_range": 0.02, "model_type": "deepseek_v3", "moe_layer_freq": 1,
    "n_group": 1, "n_shared_experts": 1, "norm_topk_prob": True, "num_nextn_predict_layers": 1,
    "pretraining_tp": 1, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                 "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True}
SMALL = TINY_MOE + ["--num-layers", "2", "--moe-first-k-dense", "1", "--mtp-num-layers", "1",
                    "--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "8",
                    "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8", "--moe-router-topk-scaling-factor", "2.5",
                    "--rope-scaling-factor", "40", "--original-max-position-embeddings", "4096",
                    "--beta-fast", "32", "--beta-slow", "1", "--mscale", "1.0", "--mscale-all-dim", "1.0",
                    "--init-method-std", "0.02"]


def trained_like(config):
    """A model whose norms and biases are not all ones and zeros (so a swap shows)."""
    model = build_full_model(config, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dim() == 1:
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
    return model


def hf_tensors(model) -> dict[str, torch.Tensor]:
    m = model.config
    ours = model.state_dict()
    out = {hf_name(n, m.num_layers): to_hf_rows(n, t, m)[:m.vocab_size] for n, t in ours.items()}
    return out | {n: ours[o].clone() for n, o in mtp_copies(m.num_layers, m.mtp_num_layers).items()}


def test_deepseek_config_json_imports_with_the_right_logits(tmp_path):
    config = parse_args(SMALL)
    model = trained_like(config.model)
    tensors = hf_tensors(model)
    write_sharded({n: t.numel() * 4 for n, t in tensors.items()}, lambda names: {n: tensors[n] for n in names},
                  str(tmp_path), 1 << 30)
    ours = hf_config(config.model, config.model.vocab_size)
    shipped = {**DEEPSEEK_CONFIG, **{k: ours[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")}}
    assert "rope_interleave" not in shipped
    (tmp_path / "config.json").write_text(json.dumps(shipped))
    read_config, _, read = read_hf(str(tmp_path), ["--seq-length", "32", "--micro-batch-size", "2",
                                                   "--global-batch-size", "8"], warn=lambda line: None)
    imported = build_full_model(read_config.model, seed=9)
    imported.load_state_dict({n: read(n) for n in imported.state_dict()})
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.chunks[0](tokens, tokens, torch.tensor([0, 1]))
        got = imported.chunks[0](tokens, tokens, torch.tensor([0, 1]))
    assert torch.equal(got.loss, want.loss)
    assert all(torch.equal(a, b) for a, b in zip(imported.state_dict().values(), model.state_dict().values()))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_mtp_module_equals_deepseeks_formula_on_the_hf_tensors():
    """DeepSeek's MTP (as vLLM's deepseek_mtp and Megatron compute it): eh_proj([enorm(embedding of
    t_{i+1}); hnorm(h_i)]), one transformer layer, shared_head.norm, shared_head.head; the layer
    itself is ours (its names are checked against transformers in test_hf_checkpoint)."""
    config = parse_args(SMALL).model
    model = trained_like(config)
    hf, mtp, eps = hf_tensors(model), model.mtp[0], config.norm_epsilon
    g = torch.Generator().manual_seed(6)
    hidden, tokens = torch.randn(32, 2, 64, generator=g), torch.randint(0, 512, (2, 32), generator=g)
    prefix = "model.layers.2."  # the MTP layer: after the 2 transformer layers
    with torch.no_grad():
        embedded = hf[prefix + "embed_tokens.weight"][tokens].transpose(0, 1)
        x = torch.cat([rms_norm(embedded, hf[prefix + "enorm.weight"], eps),
                       rms_norm(hidden, hf[prefix + "hnorm.weight"], eps)], -1) @ hf[prefix + "eh_proj.weight"].T
        want = rms_norm(mtp.layer(x), hf[prefix + "shared_head.norm.weight"], eps)
        got = run_steps(mtp.forward_steps(hidden, model.chunks[0].embed(tokens), None))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.output_layer(got), want @ hf[prefix + "shared_head.head.weight"].T,
                                   rtol=1e-5, atol=1e-5)
