"""The FLOP count derived from the config against torch.utils.flop_counter on a small model, forward
and backward, with MHA/GQA and with MLA, dense and MoE layers, shared experts and the head."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from megadual.config import ModelConfig
from megadual.model.flops import training_flops_per_iteration
from megadual.pipeline.stage_model import build_full_model

pytestmark = pytest.mark.usefixtures("on_device_under_test")  # made on CUDA under scripts/gpu_check.sh

MOE = {"num_layers": 3, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 128,
       "ffn_hidden_size": 48, "num_experts": 8, "moe_router_topk": 2, "moe_ffn_hidden_size": 24,
       "moe_shared_expert_intermediate_size": 40, "moe_first_k_dense": 1}
MLA = {"multi_latent_attention": True, "kv_lora_rank": 12, "qk_head_dim": 8, "qk_pos_emb_head_dim": 6,
       "v_head_dim": 10}


def _cpu_sdpa(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    # The counter's own backward formula adds the flash kernel's recomputation of the scores
    # (hardware FLOPs); model FLOPs count the four gradient GEMMs only: twice the forward.
    return 2 * sdpa_flop_count(query, key, value)


# The counter has formulas for the CUDA attention kernels but none for CPU's flash attention
# (MHA/GQA, and MLA with its values padded to the query/key head dim). Its formulas
# for the CUDA kernels' backward add the recomputed scores too: counted as twice the forward here.
aten = torch.ops.aten
ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
             aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
             aten._scaled_dot_product_flash_attention_backward: _sdpa_backward,
             aten._scaled_dot_product_efficient_attention_backward: _sdpa_backward,
             aten._scaled_dot_product_cudnn_attention_backward: _sdpa_backward}


@pytest.mark.parametrize("variant", [
    dict(MOE, num_query_groups=2),
    dict(MOE, **MLA, q_lora_rank=20),
    dict(MOE, **MLA, q_lora_rank=0, moe_shared_expert_intermediate_size=0),
    dict(MOE, num_query_groups=2, mtp_num_layers=2),
], ids=["gqa", "mla", "mla-no-q-lora-no-shared", "mtp-d2"])
def test_flop_count_equals_the_flop_counter(variant):
    config = ModelConfig(**variant)
    model = build_full_model(config, seed=1)
    batch = 3
    tokens = torch.randint(0, config.vocab_size, (batch, config.seq_length))
    with FlopCounterMode(display=False, custom_mapping=ATTENTION) as counter:
        model.chunks[0](tokens, tokens).loss.backward()
    assert counter.get_total_flops() == training_flops_per_iteration(config, batch) + value_padding_flops(config, batch)


def value_padding_flops(config: ModelConfig, batch: int) -> int:
    """MLA's values are zero-padded to the query/key head dim so SDPA can run a fused kernel
    (model/mla.py): the counter sees the padded columns of probabilities x values (forward, and
    twice that backward); model FLOPs do not count them."""
    if not config.multi_latent_attention:
        return 0
    padding = config.qk_head_dim + config.qk_pos_emb_head_dim - config.v_head_dim
    s, layers = config.seq_length, config.num_layers + config.mtp_num_layers
    return 3 * 2 * batch * config.num_attention_heads * s * s * padding * layers

