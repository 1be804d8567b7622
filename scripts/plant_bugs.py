"""Plant known bugs, one at a time, in a scratch copy of the repository and check that the tests catch each.

    python scripts/plant_bugs.py                       # every mutation
    python scripts/plant_bugs.py grad-norm-tp-twice    # the ones named
    python scripts/plant_bugs.py --list

For each mutation: copy the working tree (tracked files and untracked ones git does not ignore,
as they are on disk) to a temporary directory, replace the mutation's text (which must occur
exactly once) and run each of its pytest node ids there with this Python. Each must fail:
CAUGHT when it does; MISSED when it passes, NOT RUN when it is skipped, ERROR when pytest cannot
run it (or the text is not there once). The exit status is 1 unless every mutation was CAUGHT.
docs/testing.md lists the mutations; every new feature adds one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    description: str


MUTATIONS = [
    Mutation(
        "grad-norm-tp-twice", "megadual/training/grads.py",
        "    if record.replicated_over_tp and topo.tp_rank:\n        return False\n",
        "",
        ("tests/test_parallel_layouts.py::test_layout_matches_one_process[TP2-GQA]",),
        "the gradient norm counts TP-replicated gradients once per TP rank"),
    Mutation(
        "bias-update-skipped-on-rank-1", "megadual/training/step.py",
        "if update_bias and router.config.moe_router_enable_expert_bias:",
        "if update_bias and router.config.moe_router_enable_expert_bias and topo.rank != 1:",
        ("tests/test_parallel_layouts.py::test_layout_matches_one_process[DP3]",),
        "rank 1 never moves its routers' expert biases"),
    Mutation(
        "sp-grads-not-summed-over-tp", "megadual/training/grads.py",
        '    _all_reduce_coalesced(grads, topo.group("tp"))\n',
        "    pass\n",
        ("tests/test_parallel_layouts.py::test_layout_matches_one_process[TP2-SP]",),
        "the gradients of sequence-parallel parameters (norms, router) are not summed over TP"),
    Mutation(
        "dualpipe-mirror-grads-not-summed", "megadual/pipeline/driver.py",
        "lambda flat: flat + self.from_mirror(flat))",
        "lambda flat: flat + 0 * self.from_mirror(flat))",
        ("tests/test_parallel_pp.py::test_pipeline_matches_one_process[PP4-dualpipe]",),
        "DualPipe's two copies of a stage keep their own gradients instead of their sum"),
    Mutation(
        "dualpipe-mirror-router-stats", "megadual/training/step.py",
        "            sums = sums + pipeline.from_mirror(sums)",
        "            pipeline.from_mirror(sums)",
        ("tests/test_parallel_pp.py::test_pipeline_matches_one_process[PP4-dualpipe]",),
        "DualPipe's mirrored copies move their expert biases by their own loads only"),
    Mutation(
        "router-ignores-node-limit", "megadual/moe/router.py",
        "indices = node_limited_topk(choice, c.moe_router_topk, self.num_nodes, c.moe_router_max_nodes)",
        "indices = choice.topk(c.moe_router_topk, dim=-1).indices",
        ("tests/test_router.py::test_stats_and_aux_loss_use_final_node_limited_routing",),
        "the router takes the unrestricted top-k, sending tokens to more than M nodes"),
    Mutation(
        "triton-gemm-drops-b-scales", "megadual/fp8/triton_gemm.py",
        "* a_scale[:, None] * b_scale[None, :]",
        "* a_scale[:, None]",
        ("tests/test_fp8_gemm.py::test_gemm_error_vs_float64[Bblocks-384-cpu-triton]",),
        "the Triton FP8 GEMM kernel leaves out the weight's block scales"),
    Mutation(
        "dist-opt-mirror-shards-not-summed", "megadual/training/dist_optimizer.py",
        "            pipeline.sum_with_mirror(shards)\n",
        "            pass\n",
        ("tests/test_dist_optimizer.py::test_distributed_optimizer_takes_the_plain_steps[PP2xDP2xEP2-dualpipe-FP8]",),
        "with the distributed optimizer, DualPipe's mirrored ranks do not add their gradient shards"),
    Mutation(
        "dist-opt-norm-counts-dp-rank-0-only", "megadual/training/grads.py",
        "        return True  # every data-parallel rank holds a different piece\n",
        "        return topo.dp_rank == 0\n",
        ("tests/test_dist_optimizer.py::test_distributed_optimizer_takes_the_plain_steps[DP2]",),
        "the gradient norm of sharded gradients counts only data-parallel rank 0's shard"),
    Mutation(
        "dist-opt-decays-vectors", "megadual/training/dist_optimizer.py",
        " for record, p in b.pieces if decayed(record.param)])",
        " for record, p in b.pieces])",
        ("tests/test_dist_optimizer.py::test_distributed_optimizer_takes_the_plain_steps[DP2]",),
        "the distributed optimizer applies weight decay to norms (1-D parameters) too"),
    Mutation(
        "dist-opt-saves-own-shard-only", "megadual/training/dist_optimizer.py",
        "(bucket.views(bucket.gather(t))",
        "(bucket.views(t.repeat(bucket.size))",
        ("tests/test_dist_optimizer.py::test_checkpoints_resume_across_layouts_and_optimizers",),
        "the distributed optimizer's checkpoint holds its own shard of masters and moments in every rank's place"),
    Mutation(
        "dist-opt-deferred-grads-bypass-buckets", "megadual/training/loop.py",
        "accumulate_grad=optimizer.accumulate_grad if isinstance(optimizer, DistributedOptimizer)",
        "accumulate_grad=add_to_grad if isinstance(optimizer, DistributedOptimizer)",
        ("tests/test_dist_optimizer.py::test_distributed_optimizer_takes_the_plain_steps[PP2xDP2xEP2-dualpipe-FP8]",),
        "the pipeline's deferred (W-split) weight gradients go to param.grad, not the distributed optimizer's buckets"),
    Mutation(
        "dist-opt-grads-not-zeroed", "megadual/training/dist_optimizer.py",
        "            bucket.grads.zero_()\n",
        "            pass\n",
        ("tests/test_dist_optimizer.py::test_distributed_optimizer_takes_the_plain_steps[DP2]",),
        "the distributed optimizer's gradient buckets carry the previous steps' gradients"),
    Mutation(
        "dist-opt-clip-misses-shards", "megadual/training/dist_optimizer.py",
        "        return ReducedGradients(shards, counted, self._whole_gradients)",
        "        return ReducedGradients([], counted, self._whole_gradients)",
        ("tests/test_dist_optimizer.py::test_distributed_optimizer_takes_the_plain_steps[DP2]",),
        "clipping does not scale the distributed optimizer's gradient shards"),
    Mutation(
        "dist-opt-tp-partial-not-summed", "megadual/training/dist_optimizer.py",
        "for r in self.table if r.spec.grad_partial_over_tp],",
        "for r in self.table if False],",
        ("tests/test_dist_optimizer.py::test_distributed_optimizer_takes_the_plain_steps[TP2xDP2-SP-MLA]",),
        "with the distributed optimizer, gradients partial over TP (SP norms, MLA's latents) are not summed over TP"),
    Mutation(
        "dist-opt-load-drops-moments", "megadual/training/dist_optimizer.py",
        "            if optim is not None:\n",
        "            if False:\n",
        ("tests/test_dist_optimizer.py::test_checkpoints_resume_across_layouts_and_optimizers",),
        "the distributed optimizer loads a checkpoint's weights but not its Adam moments and step"),
    Mutation(
        "dist-opt-bf16-masters-whole", "megadual/training/buckets.py",
        "else initial[shard].clone()",
        "else initial.clone()[shard]",
        ("tests/test_dist_optimizer.py::test_optimizer_state_falls_as_one_over_dp",),
        "with BF16 weights each rank keeps the FP32 masters of the whole bucket (its shard a view of them)"),
    Mutation(
        "skipped-step-still-updates", "megadual/training/step.py",
        "    if finite:\n        grads.clip(norm, clip_grad)\n",
        "    if True:\n        grads.clip(norm, clip_grad)\n",
        ("tests/test_dist_optimizer.py::test_skipped_step_updates_nothing_masters_included",),
        "a step whose loss is not finite still updates the weights (with the distributed optimizer: the masters)"),
    Mutation(
        "dropout-sp-offset", "megadual/model/dropout.py",
        "        offset = self.tp.rank * s if self.tp.sequence_parallel else 0",
        "        offset = 0",
        ("tests/test_parallel_layouts.py::test_layout_matches_one_process[TP2-SPxEP2xDP2-dropout]",),
        "sequence-parallel ranks draw the mask of the sequence's start"),
    Mutation(
        "dropout-local-heads", "megadual/model/layers.py",
        "self.dropout, samples,\n                                self.tp.rank * self.heads)",
        "self.dropout, samples,\n                                0)",
        ("tests/test_parallel_layouts.py::test_layout_matches_one_process[TP2-SPxEP2xDP2-dropout]",),
        "the attention-dropout mask is keyed by the local head index"),
    Mutation(
        "dropout-global-rng", "megadual/model/dropout.py",
        "        keep = uniform(self.key, samples, counters) >= self.p",
        "        keep = torch.rand(torch.broadcast_shapes(samples.shape, counters.shape), device=x.device) >= self.p",
        ("tests/test_resume.py::test_resumed_losses_equal_uninterrupted",),
        "dropout masks drawn from the stateful global RNG: a resumed run no longer equals an uninterrupted one"),
    Mutation(
        "wgrad-always-defer", "megadual/parallel/linear.py",
        "    if store is None or not store.deferring:",
        "    if store is None:",
        ("tests/test_wgrad.py::test_deferrable_forward_whose_backward_is_not_split_computes_weight_grad_at_once",),
        "a deferrable forward's unsplit backward tries to defer its weight gradient"),
    Mutation("mla-k-rope-not-rotated", "megadual/model/mla.py",
        "k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin).expand(s, b, self.heads, -1)",
        "k_rope = k_rope.unsqueeze(2).expand(s, b, self.heads, -1)",
        ("tests/test_mla.py::test_equals_deepseeks_formulation_in_float64[q-lora]",),
        "MLA's shared RoPE key is not rotated"),
    Mutation("mla-rope-on-whole-heads", "megadual/model/mla.py",
        "        q = torch.cat([q_nope, apply_rotary(q_rope, cos, sin)], -1)\n        k = torch.cat([k_nope, k_rope], -1)\n",
        "        nope = rotary_tables(s, __import__('megadual.model.layers', fromlist=['f']).rotary_frequencies(c.qk_head_dim, c.rotary_base), x.device)\n"
        "        q = torch.cat([apply_rotary(q_nope, *nope), apply_rotary(q_rope, cos, sin)], -1)\n"
        "        k = torch.cat([apply_rotary(k_nope, *nope), k_rope], -1)\n",
        ("tests/test_mla.py::test_positions_enter_through_the_decoupled_rope_channels_only",),
        "RoPE rotates the heads' non-RoPE channels too"),
    Mutation("mla-kv-latent-not-normed", "megadual/model/mla.py",
        "torch.cat([query_input, self.kv_norm(c_kv), k_rope], -1)",
        "torch.cat([query_input, c_kv, k_rope], -1)",
        ("tests/test_mla.py::test_equals_deepseeks_formulation_in_float64[no-q-lora]",),
        "the key/value latent skips its RMSNorm"),
    Mutation("mla-softmax-scale-without-rope-dims", "megadual/model/mla.py",
        "scale = 1.0 / math.sqrt(config.qk_head_dim + config.qk_pos_emb_head_dim)",
        "scale = 1.0 / math.sqrt(config.qk_head_dim)",
        ("tests/test_mla.py::test_equals_deepseeks_formulation_in_float64[q-lora]",),
        "the softmax scale leaves the RoPE dims out"),
    Mutation("mla-yarn-mscale-ignored", "megadual/model/mla.py",
        "    return scale * yarn_mscale(config.rope_scaling_factor, config.mscale_all_dim) ** 2\n",
        "    return scale\n",
        ("tests/test_mla.py::test_softmax_scale_and_rope_magnitude_follow_deepseek_v3_and_v2_lite",),
        "YaRN's mscale^2 is left out of the softmax scale"),
    Mutation("yarn-ramp-reversed", "megadual/model/yarn.py",
        "return frequencies / factor * interpolated + frequencies * (1 - interpolated)",
        "return frequencies * interpolated + frequencies / factor * (1 - interpolated)",
        ("tests/test_mla.py::test_yarn_frequencies_follow_the_formula",),
        "YaRN interpolates the fast channels and keeps the slow ones"),
    Mutation("mla-down-proj-grad-not-summed-under-sp", "megadual/model/mla.py",
        "self.kv_down = ShardedLinear(h, config.kv_lora_rank + config.qk_pos_emb_head_dim, tp, None, std, gemm,\n                                     grad_partial_over_tp=sp)",
        "self.kv_down = ShardedLinear(h, config.kv_lora_rank + config.qk_pos_emb_head_dim, tp, None, std, gemm)",
        ("tests/test_mla_layouts.py::test_mla_layout_matches_one_process[no-q-lora-TP2-SPxEP2xDP2]",),
        "under sequence parallelism the replicated KV down-projection's gradient is not summed over TP"),
    Mutation("mla-down-proj-grad-summed-without-sp", "megadual/model/mla.py",
        "self.q_down = ShardedLinear(h, self.q_lora_rank, tp, None, std, gemm, grad_partial_over_tp=sp)",
        "self.q_down = ShardedLinear(h, self.q_lora_rank, tp, None, std, gemm, grad_partial_over_tp=tp.size > 1)",
        ("tests/test_mla_layouts.py::test_mla_layout_matches_one_process[q-lora-TP2xEP2xDP2]",),
        "without sequence parallelism the query down-projection's (already whole) gradient is summed over TP again"),
    Mutation("mla-linear-bypasses-gemm", "megadual/model/mla.py",
        "self.kv_up = ShardedLinear(config.kv_lora_rank, heads * (config.qk_head_dim + config.v_head_dim), tp, 0,\n                                   std, gemm)",
        "self.kv_up = ShardedLinear(config.kv_lora_rank, heads * (config.qk_head_dim + config.v_head_dim), tp, 0,\n                                   std)",
        ("tests/test_mla.py::test_every_linear_runs_through_the_layers_gemm",),
        "an MLA projection ignores the layer's GEMM (no FP8)"),
    Mutation("mla-flags-silently-ignored", "megadual/config.py",
        "    validate_attention_flags_given(m)\n", "",
        ("tests/test_config.py::test_mla_and_yarn_flags_are_refused_without_what_they_need",),
        "MLA flags given without --multi-latent-attention are ignored"),
    Mutation("mtp-loss-not-averaged-over-depths", "megadual/model/gpt.py",
        "scale = self.config.mtp_loss_scaling_factor / len(depths)",
        "scale = self.config.mtp_loss_scaling_factor",
        ("tests/test_mtp.py::test_mtp_losses_and_gradients_equal_the_reference",),
        "the MTP losses are summed over depths instead of averaged before scaling"),
    Mutation("mtp-wrong-token-shift", "megadual/model/mtp.py",
        "embed(ahead[:, k - 1:k - 1 + seq])",
        "embed(ahead[:, k:k + seq])",
        ("tests/test_mtp.py::test_mtp_losses_and_gradients_equal_the_reference",),
        "MTP depth k embeds t_{i+k+1}, the token it should predict, instead of t_{i+k}"),
    Mutation("mtp-computed-in-evaluation", "megadual/model/gpt.py",
        "if self.mtp is None or not (self.training or self.mtp_in_evaluation):",
        "if self.mtp is None:",
        ("tests/test_mtp.py::test_evaluation_computes_mtp_only_when_asked",),
        "evaluation computes the MTP losses without --mtp-eval-loss"),
    Mutation("mtp-projection-bypasses-gemm", "megadual/model/mtp.py",
        "config.init_method_std, ctx.gemm,\n",
        "config.init_method_std,\n",
        ("tests/test_mtp.py::test_every_mtp_linear_runs_through_the_layers_gemm",),
        "MTP's eh_proj ignores the layer's GEMM (no FP8)"),
    Mutation("mtp-shared-embedding-grad-lost-under-dualpipe", "megadual/pipeline/stage_model.py",
        "mtp_embed=embedder.embed if embedder else None)",
        "mtp_embed=(lambda tokens: embedder.embed(tokens).detach()) if embedder else None)",
        ("tests/test_parallel_mtp.py::test_mtp_matches_one_process[D1-PP2-dualpipexEP2xDP2]",),
        "under DualPipe the MTP's gradient never reaches the embedding it shares with the other copy's first stage"),
    Mutation("mtp-tied-embedding-grad-not-summed", "megadual/pipeline/driver.py",
        "grad += self._exchange(grad, self.embedding_twin)",
        "self._exchange(grad, self.embedding_twin)",
        ("tests/test_parallel_mtp.py::test_mtp_matches_one_process[D2-PP2-1f1bxTP2-SP]",),
        "under 1F1B the last stage's tied embedding (MTP's) and the first stage's keep their own gradients"),
    Mutation("hf-rope-rows-not-interleaved-out", "megadual/hf/names.py",
        "return _reorder_rope_rows(name, tensor, config, half_split_to_interleaved)", "return tensor",
        ("tests/test_hf_checkpoint.py::test_trained_checkpoint_converts_out_and_back_exactly",),
        "export leaves the RoPE rows half-split where HF's rope_interleave expects interleaved pairs"),
    Mutation("hf-rope-rows-wrong-way-in", "megadual/hf/names.py",
        "_reorder_rope_rows(name, tensor, config, interleaved_to_half_split) if interleaved",
        "_reorder_rope_rows(name, tensor, config, half_split_to_interleaved) if interleaved",
        ("tests/test_hf_checkpoint.py::test_hf_model_converts_in_with_its_logits_under_every_layout",),
        "import reorders the RoPE rows with the export's permutation instead of its inverse"),
    Mutation("hf-mtp-layer-numbered-one-late", "megadual/hf/names.py",
        'index = int(layer[1]) + (num_layers if name.startswith("mtp.") else 0)',
        'index = int(layer[1]) + (num_layers + 1 if name.startswith("mtp.") else 0)',
        ("tests/test_hf_checkpoint.py::test_trained_checkpoint_converts_out_and_back_exactly",),
        "an MTP module's transformer layer is written one layer after its enorm/hnorm/eh_proj"),
    Mutation("hf-expert-gate-up-swapped", "megadual/hf/names.py",
        '"mlp.experts.local.{e}.gate.weight": "mlp.experts.{e}.gate_proj.weight",\n'
        '    "mlp.experts.local.{e}.up.weight": "mlp.experts.{e}.up_proj.weight",',
        '"mlp.experts.local.{e}.gate.weight": "mlp.experts.{e}.up_proj.weight",\n'
        '    "mlp.experts.local.{e}.up.weight": "mlp.experts.{e}.gate_proj.weight",',
        ("tests/test_hf_checkpoint.py::test_hf_model_converts_in_with_its_logits_under_every_layout",),
        "the routed experts' gate and up projections trade places on conversion (same shapes)"),
    Mutation("hf-vocab-padding-exported", "megadual/hf/convert.py",
        "to_hf_rows(name, tensor, m)[:vocab] if name in VOCAB_ROWS", "to_hf_rows(name, tensor, m) if name in VOCAB_ROWS",
        ("tests/test_hf_checkpoint.py::test_trained_checkpoint_converts_out_and_back_exactly",),
        "export keeps the --make-vocab-size-divisible-by padding rows in the embedding and head"),
    Mutation("hf-group-rule-difference-unchecked", "megadual/hf/config_map.py",
        "m.moe_router_topk // kept != HF_GROUP_SCORE_TOPK:", "m.moe_router_topk // kept != m.moe_router_topk // kept:",
        ("tests/test_hf_checkpoint.py::test_conversion_refuses_what_hugging_face_would_compute_differently",),
        "conversion does not notice that HF ranks expert groups by their top 2, megadual by its top K/M"),
    Mutation("size-every-expert-active", "megadual/model/size.py",
        "experts * config.moe_router_topk // config.num_experts if config.num_experts else 0", "experts",
        ("tests/test_model_size.py::test_counts_equal_the_built_models_parameters",),
        "the active parameter count takes every routed expert instead of top-k of them"),
    Mutation(
        'stop-not-agreed-across-ranks', 'megadual/training/stopping.py',
        'dist.all_reduce(votes, op=dist.ReduceOp.MAX)',
        'pass',
        ('tests/test_stopping.py::test_a_signal_to_one_rank_stops_every_rank',),
        'each rank decides alone whether to stop, so a signal that reached one rank stops only that one'),
    Mutation(
        'second-ctrl-c-caught-again', 'megadual/training/stopping.py',
        '            signal.signal(signal.SIGINT, signal.SIG_DFL)\n',
        '            pass\n',
        ('tests/test_stopping.py::test_first_ctrl_c_stops_after_the_iteration_and_a_second_would_kill',),
        'a second Ctrl-C is caught like the first instead of ending the process'),
    Mutation(
        'exit-duration-ignored', 'megadual/training/stopping.py',
        'over_time = self.deadline is not None and time.monotonic() >= self.deadline',
        'over_time = False',
        ('tests/test_stopping.py::test_exit_duration_saves_and_stops',),
        '--exit-duration-in-mins never stops the run'),
    Mutation(
        'stop-without-saving', 'megadual/training/loop.py',
        '    saved = checkpoints.finish(state)',
        '    saved = result.stop_reason is None and checkpoints.finish(state)',
        ('tests/test_stopping.py::test_exit_duration_saves_and_stops',),
        'a run stopped early exits without saving'),
    Mutation(
        'world-without-distributed-timeout', 'megadual/training/distributed.py',
        'dist.init_process_group(backend, timeout=timeout)',
        'dist.init_process_group(backend)',
        ('tests/test_stopping.py::test_every_process_group_waits_the_distributed_timeout',),
        "the world group keeps gloo's 30-minute timeout: a stopped rank blocks the others in checkpoints and the stop agreement"),
    Mutation(
        'groups-without-distributed-timeout', 'megadual/parallel/topology.py',
        'dist.new_group(ranks, timeout=timeout)',
        'dist.new_group(ranks)',
        ('tests/test_stopping.py::test_every_process_group_waits_the_distributed_timeout',),
        "the DP/TP/EP/PP groups keep gloo's 30-minute timeout: a stopped rank blocks the others in training"),
    Mutation(
        'lost-rank-not-explained', 'pretrain_moe.py',
        'lost = lost_rank_message(e, config.train.distributed_timeout_minutes)',
        'lost = None',
        ('tests/test_lost_ranks.py::test_stopped_rank_ends_the_run_after_the_distributed_timeout',),
        "a collective timeout ends the run with gloo's raw traceback"),
    Mutation(
        'workers-outlive-their-agent', 'megadual/training/distributed.py',
        '    exit_with_torchrun_agent()\n',
        '',
        ('tests/test_lost_ranks.py::test_workers_exit_when_their_torchrun_agent_is_killed',),
        'workers of a killed torchrun agent train on (and save) by themselves'),
    Mutation(
        'token-ids-not-checked', 'megadual/data/builder.py',
        '    check_token_ids(dataset, vocab_size)\n',
        '',
        ('tests/test_entry_point.py::test_bad_data_and_bad_values_fail_at_start_up_with_one_line_each',),
        'token ids beyond the vocabulary reach the model'),
    Mutation(
        'token-id-cache-trusted-after-rewrite', 'megadual/data/token_ids.py',
        'if cached["files"] == identity:',
        'if cached:',
        ('tests/test_data_indexed.py::test_token_ids_outside_the_vocabulary_are_refused_and_the_scan_is_cached',),
        'the cached token-id range is used for a dataset rewritten since'),
    Mutation(
        'idx-pointer-stride-not-checked', 'megadual/data/indexed_dataset.py',
        '            if len(wrong):',
        '            if False:',
        ('tests/test_data_indexed.py::test_dtype_that_disagrees_with_the_bin_is_refused',),
        "an .idx whose pointers do not advance by its dtype's size is read"),
    Mutation(
        'bin-longer-than-idx-accepted', 'megadual/data/indexed_dataset.py',
        '        if size > end:',
        '        if False:',
        ('tests/test_data_indexed.py::test_dtype_that_disagrees_with_the_bin_is_refused',),
        'a .bin larger than its .idx describes (e.g. a uint16 file relabelled uint8) is read'),
    Mutation(
        'preprocess-failure-deletes-the-old-dataset', 'scripts/preprocess_data.py',
        'os.remove(_temporary(path))',
        'os.remove(path)',
        ('tests/test_data_preprocess.py::test_a_failed_run_leaves_the_previous_dataset_and_names_the_bad_input',),
        'a failed preprocess_data.py run removes the dataset that was there instead of its own temporary files'),
    Mutation(
        'empty-test-split-is-an-error', 'megadual/data/builder.py',
        '    if split_number == 1:',
        '    if split_number >= 1:',
        ('tests/test_entry_point.py::test_bad_data_and_bad_values_fail_at_start_up_with_one_line_each',),
        'the default --split 969,30,1 refuses a small corpus because of the unused test split'),
    Mutation(
        'negative-lr-read-as-a-flag', 'megadual/config.py',
        '    parser._negative_number_matcher = re.compile(r"^-(\\d+\\.?\\d*|\\.\\d+)([eE][-+]?\\d+)?$")\n',
        '',
        ('tests/test_entry_point.py::test_bad_data_and_bad_values_fail_at_start_up_with_one_line_each',),
        'argparse reads `--lr -1e-3` as two flags'),
    Mutation(
        'slurm-warning-not-passed-to-workers', 'scripts/pretrain_moe_slurm.sh',
        '--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 ',
        '',
        ('tests/test_launchers.py::test_slurm_time_limit_warning_saves_requeues_and_resumes_exactly',),
        'torchrun is not told to pass SIGUSR1 on, dies of it, and its workers save nothing'),
    Mutation(
        'slurm-requeued-run-starts-fresh', 'scripts/pretrain_moe_slurm.sh',
        'flags+=(--load "$save")',
        ':',
        ('tests/test_launchers.py::test_slurm_time_limit_warning_saves_requeues_and_resumes_exactly',),
        'the requeued job trains from scratch instead of resuming from --save'),
    Mutation(
        "recompute-router-stats-twice", "megadual/model/block.py",
        "recompute_context=self.mlp.router.stats_paused,",
        "recompute_context=torch.enable_grad,",
        ("tests/test_recompute.py::test_recomputation_changes_nothing[MHA]",),
        "a recomputed MoE forward counts its tokens in the router statistics a second time"),
    Mutation(
        "recompute-wgrad-deferrable-now", "megadual/parallel/recompute.py",
        "        if store is not None:\n            recompute_context = _also(",
        "        if False:\n            recompute_context = _also(",
        ("tests/test_recompute.py::test_recomputation_changes_nothing[MHA]",),
        "a recomputation builds its linears for the W split as the current forward does, not as its own forward did"),
    Mutation(
        "activations-never-freed", "megadual/training/memory.py",
        "        self.current -= self.live.pop(key)",
        "        self.live.pop(key)",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[PP2-1f1b]",),
        "the memory report counts an activation as held after it is freed"),
    Mutation(
        "recomputed-not-counted", "megadual/parallel/recompute.py",
        "                self.recomputed[index] = kept\n                self._observe(kept)",
        "                self.recomputed[index] = kept",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[one process, full recomputation]",),
        "the memory report leaves out what a backward recomputes"),
    Mutation(
        "planner-w-inputs-free-at-backward", "megadual/memory_model.py",
        "            if defers_w:\n                live += acts.weight_inputs",
        "            if defers_w:\n                live += 0.0",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[PP2-1f1b-full-block]",),
        "the planner frees a deferred W's GEMM inputs at the input-gradient backward"),
    Mutation(
        "planner-dualpipe-one-copy", "megadual/rank_memory.py",
        "        held[rank].append((chunk, specs[stage]))",
        "        held[rank].append((chunk, specs[stage])) if chunk == 0 else None",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[PP2-dualpipexEP2]",),
        "the planner counts one copy of a DualPipe rank's two stages"),
    Mutation(
        "planner-mtp-tied-embedding-missed", "megadual/rank_memory.py",
        "            params += _dense(c.vocab_size // layout.tp * c.hidden_size)  # MTP's tied embedding",
        "            params += _dense()  # MTP's tied embedding",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[PP2-1f1b-MTP2]",),
        "the planner leaves out the embedding copy 1F1B's last stage keeps for MTP"),
    Mutation(
        "planner-paired-forward-always-first", "megadual/memory_model.py",
        "        forward_after = forward >= 0 and backward >= 0 and exchanges is not None and not exchanges[backward]",
        "        forward_after = False",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[PP4-dualpipev]",),
        "the planner holds a paired F&B's forward beside its backward when no all-to-all runs it early"),
    Mutation(
        "planner-zero1-step-counts-missed", "megadual/rank_memory.py",
        "        total += per_element * -(-elements // group) + FP32 * buckets",
        "        total += per_element * -(-elements // group)",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[DP2xEP2-distributed-optimizer]",),
        "the planner's distributed-optimizer state leaves out each bucket's step count"),
    Mutation(
        'ckpt-fresh-start-over-save', 'megadual/training/checkpoint/load.py',
        '    if t.save and holds_checkpoints(t.save):',
        '    if False:',
        ('tests/test_checkpoint_load.py::test_a_load_that_cannot_be_meant_is_refused[no --load, --save has checkpoints]',
         'tests/test_checkpoint_load.py::test_a_load_that_cannot_be_meant_is_refused[typo, --save has checkpoints]'),
        'a missing or mistyped --load trains from scratch over the checkpoints in --save'),
    Mutation(
        'ckpt-load-iter-folder-ignored', 'megadual/training/checkpoint/load.py',
        '    if iteration_of(load) is not None:',
        '    if False:',
        ('tests/test_checkpoint_load.py::test_load_naming_an_iteration_folder_loads_that_folder',),
        '--load naming an iter_NNNNNNN folder is not loaded as that folder'),
    Mutation(
        'ckpt-empty-load-refused', 'megadual/training/checkpoint/load.py',
        '    if not t.load or why == "is empty":',
        '    if not t.load:',
        ('tests/test_checkpoint_load.py::test_nothing_to_load_starts_from_scratch_and_says_so[empty directory]',),
        'an empty --load directory is refused instead of a logged fresh start'),
    Mutation(
        'ckpt-retrain-below-loaded-iteration', 'megadual/training/checkpoint/manager.py',
        'self.found.train_state.iteration < train_iters:',
        'self.found.train_state.iteration < train_iters + 1000:',
        ('tests/test_checkpoint_load.py::test_train_iters_at_or_below_the_checkpoint_exits_writing_nothing',),
        '--train-iters at or below the loaded iteration builds the run instead of exiting at once, saying so'),
    Mutation(
        'ckpt-tracker-before-folder', 'megadual/training/checkpoint/save.py',
        '        os.rename(staging, final)\n',
        '        write_tracker(self.root, iteration)\n        os.rename(staging, final)\n',
        ('tests/test_checkpoint_save.py::test_every_moment_of_a_save_leaves_a_loadable_checkpoint',),
        'the tracker moves before the new folder is in place, so a kill between leaves it naming no checkpoint'),
    Mutation(
        'ckpt-second-writer-allowed', 'megadual/training/checkpoint/lock.py',
        '            if _create_exclusively(path, me):',
        '            if _create_exclusively(path, me) or True:',
        ('tests/test_checkpoint_lock.py::test_a_second_trainer_is_refused_at_start_up',),
        'a second trainer on the same --save is not refused'),
    Mutation(
        'ckpt-save-checked-only-when-saving', 'megadual/training/checkpoint/manager.py',
        '                took_over = self.coord.on_rank0(self._take_lock)',
        '                took_over = None',
        (('tests/test_checkpoint_lock.py::test_a_save_directory_that_cannot_be_written_is_refused_at_start_up'
          '[file in the path]'),),
        'an unwritable --save is found only when the first save fails, after training (and no lock is taken)'),
    Mutation(
        'ckpt-checksum-not-compared', 'megadual/training/checkpoint/integrity.py',
        '    if crc != expected["crc32"]:',
        '    if False:',
        ('tests/test_checkpoint_integrity.py::test_every_flipped_run_of_bytes_is_found',
         'tests/test_checkpoint_integrity.py::test_corrupt_checkpoint_is_skipped_and_a_failed_save_keeps_the_previous'),
        'flipped bytes in a checkpoint file load silently (sizes still checked)'),
    Mutation(
        'ckpt-no-fallback-past-corrupt', 'megadual/training/checkpoint/load.py',
        '        if found.named:',
        '        if True:',
        ('tests/test_checkpoint_integrity.py::test_corrupt_checkpoint_is_skipped_and_a_failed_save_keeps_the_previous',),
        '--load of a directory whose newest checkpoint is corrupt fails instead of taking the newest that verifies'),
    Mutation(
        'ckpt-failed-save-ignored', 'megadual/training/checkpoint/manager.py',
        '        if not self.config.train.save_failures_continue:',
        '        if False:',
        ('tests/test_checkpoint_integrity.py::test_corrupt_checkpoint_is_skipped_and_a_failed_save_keeps_the_previous',),
        'a failed save is only logged and training goes on without --save-failures-continue'),
    Mutation(
        'ckpt-save-after-skipped-step', 'megadual/training/checkpoint/manager.py',
        '        if skipped:',
        '        if False:',
        ('tests/test_checkpoint_save.py::test_no_checkpoint_from_a_skipped_step',),
        'a save falling due on a skipped (non-finite) step is written, so the tracker may name diverged weights'),
    Mutation(
        'ckpt-retention-before-verify', 'megadual/training/checkpoint/save.py',
        '        if problem is not None:',
        '        if False:',
        ('tests/test_checkpoint_save.py::test_keep_last_n_removes_older_checkpoints_only_after_a_newer_one_verified',),
        '--keep-last-n-checkpoints removes older folders although the new one does not verify'),
    Mutation(
        'ckpt-async-published-before-written', 'megadual/training/checkpoint/save.py',
        'lambda: self.coord.everywhere(upload.result))',
        'lambda: None)',
        ('tests/test_checkpoint_save.py::test_an_async_save_holds_its_own_iteration_while_training_goes_on',),
        '--async-save checksums, renames and moves the tracker without waiting for the background write'),
    Mutation(
        "combine-keeps-one-row", "megadual/moe/dispatcher.py",
        "return back.new_zeros(d.num_tokens, back.shape[-1]).index_add(0, d.token_of_row, back)",
        "return back.new_zeros(d.num_tokens, back.shape[-1]).index_copy(0, d.token_of_row, back)",
        ("tests/test_parallel_layouts.py::test_layout_matches_one_process[EP4-on-2-nodes-M2]",),
        "each hop's combine keeps one of a row's returned results instead of their sum (the "
        "hierarchical path's in-node sum included; both paths then keep the same one, so only the "
        "comparison with one process sees it)"),
    Mutation(
        "hierarchical-outputs-in-sorted-order", "megadual/moe/hierarchical.py",
        "d.gates[order])[arrival]",
        "d.gates[order])",
        ("tests/test_dispatch_layouts.py::test_hierarchical_dispatch_matches_flat_and_crosses_each_node_once",),
        "hop 2's expert outputs go back in the flat path's order instead of the order the rows arrived in"),
    Mutation(
        "dispatch-rows-to-self-counted", "megadual/moe/dispatcher.py",
        "if node == own and q != index)",
        "if node == own)",
        ("tests/test_dispatch.py::test_a_token_crosses_to_a_node_once_and_is_forwarded_inside_it",),
        "the intra-node rows per token count the rows a rank sends to itself"),
    Mutation(
        "local-dispatch-skips-fp8-rounding", "megadual/moe/dispatcher.py",
        "            tokens = _AsDispatched.apply(tokens, self.codec)",
        "            pass",
        ("tests/test_dispatch.py::test_without_expert_parallelism_the_layer_skips_the_exchange_and_computes_the_same",),
        "without expert parallelism the experts see unrounded tokens under --moe-fp8-dispatch"),
    Mutation(
        "emulated-link-free", "megadual/parallel/emulate.py",
        "        _sleep_until(self._record.deadline)",
        "        pass",
        ("tests/test_emulate.py::test_collectives_finish_no_earlier_than_modelled_and_compute_hides_them",),
        "an emulated collective finishes when gloo does, not when its bytes could have crossed the link"),
    Mutation(
        "flop-count-shared-experts-dropped", "megadual/model/flops.py",
        "return gemm(c.hidden_size, c.num_experts) + routed + shared",
        "return gemm(c.hidden_size, c.num_experts) + routed",
        ("tests/test_flops.py::test_flop_count_equals_the_flop_counter[gqa]",),
        "--log-throughput's FLOP count leaves out the shared experts"),
    Mutation(
        "grouped-experts-wrong-order", "megadual/moe/experts.py",
        "experts = list(self.local.values())",
        "experts = list(reversed(self.local.values()))",
        ("tests/test_grouped_gemm.py::test_grouped_experts_equal_the_per_expert_loop[fp32]",
         "tests/test_grouped_gemm.py::test_grouped_experts_defer_their_weight_gradients_to_the_w_action"),
        "the grouped GEMM gives each expert's tokens another expert's weights"),
    Mutation(
        "fused-cross-entropy-target-order", "megadual/parallel/tensor.py",
        "reduction=\"none\").view(target.shape)",
        "reduction=\"none\").view(target.shape).flip(0)",
        ("tests/test_cross_entropy.py::test_fused_cross_entropy_equals_the_written_out_one",),
        "the fused cross entropy (no TP) returns the token losses in another order"),
]


class MutationError(ValueError):
    pass


def working_tree_files(repo: Path) -> list[str]:
    """Tracked files and untracked ones git does not ignore, relative to `repo`, as far as they exist."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=repo, check=True, capture_output=True).stdout
    names = sorted({os.fsdecode(name) for name in listed.split(b"\0") if name})
    return [name for name in names if (repo / name).is_file()]  # a tracked file deleted on disk is gone


