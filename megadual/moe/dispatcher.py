"""Token dispatch and combine between routing and the experts, over the EP group.

A token travels once to every EP rank that holds at least one of its experts (not
once per expert); it carries, for that rank, which of the rank's experts it chose
and with what gate. The receiving rank sums the gated expert outputs of the token
before sending one row back, so combine is a plain sum over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megadual.fp8.quant import dequantize_from_dispatch, quantize_for_dispatch
from megadual.parallel import comm


@dataclass
class Dispatched:
    tokens: torch.Tensor  # [rows, hidden] received rows
    local_experts: torch.Tensor  # [rows, topk] this rank's expert index, -1 where not here
    gates: torch.Tensor  # [rows, topk] gate of that expert, 0 where not here
    token_of_row: torch.Tensor  # [sent rows] source token of each sent row (for combine)
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int


class _Fp8Exchange(torch.autograd.Function):
    """Send tokens as E4M3 data + 1x128 scales, dequantize on arrival (half the bytes of BF16).

    The gradient goes back through the reverse all-to-all in full precision, treating
    the quantization as the identity (the combine path stays high precision too).
    """

    @staticmethod
    def forward(ctx, tokens, group, recv_counts, send_counts):
        ctx.group, ctx.counts = group, (recv_counts, send_counts)
        data, scales = quantize_for_dispatch(tokens)
        # gloo has no float8 type: the E4M3 bytes travel as uint8.
        data = comm.all_to_all(data.view(torch.uint8), group, recv_counts, send_counts)
        scales = comm.all_to_all(scales, group, recv_counts, send_counts)
        return dequantize_from_dispatch(data.view(torch.float8_e4m3fn), scales, tokens.dtype)

    @staticmethod
    def backward(ctx, grad):
        recv_counts, send_counts = ctx.counts
        return comm.all_to_all(grad, ctx.group, send_counts, recv_counts), None, None, None


class TokenDispatcher:
    def __init__(self, num_experts: int, ep_group=None, fp8_dispatch: bool = False):
        self.fp8_dispatch = fp8_dispatch
        self.group = ep_group
        self.ep_size = comm.group_size(ep_group)
        self.experts_per_rank = num_experts // self.ep_size

    def dispatch(self, tokens: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> Dispatched:
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
        recv = comm.exchange_counts(send, self.group)
        send_counts, recv_counts = send.tolist(), recv.tolist()

        def exchange(t: torch.Tensor) -> torch.Tensor:
            return comm.all_to_all(t, self.group, recv_counts, send_counts)

        rows = tokens[token_of_row]
        if self.fp8_dispatch:
            sent = _Fp8Exchange.apply(rows, self.group, recv_counts, send_counts)
        else:
            sent = exchange(rows)
        return Dispatched(sent, exchange(local), exchange(row_gates),
                          token_of_row, send_counts, recv_counts, num_tokens)

    def combine(self, expert_out: torch.Tensor, d: Dispatched) -> torch.Tensor:
        back = comm.all_to_all(expert_out, self.group, d.send_counts, d.recv_counts)
        out = back.new_zeros(d.num_tokens, back.shape[-1])
        return out.index_add(0, d.token_of_row, back)
