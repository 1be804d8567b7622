"""The checks of a run configuration: each rule once, each message naming the flag at fault.

`validate` needs only the flags; `validate_world` checks the parallel layout against the
world the run is launched on. Both are arithmetic on the config, with no torch.distributed,
so the entry point runs them before any process group exists.
"""
from __future__ import annotations

import dataclasses

from megadual.config import (
    ATTENTION_VARIANT_FLAGS,
    ITERATION_SCHEDULE_FLAGS,
    SAMPLE_SCHEDULE_FLAGS,
    SCHEDULES,
    YARN_FLAGS,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    flag_name,
)
from megadual.data.batch_ramp import BatchRamp
from megadual.data.data_args import parse_data_path, parse_split


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_ranges(c: RunConfig) -> None:
    """Every flag against the range its field declares; a flag left out (None) is not checked."""
    for section in dataclasses.fields(c):
        values = getattr(c, section.name)
        for f in dataclasses.fields(values):
            bounds = f.metadata.get("flag", {}).get("range")
            value = getattr(values, f.name)
            _require(bounds is None or value is None or bounds.holds(value),
                     f"{flag_name(f.name)} must be {bounds.text() if bounds else ''}, got {value}")


def validate(c: RunConfig) -> None:
    """Checks that need no process group; layout checks against the world are in validate_world."""
    m, t, o, d = c.model, c.train, c.optim, c.data
    validate_ranges(c)
    if m.multi_latent_attention:
        _validate_mla(m, c.parallel)
    else:
        _require(m.hidden_size % m.num_attention_heads == 0,
                 f"--hidden-size ({m.hidden_size}) must be divisible by --num-attention-heads "
                 f"({m.num_attention_heads})")
        _require(m.head_dim % 2 == 0, "--hidden-size / --num-attention-heads must be even for rotary embeddings")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"--num-attention-heads ({m.num_attention_heads}) must be divisible by --num-query-groups "
             f"({m.num_query_groups})")
    if m.num_experts:
        _validate_moe(m)
        _require(not c.parallel.moe_grouped_gemm or grouped_gemm_fits(m),
                 f"--moe-grouped-gemm needs --hidden-size ({m.hidden_size}) and --moe-ffn-hidden-size "
                 f"({m.moe_ffn_hidden_size}) to be multiples of 8")
    _validate_mtp(m, t)
    _validate_pipeline_layers(m, c.parallel)
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"--global-batch-size ({t.global_batch_size}) must be divisible by --micro-batch-size "
             f"({t.micro_batch_size})")
    _validate_optimizer(o)
    _require(not (o.use_distributed_optimizer and m.mtp_num_layers and c.parallel.pipeline_model_parallel_size > 1
                  and c.parallel.pipeline_schedule not in ("dualpipe", "dualpipev")),
             "--use-distributed-optimizer with --mtp-num-layers needs --pipeline-schedule dualpipe or dualpipev "
             "when --pipeline-model-parallel-size > 1: the MTP modules' tied copy of the embedding on the last "
             "stage is not sharded yet")
    _validate_schedule_kind(o, t)
    _require(not (t.save_interval and not t.save), "--save-interval needs --save")
    for name in ("keep_last_n_checkpoints", "async_save", "save_failures_continue"):
        _require(not getattr(t, name) or t.save is not None, f"{flag_name(name)} needs --save")
    _require(bool(d.data_path) != d.mock_data, "give exactly one of --data-path and --mock-data")
    _validate_data(d, t)
    if d.tokenizer_type == "HuggingFaceTokenizer":
        _require(d.tokenizer_model is not None, "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model")
    else:
        _require(d.tokenizer_model is None, f"--tokenizer-model is read by HuggingFaceTokenizer only, not by "
                                            f"--tokenizer-type {d.tokenizer_type}")
    _require(c.fp8.fp8_format is not None or not c.fp8.moe_fp8_dispatch,
             "--moe-fp8-dispatch needs --fp8-format e4m3")
    _validate_recompute(t, m)


