"""One optimizer step: forward/backward over the micro-batches, gradient sync, clip, update.

A non-finite loss or gradient norm skips the update (gradients dropped, router biases
left alone); the decision is the same on every rank because both values are reduced
over all ranks before it is taken.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megadual.model.gpt import GPTChunk, loss_names
from megadual.parallel.topology import Topology
from megadual.pipeline.driver import Pipeline
from megadual.pipeline.stage_model import StageModel
from megadual.training.dist_optimizer import DistributedOptimizer
from megadual.training.grads import ReducedGradients, reduce_gradients
from megadual.training.optimizer import set_learning_rate


@dataclass
class RoutingSummary:
    aux_loss: float = 0.0
    max_over_mean_load: float = 0.0
    nodes_per_token_mean: float = 0.0
    nodes_per_token_max: int = 0
    inter_node_rows_per_token: float = 0.0  # dispatch rows sent to other nodes, per routed token
    intra_node_rows_per_token: float = 0.0  # dispatch rows sent to other ranks of the node, per routed token


@dataclass
class StepResult:
    lm_loss: float
    grad_norm: float
    skipped: bool
    routing: RoutingSummary
    mtp_losses: list[float] = field(default_factory=list)  # per MTP depth, unscaled ("mtp_k loss")


def autocast_context(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def forward_backward(model: GPTChunk, batches: list[dict], device: torch.device, bf16: bool,
                     backward: bool = True) -> dict[str, torch.Tensor]:
    """Gradient accumulation over micro-batches through the whole model (one chunk); returns the
    mean of each reported loss (this rank) by log name, summed in the order the pipeline runtime
    sums them. Without `backward`: evaluation."""
    totals: dict[str, torch.Tensor] = {}
    for batch in batches:
        with autocast_context(device, bf16):
            documents = batch.get("documents")
            out = model(batch["tokens"].to(device), batch["labels"].to(device), batch.get("sample_ids"),
                        documents and documents.to(device))
        if backward:
            (out.loss / len(batches)).backward()
        out.add_to(totals)
    return {name: total / len(batches) for name, total in totals.items()}


def mean_over_dp(losses: dict[str, torch.Tensor], names: list[str], topo: Topology) -> list[float]:
    """The losses `names` (those reported by the model) averaged over the data-parallel ranks."""
    values = torch.stack([losses[name].detach().double().cpu() for name in names])
    group = topo.group("dp")
    if group is not None:
        dist.all_reduce(values, group=group)
    return (values / topo.layout.dp).tolist()


def reduce_routing(model: StageModel, topo: Topology, rate: float, update_bias: bool,
                   pipeline: Pipeline | None = None) -> RoutingSummary:
    """Sum each router's step statistics over the pipeline stage (and DualPipe's mirrored copy);
    move its expert bias. Under PP the summary covers the routers of every stage."""
    if not model.config.num_experts:
        return RoutingSummary()
    summary = RoutingSummary()
    group = topo.group("dp_tp")
    node_sum = node_tokens = inter_rows = intra_rows = 0.0
    for router, copy in model.routers():
        stats = router.take_stats()
        totals = [stats.aux_loss, stats.calls, stats.tokens, stats.node_count_sum, stats.inter_node_rows,
                  stats.intra_node_rows]
        sums = torch.cat([stats.tokens_per_expert, torch.tensor(totals, dtype=torch.float64)])
        node_max = torch.tensor(stats.node_count_max)
        if group is not None:
            dist.all_reduce(sums, group=group)
            dist.all_reduce(node_max, op=dist.ReduceOp.MAX, group=group)
        if pipeline is not None and pipeline.mirror is not None:
            sums = sums + pipeline.from_mirror(sums)
            node_max = torch.maximum(node_max, pipeline.from_mirror(node_max))
        load = sums[:-len(totals)]
        aux, calls, tokens, nodes, inter, intra = sums[-len(totals):].tolist()
        if update_bias and router.config.moe_router_enable_expert_bias:
            router.update_bias(load, rate)
        if copy:
            continue  # the first copy, on the mirrored rank, counts it
        summary.aux_loss += aux / max(1.0, calls)
        summary.max_over_mean_load = max(summary.max_over_mean_load, float(load.max() / load.mean()))
        summary.nodes_per_token_max = max(summary.nodes_per_token_max, int(node_max))
        node_sum, node_tokens = node_sum + nodes, node_tokens + tokens
        inter_rows, intra_rows = inter_rows + inter, intra_rows + intra
    per_token = [node_sum, inter_rows, intra_rows]
    if topo.layout.pp > 1:
        per_token, node_tokens = _combine_over_pipeline(summary, per_token, node_tokens, topo.group("pp"))
    (summary.nodes_per_token_mean, summary.inter_node_rows_per_token,
     summary.intra_node_rows_per_token) = (value / max(1.0, node_tokens) for value in per_token)
    return summary


def _combine_over_pipeline(summary: RoutingSummary, per_token: list[float], tokens: float,
                           group) -> tuple[list[float], float]:
    """Fold the other stages' routers into `summary`; returns the pipeline's per-token sums and tokens."""
    sums = torch.tensor([summary.aux_loss, tokens, *per_token], dtype=torch.float64)
    maxes = torch.tensor([summary.max_over_mean_load, summary.nodes_per_token_max], dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    summary.aux_loss, tokens, *per_token = sums.tolist()
    summary.max_over_mean_load, summary.nodes_per_token_max = float(maxes[0]), int(maxes[1])
    return per_token, tokens


def reduce_step_gradients(model: StageModel, optimizer: torch.optim.Optimizer | DistributedOptimizer,
                          topo: Topology, pipeline: Pipeline | None) -> ReducedGradients:
    """Reduce the step's gradients over their replicas and DualPipe's mirrored copies: all-reduced
    for the plain optimizer, reduce-scattered into shards for the distributed one."""
    if isinstance(optimizer, DistributedOptimizer):
        return optimizer.reduce_gradients(pipeline)
    grads = reduce_gradients(model.param_table, topo)
    if pipeline is not None:
        pipeline.sum_shared_gradients()
    return grads


def train_step(model: StageModel, optimizer: torch.optim.Optimizer | DistributedOptimizer, batches: list[dict],
               topo: Topology, lr: float, clip_grad: float, bias_rate: float, device: torch.device, bf16: bool,
               grad_hook=None, pipeline: Pipeline | None = None) -> StepResult:
    """With `pipeline` (PP > 1) the schedule runs the micro-batches through `model`'s chunks."""
    optimizer.zero_grad(set_to_none=True)
    if pipeline is None:
        losses = forward_backward(model.chunks[0], batches, device, bf16)
    else:
        losses = pipeline.forward_backward(batches)
    lm_loss, *mtp_losses = mean_over_dp(losses, loss_names(model.config), topo)
    grads = reduce_step_gradients(model, optimizer, topo, pipeline)
    if grad_hook is not None:
        grad_hook(model, grads.whole)
    norm = grads.norm()
    finite = all(map(math.isfinite, [norm, lm_loss, *mtp_losses]))
    routing = reduce_routing(model, topo, bias_rate, update_bias=finite, pipeline=pipeline)
    if finite:
        grads.clip(norm, clip_grad)
        set_learning_rate(optimizer, lr)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(lm_loss, norm, not finite, routing, mtp_losses)
