"""Token dispatch and combine between routing and the experts: the flat all-to-all over the EP group.

A token travels once to every EP rank that holds at least one of its experts (not once
per expert); it carries, for that rank, which of the rank's experts it chose and with
what gate. The receiving rank sums the gated expert outputs of the token before sending
one row back, so combine is a plain sum over ranks.

`Hop` is one such all-to-all over one group, and what the node-hierarchical dispatcher
(hierarchical.py) chains twice: routing rows by destination (`plan_rows`), the counts
exchange, the async exchange (start/wait) and the return summed per source row.

A dispatcher's `routed_steps` is the routed path of one MoE layer as a generator that
pauses while an all-to-all is in flight, so a schedule can cover it with other compute
(`pipeline/overlap.py`); `alongside` (the shared experts) runs where it covers this
micro-batch's own dispatch, and the generator returns the routed output with its result.
"""
from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from typing import Any

import torch

from megadual.fp8.quant import dequantize_from_dispatch, quantize_for_dispatch
from megadual.moe.router import RoutingStats
from megadual.moe.rows import sum_rows_into
from megadual.parallel import comm

# (rows, local expert per slot, gate per slot, slots per local expert or None: count them) -> output rows
Experts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int] | None], torch.Tensor]


class Fp8Codec(comm.Codec):
    """Tokens travel as E4M3 bytes plus 1x128 scales (half the bytes of BF16).

    The gradient returns in full precision, the quantization counting as the identity.
    """

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        data, scales = quantize_for_dispatch(x)
        return [data.view(torch.uint8), scales]  # gloo has no float8 type

    def decode(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        data, scales = parts
        return dequantize_from_dispatch(data.view(torch.float8_e4m3fn), scales, dtype)


@dataclass
class RowPlan:
    """The rows to send: one per (source row, destination holding any of its experts), by destination."""
    source: torch.Tensor  # [rows] the source row each sent row copies
    experts: torch.Tensor  # [rows, topk] expert index at the destination; -1 where the slot goes elsewhere
    gates: torch.Tensor  # [rows, topk] the slot's gate; 0 where it goes elsewhere
    send_counts: list[int]  # rows per destination


def _destinations(experts: torch.Tensor, experts_per_dest: int, num_dest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(each slot's destination, [rows, num_dest] whether a row goes to each destination)."""
    dest = experts.div(experts_per_dest, rounding_mode="floor")
    goes_to = torch.zeros(experts.shape[0], num_dest + 1, dtype=torch.bool, device=experts.device)
    goes_to.scatter_(1, torch.where(experts >= 0, dest, num_dest), True)
    return dest, goes_to[:, :num_dest]


def count_rows(experts: torch.Tensor, experts_per_dest: int, num_dest: int) -> torch.Tensor:
    """[num_dest, 1 + experts_per_dest] on the device, without a host sync: the rows going to each
    destination, then the slots each of its experts gets (what its experts will split by)."""
    _, goes_to = _destinations(experts, experts_per_dest, num_dest)
    valid = experts >= 0
    slots = torch.zeros(num_dest * experts_per_dest + 1, dtype=torch.int64, device=experts.device)
    slots.scatter_add_(0, torch.where(valid, experts, num_dest * experts_per_dest).flatten(),
                       torch.ones_like(experts).flatten())
    return torch.cat([goes_to.sum(0, dtype=torch.int64)[:, None], slots[:-1].view(num_dest, experts_per_dest)], 1)


def plan_rows(experts: torch.Tensor, gates: torch.Tensor, experts_per_dest: int, num_dest: int,
              send_counts: list[int] | None = None) -> RowPlan:
    """Route rows whose slots name experts (-1: no expert here) to the destinations holding them,
    destination d holding experts [d * experts_per_dest, (d + 1) * experts_per_dest). `send_counts`,
    the rows per destination (count_rows' first column on the host), sizes the plan without a
    sync; left out, they are brought to the host here."""
    if send_counts is None:
        send_counts = count_rows(experts, experts_per_dest, num_dest)[:, 0].tolist()
    dest, goes_to = _destinations(experts, experts_per_dest, num_dest)
    dest_of_row, source = torch.nonzero_static(goes_to.t(), size=sum(send_counts)).unbind(1)  # by destination
    on_dest = dest[source] == dest_of_row[:, None]
    local = (experts[source] - dest_of_row[:, None] * experts_per_dest).masked_fill(~on_dest, -1)
    return RowPlan(source, local, gates[source] * on_dest, send_counts)


@dataclass
class Dispatched:
    tokens: torch.Tensor  # [rows, hidden] received rows
    local_experts: torch.Tensor  # [rows, topk] this rank's expert index, -1 where not here
    gates: torch.Tensor  # [rows, topk] gate of that expert, 0 where not here
    token_of_row: torch.Tensor  # [sent rows] source row of each sent row (for the return)
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int  # source rows
    expert_counts: list[int]  # slots each local expert received (the experts split the rows by them)
    received: torch.Tensor  # [members, 1 + local experts] count_rows' rows from each member, on the device
    origin: torch.Tensor | None = None  # [rows] the `origin` tag each received row was sent with


@dataclass
class Counts:
    """A hop's counts: `received` on the device, the rest on the host."""
    received: torch.Tensor  # [members, ...] from each member, column 0 its rows (count_rows' rows)
    send: list[int]  # rows to each member
    recv: list[int]  # rows from each member
    experts: list[int]  # slots per local expert


def counts_to_host(*counts: torch.Tensor) -> list[list[int]]:
    """Integer vectors on the device brought to the host in one transfer: the one host sync of an MoE
    layer's dispatch (the all-to-all's buffers are sized by them)."""
    flat = torch.cat(counts).tolist()
    return [flat[a:b] for a, b in pairwise([0, *accumulate(c.numel() for c in counts)])]


@dataclass
class InFlight:
    exchange: comm.Exchange
    plan: RowPlan
    recv_counts: list[int]
    expert_counts: list[int]
    received: torch.Tensor
    num_tokens: int


@dataclass
class Returning:
    exchange: comm.Exchange
    dispatched: Dispatched


def count_traffic(send_counts: Sequence[int], nodes: Sequence[int], index: int) -> tuple[int, int]:
    """(inter-node, intra-node) rows of a send by group member `index`, `nodes[q]` being the node of
    member q: rows to another node, and rows to another rank of this node (rows to itself cross
    no link and count as neither)."""
    own = nodes[index]
    inter = sum(n for n, node in zip(send_counts, nodes) if node != own)
    intra = sum(n for q, (n, node) in enumerate(zip(send_counts, nodes)) if node == own and q != index)
    return inter, intra


class Hop:
    """One all-to-all over `group`: rows to the members holding their experts, results back.
    `nodes[q]` is the node of group member q, for counting the traffic."""

    def __init__(self, group, experts_per_rank: int, nodes: Sequence[int], fp8: bool):
        self.group, self.experts_per_rank, self.nodes = group, experts_per_rank, list(nodes)
        self.size, self.index = comm.group_size(group), comm.group_rank(group)
        self.codec = Fp8Codec() if fp8 else None

    def start(self, tokens: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor,
              overlap: comm.BackwardOverlap | None, stats: RoutingStats | None = None,
              origin: torch.Tensor | None = None, counts: Counts | None = None) -> InFlight:
        """Launch the rows; `origin`, an integer tag per source row, travels with them. `counts`: the
        hop's counts when the caller has them already (the hierarchical dispatch, which brings both
        hops' over together); otherwise the hop's one host sync brings them (`exchange_counts`)."""
        counts = counts or self.exchange_counts(experts)
        plan = plan_rows(experts, gates, self.experts_per_rank, self.size, counts.send)
        if stats is not None:
            stats.record_dispatch(*count_traffic(plan.send_counts, self.nodes, self.index))
        exchange = comm.Exchange(self.group, counts.recv, plan.send_counts, (self.codec,), overlap)
        tags = () if origin is None else (origin[plan.source],)
        return InFlight(exchange.start(tokens[plan.source], plan.experts, plan.gates, *tags), plan, counts.recv,
                        counts.experts, counts.received, tokens.shape[0])

    def exchange_counts(self, experts: torch.Tensor) -> Counts:
        """The counts exchanged on the device, then brought to the host in one transfer."""
        sent = count_rows(experts, self.experts_per_rank, self.size)
        received = comm.exchange_counts(sent, self.group)
        return Counts(received, *counts_to_host(sent[:, 0], received[:, 0], received[:, 1:].sum(0)))

    def wait(self, sent: InFlight) -> Dispatched:
        tokens, experts, gates, *origin = sent.exchange.wait()
        return Dispatched(tokens, experts, gates, sent.plan.source, sent.plan.send_counts, sent.recv_counts,
                          sent.num_tokens, sent.expert_counts, sent.received, *origin)

    def return_start(self, rows: torch.Tensor, d: Dispatched, overlap: comm.BackwardOverlap | None) -> Returning:
        return Returning(comm.Exchange(self.group, d.send_counts, d.recv_counts, (), overlap).start(rows), d)

    def return_wait(self, returning: Returning) -> torch.Tensor:
        """Each source row's returned rows, summed."""
        (back,), d = returning.exchange.wait(), returning.dispatched
        return sum_rows_into(back, d.token_of_row, d.num_tokens)


class TokenDispatcher:
    """--moe-token-dispatcher-type alltoall: one all-to-all over the EP group, which spans `num_nodes`."""

    def __init__(self, num_experts: int, ep_group=None, num_nodes: int = 1, fp8_dispatch: bool = False):
        ep_size = comm.group_size(ep_group)
        ranks_per_node = max(1, ep_size // num_nodes)
        self.hop = Hop(ep_group, num_experts // ep_size, [q // ranks_per_node for q in range(ep_size)],
                       fp8_dispatch)
        # Set by a pipeline runtime that fills the backward's all-to-alls with other work.
        self.overlap: comm.BackwardOverlap | None = None

    def routed_steps(self, tokens: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, experts: Experts,
                     alongside: Callable[[], Any], stats: RoutingStats | None = None
                     ) -> Generator[None, None, tuple[torch.Tensor, Any]]:
        """dispatch | experts | combine, pausing while each all-to-all is in flight; `alongside`
        covers the dispatch."""
        sent = self.hop.start(tokens, indices, gates, self.overlap, stats)
        beside = alongside()
        yield
        d = self.hop.wait(sent)
        returning = self.hop.return_start(experts(d.tokens, d.local_experts, d.gates, d.expert_counts), d,
                                          self.overlap)
        yield
        return self.hop.return_wait(returning), beside


class _AsDispatched(torch.autograd.Function):
    """Tokens rounded as the FP8 dispatch delivers them; the gradient passes unchanged, as it does
    through the all-to-all."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, codec: comm.Codec) -> torch.Tensor:
        return codec.decode(codec.encode(tokens), tokens.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class LocalDispatcher:
    """Without expert parallelism every expert is on this rank: the routed path is the experts
    alone, with no row plan, exchange or summed return (which at one rank copy the rows, and
    add them to zeros). Equal to the flat path at one rank, FP8 dispatch's rounding included."""

    def __init__(self, fp8_dispatch: bool = False):
        self.codec = Fp8Codec() if fp8_dispatch else None
        self.overlap: comm.BackwardOverlap | None = None  # no all-to-all to fill

    def routed_steps(self, tokens: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, experts: Experts,
                     alongside: Callable[[], Any], stats: RoutingStats | None = None
                     ) -> Generator[None, None, tuple[torch.Tensor, Any]]:
        """The experts, then `alongside`, with no pause (nothing is in flight)."""
        if self.codec is not None:
            tokens = _AsDispatched.apply(tokens, self.codec)
        return experts(tokens, indices, gates, None), alongside()
        yield  # a generator, like the other dispatchers' routed paths
