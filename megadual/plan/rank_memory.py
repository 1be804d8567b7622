"""One rank's memory before launch: parameters, gradients and optimizer state of the stages it
holds (DualPipe: both copies), and the peak activations of its schedule (memory_model.py).
What `python -m megadual.plan --world-size N` prints and the memory report measures."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache

from megadual.config import ModelConfig, RunConfig
from megadual.config_validate import num_microbatches, virtual_stages
from megadual.model.gpt import StageSpec, full_model_stage
from megadual.parallel.recompute import RecomputePlan
from megadual.pipeline.actions import Action
from megadual.pipeline.schedules import build_schedule, pipeline_layout
from megadual.pipeline.stage_model import stage_specs
from megadual.plan.memory_model import MemoryStep, PeakMoment, memory_steps, peak_moment, stage_activations
from megadual.plan.tensor_bytes import FP32, Activations, Precision, Shape
from megadual.training.dist_optimizer import default_bucket_numel


@dataclass(frozen=True)
class ParamCount:
    elements: int = 0
    tensors: int = 0
    expert_elements: int = 0  # of `elements`, routed experts' (sharded over expert-DP, not DP)

    def __add__(self, other: ParamCount) -> ParamCount:
        return ParamCount(self.elements + other.elements, self.tensors + other.tensors,
                          self.expert_elements + other.expert_elements)


def _dense(*sizes: int) -> ParamCount:
    return ParamCount(sum(sizes), len(sizes))


def layer_parameters(c: ModelConfig, layer: int, tp: int, ep: int) -> ParamCount:
    """One layer's parameters on one rank (TP shards, this EP rank's experts)."""
    return _layer_parameters(c, c.is_moe_layer(layer), tp, ep)


@cache  # the planner's search asks for the same few layers thousands of times
def _layer_parameters(c: ModelConfig, moe: bool, tp: int, ep: int) -> ParamCount:
    h = c.hidden_size
    count = _dense(h, h)  # the two norms
    if c.multi_latent_attention:
        heads, qk = c.num_attention_heads // tp, c.qk_head_dim + c.qk_pos_emb_head_dim
        query = (_dense(h * c.q_lora_rank, c.q_lora_rank, c.q_lora_rank * heads * qk) if c.q_lora_rank
                 else _dense(h * heads * qk))
        count += query + _dense(h * (c.kv_lora_rank + c.qk_pos_emb_head_dim), c.kv_lora_rank,
                                c.kv_lora_rank * heads * (c.qk_head_dim + c.v_head_dim), heads * c.v_head_dim * h)
    else:
        d, heads, groups = c.head_dim, c.num_attention_heads // tp, c.num_query_groups // tp
        count += _dense(h * heads * d, h * groups * d, h * groups * d, heads * d * h)
    if not moe:
        return count + _dense(*[h * c.ffn_hidden_size // tp] * 3)
    count += _dense(c.num_experts * h)  # the router
    if c.moe_shared_expert_intermediate_size:
        count += _dense(*[h * c.moe_shared_expert_intermediate_size // tp] * 3)
    experts = c.num_experts // ep
    per_expert = 3 * h * c.moe_ffn_hidden_size
    return count + ParamCount(experts * per_expert, 3, experts * per_expert)  # 3 stacks (moe/experts.py)


def stage_parameters(c: ModelConfig, stage: StageSpec, tp: int, ep: int) -> ParamCount:
    count = ParamCount()
    vocab_rows = c.vocab_size // tp
    if stage.has_embedding:
        count += _dense(vocab_rows * c.hidden_size)
    for layer in range(stage.first_layer, stage.last_layer):
        count += layer_parameters(c, layer, tp, ep)
    if stage.has_head:
        count += _dense(c.hidden_size, vocab_rows * c.hidden_size)
        h = c.hidden_size
        for depth in range(c.mtp_num_layers):  # enorm, hnorm, eh_proj (whole on every TP rank), final norm
            count += _dense(h, h, 2 * h * h, h) + layer_parameters(c, c.num_layers + depth, tp, ep)
    return count


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds (the memory report's fields); optimizer state both ways."""
    pp_rank: int
    parameters: float
    gradients: float
    optimizer_state: float  # the plain AdamW's
    optimizer_state_distributed: float  # --use-distributed-optimizer's
    peak_activations: float
    distributed_optimizer: bool = False

    @property
    def optimizer_state_held(self) -> float:
        """The state of the optimizer the rank runs (`distributed_optimizer`'s)."""
        return self.optimizer_state_distributed if self.distributed_optimizer else self.optimizer_state

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer_state_held + self.peak_activations


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    ep: int
    schedule: str
    virtual_stages: int = 1  # V of the interleaved schedule
    overlap: bool = False  # --overlap-moe-expert-parallel-comm

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)


