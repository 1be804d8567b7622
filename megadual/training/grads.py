"""Gradient reduction across replicas, and the global gradient norm for clipping.

What each gradient needs comes from its parameter's record (parallel/params.py).
Dense parameters are averaged over DP. Expert parameters are summed over the
expert-data-parallel group (ranks holding the same experts) and divided by DP,
since their gradients already gather tokens of the whole EP group. Parameters that
see only part of the sequence under sequence parallelism (norms, router) are first
summed over TP. Parameters held on two pipeline ranks (DualPipe's two copies of a stage,
the embedding tied to the last stage for MTP) are summed by the pipeline
(pipeline/driver.py) after this reduction.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megadual.parallel import comm
from megadual.parallel.params import ParamRecord, ParamTable
from megadual.parallel.topology import Topology


def _all_reduce_coalesced(grads: list[torch.Tensor], group, scale: float = 1.0) -> None:
    if comm.group_size(group) == 1 and scale == 1.0:
        return

    def reduce(flat: torch.Tensor) -> torch.Tensor:
        if comm.group_size(group) > 1:
            dist.all_reduce(flat, group=group)
        return flat.mul_(scale)

    comm.coalesced(grads, reduce)


def ensure_grads(table: ParamTable) -> None:
    """Give every parameter a gradient, so every rank joins the same collectives."""
    for p in table.params():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def reduce_gradients(table: ParamTable, topo: Topology) -> None:
    ensure_grads(table)
    dp = topo.layout.dp
    _all_reduce_coalesced([r.param.grad for r in table if r.spec.grad_partial_over_tp], topo.group("tp"))
    _all_reduce_coalesced([r.param.grad for r in table if not r.spec.expert], topo.group("dp"), 1.0 / dp)
    _all_reduce_coalesced([r.param.grad for r in table if r.spec.expert], topo.group("edp"), 1.0 / dp)


def _counted_here(record: ParamRecord, topo: Topology) -> bool:
    """Whether this rank adds the parameter's gradient to the norm: each distinct piece once."""
    if record.duplicate:
        return False  # DualPipe's second copy, or a tied copy: its gradient equals the counted copy's
    if record.spec.expert:
        return topo.members["edp"].index(topo.rank) == 0
    return topo.dp_rank == 0 and not (record.replicated_over_tp and topo.tp_rank)


def global_grad_norm(table: ParamTable, topo: Topology) -> float:
    """L2 norm of the full model's gradient, each distinct parameter counted once."""
    total = torch.zeros((), dtype=torch.float64)
    for record in table:
        if _counted_here(record, topo):
            total += record.param.grad.detach().double().pow(2).sum().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total.sqrt())


def clip_gradients(table: ParamTable, norm: float, max_norm: float) -> None:
    if max_norm > 0 and norm > max_norm:
        for p in table.params():
            p.grad.mul_(max_norm / (norm + 1e-6))