def _validate_recompute(t, m: ModelConfig) -> None:
    """Megatron's rules: full needs a method and a layer count, selective takes neither."""
    granularity = t.recompute_granularity
    if granularity == "full":
        _require(t.recompute_method is not None, "--recompute-granularity full needs --recompute-method "
                                                 "(uniform or block)")
        _require(t.recompute_num_layers is not None and t.recompute_num_layers >= 1,
                 "--recompute-granularity full needs --recompute-num-layers >= 1")
    else:
        for name in ("recompute_method", "recompute_num_layers"):
            _require(getattr(t, name) is None, f"{flag_name(name)} applies to --recompute-granularity full only")
    _require(len(t.recompute_modules) > 0, "--recompute-modules needs at least one module")
    if granularity != "selective":
        _require(tuple(t.recompute_modules) == ("core_attn",),
                 "--recompute-modules needs --recompute-granularity selective")
    _require("mla_up_proj" not in t.recompute_modules or m.multi_latent_attention,
             "--recompute-modules mla_up_proj needs --multi-latent-attention")


def validate_attention_flags_given(parsed: ModelConfig) -> None:
    """MLA's flags do nothing without --multi-latent-attention, and YaRN's without
    --rope-scaling-factor above 1: given there, they are refused rather than ignored.
    `parsed` is the model section as parsed, where None marks a flag left out."""
    for name in ATTENTION_VARIANT_FLAGS:
        _require(getattr(parsed, name) is None or parsed.multi_latent_attention,
                 f"{flag_name(name)} needs --multi-latent-attention")
    yarn = (parsed.rope_scaling_factor or 1.0) > 1.0
    for name in YARN_FLAGS:
        _require(getattr(parsed, name) is None or yarn, f"{flag_name(name)} needs --rope-scaling-factor above 1")


def validate_flags_needing_others(parsed: RunConfig) -> None:
    """Flags that do nothing without another, refused when given without it (None: left out)."""
    _require(parsed.fp8.fp8_recipe is None or parsed.fp8.fp8_format is not None,
             "--fp8-recipe needs --fp8-format (without it no GEMM runs in FP8)")
    _require(parsed.train.exit_signal is None or parsed.train.exit_signal_handler,
             "--exit-signal needs --exit-signal-handler (without it the signal is not caught)")


def _validate_mla(m: ModelConfig, p: ParallelConfig) -> None:
    _require(not p.group_query_attention, "--group-query-attention does not apply with --multi-latent-attention "
                                          "(each head has its own keys and values, all from one latent)")
    _require(m.qk_pos_emb_head_dim % 2 == 0,
             f"--qk-pos-emb-head-dim ({m.qk_pos_emb_head_dim}) must be even for rotary embeddings")
    if m.rope_scaling_factor > 1.0:
        _require(m.beta_fast > m.beta_slow, f"--beta-fast ({m.beta_fast}) must exceed --beta-slow ({m.beta_slow})")


def validate_training_kind(t: TrainConfig) -> None:
    """Iterations or samples, not both; a well-formed ramp (on the flags as parsed: --train-iters
    None when left out)."""
    _require(t.train_iters is None or t.train_samples is None,
             "give one of --train-iters and --train-samples (iteration- or sample-based training), not both")
    _require(t.train_samples is None or t.train_samples > 0, f"--train-samples must be positive, got "
                                                             f"{t.train_samples}")
    if not t.rampup_batch_size:
        return
    _require(len(t.rampup_batch_size) == 3, "--rampup-batch-size takes three numbers: START INCREMENT "
                                            f"RAMPUP_SAMPLES, got {list(t.rampup_batch_size)}")
    start, increment, samples = t.rampup_batch_size
    _require(t.train_samples is not None, "--rampup-batch-size needs sample-based training (--train-samples "
                                          "instead of --train-iters), as in Megatron")
    _require(0 < start < t.global_batch_size and increment > 0 and samples >= 0,
             f"--rampup-batch-size {start} {increment} {samples}: START must be in [1, --global-batch-size "
             f"({t.global_batch_size})), INCREMENT positive and RAMPUP_SAMPLES >= 0")
    _require((t.global_batch_size - start) % increment == 0,
             f"--rampup-batch-size: --global-batch-size ({t.global_batch_size}) - START ({start}) must be a "
             f"multiple of INCREMENT ({increment})")


