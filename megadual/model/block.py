"""One decoder layer, written as explicit sub-steps a schedule can run one by one.

attention (with its residual, the pre-MLP norm and routing) -> dispatch (launches the
all-to-all, runs shared experts) -> experts (waits, computes, launches the combine)
-> combine (waits, adds the MLP residual). A dense layer runs its MLP in the experts
step and passes through dispatch and combine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megadual.config import ModelConfig
from megadual.model.dropout import ATTENTION_OUTPUT, MLP_OUTPUT, HiddenDropout
from megadual.model.layers import Attention, RMSNorm
from megadual.model.mla import MultiLatentAttention
from megadual.moe.layer import MoELayer, MoEState
from megadual.parallel.context import ONE_PROCESS, BuildContext
from megadual.parallel.mlp import SwiGLUMLP


@dataclass
class LayerState:
    residual: torch.Tensor
    samples: torch.Tensor | None  # the micro-batch's global sample indices, for dropout
    mlp_input: torch.Tensor | None = None
    moe: MoEState | None = None
    mlp_output: torch.Tensor | None = None


class TransformerLayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, ctx: BuildContext = ONE_PROCESS, seed: int = 0):
        super().__init__()
        sp = ctx.tp.sequence_parallel
        self.input_norm = RMSNorm(config.hidden_size, config.norm_epsilon, sp)
        attention = MultiLatentAttention if config.multi_latent_attention else Attention
        self.attention = attention(config, ctx.tp, ctx.gemm, layer_index, seed)
        self.attention_dropout = HiddenDropout(config.hidden_dropout, seed, ATTENTION_OUTPUT, layer_index, ctx.tp)
        self.mlp_dropout = HiddenDropout(config.hidden_dropout, seed, MLP_OUTPUT, layer_index, ctx.tp)
        self.pre_mlp_norm = RMSNorm(config.hidden_size, config.norm_epsilon, sp)
        self.is_moe = config.is_moe_layer(layer_index)
        if self.is_moe:
            self.mlp = MoELayer(config, ctx)
        else:
            self.mlp = SwiGLUMLP(config, config.ffn_hidden_size, ctx.tp, ctx.gemm)

    def attention_step(self, hidden: torch.Tensor, samples: torch.Tensor | None = None) -> LayerState:
        attention = self.attention(self.input_norm(hidden), samples)
        residual = hidden + self.attention_dropout(attention, samples)
        state = LayerState(residual, samples, mlp_input=self.pre_mlp_norm(residual))
        if self.is_moe:
            state.moe = self.mlp.route(state.mlp_input)
        return state

    def dispatch_step(self, state: LayerState) -> LayerState:
        if self.is_moe:
            self.mlp.dispatch_start(state.moe)
        return state

    def experts_step(self, state: LayerState) -> LayerState:
        if self.is_moe:
            self.mlp.experts_and_combine_start(state.moe)
        else:
            state.mlp_output = self.mlp(state.mlp_input)
        return state

    def combine_step(self, state: LayerState) -> torch.Tensor:
        out = self.mlp.combine_wait(state.moe) if self.is_moe else state.mlp_output
        return state.residual + self.mlp_dropout(out, state.samples)

    def forward(self, hidden: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
        state = self.attention_step(hidden, samples)
        return self.combine_step(self.experts_step(self.dispatch_step(state)))
