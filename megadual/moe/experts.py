"""The routed experts held by this EP rank, named by their global expert index.

Each projection (gate, up, down) of the rank's experts is one parameter [local experts, out, in]
(`gate_weight`, ...), so the optimizer, the distributed optimizer's buckets and the grouped GEMM
see three tensors, not three per expert. Everything that names parameters still sees one weight
per global expert (`local.<e>.gate.weight`): the parameter table records each row under that
name (parallel/params.py), and the state dict holds the rows under it (so checkpoints, resharding
over EP and the HF export are as they were).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
def _fp8_tile_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    quantized = quantize_tiles(t)
    return quantized.data, quantized.scale


FP8_TILES = ActivationCodec(_fp8_tile_parts, lambda parts, dtype: Fp8Tensor(*parts, TILE).dequantize(dtype))
PROJECTIONS = ("gate", "up", "down")


class ExpertLinear(torch.nn.Module):
    """One expert's linear, in place of its SwiGLUMLP's ShardedLinear: its weight is its row of the
    projection's stack. While the experts run, `bound` is that row from one unbind of the stack
    (whose backward gathers the rows' gradients into one tensor); otherwise a view taken on use."""

    def __init__(self, stack: Callable[[], torch.Tensor], row: int, gemm: Callable):
        super().__init__()
        self._stack, self.row, self.gemm = stack, row, gemm
        self.wgrad_store = None  # set by the pipeline runtime (model/gpt.py)
        self.bound: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.bound if self.bound is not None else self._stack()[self.row]

    def forward(self, x: torch.Tensor, cache: InputCache | None = None) -> torch.Tensor:
        return self.gemm(x, self.weight, self.wgrad_store, cache)


class RoutedExperts(torch.nn.Module):
    """`grouped`: each of gate, up and down runs as one grouped GEMM over the local experts
    (full precision and bf16); otherwise, and with FP8 (blockwise scales per expert), one
    GEMM per expert, each expert's SwiGLUMLP computing with its rows of the stacks. Each (row,
    expert) pair's gate scales the rows entering the down-projection, and the rows move by index
    (moe/rows.py): no expert output is kept for the backward."""

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
        self.param_specs, self.param_rows = {}, {}
        for name in PROJECTIONS:
            built = [getattr(expert, name) for expert in self.local.values()]
            weight = built[0].weight
            stacked = f"{name}_weight"
            setattr(self, stacked, torch.nn.Parameter(torch.empty(num_local, *weight.shape, dtype=weight.dtype,
                                                                  device=weight.device)))
            self.param_specs[stacked] = built[0].param_specs["weight"]
            self.param_rows[stacked] = [f"local.{e}.{name}.weight" for e in self.local]
            for row, (expert, linear_) in enumerate(zip(self.local.values(), built)):
                setattr(expert, name, ExpertLinear(self._stack_getter(stacked), row, linear_.gemm))
        self.register_state_dict_post_hook(_rows_into_state_dict)
        self.register_load_state_dict_pre_hook(_rows_from_state_dict)
        self.recompute = NO_RECOMPUTE  # the chunk's (model/gpt.py): the grouped path's moe_act

    def _stack_getter(self, name: str) -> Callable[[], torch.Tensor]:
        return lambda: getattr(self, name)

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

    @contextmanager
    def _rows_bound(self) -> Iterator[None]:
        """Each expert's linears compute with their rows from one unbind per stack."""
        for name in PROJECTIONS:
            for expert, row in zip(self.local.values(), getattr(self, f"{name}_weight").unbind(0)):
                getattr(expert, name).bound = row
        try:
            yield
        finally:
            for expert in self.local.values():
                for name in PROJECTIONS:
                    getattr(expert, name).bound = None

    def _looped(self, sorted_tokens: torch.Tensor, counts: list[int], scale: torch.Tensor,
                caches: list[InputCache]) -> torch.Tensor:
        chunks, scales = sorted_tokens.split(counts), scale.split(counts)
        with self._rows_bound():
            return torch.cat([expert(chunk, s, cache) for expert, chunk, s, cache in
                              zip(self.local.values(), chunks, scales, caches)])

    def _grouped(self, sorted_tokens: torch.Tensor, counts: list[int], scale: torch.Tensor,
                 caches: list[InputCache]) -> torch.Tensor:
        first = next(iter(self.local.values()))
        x = gemm_input(sorted_tokens, caches[0])  # gate and up read (and keep) one copy

        def project(x: torch.Tensor, name: str) -> torch.Tensor:
            return grouped_linear(x, counts, getattr(self, f"{name}_weight"), getattr(first, name).wgrad_store)

        return first.swiglu_down(project(x, "gate"), project(x, "up"), scale, lambda h: project(h, "down"))


def _rows_into_state_dict(module: RoutedExperts, state: dict, prefix: str, local_metadata) -> None:
    """The stacks' rows under their experts' names, in place of the stacks, in the parameter table's
    order (each expert's projections together)."""
    stacks = [(rows, state.pop(prefix + stacked).unbind(0)) for stacked, rows in module.param_rows.items()]
    for row in range(len(module.local)):
        state.update({prefix + names[row]: values[row] for names, values in stacks})


def _rows_from_state_dict(module: RoutedExperts, state: dict, prefix: str, *args) -> None:
    """The experts' rows stacked again, for loading (a missing row is left for strict loading to name)."""
    for stacked, rows in module.param_rows.items():
        names = [prefix + name for name in rows]
        if all(name in state for name in names):
            state[prefix + stacked] = torch.stack([state.pop(name) for name in names])
