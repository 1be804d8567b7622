"""One optimizer step: forward/backward over the micro-batches, gradient sync, clip, update.

A non-finite loss or gradient norm skips the update (gradients dropped, router biases
left alone); the decision is the same on every rank because both values are reduced
over all ranks before it is taken. The step brings one pair of values to the host
(`to_host`: the gradient norm and whether the losses are finite), which decide whether the
optimizer steps; the logged values (losses, routing summary) stay on the device in
StepResult.values until --log-interval brings an interval's totals over (metrics.py). The
router biases move by a device-side 0/1 for a skipped step, so the decision needs no other.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megadual.model.gpt import GPTChunk, loss_names
from megadual.moe.router import RoutingStats
from megadual.parallel import collectives
from megadual.parallel.topology import Topology
from megadual.pipeline.driver import Pipeline
from megadual.pipeline.stage_model import StageModel
from megadual.training.device_check import unwatched, watched
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
    """`values`: the step's logged values on the device, a float64 vector (lm loss, each MTP depth's
    loss, then RoutingSummary's fields when the model has experts); reading `lm_loss`,
    `mtp_losses` or `routing` brings it to the host (callers after the run, tests), the training
    loop never does."""
    values: torch.Tensor
    mtp_depths: int
    grad_norm: float
    skipped: bool
    host_syncs: int | None = None  # values brought to the host, where MEGADUAL_DEVICE_CHECK counts them
    _host: list[float] | None = field(default=None, repr=False)

    @property
    def losses(self) -> torch.Tensor:
        """The lm loss and the MTP losses, on the device."""
        return self.values[:1 + self.mtp_depths]

    def host_values(self) -> list[float]:
        if self._host is None:
            self._host = self.values.tolist()
        return self._host

    @property
    def lm_loss(self) -> float:
        return self.host_values()[0]

    @property
    def mtp_losses(self) -> list[float]:  # per MTP depth, unscaled ("mtp_k loss")
        return self.host_values()[1:1 + self.mtp_depths]

    @property
    def routing(self) -> RoutingSummary:
        return summary_from(self.host_values()[1 + self.mtp_depths:])


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


def mean_over_dp(losses: dict[str, torch.Tensor], names: list[str], topo: Topology) -> torch.Tensor:
    """The losses `names` (those reported by the model) averaged over the data-parallel ranks: a
    float64 vector, on the device."""
    values = torch.stack([losses[name].detach().double() for name in names])
    group = topo.group("dp")
    if group is not None:
        collectives.all_reduce(values, group)
    return values / topo.layout.dp


def reduce_routing(model: StageModel, topo: Topology, rate: float, update_bias: torch.Tensor,
                   pipeline: Pipeline | None = None) -> torch.Tensor | None:
    """Sum each router's step statistics over the pipeline stage (and DualPipe's mirrored copy);
    move its expert bias where `update_bias` (a boolean on the device) holds. Returns the
    RoutingSummary's fields in order, on the device (None without experts). Under PP the summary
    covers the routers of every stage."""
    if not model.config.num_experts:
        return None
    device = update_bias.device
    group = topo.group("dp_tp")
    zero = torch.zeros((), dtype=torch.float64, device=device)
    aux_loss = max_load = node_sum = node_tokens = inter_rows = intra_rows = zero
    node_max = torch.zeros(1, dtype=torch.int64, device=device)
    totals = len(RoutingStats.SUMS)
    for router, copy in model.routers():
        sums, router_node_max = router.take_stats().as_tensors(device)
        if group is not None:
            collectives.all_reduce(sums, group)
            collectives.all_reduce(router_node_max, group, op=dist.ReduceOp.MAX)
        if pipeline is not None and pipeline.mirror is not None:
            sums = sums + pipeline.from_mirror(sums)
            router_node_max = torch.maximum(router_node_max, pipeline.from_mirror(router_node_max))
        load = sums[:-totals]
        aux, calls, tokens, nodes, inter, intra = sums[-totals:]
        if router.config.moe_router_enable_expert_bias:
            router.update_bias(load, rate * update_bias.float())
        if copy:
            continue  # the first copy, on the mirrored rank, counts it
        aux_loss = aux_loss + aux / calls.clamp(min=1.0)
        max_load = torch.maximum(max_load, load.max() / load.mean())
        node_max = torch.maximum(node_max, router_node_max)
        node_sum, node_tokens = node_sum + nodes, node_tokens + tokens
        inter_rows, intra_rows = inter_rows + inter, intra_rows + intra
    sums = torch.stack([aux_loss, node_tokens, node_sum, inter_rows, intra_rows])
    maxes = torch.stack([max_load, node_max[0].double()])
    if topo.layout.pp > 1:  # fold in the other stages' routers
        collectives.all_reduce(sums, topo.group("pp"))
        collectives.all_reduce(maxes, topo.group("pp"), op=dist.ReduceOp.MAX)
    per_token = sums[2:] / sums[1].clamp(min=1.0)
    return torch.stack([sums[0], maxes[0], per_token[0], maxes[1], per_token[1], per_token[2]])


def summary_from(values: list[float]) -> RoutingSummary:
    """reduce_routing's fields, on the host (the defaults without experts)."""
    if not values:
        return RoutingSummary()
    aux, max_load, nodes_mean, nodes_max, inter, intra = values
    return RoutingSummary(aux, max_load, nodes_mean, int(nodes_max), inter, intra)


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


