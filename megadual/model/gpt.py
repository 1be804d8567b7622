"""The decoder as pipeline stage chunks, cut by global layer index.

A chunk holds layers [first, last) and, when it is the first stage, the embedding,
when it is the last, the final norm, output head and loss. Parameter names are the
global names of the full model (layers keyed by global index, experts by global
expert index), so initialization and checkpoints do not depend on the layout.
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from megadual.config import ModelConfig
from megadual.model.block import TransformerLayer
from megadual.model.layers import RMSNorm
from megadual.moe.layer import MoELayer
from megadual.moe.router import Router
from megadual.parallel.linear import linear
from megadual.parallel.rng import initialize_parameters
from megadual.parallel.tensor import (
    NO_TP,
    ShardedLinear,
    TensorParallel,
    VocabParallelEmbedding,
    enter_tp_region,
    vocab_parallel_cross_entropy,
)


@dataclass(frozen=True)
class StageSpec:
    first_layer: int
    last_layer: int  # exclusive
    has_embedding: bool
    has_head: bool


def full_model_stage(config: ModelConfig) -> StageSpec:
    return StageSpec(0, config.num_layers, True, True)


class GPTChunk(torch.nn.Module):
    def __init__(self, config: ModelConfig, stage: StageSpec, tp: TensorParallel = NO_TP,
                 ep_group=None, num_nodes: int = 1, gemm: Callable = linear):
        super().__init__()
        self.config, self.stage, self.tp = config, stage, tp
        if stage.has_embedding:
            self.embedding = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp,
                                                    config.init_method_std)
        self.layers = torch.nn.ModuleDict({
            str(i): TransformerLayer(config, i, tp, ep_group, num_nodes, gemm)
            for i in range(stage.first_layer, stage.last_layer)})
        if stage.has_head:
            self.final_norm = RMSNorm(config.hidden_size, config.norm_epsilon, tp.sequence_parallel)
            # The head stays in full precision (as in DeepSeek-V3), whatever `gemm` is.
            self.output_layer = ShardedLinear(config.hidden_size, config.vocab_size, tp, 0,
                                              config.init_method_std)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [seq(/TP under sequence parallel), batch, hidden]."""
        return self.embedding(tokens.t().contiguous())

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy over the micro-batch's tokens."""
        hidden = enter_tp_region(self.final_norm(hidden), self.tp)
        logits = self.output_layer(hidden)
        return vocab_parallel_cross_entropy(logits, labels.t(), self.tp).mean()

    def forward_steps(self, inputs: torch.Tensor, labels: torch.Tensor | None = None
                      ) -> Generator[None, None, torch.Tensor]:
        """The forward as a generator that pauses while each expert all-to-all is in flight.

        Its return value (StopIteration.value) is what `forward` returns. A schedule can
        resume it from elsewhere - `pipeline/overlap.py` does so inside another
        micro-batch's backward - to fill the all-to-all's time with other compute.
        """
        hidden = self.embed(inputs) if self.stage.has_embedding else inputs
        for layer in self.layers.values():
            state = layer.dispatch_step(layer.attention_step(hidden))
            if layer.is_moe:
                yield  # dispatch in flight
            state = layer.experts_step(state)
            if layer.is_moe:
                yield  # combine in flight
            hidden = layer.combine_step(state)
        return self.loss(hidden, labels) if self.stage.has_head else hidden

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        steps = self.forward_steps(inputs, labels)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def routers(self) -> list[Router]:
        return [m.router for m in self.modules() if isinstance(m, MoELayer)]

    def set_fp8_dispatch(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, MoELayer):
                m.dispatcher.fp8_dispatch = enabled

    def set_aux_loss_grad_scale(self, scale: float) -> None:
        for m in self.modules():
            if isinstance(m, MoELayer):
                m.aux_loss_grad_scale = scale


def build_chunk(config: ModelConfig, stage: StageSpec, seed: int, tp: TensorParallel = NO_TP,
                ep_group=None, num_nodes: int = 1, gemm: Callable = linear) -> GPTChunk:
    chunk = GPTChunk(config, stage, tp, ep_group, num_nodes, gemm)
    initialize_parameters(chunk, seed)
    return chunk

