"""The decoder as pipeline stage chunks, cut by global layer index.

A chunk holds layers [first, last) and, when it is the first stage, the embedding,
when it is the last, the final norm, output head, loss and the multi-token prediction
modules (model/mtp.py). Parameter names are the global names of the full model (layers
keyed by global index, experts by global expert index, MTP modules as `mtp.<k>`), so
initialization and checkpoints do not depend on the layout.

A last stage returns a `StageLoss`: the loss its backward starts from, and the parts to
report by their log names (`lm loss`, `mtp_1 loss`, ...).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Generator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import torch

from megadual.config import ModelConfig
from megadual.data.documents import Documents
from megadual.model.block import TransformerLayer
from megadual.model.dropout import EMBEDDING, HiddenDropout
from megadual.model.layers import RMSNorm
from megadual.model.mtp import MultiTokenPrediction, masked_mean, mtp_loss_names
from megadual.moe.experts import ExpertLinear
from megadual.moe.layer import MoELayer
from megadual.moe.router import Router
from megadual.parallel import comm
from megadual.parallel.context import ONE_PROCESS, BuildContext
from megadual.parallel.params import ParamTable
from megadual.parallel.recompute import Recompute, run_steps
from megadual.parallel.rng import initialize_parameters
from megadual.parallel.tensor import (
    ShardedLinear,
    VocabParallelEmbedding,
    enter_tp_region,
    vocab_parallel_cross_entropy,
)
from megadual.parallel.wgrad import WeightGradStore

LM_LOSS = "lm loss"


def loss_names(config: ModelConfig) -> list[str]:
    """What a last stage can report, in a fixed order: the lm loss, then each MTP depth's."""
    return [LM_LOSS, *mtp_loss_names(config.mtp_num_layers)]


@dataclass
class StageLoss:
    """What a last stage's forward returns. `loss`: the scalar the backward starts from (the lm
    loss plus the scaled MTP loss); `reported`: its parts by log name, detached and unscaled."""
    loss: torch.Tensor
    reported: dict[str, torch.Tensor]

    def add_to(self, totals: dict[str, torch.Tensor]) -> None:
        for name, value in self.reported.items():
            totals[name] = totals[name] + value.float() if name in totals else value.float()


@dataclass(frozen=True)
class StageSpec:
    first_layer: int
    last_layer: int  # exclusive
    has_embedding: bool
    has_head: bool


def full_model_stage(config: ModelConfig) -> StageSpec:
    return StageSpec(0, config.num_layers, True, True)