def to_host(norm_squared: torch.Tensor, losses: torch.Tensor) -> tuple[float, bool]:
    """The step's one host transfer, (gradient norm, whether the step's values are finite): the
    only values each step needs on the host. Whether the optimizer steps, the consecutive-skipped
    counter (its error) and the checkpoint's skipped count are host control flow, and clipping
    scales by the norm as Megatron does; the logged values stay on the device."""
    norm_squared, losses_finite = torch.stack([norm_squared, torch.isfinite(losses).all().double()]).tolist()
    norm = math.sqrt(norm_squared)
    return norm, math.isfinite(norm) and losses_finite == 1.0


def train_step(model: StageModel, optimizer: torch.optim.Optimizer | DistributedOptimizer, batches: list[dict],
               topo: Topology, lr: float, clip_grad: float, bias_rate: float, device: torch.device, bf16: bool,
               grad_hook=None, pipeline: Pipeline | None = None) -> StepResult:
    """With `pipeline` (PP > 1) the schedule runs the micro-batches through `model`'s chunks. Under
    MEGADUAL_DEVICE_CHECK the step is watched (device_check.py) and counts its host transfers."""
    with watched(f"training step on rank {topo.rank}") as watch:
        result = _step(model, optimizer, batches, topo, lr, clip_grad, bias_rate, device, bf16, grad_hook, pipeline,
                       watch)
        if watch is not None:
            result.host_syncs = len(watch.syncs)
    return result


def _step(model: StageModel, optimizer: torch.optim.Optimizer | DistributedOptimizer, batches: list[dict],
          topo: Topology, lr: float, clip_grad: float, bias_rate: float, device: torch.device, bf16: bool,
          grad_hook, pipeline: Pipeline | None, watch) -> StepResult:
    optimizer.zero_grad(set_to_none=True)
    if pipeline is None:
        losses = forward_backward(model.chunks[0], batches, device, bf16)
    else:
        losses = pipeline.forward_backward(batches)
    names = loss_names(model.config)
    losses = mean_over_dp(losses, names, topo)
    grads = reduce_step_gradients(model, optimizer, topo, pipeline)
    if grad_hook is not None:
        with unwatched(watch):  # the layout checker's, not the step's: it gathers gradients to the host
            grad_hook(model, grads.whole)
    norm_squared = grads.norm_squared()
    finite = torch.isfinite(norm_squared) & torch.isfinite(losses).all()
    routing = reduce_routing(model, topo, bias_rate, finite, pipeline)
    norm, finite = to_host(norm_squared, losses)
    if finite:
        grads.clip(norm, clip_grad)
        set_learning_rate(optimizer, lr)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    values = losses if routing is None else torch.cat([losses, routing])
    return StepResult(values, len(names) - 1, norm, not finite)
