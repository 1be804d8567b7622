"""The routed experts held by this EP rank, named by their global expert index."""
from __future__ import annotations

from collections.abc import Callable

import torch

from megadual.config import ModelConfig
from megadual.fp8.quant import TILE, Fp8Tensor, quantize_tiles
from megadual.moe.grouped_gemm import grouped_linear
from megadual.moe.rows import RowsKeptOnce, sum_rows_into
from megadual.parallel.linear import InputCache, gemm_input, linear
from megadual.parallel.mlp import SwiGLUMLP
from megadual.parallel.recompute import NO_RECOMPUTE, ActivationCodec

# --recompute-modules moe_act: the SwiGLU's inputs kept in E4M3 1x128 tiles (DeepSeek-V3 report
# 3.3.2), the activation and the down-projection's input recomputed from them in the backward.
FP8_TILES = ActivationCodec(lambda t: (lambda q: (q.data, q.scale))(quantize_tiles(t)),
                            lambda parts, dtype: Fp8Tensor(*parts, TILE).dequantize(dtype))


class RoutedExperts(torch.nn.Module):
    """`grouped`: each of gate, up and down runs as one grouped GEMM over the local experts
    (full precision and bf16); otherwise, and with FP8 (blockwise scales per expert), one
    GEMM per expert. Each (row, expert) pair's gate scales the rows entering the down-projection,
    and the rows move by index (moe/rows.py): no expert output is kept for the backward."""

    def __init__(self, config: ModelConfig, first_expert: int, num_local: int, gemm: Callable = linear,
                 grouped: bool = False):
        super().__init__()
        self.first_expert = first_expert
        self.grouped = grouped and gemm is linear
        self.copy_bytes = None if gemm is linear else 1  # what gate and up keep of a row, per element: FP8
        self.local = torch.nn.ModuleDict({
            str(first_expert + i): SwiGLUMLP(config, config.moe_ffn_hidden_size, gemm=gemm, expert=True,
                                             moe_act_codec=FP8_TILES)
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
        with RowsKeptOnce(tokens, len(rows), self.copy_bytes, self.recompute) as kept:  # the rows' copies kept as their index
            caches = [kept.cache(part) for part in ([rows] if self.grouped else rows.split(counts))]
            out = run(tokens[rows], counts, gates[rows, slots], caches)
        return sum_rows_into(out.to(tokens.dtype), rows, tokens.shape[0])

    def _looped(self, sorted_tokens: torch.Tensor, counts: list[int], scale: torch.Tensor,
                caches: list[InputCache]) -> torch.Tensor:
        chunks, scales = sorted_tokens.split(counts), scale.split(counts)
        return torch.cat([expert(chunk, s, cache) for expert, chunk, s, cache in
                          zip(self.local.values(), chunks, scales, caches)])

    def _grouped(self, sorted_tokens: torch.Tensor, counts: list[int], scale: torch.Tensor,
                 caches: list[InputCache]) -> torch.Tensor:
        experts = list(self.local.values())
        x = gemm_input(sorted_tokens, caches[0])  # gate and up read (and keep) one copy

        def project(x: torch.Tensor, name: str) -> torch.Tensor:
            linears = [getattr(expert, name) for expert in experts]
            return grouped_linear(x, counts, [lin.weight for lin in linears], linears[0].wgrad_store)

        return experts[0].swiglu_down(project(x, "gate"), project(x, "up"), scale, lambda h: project(h, "down"))