def _validate_schedule_kind(o: OptimConfig, t: TrainConfig) -> None:
    """Megatron's rule: a sample-based run gives its LR schedule in samples, an iteration-based one in
    iterations; and WSD's decay fits in the decay horizon."""
    _require(not (t.override_opt_param_scheduler and t.use_checkpoint_opt_param_scheduler),
             "give at most one of --override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler")
    by_samples = t.train_samples is not None
    right, wrong = ((SAMPLE_SCHEDULE_FLAGS, ITERATION_SCHEDULE_FLAGS) if by_samples
                    else (ITERATION_SCHEDULE_FLAGS, SAMPLE_SCHEDULE_FLAGS))
    given = [flag_name(name) for name in wrong if getattr(o, name)]
    kind = "sample-based (--train-samples)" if by_samples else "iteration-based (--train-iters)"
    _require(not given, f"{', '.join(given)}: this run is {kind}; give its LR schedule with "
                        f"{', '.join(map(flag_name, right))}")
    unit = "samples" if by_samples else "iters"
    warmup, decay, wsd = (getattr(o, f"lr_{part}_{unit}") for part in ("warmup", "decay", "wsd_decay"))
    horizon = decay if decay is not None else (t.train_samples if by_samples else t.train_iters)
    for name, value in ((f"lr_warmup_{unit}", warmup), (f"lr_decay_{unit}", decay), (f"lr_wsd_decay_{unit}", wsd)):
        _require(value is None or value >= 0, f"{flag_name(name)} must be >= 0, got {value}")
    _require(warmup <= horizon, f"--lr-warmup-{unit} ({warmup}) must not exceed --lr-decay-{unit} (default "
                                f"--train-{unit if by_samples else 'iters'}: {horizon})")
    if o.lr_decay_style == "WSD":
        _require(wsd is not None and 0 < wsd <= horizon - warmup,
                 f"--lr-decay-style WSD needs --lr-wsd-decay-{unit} in [1, {horizon - warmup}] (the decay horizon "
                 f"after the warm-up), got {wsd}")


def _validate_optimizer(o: OptimConfig) -> None:
    _require(o.lr >= o.min_lr, f"--min-lr ({o.min_lr}) must be in [0, --lr ({o.lr})]")
    _require(not o.use_precision_aware_optimizer or o.use_distributed_optimizer,
             "--use-precision-aware-optimizer needs --use-distributed-optimizer (it shards the moments it keeps)")
    _require(o.use_precision_aware_optimizer or o.exp_avg_dtype == o.exp_avg_sq_dtype == "fp32",
             "--exp-avg-dtype / --exp-avg-sq-dtype other than fp32 need --use-precision-aware-optimizer")


def _validate_data(d: DataConfig, t: TrainConfig) -> None:
    """--split and --data-path weights, and a validation split for --eval-interval."""
    try:
        shares = parse_split(d.split)
        if d.data_path:
            parse_data_path(list(d.data_path))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(shares[0] > 0, f"--split {d.split} gives the training split no share")
    _require(not (t.eval_interval and t.eval_iters) or shares[1] > 0,
             f"--eval-interval {t.eval_interval} asks for evaluation but --split {d.split} gives the validation "
             "split no share; give it one, or set --eval-interval 0")


def _validate_pipeline_layers(m: ModelConfig, p: ParallelConfig) -> None:
    """The layers split over the pipeline stages: PP of them, 2 * PP under dualpipev, PP * V
    under interleaved. (The schedule's micro-batch checks need the data-parallel size: see validate_world.)"""
    pp, per_rank = p.pipeline_model_parallel_size, stages_per_rank(p, m.num_layers)
    _require(not p.overlap_moe_expert_parallel_comm or p.pipeline_model_parallel_size > 1,
             "--overlap-moe-expert-parallel-comm pairs micro-batches of a pipeline schedule: it needs "
             "--pipeline-model-parallel-size > 1")
    if pp > 1:
        context = f"of --pipeline-model-parallel-size {pp} under --pipeline-schedule {p.pipeline_schedule}"
        extra = (f" with {per_rank} virtual stages per rank (--num-virtual-stages-per-pipeline-rank)"
                 if p.pipeline_schedule == "interleaved" else " (two stages per rank)" if per_rank == 2 else "")
        pipeline_stage_layers(m.num_layers, pp * per_rank, p.decoder_first_pipeline_num_layers,
                              p.decoder_last_pipeline_num_layers, context + extra)