def layout_of(config: RunConfig, world: int) -> Layout:
    p = config.parallel
    return Layout(world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.expert_model_parallel_size, p.pipeline_schedule, virtual_stages(p, config.model.num_layers),
                  p.overlap_moe_expert_parallel_comm)


def rank_stages(config: RunConfig, layout: Layout, n_micro: int) -> list[list[StageSpec]]:
    """The stages (chunks, in local chunk order) each pipeline rank holds."""
    if layout.pp == 1:
        return [[full_model_stage(config.model)]]
    placement = pipeline_layout(layout.schedule, layout.pp, n_micro, layout.virtual_stages)
    p = config.parallel
    specs = stage_specs(config.model.num_layers, len(placement.paths[0]), p.decoder_first_pipeline_num_layers,
                        p.decoder_last_pipeline_num_layers)
    held = [[] for _ in range(layout.pp)]
    for path in placement.paths:
        for stage, (rank, chunk) in enumerate(path):
            held[rank].append((chunk, specs[stage]))
    return [[spec for _, spec in sorted(chunks, key=lambda item: item[0])] for chunks in held]


def shape_of(config: RunConfig, layout: Layout, distributed: bool = False, recast_weights: bool = False) -> Shape:
    bf16 = bool(config.train.bf16)
    gemm_bytes = 1 if config.fp8.fp8_format else 2 if bf16 else FP32
    precision = Precision.of_run(bf16, distributed, bool(config.fp8.fp8_format))
    return Shape(config.model.seq_length, config.train.micro_batch_size, layout.tp,
                 config.parallel.sequence_parallel and layout.tp > 1, layout.ep, gemm_bytes,
                 precision=dataclasses.replace(precision, recast_weights=recast_weights))


@dataclass(frozen=True)
class StateBytes:
    """Bytes per element of what a rank holds under the flags and the optimizer chosen."""
    weights: int  # the model's parameters: BF16 under the distributed optimizer with --bf16
    moments: int  # Adam's two moments together (--exp-avg-dtype, --exp-avg-sq-dtype)
    masters: int  # FP32 masters beside BF16 weights (the distributed optimizer's)

    @classmethod
    def of(cls, config: RunConfig, distributed: bool) -> StateBytes:
        o, bf16 = config.optim, distributed and bool(config.train.bf16)
        moments = sum(2 if distributed and o.use_precision_aware_optimizer and dtype == "bf16" else FP32
                      for dtype in (o.exp_avg_dtype, o.exp_avg_sq_dtype))
        return cls(2 if bf16 else FP32, moments, FP32 if bf16 else 0)


def predict(config: RunConfig, world: int, distributed: bool | None = None,
            activations: bool = True) -> list[RankMemory]:
    """Every pipeline rank's memory; `distributed`: with or without the distributed optimizer
    (None: as the flags say), which decides the weights' dtype and so what the layers save;
    without `activations` the peak activations are left at 0 (a quick first cut for the search)."""
    layout = layout_of(config, world)
    n_micro = num_microbatches(config, layout.dp)
    distributed = config.optim.use_distributed_optimizer if distributed is None else distributed
    stages = rank_stages(config, layout, n_micro)
    precision = StateBytes.of(config, distributed)
    ranks = []
    for pp_rank, chunks in enumerate(stages):
        params = rank_parameters(config.model, chunks, layout)
        peak = _peak(config, layout, chunks, pp_rank, distributed).bytes if activations else 0.0
        sharded = _distributed_adam_bytes(params, layout, StateBytes.of(config, True), config.optim.ddp_bucket_size)
        ranks.append(RankMemory(pp_rank, params.elements * precision.weights, params.elements * FP32,
                                _adam_bytes(params), sharded, peak, distributed))
    return ranks


