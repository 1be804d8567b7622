"""Gradient reduction across replicas, and the global gradient norm for clipping.

What each gradient needs comes from its parameter's record (parallel/params.py).
Dense parameters are averaged over DP. Expert parameters are summed over the
expert-data-parallel group (ranks holding the same experts) and divided by DP,
since their gradients already gather tokens of the whole EP group. Parameters that
see only part of the sequence under sequence parallelism (norms, router) are first
summed over TP. Parameters held on two pipeline ranks (DualPipe's two copies of a stage,
the embedding tied to the last stage for MTP) are summed by the pipeline
(pipeline/driver.py) after this reduction. The distributed optimizer (dist_optimizer.py)
reduce-scatters instead of all-reducing; both hand the norm and clipping a `ReducedGradients`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megadual.parallel import collectives, comm
from megadual.parallel.params import ParamRecord, ParamTable
from megadual.parallel.topology import Topology


def _all_reduce_coalesced(grads: list[torch.Tensor], group, scale: float = 1.0) -> None:
    if comm.group_size(group) == 1 and scale == 1.0:
        return

    def reduce(flat: torch.Tensor) -> torch.Tensor:
        if comm.group_size(group) > 1:
            collectives.all_reduce(flat, group)
        return flat.mul_(scale)

    comm.coalesced(grads, reduce)


def ensure_grads(table: ParamTable) -> None:
    """Give every parameter a gradient, so every rank joins the same collectives."""
    for p in table.params():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def sum_partial_over_tp(grads: list[torch.Tensor], topo: Topology) -> None:
    """Sum over TP the gradients of parameters that saw only part of the sequence there."""
    _all_reduce_coalesced(grads, topo.group("tp"))


@dataclass
class ReducedGradients:
    """The gradient a rank holds after the reduction: `tensors` all of it (what clipping scales),
    `counted` the distinct pieces this rank adds to the global norm; `whole()` each of the rank's
    parameters' reduced gradient by global name, whole even where the rank holds a shard (for
    checks: under the distributed optimizer it gathers, so every rank must call it)."""
    tensors: list[torch.Tensor]
    counted: list[torch.Tensor]
    whole: Callable[[], dict[str, torch.Tensor]]

    def norm_squared(self) -> torch.Tensor:
        """The squared L2 norm of the full model's gradient, each distinct piece counted once over all
        ranks: a float64 scalar on the gradients' device, left there (the step brings it to the host
        with its other scalars, in one transfer)."""
        device = self.tensors[0].device
        total = torch.zeros((), dtype=torch.float64, device=device)
        if self.counted:
            total = total + torch.stack(torch._foreach_norm(self.counted, 2, dtype=torch.float64)).square().sum()
        if collectives.size(None) > 1:  # the world
            collectives.all_reduce(total)
        return total

    def clip(self, norm: float, max_norm: float) -> None:
        if max_norm > 0 and norm > max_norm:
            torch._foreach_mul_(self.tensors, max_norm / (norm + 1e-6))


def reduce_gradients(table: ParamTable, topo: Topology) -> ReducedGradients:
    """All-reduce every gradient over its replicas (the plain optimizer's reduction)."""
    ensure_grads(table)
    dp = topo.layout.dp
    # Row by row (an expert's projections together, as the table orders them), so each element's
    # place in the coalesced buffer, and so the order a ring all-reduce sums it in, does not depend
    # on how the experts' weights are stored.
    sum_partial_over_tp([r.grad for r in table if r.spec.grad_partial_over_tp], topo)
    _all_reduce_coalesced([r.grad for r in table if not r.spec.expert], topo.group("dp"), 1.0 / dp)
    _all_reduce_coalesced([r.grad for r in table if r.spec.expert], topo.group("edp"), 1.0 / dp)
    return ReducedGradients([p.grad for p in table.params()],  # a stack once, not row by row
                            [r.grad for r in table if counted_in_norm(r, topo, sharded_over_dp=False)],
                            lambda: {r.name: r.grad for r in table})


def counted_in_norm(record: ParamRecord, topo: Topology, sharded_over_dp: bool) -> bool:
    """Whether this rank adds its gradient (or, `sharded_over_dp`, its shard of it) to the norm:
    each distinct piece once."""
    if record.duplicate:
        return False  # DualPipe's second copy, or a tied copy: its gradient equals the counted copy's
    if record.replicated_over_tp and topo.tp_rank:
        return False
    if sharded_over_dp:
        return True  # every data-parallel rank holds a different piece
    if record.spec.expert:
        return topo.members["edp"].index(topo.rank) == 0
    return topo.dp_rank == 0
