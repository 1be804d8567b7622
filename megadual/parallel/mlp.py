"""The SwiGLU MLP, sharded over tensor parallelism: the dense layers', shared and routed experts' MLP."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megadual.config import ModelConfig
from megadual.parallel.linear import InputCache, linear
from megadual.parallel.recompute import NO_RECOMPUTE, ActivationCodec, Recompute
from megadual.parallel.tensor import NO_TP, ShardedLinear, TensorParallel, enter_tp_region, leave_tp_region


def output_std(config: ModelConfig) -> float:
    """Megatron scales the init of layers that write into the residual by 1/sqrt(2L)."""
    return config.init_method_std / math.sqrt(2.0 * config.num_layers)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, times a per-row `scale` when given (a routed expert's gate, applied to the
    down-projection's input rows, so no expert output is kept for the gate's gradient). Keeps gate,
    up and the scale; silu(gate) and the product are recomputed."""

    @staticmethod
    def forward(ctx, gate, up, scale):
        hidden = F.silu(gate) * up
        ctx.save_for_backward(gate, up, scale)
        return hidden if scale is None else hidden * scale.unsqueeze(-1)

    @staticmethod
    def backward(ctx, grad):
        gate, up, scale = ctx.saved_tensors
        silu = F.silu(gate)
        grad_scale = None
        if scale is not None:
            grad_scale = (grad * (silu * up)).sum(-1) if ctx.needs_input_grad[2] else None
            grad = grad * scale.unsqueeze(-1)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad * silu, grad_scale


def swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up [* scale per row], keeping gate and up for the backward."""
    return _SwiGLU.apply(gate, up, None if scale is None else scale.to(gate.dtype))


def swiglu_down(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None, down: Callable,
                recompute: Recompute = NO_RECOMPUTE, codec: ActivationCodec | None = None) -> torch.Tensor:
    """down(swiglu(gate, up, scale)). With `codec` (moe_act), one region recomputed from gate and up as
    the codec keeps them: neither the activation nor the down-projection's input is kept, as in
    DeepSeek-V3 (report 3.3.2), at the price of the down GEMM's forward again in the backward."""
    if codec is None:
        return down(swiglu(gate, up, scale))
    scale = None if scale is None else scale.to(gate.dtype)  # kept as the SwiGLU reads it
    return recompute.call("moe_act", lambda g, u, s: down(swiglu(g, u, s)), gate, up, scale, codecs=(codec, codec))


class SwiGLUMLP(torch.nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-sharded, down row-sharded over `tp`.

    A routed expert (`expert=True`) has no TP: the caller moves its tokens, so it
    neither enters nor leaves a TP region; its gate scales the rows entering `down`. Under moe_act
    recomputation an MoE layer's experts (`moe_act_codec`) keep their SwiGLU input as the codec encodes
    it and recompute the activation and the down-projection's input from it.
    """

    def __init__(self, config: ModelConfig, ffn_hidden_size: int, tp: TensorParallel = NO_TP,
                 gemm: Callable = linear, expert: bool = False, moe_act_codec: ActivationCodec | None = None):
        super().__init__()
        self.tp, self.in_tp_region = tp, not expert
        h, std = config.hidden_size, config.init_method_std
        self.gate = ShardedLinear(h, ffn_hidden_size, tp, 0, std, gemm, expert)
        self.up = ShardedLinear(h, ffn_hidden_size, tp, 0, std, gemm, expert)
        self.down = ShardedLinear(ffn_hidden_size, h, tp, 1, output_std(config), gemm, expert)
        self.moe_act_codec = moe_act_codec
        self.recompute = NO_RECOMPUTE  # the chunk's (model/gpt.py); a routed expert's recomputes moe_act

    def swiglu_down(self, gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None,
                    down: Callable) -> torch.Tensor:
        """down(swiglu(gate, up, scale)), recomputed from moe_act's codec when moe_act is selected (the
        MoE layer's experts, routed and shared; a dense layer's MLP has no codec)."""
        codec = self.moe_act_codec if "moe_act" in self.recompute.modules else None
        return swiglu_down(gate, up, scale, down, self.recompute, codec)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, cache: InputCache | None = None
                ) -> torch.Tensor:
        """`scale`: a routed expert's gate per row of x; `cache`: the InputCache of gate and up (a new one)."""
        if self.in_tp_region:
            x = enter_tp_region(x, self.tp)
        cache = InputCache() if cache is None else cache
        out = self.swiglu_down(self.gate(x, cache), self.up(x, cache), scale, self.down)
        return leave_tp_region(out, self.tp) if self.in_tp_region else out
