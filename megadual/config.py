"""Run configuration: dataclasses, and the Megatron-style argparse front end that fills them.

All validation lives here, so a bad run fails at start-up with one message naming the
flag, before any process group, model or data is built.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A flag or combination of flags that cannot work; the message names the flag."""


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 344
    num_attention_heads: int = 4
    num_query_groups: int = 4
    seq_length: int = 128
    vocab_size: int = 4096  # padded size, as the embedding is built
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0  # on the embedding and each attention / MLP output before its residual add
    attention_dropout: float = 0.0  # on the attention probabilities
    num_experts: int = 0
    moe_ffn_hidden_size: int = 64
    moe_shared_expert_intermediate_size: int = 0
    moe_first_k_dense: int = 1
    moe_router_topk: int = 2
    moe_router_topk_scaling_factor: float = 1.0
    moe_router_score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    moe_router_load_balancing_type: str = "seq_aux_loss"
    moe_aux_loss_coeff: float = 1e-4
    moe_router_max_nodes: int = 4
    moe_router_num_groups: int = 0  # 0: the nodes of the EP group; >0: virtual nodes

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.num_experts > 0 and layer_index >= self.moe_first_k_dense


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    moe_ranks_per_node: int = 0  # 0: the launcher's local world size
    # An M set on the command line must fit the nodes; the default 4 just means "no limit" on fewer.
    moe_router_max_nodes_given: bool = False
    pipeline_schedule: str = "1f1b"
    pipeline_split_backward: bool = True  # zero-bubble: weight gradients deferred to W actions
    decoder_first_pipeline_num_layers: int | None = None  # None: the even share
    decoder_last_pipeline_num_layers: int | None = None


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    moe_router_bias_update_rate: float = 1e-3


@dataclass(frozen=True)
class DataConfig:
    data_path: tuple[str, ...] = ()
    split: str = "969,30,1"
    mock_data: bool = False
    tokenizer_type: str = "NullTokenizer"
    tokenizer_model: str | None = None
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128


@dataclass(frozen=True)
class Fp8Config:
    fp8_format: str | None = None  # "e4m3" turns FP8 GEMMs on
    fp8_recipe: str = "blockwise"
    moe_fp8_dispatch: bool = False


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 100
    seed: int = 1234
    bf16: bool = False
    log_interval: int = 10
    eval_interval: int = 0
    eval_iters: int = 10
    save: str | None = None
    load: str | None = None
    save_interval: int = 0
    exit_interval: int = 0
    no_load_optim: bool = False
    finetune: bool = False
    max_consecutive_skipped_iters: int = 10
    tensorboard_dir: str | None = None


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    train: TrainConfig = field(default_factory=TrainConfig)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pretrain a DeepSeek-V3-style MoE transformer.",
                                allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="dense MLP size; default 8/3 * hidden rounded up to a multiple of 8")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--norm-epsilon", type=float, default=1e-6)
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=0, help="routed experts per MoE layer; 0: dense")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=64)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=0)
    g.add_argument("--moe-first-k-dense", type=int, default=1, help="the first K layers stay dense")
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=1.0)
    g.add_argument("--moe-router-score-function", choices=["sigmoid", "softmax"], default="sigmoid")
    g.add_argument("--moe-router-enable-expert-bias", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--moe-router-load-balancing-type", choices=["seq_aux_loss", "aux_loss", "none"],
                   default="seq_aux_loss")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-4)
    g.add_argument("--moe-router-max-nodes", type=int, default=None,
                   help="M: each token's experts live on at most M nodes (node-limited routing; default 4)")
    g.add_argument("--moe-router-group-topk", type=int, default=None,
                   help="Megatron's name for --moe-router-max-nodes")
    g.add_argument("--moe-router-num-groups", type=int, default=0,
                   help="node groups for node-limited routing; 0: the real nodes of the EP group")
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--moe-ranks-per-node", type=int, default=0)
    g.add_argument("--pipeline-schedule", choices=["1f1b", "dualpipe", "dualpipev"], default="1f1b")
    g.add_argument("--pipeline-split-backward", action=argparse.BooleanOptionalAction, default=True,
                   help="zero-bubble W split: backwards compute input gradients first, weight gradients "
                        "later where the schedule puts W actions")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers of the first pipeline stage; the others share the rest evenly")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers of the last pipeline stage; the others share the rest evenly")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=3e-5)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[])
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--tokenizer-type", choices=["HuggingFaceTokenizer", "NullTokenizer"],
                   default="NullTokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    g = p.add_argument_group("fp8")
    g.add_argument("--fp8-format", choices=["e4m3"], default=None)
    g.add_argument("--fp8-recipe", choices=["blockwise"], default="blockwise")
    g.add_argument("--moe-fp8-dispatch", action="store_true")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; default on for CUDA, off on CPU")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--max-consecutive-skipped-iters", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--exit-interval", type=int, default=0,
                   help="stop (saving first, with --save) when the iteration is a multiple of this")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--finetune", action="store_true")
    return p


