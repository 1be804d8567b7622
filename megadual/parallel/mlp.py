"""The SwiGLU MLP, sharded over tensor parallelism: the dense layers', shared and routed experts' MLP."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megadual.config import ModelConfig
from megadual.parallel.linear import linear
from megadual.parallel.recompute import NO_RECOMPUTE
from megadual.parallel.tensor import NO_TP, ShardedLinear, TensorParallel, enter_tp_region, leave_tp_region


def output_std(config: ModelConfig) -> float:
    """Megatron scales the init of layers that write into the residual by 1/sqrt(2L)."""
    return config.init_method_std / math.sqrt(2.0 * config.num_layers)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SwiGLUMLP(torch.nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-sharded, down row-sharded over `tp`.

    A routed expert (`expert=True`) has no TP: the caller moves its tokens, so it
    neither enters nor leaves a TP region.
    """

    def __init__(self, config: ModelConfig, ffn_hidden_size: int, tp: TensorParallel = NO_TP,
                 gemm: Callable = linear, expert: bool = False):
        super().__init__()
        self.tp, self.in_tp_region = tp, not expert
        h, std = config.hidden_size, config.init_method_std
        self.gate = ShardedLinear(h, ffn_hidden_size, tp, 0, std, gemm, expert)
        self.up = ShardedLinear(h, ffn_hidden_size, tp, 0, std, gemm, expert)
        self.down = ShardedLinear(ffn_hidden_size, h, tp, 1, output_std(config), gemm, expert)
        self.recompute = NO_RECOMPUTE  # the chunk's (model/gpt.py); a routed expert's recomputes moe_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_tp_region:
            x = enter_tp_region(x, self.tp)
        gate, up = self.gate(x), self.up(x)
        hidden = swiglu(gate, up) if self.in_tp_region else self.recompute.call("moe_act", swiglu, gate, up)
        out = self.down(hidden)
        return leave_tp_region(out, self.tp) if self.in_tp_region else out
