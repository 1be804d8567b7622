"""The layouts that fit N GPUs of G GiB, ranked by a step-time estimate (python -m megadual.plan --gpus).

Searched: TP in {1, 2, 4, 8}, PP in {1, 2, 4, 8, 16, 32}, the schedules (1F1B and interleaved 1F1B
with V = 2, each with and without --overlap-moe-expert-parallel-comm; DualPipe; DualPipeV), EP in the powers
of two up to the experts, micro-batch 1 or 2, recomputation none / selective (core_attn) /
selective (DeepSeek-V3's: layernorm, mla_up_proj with core_attn) / full (every layer), and the
distributed optimizer off or on; the end stages take the layers an even split leaves over
(Megatron's --decoder-first/last-pipeline-num-layers). A layout fits when every rank's predicted
memory (megadual/plan/cli.py) is at most --memory-fraction of the GPU's.

The step time is the schedule simulator's makespan (pipeline/simulate.py) over per-stage costs
from these stated assumptions (flags, defaults for H800/H100-class GPUs):
- compute: the forward's FLOPs as --log-throughput counts them (megadual/model/flops.py: every
  GEMM, attention over the whole sequence, MTP beside the head), backward twice that (input and
  weight halves equal), at --gpu-tflops achieved per GPU; full recomputation adds a forward to
  each backward, selective recomputation is counted free;
- expert all-to-all: each token's hidden state (BF16) to every remote EP rank holding one of
  its experts and back, forward and backward, over InfiniBand (--ib-gbps per GPU) once the EP
  group spans nodes (as parallel/topology.py builds it: EP consecutive ranks), else NVLink
  (--nvlink-gbps); exposed under 1F1B, hidden behind the other micro-batch's compute in paired
  chunks (DualPipe's; 1F1B's with --overlap-moe-expert-parallel-comm), timed hop by hop
  (pipeline/hops.py): each layer's dispatch and combine against the other side's compute piece
  beside it (attention and shared experts before a dispatch, routed experts between dispatch and
  combine; the shared expert computes while its own dispatch is in flight, and the dispatch's
  token counts, sent before it, wait for the hops already on the link), so a hop longer than
  that piece shows even where the pair's compute outlasts its communication;
- TP: two all-reduces of the hidden state per layer each way, over NVLink, exposed;
- pipeline p2p: one activation message per micro-batch and stage boundary over InfiniBand;
- data parallelism: one reduce-scatter of FP32 gradients and one all-gather of the weights per
  step over InfiniBand, not overlapped.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from functools import cache

from megadual.config import ConfigError, RunConfig
from megadual.config_validate import num_microbatches, validate_world
from megadual.model.flops import layer_flops, stage_forward_flops_per_token, swiglu_flops
from megadual.parallel.topology import nodes_per_ep_group
from megadual.pipeline.hops import Pieces
from megadual.pipeline.simulate import SimCosts, StageCosts, simulate
from megadual.plan.rank_memory import RankMemory, layout_of, predict, rank_stages, schedule_actions
from megadual.plan.tensor_bytes import distinct_ranks_per_token

GIB = 1024 ** 3
RECOMPUTE_CHOICES = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "selective+norm+mla": {"recompute_granularity": "selective",
                           "recompute_modules": ("layernorm", "mla_up_proj", "core_attn")},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


# (--pipeline-schedule, --overlap-moe-expert-parallel-comm); interleaved with 2 virtual stages per rank
SCHEDULE_CHOICES = (("1f1b", False), ("1f1b", True), ("interleaved", False), ("interleaved", True),
                    ("dualpipe", False), ("dualpipev", False))


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    tflops: float = 400.0  # achieved BF16 per GPU (H800 / H100 peak dense: 989)
    nvlink_gbps: float = 160.0  # GB/s per GPU within a node
    ib_gbps: float = 50.0  # GB/s per GPU between nodes (400 Gb/s InfiniBand)
    memory_fraction: float = 0.9  # of the GPU's memory a layout may use

    def describe(self) -> str:
        return (f"assumed: {self.tflops:g} TFLOP/s achieved per GPU, NVLink {self.nvlink_gbps:g} GB/s, "
                f"InfiniBand {self.ib_gbps:g} GB/s per GPU, {self.gpus_per_node} GPUs per node, "
                f"{self.memory_fraction:.0%} of the memory usable")


@dataclass(frozen=True)
class Fit:
    config: RunConfig
    recompute: str
    distributed: bool
    memory: list[RankMemory]
    step_seconds: float

    @property
    def peak_bytes(self) -> float:
        return max(rank.total for rank in self.memory)

    def describe(self, world: int) -> str:
        p, t = self.config.parallel, self.config.train
        dp = world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
        schedule = p.pipeline_schedule + ("+ov" if p.overlap_moe_expert_parallel_comm else "")
        return (f"TP{p.tensor_model_parallel_size} PP{p.pipeline_model_parallel_size} {schedule:<14} "
                f"EP{p.expert_model_parallel_size:<3} DP{dp:<4} mb{t.micro_batch_size} {self.recompute:<18} "
                f"{'ZeRO-1' if self.distributed else 'plain ':<6}")


def end_stage_layers(num_layers: int, stages: int) -> tuple[int | None, int | None]:
    """(first, last) stage layer counts that make `num_layers` split over `stages` (None, None: evenly)."""
    if num_layers % stages == 0:
        return None, None
    middle = -(-num_layers // stages)
    rest = num_layers - middle * (stages - 2)
    if rest < 0:
        raise ConfigError(f"{num_layers} layers do not split over {stages} stages")
    return rest // 2, rest - rest // 2


def candidates(base: RunConfig, world: int, hw: Hardware):
    m = base.model
    eps = [e for e in (2 ** i for i in range(int(math.log2(max(1, m.num_experts))) + 1)) if e <= world] or [1]
    for tp, pp, (schedule, overlap), ep, mb, recompute, distributed in itertools.product(
            (1, 2, 4, 8), (1, 2, 4, 8, 16, 32), SCHEDULE_CHOICES, eps, (1, 2), RECOMPUTE_CHOICES, (False, True)):
        if (pp == 1 and (schedule != "1f1b" or overlap)) or tp > hw.gpus_per_node or world % (tp * pp):
            continue
        if "mla" in recompute and not m.multi_latent_attention:
            continue
        stages = (2 if schedule in ("dualpipev", "interleaved") else 1) * pp  # interleaved: V = 2
        try:
            first, last = end_stage_layers(m.num_layers, stages) if pp > 1 else (None, None)
        except ConfigError:
            continue
        parallel = replace(base.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                           pipeline_schedule=schedule, expert_model_parallel_size=ep,
                           num_virtual_stages_per_pipeline_rank=2 if schedule == "interleaved" else None,
                           overlap_moe_expert_parallel_comm=overlap,
                           decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last,
                           moe_ranks_per_node=hw.gpus_per_node)
        train = replace(base.train, micro_batch_size=mb, **RECOMPUTE_CHOICES[recompute])
        config = replace(base, parallel=parallel, train=train)
        try:
            validate_world(config, world, hw.gpus_per_node)
        except ConfigError:
            continue
        yield config, recompute, distributed


def search(base: RunConfig, world: int, gpu_memory_gib: float, hw: Hardware) -> tuple[list[Fit], int]:
    """(the layouts that fit, fastest first; how many layouts were tried)."""
    fits, tried = [], 0
    for config, recompute, distributed in candidates(base, world, hw):
        tried += 1
        budget = hw.memory_fraction * gpu_memory_gib * GIB
        if max(rank.total for rank in predict(config, world, distributed, activations=False)) > budget:
            continue
        memory = predict(config, world, distributed)
        if max(rank.total for rank in memory) <= budget:
            fits.append(Fit(config, recompute, distributed, memory, step_seconds(config, world, hw, memory)))
    return sorted(fits, key=lambda fit: fit.step_seconds), tried


@cache  # layouts that differ only in what costs nothing here (the optimizer, selective recomputation) share it
def _makespan(schedule: tuple, pp: int, n_micro: int, costs: tuple, latency: float) -> float:
    name, virtual, overlap = schedule
    return simulate(schedule_actions(name, pp, n_micro, True, virtual, overlap),
                    StageCosts(dict(costs), latency)).makespan


def step_seconds(config: RunConfig, world: int, hw: Hardware, memory: list[RankMemory]) -> float:
    """The estimated time of one step (see the module's doc)."""
    m, t, layout = config.model, config.train, layout_of(config, world)
    n_micro = num_microbatches(config, layout.dp)
    message = m.seq_length * t.micro_batch_size * m.hidden_size * 2  # BF16
    costs = chunk_costs(config, world, hw)
    if layout.pp == 1:
        makespan = n_micro * (costs[0, 0].f + costs[0, 0].b + costs[0, 0].comm_f + costs[0, 0].comm_b)
    else:
        makespan = _makespan((layout.schedule, layout.virtual_stages, layout.overlap), layout.pp, n_micro,
                             tuple(costs.items()), message / (hw.ib_gbps * 1e9))
    elements = max(rank.parameters for rank in memory) / (2 if t.bf16 and memory[0].distributed_optimizer else 4)
    sync = elements * (4 + 2) * (layout.dp - 1) / layout.dp / (hw.ib_gbps * 1e9)
    return makespan + sync


def chunk_costs(config: RunConfig, world: int, hw: Hardware) -> dict[tuple[int, int], SimCosts]:
    """Each (pipeline rank, chunk)'s costs of one micro-batch (see the module's doc), at hop level: the
    forward's compute pieces between its expert all-to-alls (what runs before a layer's dispatch, its
    routed experts, ...), the backward's the same in reverse at twice the compute (three times under
    full recomputation), each hop one direction of one layer's all-to-all."""
    m, t, layout = config.model, config.train, layout_of(config, world)
    tokens = m.seq_length * t.micro_batch_size
    spans_nodes = nodes_per_ep_group(layout.ep, hw.gpus_per_node) > 1
    a2a_bandwidth = (hw.ib_gbps if spans_nodes else hw.nvlink_gbps) * 1e9
    message = tokens * m.hidden_size * 2  # BF16
    remote = distinct_ranks_per_token(m, layout.ep) * (1 - 1 / layout.ep) if m.num_experts else 0.0
    hop = message / layout.tp * remote / a2a_bandwidth
    backward = 3.0 if t.recompute_granularity == "full" else 2.0
    seconds = 1 / (hw.tflops * 1e12) * tokens / layout.tp
    tp = 2 * message * (layout.tp - 1) / layout.tp / (hw.nvlink_gbps * 1e9)  # one layer's, each way
    routed = m.moe_router_topk * swiglu_flops(m.hidden_size, m.moe_ffn_hidden_size) * seconds
    shared = swiglu_flops(m.hidden_size, m.moe_shared_expert_intermediate_size) * seconds  # beside the dispatch
    costs = {}
    for rank, chunks in enumerate(rank_stages(config, layout, num_microbatches(config, layout.dp))):
        for chunk, spec in enumerate(chunks):
            layers = range(spec.first_layer, spec.last_layer)
            f = stage_forward_flops_per_token(m, layers, spec.has_head) * seconds
            pieces, lead, current = [], [], 0.0  # the forward's compute pieces; what has run since the last hop
            drain: list[float | None] = []  # where each piece sends its dispatch's token counts
            for layer in layers:
                if m.is_moe_layer(layer) and layout.ep > 1:
                    before = current + layer_flops(m, layer) * seconds - routed
                    pieces += [before, routed]
                    lead += [shared, 0.0]
                    drain += [before - shared, None]
                    current = 0.0
                else:
                    current += layer_flops(m, layer) * seconds
            pieces.append(current + f - sum(layer_flops(m, layer) * seconds for layer in layers))
            hops = (hop,) * (len(pieces) - 1)
            exposed_tp = len(layers) * tp
            drain.append(None)
            first_drain = None if drain[0] is None else drain[0] + exposed_tp
            forward = Pieces((pieces[0] + exposed_tp, *pieces[1:]), hops, tuple(lead), drain=(first_drain, *drain[1:]))
            back = [backward * p for p in reversed(pieces)]
            costs[rank, chunk] = SimCosts(f=f + exposed_tp, b=backward * f + exposed_tp, w=f,
                                          comm_f=sum(hops), comm_b=sum(hops), hops_f=forward,
                                          hops_b=Pieces((*back[:-1], back[-1] + exposed_tp), hops))
    return costs
