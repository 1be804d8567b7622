"""--moe-token-dispatcher-type hierarchical: each token crosses to each destination node once.

DeepSeek-V3's dispatch. Hop 1, over the ranks of the EP group that share this rank's
in-node index (one per node): a token goes once to every node holding any of its experts,
to the rank there with the sender's in-node index. Hop 2, over the ranks of one node: that
rank forwards the row to the ranks of its node holding the token's experts. The combine
runs both hops backwards: each rank returns its summed expert outputs inside the node, the
forwarding rank sums them per row, and one row per node crosses back. So a token costs at
most M inter-node rows (M = --moe-router-max-nodes) where the flat all-to-all sends one
per destination rank, however many of them share a node.

The layer's sub-steps (what a paired F&B chunk covers with the other micro-batch's compute):

    hop 1 out in flight | hop 2 out, shared experts while it flies, experts, hop 2 back in flight
    | node sum, hop 1 back in flight | ...

So a layer takes three steps where the flat dispatch takes two, alternating long and
short computes. Paired with the backward of another micro-batch (whose steps mirror
these) with the forward one step ahead (`BackwardOverlap.forward_first`, which this
dispatcher sets), the long steps of each side cover the other's inter-node hops, the
shared experts cover this micro-batch's intra-node dispatch (in the backward too: the
intra-node hop resumes no forward step), and the short steps the intra-node returns
(docs/benchmarks.md measures what that leaves exposed).
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch

from megadual.moe.dispatcher import Counts, Dispatched, Experts, Hop, count_rows, counts_to_host
from megadual.moe.router import RoutingStats
from megadual.parallel import comm


class HierarchicalDispatcher:
    """`inter_group`: the EP ranks with this rank's in-node index, by node; `intra_group`: this
    node's EP ranks, by in-node index."""

    def __init__(self, num_experts: int, inter_group, intra_group, fp8_dispatch: bool = False):
        nodes, per_node = comm.group_size(inter_group), comm.group_size(intra_group)
        per_rank = num_experts // (nodes * per_node)
        self.inter = Hop(inter_group, per_rank * per_node, range(nodes), fp8_dispatch)
        self.intra = Hop(intra_group, per_rank, [0] * per_node, fp8_dispatch)
        self._overlap: comm.BackwardOverlap | None = None

    @property
    def overlap(self) -> comm.BackwardOverlap | None:
        return self._overlap

    @overlap.setter
    def overlap(self, overlap: comm.BackwardOverlap | None) -> None:
        """Set by a pipeline runtime that fills the backward's all-to-alls; the paired forward then
        leads by one step (see the module doc)."""
        self._overlap = overlap
        if overlap is not None:
            overlap.forward_first = True

    def routed_steps(self, tokens: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, experts: Experts,
                     alongside: Callable[[], Any], stats: RoutingStats | None = None
                     ) -> Generator[None, None, tuple[torch.Tensor, Any]]:
        inter_counts, intra_counts = self.exchange_counts(indices)
        to_node = self.inter.start(tokens, indices, gates, self.overlap, stats, counts=inter_counts)
        yield
        at_node = self.inter.wait(to_node)
        source_node = torch.repeat_interleave(torch.arange(len(at_node.recv_counts), device=tokens.device),
                                              at_node.received[:, 0], output_size=sum(at_node.recv_counts))
        # Covered by the shared experts alone, in the forward and (reversed) in the backward: its
        # backward launch resumes no forward step.
        to_rank = self.intra.start(at_node.tokens, at_node.local_experts, at_node.gates, None, stats,
                                   origin=source_node, counts=intra_counts)
        beside = alongside()
        at_rank = self.intra.wait(to_rank)
        back_in_node = self.intra.return_start(experts_in_flat_order(experts, at_rank), at_rank, self.overlap)
        yield
        back_to_source = self.inter.return_start(self.intra.return_wait(back_in_node), at_node, self.overlap)
        yield
        return self.inter.return_wait(back_to_source), beside

    def exchange_counts(self, indices: torch.Tensor) -> tuple[Counts, Counts]:
        """Both hops' counts in one host transfer (the layer's one sync). Each source counts, per
        destination rank, the rows it will reach and their slots per expert; hop 1's counts exchange
        carries them to the forwarding rank of each node, whose sums are what it forwards to each
        rank of its node (a row reaches a rank once, however many of its experts are there), and an
        exchange inside the node tells each rank what it will receive; only then does anything
        come to the host."""
        nodes, per_node, per_rank = self.inter.size, self.intra.size, self.intra.experts_per_rank
        to_node = count_rows(indices, per_rank * per_node, nodes)[:, :1]
        to_rank = count_rows(indices, per_rank, nodes * per_node).view(nodes, per_node * (1 + per_rank))
        at_node = comm.exchange_counts(torch.cat([to_node, to_rank], 1), self.inter.group)
        forwarded = at_node[:, 1:].sum(0).view(per_node, 1 + per_rank)  # rows, then slots per expert
        at_rank = comm.exchange_counts(forwarded, self.intra.group)
        host = counts_to_host(to_node[:, 0], at_node[:, 0], forwarded[:, 0], at_rank[:, 0], at_rank[:, 1:].sum(0))
        inter_send, inter_recv, intra_send, intra_recv, slots = host
        return Counts(at_node, inter_send, inter_recv, []), Counts(at_rank, intra_send, intra_recv, slots)


def experts_in_flat_order(experts: Experts, d: Dispatched) -> torch.Tensor:
    """The experts' outputs for the rows hop 2 delivered, in arrival order, computed over the rows
    in the flat dispatch's order. Rows arrive by forwarding rank (in-node index), then source
    node; the flat path delivers them by source EP rank (source node, then in-node index), and
    a stable sort by source node restores that. The order matters where the expert GEMMs are
    FP8: their weight gradients quantize 128-token tiles, so both paths must tile the same rows."""
    order = torch.argsort(d.origin, stable=True)
    arrival = torch.empty_like(order)
    arrival[order] = torch.arange(order.numel(), device=order.device)
    return experts(d.tokens[order], d.local_experts[order], d.gates[order], d.expert_counts)[arrival]
