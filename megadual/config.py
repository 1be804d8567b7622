"""Run configuration: the dataclasses whose fields are the Megatron-style flags.

Each flag is declared once, on its field (`option`): help, choices, Megatron aliases, its
argparse group and its valid range; its default is the field default, and its type and action
follow the field's type. Fields that are no flag are marked `derived`. arguments.py turns the
fields into the command line; config_validate.py holds the checks between flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SCHEDULES = ("1f1b", "interleaved", "dualpipe", "dualpipev")
MLA_FLAGS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_scaling_factor")
YARN_FLAGS = ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
ATTENTION_VARIANT_FLAGS = MLA_FLAGS + YARN_FLAGS  # read only with --multi-latent-attention
# Megatron-Core's --recompute-modules (what each means here: parallel/recompute.py's RecomputePlan).
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
ITERATION_SCHEDULE_FLAGS = ("lr_warmup_iters", "lr_decay_iters", "lr_wsd_decay_iters")
SAMPLE_SCHEDULE_FLAGS = ("lr_warmup_samples", "lr_decay_samples", "lr_wsd_decay_samples")
EXIT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")


class ConfigError(ValueError):
    """A flag or combination of flags that cannot work; the message names the flag."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric flag, declared beside its field (config.option): at least
    `low` (above it when `low_open`) and below `high`; None: no bound on that side."""
    low: float | None = None
    low_open: bool = False
    high: float | None = None

    def limits(self) -> bool:
        return self.low is not None or self.high is not None

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value < self.high)

    def text(self) -> str:
        if self.high is not None:
            return f"in [{self.low}, {self.high})" if self.low is not None else f"< {self.high}"
        return "positive" if self.low_open and self.low == 0 else f"{'>' if self.low_open else '>='} {self.low}"


MOE, MLA, MTP, CHECKPOINTS = ("mixture of experts", "multi-latent attention", "multi-token prediction",
                              "checkpointing")
RECOMPUTE = "activation recomputation"


def option(default, help: str = "", *, choices: tuple | None = None, aliases: tuple[str, ...] = (),
           group: str | None = None, unset: str | None = None, min: float | None = None,
           positive: bool = False, below: float | None = None):
    """A field that is also the flag --field-name. `group`: its argparse group when not its
    section's. `unset`: a flag left out parses as None and becomes what this says
    (`{default}`: the field default), filled in by resolve_derived or resolve_device_defaults.
    The valid values of a number: `min` (at least), `positive` (above 0), `below` (less than);
    validate checks them and -h shows them (config_validate.Range)."""
    bounds = Range(low=0 if positive else min, low_open=positive, high=below)
    spec = {"help": help, "choices": choices, "aliases": aliases, "group": group, "unset": unset,
            "range": bounds if bounds.limits() else None}
    return field(default=default, metadata={"flag": spec})


def derived(default, why: str):
    """A field that is no flag: parse_args fills it from the flags (see `why`)."""
    return field(default=default, metadata={"derived": why})


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = option(4, "transformer layers", positive=True)
    hidden_size: int = option(128, positive=True)
    ffn_hidden_size: int = option(344, "dense MLP size",  # 344: the derived size for hidden size 128
                                  unset="8/3 x --hidden-size, rounded up to a multiple of 8", positive=True)
    num_attention_heads: int = option(4, positive=True)
    num_query_groups: int = option(4, "key/value heads; read only with --group-query-attention",
                                   unset="--num-attention-heads", positive=True)
    seq_length: int = option(128, positive=True)
    vocab_size: int = derived(4096, "--vocab-size (or the tokenizer's) padded as the embedding is built")
    unpadded_vocab_size: int = derived(0, "the vocabulary before padding (0: vocab_size): the rows trained "
                                          "and saved, whatever TP pads to")
    norm_epsilon: float = option(1e-6, positive=True)
    rotary_base: float = option(10000.0, positive=True)
    init_method_std: float = option(0.02, min=0)
    hidden_dropout: float = option(0.0, "dropout on the embedding and each attention / MLP output before its "
                                        "residual add (DeepSeek-V3: 0)", min=0, below=1)
    attention_dropout: float = option(0.0, "dropout on the attention probabilities (DeepSeek-V3: 0)", min=0, below=1)
    num_experts: int = option(0, "routed experts per MoE layer; 0: dense", group=MOE, min=0)
    moe_ffn_hidden_size: int = option(64, group=MOE, positive=True)
    moe_shared_expert_intermediate_size: int = option(0, group=MOE, min=0)
    moe_first_k_dense: int = option(1, "the first K layers stay dense", group=MOE, min=0)
    moe_router_topk: int = option(2, group=MOE, positive=True)
    moe_router_topk_scaling_factor: float = option(1.0, group=MOE, positive=True)
    moe_router_score_function: str = option("sigmoid", choices=("sigmoid", "softmax"), group=MOE)
    moe_router_enable_expert_bias: bool = option(True, "aux-loss-free balancing", group=MOE)
    moe_router_load_balancing_type: str = option("seq_aux_loss", choices=("seq_aux_loss", "aux_loss", "none"),
                                                 group=MOE)
    moe_aux_loss_coeff: float = option(1e-4, group=MOE, min=0)
    moe_router_max_nodes: int = option(
        4, "M: each token's experts live on at most M nodes (node-limited routing)",
        aliases=("--moe-router-group-topk",), group=MOE, positive=True,
        unset="{default}, which is no limit on fewer nodes; an M given must fit the nodes of an EP group")
    moe_router_num_groups: int = option(0, "node groups for node-limited routing; 0: the real nodes of the "
                                           "EP group, G > 0: G virtual nodes", group=MOE, min=0)
    multi_latent_attention: bool = option(False, "DeepSeek's multi-head latent attention (MLA) instead of MHA/GQA",
                                          group=MLA)
    # The flags below are read only with --multi-latent-attention (the YaRN ones only with
    # --rope-scaling-factor > 1): left out, they parse as None and take their default.
    q_lora_rank: int = option(0, "query latent rank; 0: queries straight from the hidden state (Megatron's "
                                 "None, as in DeepSeek-V2-Lite)", group=MLA, unset="{default}", min=0)
    kv_lora_rank: int = option(32, "key/value latent rank", group=MLA, unset="{default}", positive=True)
    qk_head_dim: int = option(128, "query/key head dim without RoPE", group=MLA, unset="{default}", positive=True)
    qk_pos_emb_head_dim: int = option(64, "query/key RoPE head dim (one RoPE key per token, shared by the heads)",
                                      group=MLA, unset="{default}", positive=True)
    v_head_dim: int = option(128, group=MLA, unset="{default}", positive=True)
    rope_scaling_factor: float = option(1.0, "YaRN: context extension factor; 1: plain RoPE",
                                        aliases=("--rotary-scaling-factor",), group=MLA, unset="{default}", min=1)
    original_max_position_embeddings: int = option(4096, "YaRN: the context length RoPE was trained for",
                                                   group=MLA, unset="{default}", positive=True)
    beta_fast: float = option(32.0, "YaRN: channels turning more often than this over the original context "
                                    "keep their frequency", group=MLA, unset="{default}", positive=True)
    beta_slow: float = option(1.0, "YaRN: channels turning less often than this are interpolated fully",
                              group=MLA, unset="{default}", positive=True)
    mscale: float = option(1.0, "YaRN: the RoPE magnitude is mscale(factor, this) / mscale(factor, "
                                "--mscale-all-dim)", group=MLA, unset="{default}", min=0)
    mscale_all_dim: float = option(0.0, "YaRN: the softmax scale is multiplied by mscale(factor, this)^2",
                                   group=MLA, unset="{default}", min=0)
    mtp_num_layers: int = option(0, "D: multi-token prediction modules after the last layer, module k "
                                    "predicting the token k+1 ahead; 0: none", group=MTP, min=0)
    mtp_loss_scaling_factor: float = option(0.1, "the MTP loss (mean over the D depths) is scaled by this and "
                                                 "added to the training loss", group=MTP, min=0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def real_vocab_size(self) -> int:
        """The tokenizer's rows of the (padded) embedding and head."""
        return self.unpadded_vocab_size or self.vocab_size

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.num_experts > 0 and layer_index >= self.moe_first_k_dense


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = option(1, positive=True)
    pipeline_model_parallel_size: int = option(1, positive=True)
    expert_model_parallel_size: int = option(1, positive=True)
    sequence_parallel: bool = option(False)
    moe_grouped_gemm: bool | None = option(
        None, "routed experts of a rank as one grouped GEMM (torch._grouped_mm) instead of one GEMM per expert; "
              "FP8 experts keep one blockwise GEMM per expert", group=MOE,
        unset="on with CUDA in bf16 where --hidden-size and --moe-ffn-hidden-size are multiples of 8, else off")
    moe_ranks_per_node: int = option(0, "ranks per node for node-limited routing; 0: the launcher's "
                                        "LOCAL_WORLD_SIZE", min=0)
    moe_token_dispatcher_type: str = option(
        "hierarchical", "hierarchical: each token crosses to each node once, then is forwarded inside the node "
                        "(the same as alltoall on one node or with one EP rank per node); alltoall: one "
                        "all-to-all over the EP group",
        choices=("alltoall", "hierarchical"), group=MOE)
    pipeline_schedule: str = option("1f1b", choices=SCHEDULES)
    pipeline_split_backward: bool = option(True, "zero-bubble W split: backwards compute input gradients "
                                                 "first, weight gradients later where the schedule puts W actions",
                                           aliases=("--delay-wgrad-compute",))
    num_virtual_stages_per_pipeline_rank: int | None = option(None, "model chunks per pipeline rank under "
                                                                    "--pipeline-schedule interleaved", positive=True)
    num_layers_per_virtual_pipeline_stage: int | None = option(None, "layers per chunk under --pipeline-schedule "
                                                                     "interleaved (instead of the chunk count)", positive=True)
    overlap_moe_expert_parallel_comm: bool = option(False, "1f1b and interleaved: the steady state's forward and "
                                                           "backward of two micro-batches run as one paired chunk, "
                                                           "each one's expert all-to-alls hidden behind the other's "
                                                           "compute (DualPipe's always are)")
    decoder_first_pipeline_num_layers: int | None = option(None, "layers of the first pipeline stage; the "
                                                                 "others share the rest evenly", min=0)
    decoder_last_pipeline_num_layers: int | None = option(None, "layers of the last pipeline stage; the "
                                                                "others share the rest evenly", min=0)
    # Two model flags live here, not in ModelConfig, which checkpoints compare field by field.
    group_query_attention: bool = option(False, "use --num-query-groups (else one group per head)", group="model")
    moe_router_max_nodes_given: bool = derived(False, "--moe-router-max-nodes was given: it must fit the nodes")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = option(3e-4, min=0)
    min_lr: float = option(3e-5, min=0)
    lr_warmup_iters: int = option(0, min=0)
    lr_decay_iters: int | None = option(None, "default: --train-iters", positive=True)
    lr_warmup_samples: int = option(0, "with --train-samples: warm-up over this many samples", min=0)
    lr_decay_samples: int | None = option(None, "with --train-samples (its default): decay over this many samples",
                                          positive=True)
    lr_decay_style: str = option("cosine", "WSD: warm-up, stable at --lr, then --lr-wsd-decay-style down to "
                                           "--min-lr over the last --lr-wsd-decay-iters/samples of the decay",
                                 choices=("constant", "linear", "cosine", "WSD"))
    lr_wsd_decay_style: str = option("exponential", choices=WSD_DECAY_STYLES)
    lr_wsd_decay_iters: int | None = option(None, "WSD's decay phase in iterations", positive=True)
    lr_wsd_decay_samples: int | None = option(None, "WSD's decay phase in samples (with --train-samples)",
                                              positive=True)
    weight_decay: float = option(0.1, min=0)
    adam_beta1: float = option(0.9, min=0, below=1)
    adam_beta2: float = option(0.95, min=0, below=1)
    adam_eps: float = option(1e-8, positive=True)
    clip_grad: float = option(1.0, min=0)
    use_distributed_optimizer: bool = option(False, "ZeRO-1: shard the FP32 master weights and Adam moments over "
                                                    "each parameter's data-parallel ranks; with --bf16 the model "
                                                    "holds BF16 weights")
    ddp_bucket_size: int | None = option(None, "elements per gradient bucket of the distributed optimizer; "
                                               "default max(40M, 1M x data-parallel size), as Megatron's",
                                     positive=True)
    use_precision_aware_optimizer: bool = option(False, "the distributed optimizer keeps Adam's moments in "
                                                        "--exp-avg-dtype / --exp-avg-sq-dtype")
    exp_avg_dtype: str = option("fp32", "Adam's first moment (with --use-precision-aware-optimizer)",
                                choices=("fp32", "bf16"))
    exp_avg_sq_dtype: str = option("fp32", "Adam's second moment (with --use-precision-aware-optimizer)",
                                   choices=("fp32", "bf16"))
    moe_router_bias_update_rate: float = option(1e-3, group=MOE, min=0)


