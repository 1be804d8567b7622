"""Bad flags are rejected at start-up with a message naming the flag."""
import dataclasses

import pytest

from megadual.arguments import parse_args, resolve_device_defaults
from megadual.config import ConfigError, model_config_differences
from tests.helpers import TINY_MOE


def error_for(*extra: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_args(TINY_MOE + list(extra))
    return str(err.value)


@pytest.mark.parametrize("extra, flag", [
    (["--hidden-size", "66"], "--hidden-size"),
    (["--moe-router-topk", "9"], "--moe-router-topk"),
    (["--global-batch-size", "7"], "--global-batch-size"),
    (["--data-path", "x"], "--data-path"),
    (["--min-lr", "1"], "--min-lr"),
    (["--moe-first-k-dense", "9"], "--moe-first-k-dense"),
    (["--num-experts", "6", "--moe-router-num-groups", "4"], "--moe-router-num-groups"),
    (["--moe-router-num-groups", "4", "--moe-router-max-nodes", "2", "--moe-router-topk", "3"],
     "--moe-router-max-nodes"),
    (["--group-query-attention", "--num-query-groups", "3"], "--num-query-groups"),
    (["--save-interval", "5"], "--save-interval"),
    (["--moe-fp8-dispatch"], "--moe-fp8-dispatch"),
    (["--lr-warmup-iters", "500", "--train-iters", "10"], "--lr-warmup-iters"),
    (["--use-distributed-optimizer", "--ddp-bucket-size", "0"], "--ddp-bucket-size"),
    (["--multi-latent-attention", "--group-query-attention"], "--group-query-attention"),
    (["--multi-latent-attention", "--qk-pos-emb-head-dim", "7"], "--qk-pos-emb-head-dim"),
    (["--multi-latent-attention", "--q-lora-rank", "-1"], "--q-lora-rank"),
    (["--multi-latent-attention", "--v-head-dim", "0"], "--v-head-dim"),
    (["--multi-latent-attention", "--rope-scaling-factor", "0.5"], "--rope-scaling-factor"),
    (["--multi-latent-attention", "--rope-scaling-factor", "4", "--beta-fast", "1"], "--beta-fast"),
    (["--mtp-num-layers", "32"], "--mtp-num-layers"),  # --seq-length 32: no position has a target
    (["--mtp-eval-loss"], "--mtp-eval-loss"),
])
def test_invalid_combination_names_flag(extra, flag):
    assert flag in error_for(*extra)


def test_null_tokenizer_needs_vocab_size():
    args = [a for a in TINY_MOE]
    i = args.index("--vocab-size")
    del args[i:i + 2]
    with pytest.raises(ConfigError, match="--vocab-size"):
        parse_args(args)


def test_megatron_group_topk_maps_to_max_nodes_and_vocab_is_padded():
    c = parse_args(TINY_MOE + ["--moe-router-group-topk", "2", "--make-vocab-size-divisible-by", "100"])
    assert c.model.moe_router_max_nodes == 2
    assert c.model.vocab_size == 600 and c.data.vocab_size == 512


def test_unknown_choice_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        parse_args(TINY_MOE + ["--moe-router-score-function", "relu"])


def test_derived_defaults():
    c = parse_args(TINY_MOE + ["--num-query-groups", "2"])  # ignored without --group-query-attention
    assert c.model.ffn_hidden_size == 176  # 8/3 x 64 = 170.7, up to a multiple of 8
    assert c.model.num_query_groups == 4 and not c.parallel.moe_router_max_nodes_given
    c = parse_args(TINY_MOE + ["--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "96",
                               "--moe-router-max-nodes", "4"])
    assert (c.model.num_query_groups, c.model.ffn_hidden_size) == (2, 96) and c.parallel.moe_router_max_nodes_given


def test_mla_and_yarn_flags_are_refused_without_what_they_need():
    assert error_for("--kv-lora-rank", "16") == "--kv-lora-rank needs --multi-latent-attention"
    assert error_for("--q-lora-rank", "0") == "--q-lora-rank needs --multi-latent-attention"
    assert error_for("--rotary-scaling-factor", "40") == "--rope-scaling-factor needs --multi-latent-attention"
    assert error_for("--multi-latent-attention", "--mscale-all-dim", "1") == \
        "--mscale-all-dim needs --rope-scaling-factor above 1"


def test_mla_flags_left_out_take_their_defaults():
    c = parse_args(TINY_MOE + ["--multi-latent-attention", "--hidden-size", "66", "--kv-lora-rank", "16"])
    m = c.model  # the hidden size need not split into the heads: MLA's head dims are their own
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim) == (0, 16, 128, 64, 128)
    assert (m.rope_scaling_factor, m.original_max_position_embeddings, m.mscale, m.mscale_all_dim) == (1, 4096, 1, 0)
    c = parse_args(TINY_MOE + ["--multi-latent-attention", "--rope-scaling-factor", "40", "--mscale-all-dim", "1"])
    assert (c.model.rope_scaling_factor, c.model.mscale_all_dim, c.model.beta_fast) == (40, 1, 32)
    assert parse_args(TINY_MOE).model.kv_lora_rank == 32  # unread without MLA, but the same in every config


