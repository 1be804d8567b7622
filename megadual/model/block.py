"""One decoder layer, written as sub-steps a schedule can run one by one.

attention (with its residual and the pre-MLP norm) -> the MLP -> the MLP residual. An MoE
layer's MLP pauses while each of its all-to-alls is in flight (`MoELayer.forward_steps`:
routing, dispatch, experts, combine); a dense layer runs its MLP in one go. The
modules the chunk's `recompute` selects (layernorm, mlp, moe; core_attn and the others
inside the attention and the MoE layer) run as recomputed regions.
"""
from __future__ import annotations

from collections.abc import Generator

import torch

from megadual.config import ModelConfig
from megadual.data.documents import Documents
from megadual.model.dropout import ATTENTION_OUTPUT, MLP_OUTPUT, HiddenDropout
from megadual.model.layers import Attention, RMSNorm
from megadual.model.mla import MultiLatentAttention
from megadual.moe.layer import MoELayer
from megadual.parallel.context import ONE_PROCESS, BuildContext
from megadual.parallel.mlp import SwiGLUMLP
from megadual.parallel.recompute import NO_RECOMPUTE, run_steps


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
        self.recompute = NO_RECOMPUTE  # the chunk's (model/gpt.py): layernorm, mlp, moe

    def forward_steps(self, hidden: torch.Tensor, samples: torch.Tensor | None = None,
                      documents: Documents | None = None) -> Generator[None, None, torch.Tensor]:
        """The layer as a generator that pauses while each expert all-to-all is in flight;
        `samples` are the micro-batch's global sample indices (the dropout masks' key), `documents`
        its document boundaries for attention (None: one sequence)."""
        recompute = self.recompute
        attention = self.attention(recompute.call("layernorm", self.input_norm, hidden), samples, documents)
        residual = hidden + self.attention_dropout(attention, samples)
        if self.is_moe and "moe" not in recompute.modules:
            # the router's GEMM runs with the norm, so under layernorm it does not keep the norm's output
            mlp_input, *routed = recompute.call("layernorm", self._pre_mlp_norm_and_router, residual)
            out = yield from self.mlp.forward_steps(mlp_input, routed)
        elif self.is_moe:
            out = yield from recompute.steps("moe", self.mlp.forward_steps, recompute.call(
                "layernorm", self.pre_mlp_norm, residual), recompute_context=self.mlp.router.stats_paused,
                overlap=self.mlp.dispatcher.overlap)
        else:
            out = recompute.call("mlp", self.mlp, recompute.call("layernorm", self.pre_mlp_norm, residual))
        return residual + self.mlp_dropout(out, samples)

    def _pre_mlp_norm_and_router(self, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The MoE layer's input, the tokens it routes and their router logits."""
        x = self.pre_mlp_norm(residual)
        return x, *self.mlp.router_input(x)

    def forward(self, hidden: torch.Tensor, samples: torch.Tensor | None = None,
                documents: Documents | None = None) -> torch.Tensor:
        return run_steps(self.forward_steps(hidden, samples, documents))
