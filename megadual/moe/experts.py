"""The routed experts held by this EP rank, named by their global expert index."""
from __future__ import annotations

from collections.abc import Callable

import torch

from megadual.config import ModelConfig
from megadual.parallel.linear import linear
from megadual.parallel.mlp import SwiGLUMLP


class RoutedExperts(torch.nn.Module):
    def __init__(self, config: ModelConfig, first_expert: int, num_local: int, gemm: Callable = linear):
        super().__init__()
        self.first_expert = first_expert
        self.local = torch.nn.ModuleDict({
            str(first_expert + i): SwiGLUMLP(config, config.moe_ffn_hidden_size, gemm=gemm, expert=True)
            for i in range(num_local)})

    def forward(self, tokens: torch.Tensor, local_experts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Sum over each row's chosen local experts of gate * expert(row)."""
        rows, slots = (local_experts >= 0).nonzero(as_tuple=True)
        expert_of = local_experts[rows, slots]
        order = torch.argsort(expert_of, stable=True)
        rows, slots = rows[order], slots[order]
        counts = torch.bincount(expert_of[order], minlength=len(self.local)).tolist()
        chunks = tokens[rows].split(counts)
        outputs = [expert(chunk) for expert, chunk in zip(self.local.values(), chunks)]
        weighted = torch.cat(outputs) * gates[rows, slots].unsqueeze(-1)
        return tokens.new_zeros(tokens.shape).index_add(0, rows, weighted.to(tokens.dtype))