@dataclass(frozen=True)
class DataConfig:
    data_path: tuple[str, ...] = option((), "[WEIGHT] PREFIX ...: datasets, blended by weight")
    split: str = option("969,30,1", "train,valid,test proportions")
    mock_data: bool = option(False)
    tokenizer_type: str = option("NullTokenizer", choices=("HuggingFaceTokenizer", "NullTokenizer"))
    tokenizer_model: str | None = option(None)
    vocab_size: int | None = option(None, "the tokenizer's vocabulary before padding",
                                    unset="the tokenizer's; required with NullTokenizer", positive=True)
    make_vocab_size_divisible_by: int = option(128, "pad the vocabulary to a multiple of this x TP", group="model",
                                               positive=True)
    reset_position_ids: bool = option(False, "positions restart at 0 after each end-of-document token")
    reset_attention_mask: bool = option(False, "tokens attend only within their own document")
    eod_mask_loss: bool = option(False, "positions whose input is the end-of-document token do not count in the "
                                        "loss")


@dataclass(frozen=True)
class Fp8Config:
    fp8_format: str | None = option(None, "e4m3 runs the linear layers' GEMMs in FP8", choices=("e4m3",))
    fp8_recipe: str = option("blockwise", "1x128 activation / 128x128 weight scaling; read only with "
                                          "--fp8-format", choices=("blockwise",), unset="{default}")
    moe_fp8_dispatch: bool = option(False, "send E4M3 tokens and scales through the dispatch all-to-all")


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int = option(2, positive=True)
    global_batch_size: int = option(8, positive=True)
    train_iters: int | None = option(100, unset="100; with --train-samples the iterations that consume them",
                                     positive=True)
    train_samples: int | None = option(None, "sample-based training: stop once this many samples (sequences, "
                                             "those of a loaded checkpoint included) are consumed", positive=True)
    rampup_batch_size: tuple[int, ...] = option(
        (), "START INCREMENT RAMPUP_SAMPLES: the global batch grows from START by INCREMENT, evenly over the "
            "first RAMPUP_SAMPLES samples, to --global-batch-size (needs --train-samples)")
    seed: int = option(1234, min=0)
    bf16: bool | None = option(None, "bf16 autocast", unset="on with CUDA, off on CPU")
    log_interval: int = option(10, positive=True)
    log_throughput: bool = option(False, "model TFLOP/s per rank in the log line, from the FLOPs the config "
                                         "implies (model/flops.py)")
    eval_interval: int = option(0, "0: no evaluation", min=0)
    eval_iters: int = option(10, min=0)
    mtp_eval_loss: bool = option(False, "evaluation also computes the MTP losses and logs them", group=MTP)
    save: str | None = option(None, group=CHECKPOINTS)
    load: str | None = option(None, group=CHECKPOINTS)
    save_interval: int = option(0, group=CHECKPOINTS, min=0)
    exit_interval: int = option(0, "stop (saving first, with --save) when the iteration is a multiple of this",
                                group=CHECKPOINTS, min=0)
    keep_last_n_checkpoints: int = option(0, "keep only the newest N checkpoints in --save, removing older ones "
                                             "once a newer one verified; 0: keep all", group=CHECKPOINTS, min=0)
    async_save: bool = option(False, "write checkpoints in the background while training goes on",
                              group=CHECKPOINTS)
    save_failures_continue: bool = option(False, "a save that fails is logged and training goes on (default: "
                                                 "the run stops)", group=CHECKPOINTS)
    exit_signal_handler: bool = option(False, "on --exit-signal every rank finishes the iteration, the run saves "
                                              "(with --save) and exits 0", group=CHECKPOINTS)
    exit_signal: str = option("SIGTERM", "the signal --exit-signal-handler catches", choices=EXIT_SIGNALS,
                              group=CHECKPOINTS, unset="{default}")
    exit_duration_in_mins: float | None = option(None, "save (with --save) and exit 0 once this many minutes of "
                                                       "the run have passed", group=CHECKPOINTS, positive=True)
    no_load_optim: bool = option(False, group=CHECKPOINTS)
    finetune: bool = option(False, "load the model only and start at iteration 0", group=CHECKPOINTS)
    overwrite_checkpoints: bool = option(False, "let this run replace checkpoints in --save that another run wrote "
                                                "or that are newer than the one it starts from (refused "
                                                "otherwise)", group=CHECKPOINTS)
    checkpoint_key_file: str | None = option(None, "sign each checkpoint's manifest with HMAC-SHA256 under this "
                                                   "file's key and load only checkpoints it signed (default: "
                                                   "$MEGADUAL_CHECKPOINT_KEY_FILE, else unsigned)", group=CHECKPOINTS)
    override_opt_param_scheduler: bool = option(False, "on --load, the LR schedule is this run's flags' (default: "
                                                       "they must equal the checkpoint's)", group=CHECKPOINTS)
    use_checkpoint_opt_param_scheduler: bool = option(False, "on --load, the LR schedule is the checkpoint's, "
                                                             "whatever this run's flags say", group=CHECKPOINTS)
    max_consecutive_skipped_iters: int = option(10, "stop after this many non-finite steps in a row", positive=True)
    tensorboard_dir: str | None = option(None)
    recompute_granularity: str | None = option(
        None, "recompute activations in the backward: whole layers (full) or --recompute-modules (selective)",
        choices=("full", "selective"), group=RECOMPUTE)
    recompute_method: str | None = option(
        None, "full: uniform (groups of --recompute-num-layers layers) or block (the first "
              "--recompute-num-layers layers of each pipeline stage)", choices=("uniform", "block"), group=RECOMPUTE)
    recompute_num_layers: int | None = option(None, "layers per group (uniform) or per stage (block)",
                                              group=RECOMPUTE, positive=True)
    recompute_modules: tuple[str, ...] = option(("core_attn",), "what selective recomputation recomputes (mla_up_proj: MLA from "
                                                "the latents through the core attention; moe_act: the experts' "
                                                "SwiGLU and down input, from its E4M3 copy; docs/memory.md)",
                                                choices=RECOMPUTE_MODULES, group=RECOMPUTE)
    distributed_timeout_minutes: float = option(10.0, "a collective that waits longer (a rank stopped, hung or "
                                                      "lost) ends the run with an error", positive=True)
    distributed_backend: str | None = option(
        None, "torch.distributed backend, any string init_process_group takes (default: nccl on CUDA, gloo "
              "on CPU); cuda:gloo lets several ranks share one GPU under NCCL's device contract")


