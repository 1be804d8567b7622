"""Planted bugs in the planner (megadual/plan/) (scripts/mutations.py gathers every area)."""
from mutation import Mutation

MUTATIONS = [
    Mutation(
        "planner-w-inputs-free-at-backward", "megadual/plan/memory_model.py",
        "            if defers_w:\n                live += acts.weight_inputs",
        "            if defers_w:\n                live += 0.0",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[PP2-1f1b-full-block]",),
        "the planner frees a deferred W's GEMM inputs at the input-gradient backward"),
    Mutation(
        "planner-dualpipe-one-copy", "megadual/plan/rank_memory.py",
        "        held[rank].append((chunk, specs[stage]))",
        "        held[rank].append((chunk, specs[stage])) if chunk == 0 else None",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[PP2-dualpipexEP2]",),
        "the planner counts one copy of a DualPipe rank's two stages"),
    Mutation(
        "planner-mtp-tied-embedding-missed", "megadual/plan/rank_memory.py",
        "        params += _dense(c.vocab_size // layout.tp * c.hidden_size)  # MTP's tied embedding",
        "        params += _dense()  # MTP's tied embedding",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[PP2-1f1b-MTP2]",),
        "the planner leaves out the embedding copy 1F1B's last stage keeps for MTP"),
    Mutation(
        "planner-paired-forward-always-first", "megadual/plan/memory_model.py",
        "        forward_alone = forward >= 0 and backward < 0",
        "        forward_alone = forward >= 0",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[PP4-dualpipev]",
         "tests/test_oracles_planner.py::test_a_paired_backward_frees_down_to_each_pause_as_the_forward_fills"),
        "the planner holds a paired F&B's forward beside its backward when no all-to-all runs it early"),
    Mutation(
        "planner-zero1-step-counts-missed", "megadual/plan/rank_memory.py",
        "        total += per_element * -(-elements // group) + FP32 * buckets",
        "        total += per_element * -(-elements // group)",
        ("tests/test_memory_layouts.py::test_planner_predicts_the_memory_report[DP2xEP2-distributed-optimizer]",),
        "the planner's distributed-optimizer state leaves out each bucket's step count"),
    Mutation(
        "planner-bf16-weights-in-both-columns", "megadual/plan/rank_memory.py",
        "o, bf16 = config.optim, distributed and bool(config.train.bf16)",
        "o, bf16 = config.optim, bool(config.train.bf16)",
        ("tests/test_plan.py::test_parameters_are_counted_in_the_dtype_held",),
        "the planner shows BF16 weights for the plain optimizer too (it keeps FP32 weights)"),
    Mutation(
        "planner-moments-always-fp32", "megadual/plan/rank_memory.py",
        "moments = sum(2 if distributed and o.use_precision_aware_optimizer and dtype == \"bf16\" else FP32",
        "moments = sum(FP32",
        ("tests/test_plan.py::test_parameters_are_counted_in_the_dtype_held",),
        "the planner counts --exp-avg-dtype/--exp-avg-sq-dtype bf16 moments as FP32"),
    Mutation(
        "planner-no-autocast-weight-copies", "megadual/plan/tensor_bytes.py",
        "        return elements * 2 if kept else 0.0",
        "        return 0.0",
        ("tests/test_layer_memory.py::test_planner_counts_every_tensor_a_layer_keeps_in_every_precision"
         "[MHA dense-bf16-none]",),
        "the planner leaves out the BF16 copies autocast makes of FP32 weights for the GEMMs"),
    Mutation(
        "plan-bf16-default-cpu", "megadual/plan/cli.py",
        'parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",',
        'parser.add_argument("--device", choices=("cuda", "cpu"), default="cpu",',
        ("tests/test_plan.py::test_bf16_default_follows_the_device_planned_for",),
        "python -m megadual.plan plans for FP32 when --bf16 is left out, though CUDA runs default to BF16"),
    Mutation(
        "plan-gpus-without-memory", "megadual/plan/cli.py",
        "    if args.gpu_memory_gib is None or args.gpu_memory_gib <= 0:",
        "    if False:",
        ("tests/test_plan.py::test_bad_arguments_are_refused_in_one_line",),
        "python -m megadual.plan --gpus N without --gpu-memory-gib searches anyway"),
    Mutation(
        "plan-json-plain-optimizer", "megadual/plan/cli.py",
        "             for r in predict(config, world)]",
        "             for r in predict(config, world, False)]",
        ("tests/test_plan.py::test_json_prints_the_chosen_optimizers_ranks_in_mb",),
        "--json shows the plain optimizer's figures whatever the flags choose"),
    Mutation(
        "plan-breakdown-misses-deferred-w", "megadual/plan/cli.py",
        "        if deferred:\n",
        "        if False:\n",
        ("tests/test_plan.py::test_breakdown_adds_up_to_the_peak",),
        "--breakdown leaves out the GEMM inputs kept for deferred W actions"),
    Mutation(
        "search-own-flop-count", "megadual/plan/layout_search.py",
        "f = stage_forward_flops_per_token(m, layers, spec.has_head) * seconds",
        "f = stage_forward_flops_per_token(m, layers, False) * seconds",
        ("tests/test_plan.py::test_search_compute_is_the_throughput_flop_count",),
        "the layout search's compute leaves out the head and MTP that --log-throughput counts"),
    Mutation(
        "search-ep-times-tp-node-rule", "megadual/plan/layout_search.py",
        "spans_nodes = nodes_per_ep_group(layout.ep, hw.gpus_per_node) > 1",
        "spans_nodes = layout.ep * layout.tp > hw.gpus_per_node",
        ("tests/test_plan.py::test_search_takes_expert_groups_as_the_topology_builds_them",),
        "the search takes an EP group as spanning EP x TP ranks, not EP consecutive ranks"),
    Mutation(
        "planner-mla-kv-norm-missed", "megadual/plan/rank_memory.py",
        "count += query + _dense(h * (c.kv_lora_rank + c.qk_pos_emb_head_dim), c.kv_lora_rank,",
        "count += query + _dense(h * (c.kv_lora_rank + c.qk_pos_emb_head_dim),",
        ("tests/test_oracles_planner.py::test_planner_counts_every_parameter_each_rank_builds[MLA-no-q-lora]",),
        "the planner leaves MLA's key/value latent norm out of its parameter count"),
    Mutation(
        "planner-moe-act-in-full-precision", "megadual/plan/memory_model.py",
        "acts.add(swiglu_in + down_in + copies, down_in, moe_act, kept_inputs=codec_bytes(pairs, ffn) * 2,",
        "acts.add(swiglu_in + down_in + copies, down_in, moe_act, kept_inputs=swiglu_in,",
        ("tests/test_layer_memory.py::test_planner_counts_every_tensor_a_layer_keeps_in_fp32"
         "[MHA MoE-mla_up_proj core_attn moe_act-2]",),
        "the planner counts moe_act's SwiGLU input in full precision"),
    # issue 19 (s3-mem)
    Mutation(
        "planner-router-keeps-norm-output", "megadual/plan/memory_model.py",
        "acts.add(norm + router_in, router_in, \"layernorm\" in mods, kept_inputs=norm_kept,",
        "acts.add(norm + router_in, router_in, \"layernorm\" in mods, kept_inputs=norm_kept + router_in,",
        (("tests/test_layer_memory.py::test_planner_counts_every_tensor_a_layer_keeps_in_fp32"
         "[MHA MoE-layernorm moe_act-2]"),),
        "the planner counts the router's input under layernorm, which the norm's region drops"),
    Mutation(
        "planner-rows-kept-per-pair", "megadual/plan/memory_model.py",
        "if rows_kept_once(p, mods, received, pairs):",
        "if False:",
        (("tests/test_layer_memory.py::test_planner_counts_every_tensor_a_layer_keeps_in_every_precision"
         "[MHA MoE-bf16-weights-none]"),),
        "the planner counts gate and up's copies per (row, expert) pair where the experts keep the rows once"),
    # issue 22 (s3-bench)
    Mutation(
        "search-pairs-at-chunk-level", "megadual/plan/layout_search.py",
        "comm_f=sum(hops), comm_b=sum(hops), hops_f=forward,",
        "comm_f=sum(hops), comm_b=sum(hops), hops_f=None,",
        ("tests/test_plan.py::test_search_times_a_paired_chunk_hop_by_hop",),
        "the layout search times a paired F&B by its chunk totals, blind to a hop longer than its step"),
    Mutation(
        "search-backward-hops-in-forward-order", "megadual/plan/layout_search.py",
        "back = [backward * p for p in reversed(pieces)]",
        "back = [backward * p for p in pieces]",
        ("tests/test_plan.py::test_search_times_a_paired_chunk_hop_by_hop",),
        "the layout search's backward meets its hops in the forward's order"),
    # issue 23 (s3-mut)
    Mutation(
        "planner-expert-state-over-dp", "megadual/plan/rank_memory.py",
        "(params.expert_elements, expert_dp)):",
        "(params.expert_elements, layout.dp)):",
        ("tests/test_oracles_planner.py::test_zero1_keeps_each_ranks_shard_of_moments_and_masters_and_a_step_per_bucket",),
        "the planner shards the experts' distributed-optimizer state over DP, not their expert-DP group"),
    # issue 19 (s3-plan)
    Mutation(
        "planner-sdpa-keeps-fp8-outputs-uncast", "megadual/plan/tensor_bytes.py",
        "        return 2 if self.autocast else self.gemm_out",
        "        return self.gemm_out",
        ("tests/test_layer_memory.py::test_planner_counts_every_tensor_a_layer_keeps_in_every_precision"
         "[MLA MoE-fp8-bf16-none]",
         "tests/test_memory_layouts.py::test_planner_predicts_each_precisions_activations_within_5_percent"
         "[quick-start FP8+BF16 plain]"),
        "the planner counts SDPA's q, k, v and output in the FP8 linears' FP32 under --bf16 with FP32 weights, "
        "not in autocast's BF16 casts"),
    Mutation(
        "planner-bi-forwards-keep-weight-copies", "megadual/plan/tensor_bytes.py",
        "kept = self.autocast and not self.fp8 and not self.bf16_weights and not self.recast_weights",
        "kept = self.autocast and not self.fp8 and not self.bf16_weights",
        ("tests/test_memory_layouts.py::test_planner_predicts_each_precisions_activations_within_5_percent"
         "[quick-start BF16 plain selective mla_up_proj core_attn moe_act PP2-dualpipexEP2]",),
        "the planner counts autocast's weight copies for forwards whose backward is a BI (their linears "
        "recast the weights in the backward)"),
    Mutation(
        "planner-recomputed-core-inputs-as-sdpa-casts", "megadual/plan/memory_model.py",
        "kept_alone = (g, latent_bytes) if",
        "kept_alone = (p.attention, p.attention) if",
        ("tests/test_layer_memory.py::test_planner_counts_every_tensor_a_layer_keeps_in_every_precision"
         "[MLA MoE-fp8-bf16-core_attn]",
         "tests/test_layer_memory.py::test_planner_counts_every_tensor_a_layer_keeps_in_every_precision"
         "[MLA no q-lora MoE-bf16-core_attn]"),
        "the planner counts the q and k a recomputed core attention keeps as its inputs in SDPA's dtype "
        "(autocast's casts), not as they came"),
    # issue 23 (s4-mut)
    Mutation(
        "planner-stages-ignore-first-stage-layers", "megadual/plan/rank_memory.py",
        "len(placement.paths[0]), p.decoder_first_pipeline_num_layers,",
        "len(placement.paths[0]), None,",
        ("tests/test_oracles_rank_memory.py::test_each_rank_holds_its_schedules_stages_in_chunk_order",),
        "the planner places the layers as if --decoder-first-pipeline-num-layers were unset (the last "
        "stage's count alone decides a 2-stage split, not a 4-stage one)"),
    # issue 22 (s4-pair)
    Mutation(
        "planner-pair-holds-both-micro-batches", "megadual/plan/memory_model.py",
        "pair = held + (steps_f.pauses[j][0] if j < len(steps_f.pauses) else steps_f.kept)",
        "pair = acts.kept + steps_f.kept",
        ("tests/test_oracles_planner.py::test_a_paired_backward_frees_down_to_each_pause_as_the_forward_fills",
         "tests/test_memory_layouts.py::test_planner_predicts_the_paired_schedules_within_5_percent"
         "[PP2-1f1bxEP2-overlap]",
         "tests/test_memory_layouts.py::test_planner_predicts_the_paired_schedules_within_5_percent"
         "[PP2xV2xEP2-interleaved-overlap]"),
        "a paired F&B holds both micro-batches whole while it runs, though the backward frees its "
        "layers as the forward's allocate (pipeline/overlap.py)"),
    # issue 22 (sim* within 5%)
    Mutation(
        "plan-counts-pass-the-hops-in-flight", "megadual/plan/layout_search.py",
        "tuple(lead), drain=(first_drain, *drain[1:]))",
        "tuple(lead))",
        ("tests/test_plan.py::test_search_times_a_paired_chunk_hop_by_hop",),
        "the planner's pairs send a dispatch's token counts past the other side's hops on the link"),
]
