"""Token dispatch and combine between routing and the experts, over the EP group.

A token travels once to every EP rank that holds at least one of its experts (not
once per expert); it carries, for that rank, which of the rank's experts it chose
and with what gate. The receiving rank sums the gated expert outputs of the token
before sending one row back, so combine is a plain sum over ranks.

Dispatch and combine are each a start (counts exchanged, all-to-alls launched) and
a wait, so a schedule can compute something else while the tokens are in flight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megadual.fp8.quant import dequantize_from_dispatch, quantize_for_dispatch
from megadual.parallel import comm


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
class Dispatched:
    tokens: torch.Tensor  # [rows, hidden] received rows
    local_experts: torch.Tensor  # [rows, topk] this rank's expert index, -1 where not here
    gates: torch.Tensor  # [rows, topk] gate of that expert, 0 where not here
    token_of_row: torch.Tensor  # [sent rows] source token of each sent row (for combine)
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


@dataclass
class PendingDispatch:
    exchanges: tuple[comm.Exchange, comm.Exchange, comm.Exchange]  # tokens, local experts, gates
    token_of_row: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


@dataclass
class PendingCombine:
    exchange: comm.Exchange
    dispatched: Dispatched


class TokenDispatcher:
    def __init__(self, num_experts: int, ep_group=None, fp8_dispatch: bool = False):
        self.fp8_dispatch = fp8_dispatch
        self.group = ep_group
        self.ep_size = comm.group_size(ep_group)
        self.experts_per_rank = num_experts // self.ep_size
        # Set by a pipeline runtime that fills the backward's all-to-alls with other work.
        self.overlap: comm.BackwardOverlap | None = None

    def _exchange(self, output_splits: list[int], input_splits: list[int],
                  codec: comm.Codec | None = None) -> comm.Exchange:
        return comm.Exchange(self.group, output_splits, input_splits, codec, self.overlap)

    def dispatch_start(self, tokens: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> PendingDispatch:
        num_tokens = tokens.shape[0]
        dest = indices // self.experts_per_rank  # [tokens, topk]
        goes_to = torch.zeros(num_tokens, self.ep_size, dtype=torch.bool, device=tokens.device)
        goes_to.scatter_(1, dest, True)
        rank_of_row, token_of_row = goes_to.t().nonzero(as_tuple=True)  # rows sorted by destination
        on_rank = dest[token_of_row] == rank_of_row[:, None]
        local = indices[token_of_row] - rank_of_row[:, None] * self.experts_per_rank
        local = local.masked_fill(~on_rank, -1)
        row_gates = gates[token_of_row] * on_rank
        send = goes_to.sum(0)
        send_counts = send.tolist()
        recv_counts = comm.exchange_counts(send, self.group).tolist()
        codec = Fp8Codec() if self.fp8_dispatch else comm.Codec()
        exchanges = (self._exchange(recv_counts, send_counts, codec).start(tokens[token_of_row]),
                     self._exchange(recv_counts, send_counts).start(local),
                     self._exchange(recv_counts, send_counts).start(row_gates))
        return PendingDispatch(exchanges, token_of_row, send_counts, recv_counts, num_tokens)

    def dispatch_wait(self, pending: PendingDispatch) -> Dispatched:
        tokens, local, gates = (e.wait() for e in pending.exchanges)
        return Dispatched(tokens, local, gates, pending.token_of_row, pending.send_counts,
                          pending.recv_counts, pending.num_tokens)

    def combine_start(self, expert_out: torch.Tensor, d: Dispatched) -> PendingCombine:
        return PendingCombine(self._exchange(d.send_counts, d.recv_counts).start(expert_out), d)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        back, d = pending.exchange.wait(), pending.dispatched
        return back.new_zeros(d.num_tokens, back.shape[-1]).index_add(0, d.token_of_row, back)
