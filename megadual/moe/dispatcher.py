"""Token dispatch and combine between routing and the experts, over the EP group.

A token travels once to every EP rank that holds at least one of its experts (not
once per expert); it carries, for that rank, which of the rank's experts it chose
and with what gate. The receiving rank sums the gated expert outputs of the token
before sending one row back, so combine is a plain sum over ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


class TokenDispatcher:
    def __init__(self, num_experts: int, ep_group=None):
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

        return Dispatched(exchange(tokens[token_of_row]), exchange(local), exchange(row_gates),
                          token_of_row, send_counts, recv_counts, num_tokens)

    def combine(self, expert_out: torch.Tensor, d: Dispatched) -> torch.Tensor:
        back = comm.all_to_all(expert_out, self.group, d.send_counts, d.recv_counts)
        out = back.new_zeros(d.num_tokens, back.shape[-1])
        return out.index_add(0, d.token_of_row, back)
