"""One rank's memory before launch: parameters, gradients and optimizer state of the stages it
holds (DualPipe: both copies), and the peak activations of its schedule (memory_model.py).
What `python -m megadual.plan --world-size N` prints and the memory report measures."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from megadual.config import ModelConfig, RunConfig
from megadual.config_validate import num_microbatches, virtual_stages
from megadual.memory_model import FP32, MemoryStep, Shape, memory_steps, peak_bytes, stage_activations
from megadual.model.gpt import StageSpec, full_model_stage
from megadual.parallel.recompute import RecomputePlan
from megadual.pipeline.actions import Action
from megadual.pipeline.schedules import build_schedule, pipeline_layout
from megadual.pipeline.stage_model import stage_specs
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
    return count + ParamCount(experts * per_expert, 3 * experts, experts * per_expert)


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


def shape_of(config: RunConfig, layout: Layout) -> Shape:
    gemm_bytes = 1 if config.fp8.fp8_format else 2 if config.train.bf16 else FP32
    return Shape(config.model.seq_length, config.train.micro_batch_size, layout.tp,
                 config.parallel.sequence_parallel and layout.tp > 1, layout.ep, gemm_bytes)


def predict(config: RunConfig, world: int, distributed: bool | None = None,
            activations: bool = True) -> list[RankMemory]:
    """Every pipeline rank's memory; `distributed`: with or without the distributed optimizer
    (None: as the flags say); without `activations` the peak activations are left at 0 (a
    quick first cut for the search)."""
    layout = layout_of(config, world)
    n_micro = num_microbatches(config, layout.dp)
    plan, shape, c = RecomputePlan.from_flags(config.train), shape_of(config, layout), config.model
    stages = rank_stages(config, layout, n_micro)
    schedules = (schedule_steps(layout.schedule, layout.pp, n_micro, config.parallel.pipeline_split_backward,
                                layout.virtual_stages, layout.overlap)
                 if layout.pp > 1 and activations else None)
    distributed = config.optim.use_distributed_optimizer if distributed is None else distributed
    weight_bytes = 2 if distributed and config.train.bf16 else FP32  # BF16 weights beside FP32 masters
    ranks = []
    for pp_rank, chunks in enumerate(stages):
        params = ParamCount()
        for spec in chunks:
            params += stage_parameters(c, spec, layout.tp, layout.ep)
        if c.mtp_num_layers and any(s.has_head for s in chunks) and not any(s.has_embedding for s in chunks):
            params += _dense(c.vocab_size // layout.tp * c.hidden_size)  # MTP's tied embedding (1F1B, PP > 1)
        peak = _peak_activations(c, shape, plan, chunks, schedules[pp_rank] if schedules else None) \
            if activations else 0.0
        sharded = _distributed_adam_bytes(params, layout, weight_bytes, config.optim.ddp_bucket_size)
        ranks.append(RankMemory(pp_rank, params.elements * weight_bytes, params.elements * FP32,
                                _adam_bytes(params), sharded, peak, distributed))
    return ranks


def _peak_activations(c: ModelConfig, shape: Shape, plan: RecomputePlan, chunks: list[StageSpec],
                      steps: tuple[MemoryStep, ...] | None) -> float:
    acts = [stage_activations(c, shape, range(s.first_layer, s.last_layer), s.has_embedding, s.has_head, plan)
            for s in chunks]
    if steps is None:
        return acts[0].kept + max(0.0, acts[0].transient)
    return peak_bytes(steps, acts, [shape.ep > 1 and _has_moe_layer(c, s) for s in chunks])


def _has_moe_layer(c: ModelConfig, stage: StageSpec) -> bool:
    """Whether the stage's layers (its MTP layers included) include an MoE layer."""
    mtp = range(c.num_layers, c.num_layers + c.mtp_num_layers) if stage.has_head else range(0)
    return any(c.is_moe_layer(layer) for layer in (*range(stage.first_layer, stage.last_layer), *mtp))


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


def _distributed_adam_bytes(params: ParamCount, layout: Layout, weight_bytes: int, bucket_numel: int | None) -> float:
    """ZeRO-1: moments (and FP32 masters beside BF16 weights) of this rank's 1/DP shard, padded
    as the buckets pad it, and a step count per bucket; experts' over their expert-DP group
    (DP x TP / EP ranks). Each group's parameters are taken as filling its buckets in turn."""
    per_element = 2 * FP32 + (FP32 if weight_bytes != FP32 else 0)
    bucket_numel = bucket_numel or default_bucket_numel(layout.dp)
    expert_dp = max(1, layout.dp * layout.tp // layout.ep)
    total = 0.0
    for elements, group in ((params.elements - params.expert_elements, layout.dp), (params.expert_elements, expert_dp)):
        buckets = -(-elements // bucket_numel)
        total += per_element * -(-elements // group) + FP32 * buckets
    return total