def test_flags_keep_their_types_and_actions():
    c = parse_args(TINY_MOE + ["--norm-epsilon", "1e-5", "--no-pipeline-split-backward", "--sequence-parallel",
                               "--lr-decay-iters", "50", "--no-moe-router-enable-expert-bias"])
    assert c.model.norm_epsilon == 1e-5 and c.optim.lr_decay_iters == 50
    assert c.parallel.sequence_parallel and not c.parallel.pipeline_split_backward
    assert not c.model.moe_router_enable_expert_bias
    args = [a for a in TINY_MOE if a != "--mock-data"]
    assert parse_args(args + ["--data-path", "0.3", "a", "0.7", "b"]).data.data_path == ("0.3", "a", "0.7", "b")


@pytest.mark.parametrize("flags, device_type, bf16", [
    ([], "cuda", True), ([], "cpu", False), (["--no-bf16"], "cuda", False), (["--bf16"], "cpu", True),
])
def test_bf16_default_depends_on_the_device(flags, device_type, bf16):
    config = parse_args(TINY_MOE + flags)
    resolved = resolve_device_defaults(config, device_type)
    assert resolved.train.bf16 is bf16
    assert resolve_device_defaults(resolved, "cpu" if device_type == "cuda" else "cuda") == resolved


def test_a_checkpoint_predating_a_model_field_counts_it_at_its_default():
    config = parse_args(TINY_MOE).model
    saved = {k: v for k, v in dataclasses.asdict(config).items() if k != "multi_latent_attention"}
    assert model_config_differences(saved, config) == []
    mla = parse_args(TINY_MOE + ["--multi-latent-attention"]).model
    assert model_config_differences(saved, mla) == [
        "--multi-latent-attention: checkpoint has False, this run has True"]


def test_checkpoints_compare_the_vocabulary_before_padding():
    """500 tokens pad to 504 rows at TP2 and 512 at TP4: the same model for a checkpoint; 512 tokens are not."""
    vocab = ["--vocab-size", "500", "--make-vocab-size-divisible-by", "4"]
    tp2, tp4 = (parse_args(TINY_MOE + vocab + ["--tensor-model-parallel-size", str(tp)]).model for tp in (2, 4))
    assert (tp2.vocab_size, tp4.vocab_size, tp2.real_vocab_size) == (504, 512, 500)
    assert model_config_differences(dataclasses.asdict(tp2), tp4) == []
    other = parse_args(TINY_MOE + ["--make-vocab-size-divisible-by", "4", "--tensor-model-parallel-size", "4"]).model
    assert model_config_differences(dataclasses.asdict(tp2), other) == [
        "--vocab-size: checkpoint has 500, this run has 512"]