def _fill(cls, values: dict):
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def _padded_vocab(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def parse_args(argv: list[str] | None = None, tokenizer_vocab_size: int | None = None) -> RunConfig:
    """Parse flags into a validated RunConfig.

    `tokenizer_vocab_size` is the unpadded vocabulary of the tokenizer in use (None:
    take `--vocab-size`); the model's embedding is padded as Megatron pads it.
    """
    a = vars(build_parser().parse_args(argv))
    if a["ffn_hidden_size"] is None:
        a["ffn_hidden_size"] = -(-a["hidden_size"] * 8 // 3 // 8) * 8
    if a["num_query_groups"] is None or not a["group_query_attention"]:
        a["num_query_groups"] = a["num_attention_heads"]
    if a["moe_router_group_topk"] is not None:
        a["moe_router_max_nodes"] = a["moe_router_group_topk"]
    a["moe_router_max_nodes_given"] = a["moe_router_max_nodes"] is not None
    if a["moe_router_max_nodes"] is None:
        a["moe_router_max_nodes"] = ModelConfig.moe_router_max_nodes
    a["data_path"] = tuple(a["data_path"])
    raw_vocab = tokenizer_vocab_size or a["vocab_size"]
    if raw_vocab is None:
        raise ConfigError("--vocab-size is required with --tokenizer-type NullTokenizer")
    multiple = a["make_vocab_size_divisible_by"] * a["tensor_model_parallel_size"]
    a["vocab_size"] = _padded_vocab(raw_vocab, multiple)
    a["bf16"] = bool(a["bf16"])
    config = RunConfig(model=_fill(ModelConfig, a), parallel=_fill(ParallelConfig, a),
                       optim=_fill(OptimConfig, a), data=_fill(DataConfig, {**a, "vocab_size": raw_vocab}),
                       fp8=_fill(Fp8Config, a), train=_fill(TrainConfig, a))
    validate(config)
    return config


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(c: RunConfig) -> None:
    """Checks that need no process group; layout checks against the world are in validate_world."""
    m, t, o, d = c.model, c.train, c.optim, c.data
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "ffn_hidden_size"):
        _require(getattr(m, name) > 0, f"{_flag(name)} must be positive, got {getattr(m, name)}")
    _require(m.hidden_size % m.num_attention_heads == 0,
             f"--hidden-size ({m.hidden_size}) must be divisible by --num-attention-heads "
             f"({m.num_attention_heads})")
    _require(m.head_dim % 2 == 0, "--hidden-size / --num-attention-heads must be even for rotary embeddings")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"--num-attention-heads ({m.num_attention_heads}) must be divisible by --num-query-groups "
             f"({m.num_query_groups})")
    for name in ("hidden_dropout", "attention_dropout"):
        _require(0 <= getattr(m, name) < 1, f"{_flag(name)} must be in [0, 1), got {getattr(m, name)}")
    if m.num_experts:
        _validate_moe(m)
    _validate_pipeline_layers(m, c.parallel)
    _require(t.micro_batch_size > 0, "--micro-batch-size must be positive")
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"--global-batch-size ({t.global_batch_size}) must be divisible by --micro-batch-size "
             f"({t.micro_batch_size})")
    _require(t.train_iters > 0, "--train-iters must be positive")
    _require(o.lr >= o.min_lr >= 0, f"--min-lr ({o.min_lr}) must be in [0, --lr ({o.lr})]")
    _require(o.lr_warmup_iters <= (o.lr_decay_iters or t.train_iters),
             "--lr-warmup-iters must not exceed --lr-decay-iters (default --train-iters)")
    _require(t.log_interval > 0, "--log-interval must be positive")
    _require(t.eval_interval >= 0 and t.eval_iters >= 0, "--eval-interval and --eval-iters must be >= 0")
    _require(t.save_interval >= 0, "--save-interval must be >= 0")
    _require(not (t.save_interval and not t.save), "--save-interval needs --save")
    _require(bool(d.data_path) != d.mock_data, "give exactly one of --data-path and --mock-data")
    if d.tokenizer_type == "HuggingFaceTokenizer":
        _require(d.tokenizer_model is not None, "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model")
    _require(c.fp8.fp8_format is not None or not c.fp8.moe_fp8_dispatch,
             "--moe-fp8-dispatch needs --fp8-format e4m3")


def _validate_pipeline_layers(m: ModelConfig, p: ParallelConfig) -> None:
    """The layers split over the pipeline stages: PP of them, 2 * PP under dualpipev.
    (The schedule's micro-batch checks need the data-parallel size: see training/loop.py.)"""
    pp = p.pipeline_model_parallel_size
    _require(pp >= 1, f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if pp > 1:
        stages = 2 * pp if p.pipeline_schedule == "dualpipev" else pp
        context = f"of --pipeline-model-parallel-size {pp} under --pipeline-schedule {p.pipeline_schedule}"
        pipeline_stage_layers(m.num_layers, stages, p.decoder_first_pipeline_num_layers,
                              p.decoder_last_pipeline_num_layers,
                              context + (" (two stages per rank)" if stages > pp else ""))


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



def _validate_moe(m: ModelConfig) -> None:
    _require(m.moe_router_topk >= 1, "--moe-router-topk must be at least 1")
    _require(m.moe_router_topk <= m.num_experts,
             f"--moe-router-topk ({m.moe_router_topk}) exceeds --num-experts ({m.num_experts})")
    _require(0 <= m.moe_first_k_dense <= m.num_layers,
             f"--moe-first-k-dense ({m.moe_first_k_dense}) must be in [0, --num-layers]")
    _require(m.moe_router_max_nodes >= 1, "--moe-router-max-nodes must be at least 1")
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


def validate_parallel(c: RunConfig, tp: int, ep: int, nodes_in_ep_group: int) -> None:
    """Checks of the model against the parallel layout, once the world size is known."""
    m, p = c.model, c.parallel
    for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size",
                 "moe_shared_expert_intermediate_size"):
        _require(getattr(m, name) % tp == 0, f"{_flag(name)} ({getattr(m, name)}) must be divisible by "
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


def model_config_differences(saved: dict, current: ModelConfig) -> list[str]:
    """Field-by-field differences between a checkpoint's model config and this run's."""
    now = dataclasses.asdict(current)
    return [f"{_flag(k)}: checkpoint has {saved.get(k)!r}, this run has {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