def rank_parameters(c: ModelConfig, chunks: list[StageSpec], layout: Layout) -> ParamCount:
    """The parameters of the stages a rank holds (and MTP's tied embedding where it needs one)."""
    params = ParamCount()
    for spec in chunks:
        params += stage_parameters(c, spec, layout.tp, layout.ep)
    if c.mtp_num_layers and any(s.has_head for s in chunks) and not any(s.has_embedding for s in chunks):
        params += _dense(c.vocab_size // layout.tp * c.hidden_size)  # MTP's tied embedding (1F1B, PP > 1)
    return params


def chunk_activations(config: RunConfig, layout: Layout, spec: StageSpec, distributed: bool,
                      recast_weights: bool = False) -> Activations:
    """One micro-batch of one chunk (`recast_weights`: one whose backward will be a BI): its layers'
    activations and, under --bf16 with FP32 weights, the BF16 copy autocast makes of the head's
    weight (never FP8; the layers count their own copies)."""
    c, shape = config.model, shape_of(config, layout, distributed, recast_weights)
    acts = Activations()
    head_copy = dataclasses.replace(shape.p, fp8=False).weight_copies(c.hidden_size * c.vocab_size // layout.tp)
    if spec.has_head and head_copy:
        acts.add(head_copy, kind="head and loss | BF16 weight copy")
    acts += stage_activations(c, shape, range(spec.first_layer, spec.last_layer), spec.has_embedding,
                              spec.has_head, RecomputePlan.from_flags(config.train))
    return acts


def _stage_layers(c: ModelConfig, stage: StageSpec) -> list[int]:
    """The stage's layers, and the MTP layers beside its head."""
    mtp = range(c.num_layers, c.num_layers + c.mtp_num_layers) if stage.has_head else range(0)
    return [*range(stage.first_layer, stage.last_layer), *mtp]


def peak_activations(config: RunConfig, world: int, pp_rank: int, distributed: bool) -> PeakMoment:
    """What is alive at the peak of `pp_rank`'s activations in one step."""
    layout = layout_of(config, world)
    return _peak(config, layout, rank_stages(config, layout, num_microbatches(config, layout.dp))[pp_rank],
                 pp_rank, distributed)


def _peak(config: RunConfig, layout: Layout, chunks: list[StageSpec], pp_rank: int, distributed: bool
          ) -> PeakMoment:
    acts = [chunk_activations(config, layout, spec, distributed) for spec in chunks]
    if layout.pp == 1:  # no pipeline runtime, no W split
        rise = max(0.0, acts[0].transient)
        return PeakMoment(acts[0].kept + rise, (1,), (0,), 0 if rise else -1, rise, (0,))
    recast = [chunk_activations(config, layout, spec, distributed, recast_weights=True) for spec in chunks]
    steps = schedule_steps(layout.schedule, layout.pp, num_microbatches(config, layout.dp),
                           config.parallel.pipeline_split_backward, layout.virtual_stages, layout.overlap)[pp_rank]
    return peak_moment(steps, acts, [layout.ep > 1 and _has_moe_layer(config.model, s) for s in chunks], recast)


def _has_moe_layer(c: ModelConfig, stage: StageSpec) -> bool:
    """Whether the stage's layers (its MTP layers included) include an MoE layer."""
    return any(c.is_moe_layer(layer) for layer in _stage_layers(c, stage))


@cache
def schedule_actions(schedule: str, pp: int, n_micro: int, split_backward: bool, virtual_stages: int = 1,
                     overlap: bool = False) -> list[list[Action]]:
    """build_schedule's, built once (the planner's search asks for each many times; read only)."""
    return build_schedule(schedule, pp, n_micro, split_backward, virtual_stages, overlap)


@cache
def schedule_steps(schedule: str, pp: int, n_micro: int, split_backward: bool, virtual_stages: int = 1,
                   overlap: bool = False) -> list[tuple[MemoryStep, ...]]:
    """Each rank's memory_steps of the schedule."""
    return [memory_steps(actions)
            for actions in schedule_actions(schedule, pp, n_micro, split_backward, virtual_stages, overlap)]


def _adam_bytes(params: ParamCount) -> float:
    """AdamW: two FP32 moments per element and a step count per tensor."""
    return 2 * FP32 * params.elements + FP32 * params.tensors


def _distributed_adam_bytes(params: ParamCount, layout: Layout, precision: StateBytes, bucket_numel: int | None
                            ) -> float:
    """ZeRO-1: moments (in their dtypes) and FP32 masters beside BF16 weights of this rank's 1/DP
    shard, padded as the buckets pad it, and a step count per bucket; experts' over their
    expert-DP group (DP x TP / EP ranks). Each group's parameters are taken as filling its
    buckets in turn."""
    per_element = precision.moments + precision.masters
    bucket_numel = bucket_numel or default_bucket_numel(layout.dp)
    expert_dp = max(1, layout.dp * layout.tp // layout.ep)
    total = 0.0
    for elements, group in ((params.elements - params.expert_elements, layout.dp), (params.expert_elements, expert_dp)):
        buckets = -(-elements // bucket_numel)
        total += per_element * -(-elements // group) + FP32 * buckets
    return total