def stages_per_rank(p: ParallelConfig, num_layers: int) -> int:
    """Pipeline stages per rank: 2 under dualpipev, V under interleaved (virtual_stages), else 1
    (DualPipe's two chunks are copies of one stage)."""
    return 2 if p.pipeline_schedule == "dualpipev" else virtual_stages(p, num_layers)


def virtual_stages(p: ParallelConfig, num_layers: int) -> int:
    """V of the interleaved schedule: Megatron's --num-virtual-stages-per-pipeline-rank, or
    --num-layers / (PP x --num-layers-per-virtual-pipeline-stage); 1 under the other schedules."""
    virtual, per_stage = p.num_virtual_stages_per_pipeline_rank, p.num_layers_per_virtual_pipeline_stage
    interleaved = p.pipeline_schedule == "interleaved"
    for name, value in (("num_virtual_stages_per_pipeline_rank", virtual),
                        ("num_layers_per_virtual_pipeline_stage", per_stage)):
        _require(value is None or interleaved, f"{flag_name(name)} needs --pipeline-schedule interleaved")
        _require(value is None or value >= 1, f"{flag_name(name)} must be >= 1, got {value}")
    if not interleaved:
        return 1
    _require((virtual is None) != (per_stage is None), "--pipeline-schedule interleaved needs exactly one of "
             "--num-virtual-stages-per-pipeline-rank and --num-layers-per-virtual-pipeline-stage")
    if virtual is None:
        pp = p.pipeline_model_parallel_size
        _require(num_layers % (pp * per_stage) == 0,
                 f"--num-layers ({num_layers}) must be divisible by --pipeline-model-parallel-size ({pp}) x "
                 f"--num-layers-per-virtual-pipeline-stage ({per_stage})")
        virtual = num_layers // (pp * per_stage)
    _require(virtual >= 2, f"--pipeline-schedule interleaved needs at least 2 virtual stages per rank, got "
                           f"{virtual} (--num-virtual-stages-per-pipeline-rank); 1 is --pipeline-schedule 1f1b")
    return virtual