class GPTChunk(torch.nn.Module):
    """Layers [first, last) of the model; `copy` marks DualPipe's second copy of a stage; `seed`
    keys the dropout masks.

    A last stage with MTP embeds with `mtp_embed` when given (the embedding of another chunk on
    this rank: DualPipe's other copy, DualPipeV's first stage), else with its own embedding: the
    first stage's when it is one, else a tied copy of it (1F1B with PP > 1), whose gradient the
    pipeline sums with the first stage's. MTP losses are computed in training and, with
    `mtp_in_evaluation`, in evaluation (module.eval()) too."""

    def __init__(self, config: ModelConfig, stage: StageSpec, ctx: BuildContext = ONE_PROCESS, copy: bool = False,
                 seed: int = 0, mtp_embed: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        tp = ctx.tp
        self.config, self.stage, self.tp, self.copy = config, stage, tp, copy
        self.mtp, self.mtp_in_evaluation, self._tied = None, False, ()
        if stage.has_embedding:
            self.embedding = self._new_embedding()
            self.embedding_dropout = HiddenDropout(config.hidden_dropout, seed, EMBEDDING, 0, tp)
        self.layers = torch.nn.ModuleDict({
            str(i): TransformerLayer(config, i, ctx, seed) for i in range(stage.first_layer, stage.last_layer)})
        if stage.has_head:
            self.final_norm = RMSNorm(config.hidden_size, config.norm_epsilon, tp.sequence_parallel)
            # The head stays in full precision (as in DeepSeek-V3), whatever `gemm` is.
            self.output_layer = ShardedLinear(config.hidden_size, config.vocab_size, tp, 0,
                                              config.init_method_std, real_rows=config.real_vocab_size)
            if config.mtp_num_layers:
                self.mtp = MultiTokenPrediction(config, ctx, seed)
                if mtp_embed is None and not stage.has_embedding:
                    self.embedding, self._tied = self._new_embedding(), ("embedding",)
                self._mtp_embed = mtp_embed  # None: self.embed
        self.overlap: comm.BackwardOverlap | None = None
        # The MTP layers' selective modules are recomputed too; full recomputation covers the
        # chunk's decoder layers only.
        self.recompute = Recompute(ctx.recompute.selective_modules)
        for module in self.modules():
            if hasattr(module, "recompute") and module is not self:
                module.recompute = self.recompute
        layers = list(self.layers.values())
        full = ctx.recompute.full_layer_groups(len(layers))
        # Consecutive runs of layers: each recomputed group alone, the layers between as one run.
        bounds = sorted({0, len(layers), *(b for g in full for b in (g.start, g.stop))})
        self.layer_groups = [(layers[a:b], range(a, b) in full) for a, b in itertools.pairwise(bounds)]

    def _new_embedding(self) -> VocabParallelEmbedding:
        c = self.config
        return VocabParallelEmbedding(c.vocab_size, c.hidden_size, self.tp, c.init_method_std, c.real_vocab_size)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, seq] token ids -> [seq(/TP under sequence parallel), batch, hidden]."""
        return self.embedding(tokens.t().contiguous())

    def token_losses(self, normed: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The head's cross entropy [seq, batch] of normed hidden states against targets [batch, seq]."""
        logits = self.output_layer(enter_tp_region(normed, self.tp))
        return vocab_parallel_cross_entropy(logits, targets.t(), self.tp, self.config.real_vocab_size)

    def _loss_steps(self, hidden: torch.Tensor, labels: torch.Tensor, samples: torch.Tensor | None,
                    documents: Documents | None) -> Generator[None, None, StageLoss]:
        normed = self.final_norm(hidden)
        lm_loss = masked_mean(self.token_losses(normed, labels), documents and documents.loss_mask)
        reported = {LM_LOSS: lm_loss.detach()}
        if self.mtp is None or not (self.training or self.mtp_in_evaluation):
            return StageLoss(lm_loss, reported)
        embed = self._mtp_embed or self.embed
        depths = yield from self.mtp.losses_steps(normed, labels, samples, embed, self.token_losses, documents)
        reported.update(zip(mtp_loss_names(len(depths)), (d.detach() for d in depths)))
        scale = self.config.mtp_loss_scaling_factor / len(depths)
        return StageLoss(lm_loss + scale * sum(depths), reported)

    def forward_steps(self, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                      samples: torch.Tensor | None = None, documents: Documents | None = None
                      ) -> Generator[None, None, torch.Tensor | StageLoss]:
        """The forward as a generator that pauses while each expert all-to-all is in flight (the
        MTP layers' too). `samples` are the micro-batch's global sample indices (the dropout
        masks' key); `documents` its document boundaries (data/documents.py; None: none).

        Its return value (StopIteration.value) is what `forward` returns: the hidden states, or
        on the last stage a StageLoss. A schedule can resume it from elsewhere -
        `pipeline/overlap.py` does so inside another micro-batch's backward - to fill the
        all-to-all's time with other compute.
        """
        return (yield from self.recompute.observed(self._forward_steps(inputs, labels, samples, documents)))

    def _forward_steps(self, inputs: torch.Tensor, labels: torch.Tensor | None, samples: torch.Tensor | None,
                       documents: Documents | None):
        hidden = self.embedding_dropout(self.embed(inputs), samples) if self.stage.has_embedding else inputs
        for layers, recomputed in self.layer_groups:
            if recomputed:  # --recompute-granularity full: only the group's input is kept
                hidden = yield from self.recompute.region_steps(
                    self._layers_steps, (hidden, samples, layers, documents), partial(_routers_paused, layers),
                    self.overlap)
            else:
                hidden = yield from self._layers_steps(hidden, samples, layers, documents)
        if not self.stage.has_head:
            return hidden
        return (yield from self._loss_steps(hidden, labels, samples, documents))

    @staticmethod
    def _layers_steps(hidden: torch.Tensor, samples: torch.Tensor | None, layers: list[TransformerLayer],
                      documents: Documents | None = None):
        for layer in layers:
            hidden = yield from layer.forward_steps(hidden, samples, documents)
        return hidden

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                samples: torch.Tensor | None = None, documents: Documents | None = None) -> torch.Tensor | StageLoss:
        return run_steps(self.forward_steps(inputs, labels, samples, documents))

    def param_table(self) -> ParamTable:
        return ParamTable.build(self, mirror=self.copy, tied=self._tied)

    def attach_schedule(self, store: WeightGradStore | None, overlap: comm.BackwardOverlap | None) -> None:
        """Route the weight gradients of every linear through `store` (the W split) and let
        `overlap` fill the backward's expert all-to-alls (the paired F&B chunk)."""
        self.overlap, self.recompute.wgrad_store = overlap, store
        for module in self.modules():
            if isinstance(module, ShardedLinear | ExpertLinear | Router):
                module.wgrad_store = store
            elif isinstance(module, MoELayer):
                module.dispatcher.overlap = overlap


def _routers_paused(layers: list[TransformerLayer]) -> ExitStack:
    """The routers of `layers` not counting (while a full-layer region is recomputed)."""
    stack = ExitStack()
    for layer in layers:
        if layer.is_moe:
            stack.enter_context(layer.mlp.router.stats_paused())
    return stack


def build_chunk(config: ModelConfig, stage: StageSpec, seed: int, ctx: BuildContext = ONE_PROCESS,
                copy: bool = False, mtp_embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> GPTChunk:
    chunk = GPTChunk(config, stage, ctx, copy, seed, mtp_embed)
    initialize_parameters(chunk.param_table(), seed)
    return chunk
