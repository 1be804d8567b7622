"""The SwiGLU MLP, sharded over tensor parallelism: the dense layers', shared and routed experts' MLP."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megadual.config import ModelConfig
from megadual.parallel.linear import InputCache, linear
from megadual.parallel.recompute import NO_RECOMPUTE
from megadual.parallel.tensor import NO_TP, ShardedLinear, TensorParallel, enter_tp_region, leave_tp_region


def output_std(config: ModelConfig) -> float:
    """Megatron scales the init of layers that write into the residual by 1/sqrt(2L)."""
    return config.init_method_std / math.sqrt(2.0 * config.num_layers)


@dataclass(frozen=True)
class ActivationCodec:
    """How the SwiGLU keeps its inputs for the backward: `encode` a tensor into the tensors to save,
    `decode` them back in a dtype (--recompute-modules moe_act: E4M3 tiles, moe/experts.py)."""
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    decode: Callable[[tuple[torch.Tensor, ...], torch.dtype], torch.Tensor]


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, times a per-row `scale` when given (a routed expert's gate, applied to the
    down-projection's input rows, so no expert output is kept for the gate's gradient). Keeps gate,
    up (as `codec` encodes them) and the scale; silu(gate) and the product are recomputed."""

    @staticmethod
    def forward(ctx, gate, up, scale, codec):
        hidden = F.silu(gate) * up
        out = hidden if scale is None else hidden * scale.unsqueeze(-1)
        ctx.codec, ctx.dtype, ctx.split = codec, gate.dtype, None
        if codec is None:
            ctx.save_for_backward(gate, up, scale)
        else:
            gate_parts, up_parts = codec.encode(gate), codec.encode(up)
            ctx.split = len(gate_parts)
            ctx.save_for_backward(scale, *gate_parts, *up_parts)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.codec is None:
            gate, up, scale = ctx.saved_tensors
        else:
            scale, *parts = ctx.saved_tensors
            gate = ctx.codec.decode(tuple(parts[:ctx.split]), ctx.dtype)
            up = ctx.codec.decode(tuple(parts[ctx.split:]), ctx.dtype)
        silu = F.silu(gate)
        grad_scale = None
        if scale is not None:
            grad_scale = (grad * (silu * up)).sum(-1) if ctx.needs_input_grad[2] else None
            grad = grad * scale.unsqueeze(-1)
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad * silu, grad_scale, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None,
           codec: ActivationCodec | None = None) -> torch.Tensor:
    """silu(gate) * up [* scale per row], keeping gate and up (encoded by `codec`) for the backward."""
    return _SwiGLU.apply(gate, up, None if scale is None else scale.to(gate.dtype), codec)


class SwiGLUMLP(torch.nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-sharded, down row-sharded over `tp`.

    A routed expert (`expert=True`) has no TP: the caller moves its tokens, so it
    neither enters nor leaves a TP region; its gate scales the rows entering `down`, and under
    moe_act recomputation (`moe_act_codec`) its SwiGLU keeps its inputs as the codec encodes them.
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

    def activation_codec(self) -> ActivationCodec | None:
        """How a routed expert's SwiGLU keeps its inputs: as moe_act's codec when moe_act is selected."""
        return self.moe_act_codec if "moe_act" in self.recompute.modules and not self.in_tp_region else None

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """`scale`: a routed expert's gate per row of x."""
        if self.in_tp_region:
            x = enter_tp_region(x, self.tp)
        cache = InputCache()
        hidden = swiglu(self.gate(x, cache), self.up(x, cache), scale, self.activation_codec())
        out = self.down(hidden)
        return leave_tp_region(out, self.tp) if self.in_tp_region else out
