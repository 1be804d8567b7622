"""The routed experts held by this EP rank, named by their global expert index."""
from __future__ import annotations

from collections.abc import Callable

import torch

from megadual.config import ModelConfig
from megadual.moe.grouped_gemm import grouped_linear
from megadual.parallel.linear import linear
from megadual.parallel.mlp import SwiGLUMLP, swiglu
from megadual.parallel.recompute import NO_RECOMPUTE


class RoutedExperts(torch.nn.Module):
    """`grouped`: each of gate, up and down runs as one grouped GEMM over the local experts
    (full precision and bf16); otherwise, and with FP8 (blockwise scales per expert), one
    GEMM per expert."""

    def __init__(self, config: ModelConfig, first_expert: int, num_local: int, gemm: Callable = linear,
                 grouped: bool = False):
        super().__init__()
        self.first_expert = first_expert
        self.grouped = grouped and gemm is linear
        self.local = torch.nn.ModuleDict({
            str(first_expert + i): SwiGLUMLP(config, config.moe_ffn_hidden_size, gemm=gemm, expert=True)
            for i in range(num_local)})
        self.recompute = NO_RECOMPUTE  # the chunk's (model/gpt.py): the grouped path's moe_act

    def forward(self, tokens: torch.Tensor, local_experts: torch.Tensor, gates: torch.Tensor,
                counts: list[int] | None = None) -> torch.Tensor:
        """Sum over each row's chosen local experts of gate * expert(row). `counts`, the slots per local
        expert (the dispatcher's, from its one host transfer), spare a sync; None: counted here."""
        if counts is None:
            counts = torch.bincount(local_experts[local_experts >= 0], minlength=len(self.local)).tolist()
        rows, slots = torch.nonzero_static(local_experts >= 0, size=sum(counts)).unbind(1)
        expert_of = local_experts[rows, slots]
        order = torch.argsort(expert_of, stable=True)
        rows, slots = rows[order], slots[order]
        run = self._grouped if self.grouped else self._looped
        weighted = run(tokens[rows], counts) * gates[rows, slots].unsqueeze(-1)
        return tokens.new_zeros(tokens.shape).index_add(0, rows, weighted.to(tokens.dtype))

    def _looped(self, sorted_tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        chunks = sorted_tokens.split(counts)
        return torch.cat([expert(chunk) for expert, chunk in zip(self.local.values(), chunks)])

    def _grouped(self, sorted_tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        experts = list(self.local.values())

        def project(x: torch.Tensor, name: str) -> torch.Tensor:
            linears = [getattr(expert, name) for expert in experts]
            return grouped_linear(x, counts, [lin.weight for lin in linears], linears[0].wgrad_store)

        gate, up = project(sorted_tokens, "gate"), project(sorted_tokens, "up")
        return project(self.recompute.call("moe_act", swiglu, gate, up), "down")