@dataclass(frozen=True)
class RunConfig:
    """The sections; each one's flags go to the argparse group its metadata names."""
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"group": "model"})
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata={"group": "parallelism"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"group": "optimizer"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"group": "data"})
    fp8: Fp8Config = field(default_factory=Fp8Config, metadata={"group": "fp8"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"group": "training"})


# What a run loading a checkpoint (--load, with or without --finetune) may change, in one place:
# - the model flags below, which no weight depends on (context extension, loss weights, dropout);
#   every other model flag is fixed by the weights and a difference is refused;
# - the LR schedule (SCHEDULE_FLAGS): only as --override-opt-param-scheduler or
#   --use-checkpoint-opt-param-scheduler says (without --finetune);
# - every other flag (batch sizes and their ramp, data, layout, --moe-router-bias-update-rate, ...).
RESUME_MAY_CHANGE = ("seq_length", "rope_scaling_factor", "original_max_position_embeddings", "beta_fast",
                     "beta_slow", "mscale", "mscale_all_dim", "mtp_loss_scaling_factor", "moe_aux_loss_coeff",
                     "hidden_dropout", "attention_dropout")
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_decay_style", "lr_warmup_iters", "lr_decay_iters", "lr_wsd_decay_iters",
                  "lr_warmup_samples", "lr_decay_samples", "lr_wsd_decay_samples", "lr_wsd_decay_style")


