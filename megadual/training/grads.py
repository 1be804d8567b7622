"""Gradient reduction across replicas, and the global gradient norm for clipping.

Dense parameters are averaged over DP. Expert parameters are summed over the
expert-data-parallel group (ranks holding the same experts) and divided by DP,
since their gradients already gather tokens of the whole EP group. Parameters that
see only part of the sequence under sequence parallelism (norms, router) are first
summed over TP. DualPipe's two copies of a stage are summed by the pipeline
(pipeline/driver.py) after this reduction.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megadual.parallel import comm
from megadual.parallel.topology import Topology


def _all_reduce_coalesced(grads: list[torch.Tensor], group, scale: float = 1.0) -> None:
    if not grads or (comm.group_size(group) == 1 and scale == 1.0):
        return
    flat = _flatten_dense_tensors(grads)
    if comm.group_size(group) > 1:
        dist.all_reduce(flat, group=group)
    if scale != 1.0:
        flat.mul_(scale)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def ensure_grads(params: list[torch.nn.Parameter]) -> None:
    """Give every parameter a gradient, so every rank joins the same collectives."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def reduce_gradients(params: list[torch.nn.Parameter], topo: Topology) -> None:
    ensure_grads(params)
    dp = topo.layout.dp
    seq_parallel = [p.grad for p in params if getattr(p, "sequence_parallel", False)]
    _all_reduce_coalesced(seq_parallel, topo.group("tp"))
    dense = [p.grad for p in params if not getattr(p, "expert_parallel", False)]
    experts = [p.grad for p in params if getattr(p, "expert_parallel", False)]
    _all_reduce_coalesced(dense, topo.group("dp"), 1.0 / dp)
    _all_reduce_coalesced(experts, topo.group("edp"), 1.0 / dp)


def global_grad_norm(params: list[torch.nn.Parameter], topo: Topology) -> float:
    """L2 norm of the full model's gradient, each distinct parameter counted once."""
    dense_owner = topo.dp_rank == 0
    expert_owner = topo.members["edp"].index(topo.rank) == 0
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        is_expert = getattr(p, "expert_parallel", False)
        replicated_over_tp = not hasattr(p, "tp_shard") and not is_expert
        if getattr(p, "pipeline_mirror", False):
            continue  # DualPipe's second copy of a stage: its gradient equals the first copy's
        if (expert_owner if is_expert else dense_owner) and not (replicated_over_tp and topo.tp_rank):
            total += p.grad.detach().double().pow(2).sum().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total.sqrt())


def clip_gradients(params: list[torch.nn.Parameter], norm: float, max_norm: float) -> None:
    if max_norm > 0 and norm > max_norm:
        for p in params:
            p.grad.mul_(max_norm / (norm + 1e-6))