def copy_working_tree(repo: Path, dst: Path) -> None:
    for name in working_tree_files(repo):
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, dst / name)


def plant(mutation: Mutation, root: Path) -> None:
    """Apply `mutation` to the tree at `root`, refusing unless its text occurs exactly once."""
    path = root / mutation.file
    text = path.read_text()
    count = text.count(mutation.find)
    if count != 1:
        raise MutationError(f"{mutation.id}: the text to replace occurs {count} times in {mutation.file}, "
                            f"not once: {mutation.find!r}")
    path.write_text(text.replace(mutation.find, mutation.replace))


def run_test(node: str, root: Path, timeout: float) -> tuple[str, str]:
    """(verdict, pytest's output) of running the test `node` in the tree at `root`."""
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", node]
    try:
        result = subprocess.run(command, cwd=root, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "ERROR", f"{node}: pytest ran past {timeout:.0f} s"
    output = result.stdout + result.stderr
    if result.returncode == 1:
        return "CAUGHT", output
    if result.returncode != 0:
        return "ERROR", output
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    return ("MISSED" if " passed" in f" {summary}" else "NOT RUN"), output


def check(mutation: Mutation, repo: Path, timeout: float) -> list[tuple[str, str]]:
    """(verdict, pytest's output) of each of `mutation`'s tests, run with it planted in a scratch copy of `repo`."""
    with tempfile.TemporaryDirectory(prefix=f"plant-{mutation.id}-") as scratch:
        root = Path(scratch)
        copy_working_tree(repo, root)
        plant(mutation, root)
        return [run_test(node, root, timeout) for node in mutation.tests]


def overall(verdicts: list[str]) -> str:
    """CAUGHT only when every test failed; otherwise the worst of the others."""
    return next((v for v in ("ERROR", "MISSED", "NOT RUN") if v in verdicts), "CAUGHT")


def report(mutation: Mutation, timeout: float, verbose: bool) -> str:
    """Plant `mutation` in a scratch copy of this repository; print its verdict and each test's; return it."""
    try:
        results = check(mutation, REPO, timeout)
    except MutationError as err:
        print(f"ERROR    {err}", flush=True)
        return "ERROR"
    verdict = overall([v for v, _ in results])
    print(f"{verdict:<8} {mutation.id}", flush=True)
    for node, (node_verdict, output) in zip(mutation.tests, results):
        print(f"    {node_verdict:<8} {node}", flush=True)
        if verbose or node_verdict in ("ERROR", "NOT RUN"):
            print(output[-3000:], flush=True)
    return verdict


def select(ids: list[str]) -> list[Mutation]:
    by_id = {m.id: m for m in MUTATIONS}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise SystemExit(f"unknown mutation(s) {unknown}; known: {list(by_id)}")
    return [by_id[i] for i in ids] if ids else MUTATIONS


def markdown_table(mutations: list[Mutation]) -> str:
    rows = ["| id | the bug | the tests that must fail |", "|---|---|---|"]
    rows += [f"| `{m.id}` | {m.description} | " + "<br>".join(f"`{t.removeprefix('tests/')}`" for t in m.tests) + " |"
             for m in mutations]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="mutations to plant (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--markdown", action="store_true", help="print docs/testing.md's table and exit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each test run may take")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output of each")
    args = parser.parse_args(argv)
    mutations = select(args.ids)
    if args.list:
        for m in mutations:
            print(f"{m.id:<34} {m.file:<34} {m.description}")
        return 0
    if args.markdown:
        print(markdown_table(mutations))
        return 0
    verdicts = [report(m, args.timeout, args.verbose) for m in mutations]
    return 0 if all(v == "CAUGHT" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