def resume_rule() -> str:
    """RESUME_MAY_CHANGE in words, for every refusal."""
    return (f"a run loading a checkpoint may change the model's {' '.join(map(flag_name, RESUME_MAY_CHANGE))} "
            "(no weight depends on them), the LR schedule with --override-opt-param-scheduler, and any "
            "non-model flag; the other model flags are fixed by the weights")


def model_config_differences(saved: dict, current: ModelConfig, may_change: tuple[str, ...] = ()) -> list[str]:
    """Field-by-field differences between a checkpoint's model config and this run's, but for the
    fields `may_change` (a resume: RESUME_MAY_CHANGE). A field the checkpoint predates counts as its
    default (what that checkpoint's model was). The vocabulary is compared before padding: checkpoints
    keep only its rows, so any TP loads them."""
    now, saved = _vocabulary_unpadded(dataclasses.asdict(current)), \
        _vocabulary_unpadded({**dataclasses.asdict(ModelConfig()), **saved})
    return [f"{flag_name(k)}: checkpoint has {saved.get(k)!r}, this run has {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k) and k not in may_change]


def _vocabulary_unpadded(model: dict) -> dict:
    """A model config dict whose vocab_size is the unpadded vocabulary."""
    return {**{k: v for k, v in model.items() if k != "unpadded_vocab_size"},
            "vocab_size": model.get("unpadded_vocab_size") or model["vocab_size"]}

