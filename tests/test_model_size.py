"""The parameter counter against the real model, and the DeepSeek-V3 flag file it is shown on."""
from pathlib import Path

from megadual.arguments import parse_model_flags
from megadual.model.size import parameter_counts
from megadual.pipeline.stage_model import build_full_model
from tests.helpers import TINY_MOE

V3_ARGS = Path(__file__).resolve().parents[1] / "examples" / "deepseek_v3_671b.args"


def test_counts_equal_the_built_models_parameters():
    config = parse_model_flags(TINY_MOE + ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "16",
                                           "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "8",
                                           "--mtp-num-layers", "1"]).model
    model = build_full_model(config, seed=1)
    main = {name: p.numel() for name, p in model.named_parameters() if not name.startswith("mtp.")}
    expert = model.layers["1"].mlp.experts.local["0"]  # its weights: rows of the layer's stacks
    one_expert = sum(getattr(expert, name).weight.numel() for name in ("gate", "up", "down"))
    moe_layers = config.num_layers - config.moe_first_k_dense
    all_experts = one_expert * config.num_experts * moe_layers
    counts = parameter_counts(config)
    assert counts.total == sum(main.values())
    assert counts.active == sum(main.values()) - all_experts + one_expert * config.moe_router_topk * moe_layers
    assert counts.mtp == sum(p.numel() for p in model.mtp.parameters()) > 0


def test_deepseek_v3_flag_file_parses_one_flag_per_line():
    config = parse_model_flags([f"@{V3_ARGS}"])
    m, p = config.model, config.parallel
    assert (m.num_layers, m.hidden_size, m.num_experts, m.moe_router_topk, m.mtp_num_layers) == (61, 7168, 256, 8, 1)
    assert (p.pipeline_model_parallel_size, p.expert_model_parallel_size, p.pipeline_schedule) == (16, 64, "dualpipe")