def pipeline_stage_layers(num_layers: int, num_stages: int, first: int | None = None, last: int | None = None,
                          context: str = "") -> list[int]:
    """Layers per pipeline stage: `first`/`last` for the end stages when given (Megatron's
    --decoder-first/last-pipeline-num-layers), the rest split evenly over the other stages."""
    fixed = {stage: n for stage, n in ((0, first), (num_stages - 1, last)) if n is not None}
    for n in fixed.values():
        _require(0 <= n <= num_layers, f"--decoder-first/last-pipeline-num-layers ({n}) must be in "
                                       f"[0, --num-layers ({num_layers})]")
    middle, rest = num_stages - len(fixed), num_layers - sum(fixed.values())
    overrides = " minus --decoder-first/last-pipeline-num-layers" if fixed else ""
    _require(rest >= 0 and (rest % middle == 0 if middle else rest == 0),
             f"--num-layers ({num_layers}){overrides} must split evenly over the {middle or num_stages} "
             f"pipeline stages {context}".rstrip())
    return [fixed.get(stage, rest // middle if middle else 0) for stage in range(num_stages)]


def _validate_mtp(m: ModelConfig, t: TrainConfig) -> None:
    _require(m.mtp_num_layers < m.seq_length,
             f"--mtp-num-layers ({m.mtp_num_layers}) must be below --seq-length ({m.seq_length}): depth k "
             f"predicts the token k+1 ahead")
    _require(m.mtp_num_layers > 0 or not t.mtp_eval_loss, "--mtp-eval-loss needs --mtp-num-layers > 0")


def grouped_gemm_fits(m: ModelConfig) -> bool:
    """torch._grouped_mm wants row strides of 16 bytes' multiples: features a multiple of 8 in bf16."""
    return m.hidden_size % 8 == 0 and m.moe_ffn_hidden_size % 8 == 0


def _validate_moe(m: ModelConfig) -> None:
    _require(m.moe_router_topk <= m.num_experts,
             f"--moe-router-topk ({m.moe_router_topk}) exceeds --num-experts ({m.num_experts})")
    _require(0 <= m.moe_first_k_dense <= m.num_layers,
             f"--moe-first-k-dense ({m.moe_first_k_dense}) must be in [0, --num-layers]")
    if m.moe_router_num_groups:
        validate_node_limit(m, m.moe_router_num_groups, "--moe-router-num-groups")


def validate_node_limit(m: ModelConfig, num_nodes: int, nodes_flag: str) -> None:
    """Node-limited routing needs experts split evenly over nodes and topk/M experts per node."""
    _require(m.num_experts % num_nodes == 0,
             f"--num-experts ({m.num_experts}) must be divisible by the number of nodes ({nodes_flag} "
             f"gives {num_nodes})")
    limit = m.moe_router_max_nodes
    if limit >= num_nodes:
        return
    _require(m.moe_router_topk % limit == 0,
             f"--moe-router-topk ({m.moe_router_topk}) must be divisible by --moe-router-max-nodes "
             f"({limit}): nodes are ranked by their best topk/M scores")
    _require(m.moe_router_topk // limit <= m.num_experts // num_nodes,
             f"--moe-router-topk / --moe-router-max-nodes ({m.moe_router_topk // limit}) exceeds the "
             f"experts per node ({m.num_experts // num_nodes})")


def node_size(config: RunConfig, launcher_ranks_per_node: int) -> int:
    """Ranks per node: --moe-ranks-per-node, or (0) the launcher's LOCAL_WORLD_SIZE."""
    return config.parallel.moe_ranks_per_node or launcher_ranks_per_node


def validate_world(config: RunConfig, world_size: int, ranks_per_node: int) -> None:
    """Every check of the parallel layout against a world of `world_size` ranks, `ranks_per_node`
    (the launcher's LOCAL_WORLD_SIZE) on each node: the grid, the model's splits, the batch and
    the pipeline schedule."""
    p = config.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    ranks_per_node = node_size(config, ranks_per_node)
    validate_layout(world_size, tp, pp, ep, ranks_per_node)
    validate_parallel(config, tp, ep, max(1, ep // ranks_per_node))
    validate_pipeline(config, world_size // (tp * pp))


def validate_layout(world_size: int, tp: int, pp: int, ep: int, ranks_per_node: int) -> None:
    """The PP x DP x TP grid, EP folded into DP x TP, and whole EP slices per node."""
    _require(world_size % (tp * pp) == 0,
             f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
             f"--pipeline-model-parallel-size ({pp})")
    dp = world_size // (tp * pp)
    _require((dp * tp) % ep == 0,
             f"--expert-model-parallel-size ({ep}) must divide data-parallel x tensor-parallel size "
             f"({dp} x {tp}): experts are spread over the ranks of one pipeline stage")
    _require(world_size % ranks_per_node == 0,
             f"world size {world_size} is not divisible by --moe-ranks-per-node ({ranks_per_node})")
    _require(ep <= ranks_per_node or ep % ranks_per_node == 0,
             f"--expert-model-parallel-size ({ep}) must be a multiple of --moe-ranks-per-node "
             f"({ranks_per_node}) so that nodes hold whole EP slices")


def validate_parallel(c: RunConfig, tp: int, ep: int, nodes_in_ep_group: int) -> None:
    """Checks of the model against the TP and EP sizes and the nodes of an EP group."""
    m, p = c.model, c.parallel
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "moe_shared_expert_intermediate_size"):
        _require(getattr(m, name) % tp == 0, f"{flag_name(name)} ({getattr(m, name)}) must be divisible by "
                                              f"--tensor-model-parallel-size ({tp})")
    if tp > 1 and (p.sequence_parallel or m.num_experts):
        why = "sequence parallelism" if p.sequence_parallel else "MoE layers route each TP rank's part"
        _require(m.seq_length % tp == 0, f"--seq-length ({m.seq_length}) must be divisible by "
                                         f"--tensor-model-parallel-size ({tp}) ({why} of the sequence)")
    if not m.num_experts:
        return
    _require(m.num_experts % ep == 0, f"--num-experts ({m.num_experts}) must be divisible by "
                                      f"--expert-model-parallel-size ({ep})")
    if m.moe_router_num_groups:
        return
    _require(not p.moe_router_max_nodes_given or m.moe_router_max_nodes <= nodes_in_ep_group,
             f"--moe-router-max-nodes ({m.moe_router_max_nodes}) is larger than the nodes in an expert-"
             f"parallel group ({nodes_in_ep_group}: --expert-model-parallel-size {ep} over "
             f"--moe-ranks-per-node ranks per node)")
    validate_node_limit(m, nodes_in_ep_group, "--expert-model-parallel-size / --moe-ranks-per-node")


def validate_pipeline(config: RunConfig, dp: int) -> None:
    """The micro-batch count of every batch size the run takes (--rampup-batch-size's too), and the
    schedule's demands on it and on PP (the layer split: validate)."""
    t, p = config.train, config.parallel
    for batch in BatchRamp.from_flags(t.global_batch_size, t.rampup_batch_size).sizes():
        try:
            n_micro = microbatches_of(batch, t.micro_batch_size, dp)
            if p.pipeline_model_parallel_size > 1:
                validate_schedule_args(p.pipeline_schedule, p.pipeline_model_parallel_size, n_micro)
        except ConfigError as e:
            if batch == t.global_batch_size:
                raise
            raise ConfigError(f"--rampup-batch-size {' '.join(map(str, t.rampup_batch_size))} reaches a global "
                              f"batch of {batch}: {e}") from None


def num_microbatches(config: RunConfig, dp: int) -> int:
    """Micro-batches per step at --global-batch-size (the ramp's end)."""
    return microbatches_of(config.train.global_batch_size, config.train.micro_batch_size, dp)


def microbatches_of(global_batch: int, micro_batch_size: int, dp: int) -> int:
    per_step = micro_batch_size * dp
    _require(global_batch % per_step == 0,
             f"--global-batch-size ({global_batch}) must be divisible by --micro-batch-size "
             f"({micro_batch_size}) x data-parallel size ({dp})")
    return global_batch // per_step


def validate_schedule_args(name: str, pp_size: int, num_microbatches: int) -> None:
    """Reject a schedule/size combination with a message naming the flag to change."""
    _require(name in SCHEDULES, f"--pipeline-schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    _require(pp_size >= 1, f"--pipeline-model-parallel-size must be >= 1, got {pp_size}")
    mb_flags = "--num-microbatches (--global-batch-size / (--micro-batch-size * data-parallel size))"
    if name == "1f1b":
        _require(num_microbatches >= 1, f"{mb_flags} must be >= 1 under 1f1b, got {num_microbatches}")
        return
    if name == "interleaved":  # Megatron's rule: micro-batches go through the chunks in groups of PP
        _require(num_microbatches >= pp_size and num_microbatches % pp_size == 0,
                 f"{mb_flags} must be a multiple of --pipeline-model-parallel-size ({pp_size}) under "
                 f"interleaved, got {num_microbatches}")
        return
    _require(name != "dualpipe" or pp_size % 2 == 0,
             f"--pipeline-model-parallel-size must be even for {name}, got {pp_size}")
    _require(num_microbatches >= 2 * pp_size,
             f"{mb_flags} must be >= 2 * --pipeline-model-parallel-size = {2 * pp_size} "
             f"under {name}, got {num_microbatches}")
    _require(name != "dualpipe" or num_microbatches % 2 == 0,
             f"{mb_flags} must be even under dualpipe (half enter from each end), got {num_microbatches}")
