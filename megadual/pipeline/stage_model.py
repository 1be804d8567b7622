"""The model chunks one pipeline rank holds, seen as one module under the full model's names.

A schedule's Layout says which stages a rank runs: 1F1B stage r; interleaved 1F1B stages
r, PP+r, ..., (V-1)PP+r; DualPipeV stages r and 2PP-1-r of one model; DualPipe stage r of the forward-direction model and stage PP-1-r of
the reverse-direction model. Layers are split over the stages of a path by global index,
evenly unless the first or last stage's count is given (embedding in the first stage,
final norm and head in the last).

Paths after the first are copies of the model (DualPipe's reverse direction): each stage's
parameters then live on two mirrored ranks, r and PP-1-r. The copies start equal (init
depends only on seed and global name), each sees the micro-batches of its own direction,
and the loss of every micro-batch is divided by the total count M; so the gradient of the
mean loss over all M micro-batches is the SUM of the two copies' gradients. After that sum
both copies take the same optimizer step and stay equal. Parameters of a copy carry
`mirror=True` in the parameter table, so the gradient norm counts each distinct parameter once.

Multi-token prediction shares the embedding with the main model. The MTP modules sit beside
the head on a path's last stage, and use an embedding held on the same rank: under DualPipe the
other copy's first stage (rank r holds stage r of copy 0 and stage PP-1-r of copy 1, so the
last stage of one copy sits with the first stage of the other, as DeepSeek-V3 arranges it), under
DualPipeV the first stage itself. The embedding's gradient then collects both uses, and the
mirror sum makes both copies' gradients the full sum. Under 1F1B with PP > 1 the last rank holds
no embedding: it keeps a tied copy (`tied` in the parameter table), whose gradient the pipeline
sums with the first stage's (`embedding_twin_rank`), so both copies stay equal.

`StageModel.state_dict()` keys are the single-model global names (the chunks of one rank
never hold the same global layer), so checkpoints move between layouts.
"""
from __future__ import annotations

from contextlib import contextmanager
from itertools import accumulate

import torch

from megadual.config import ModelConfig
from megadual.config_validate import pipeline_stage_layers
from megadual.model.gpt import GPTChunk, StageSpec, build_chunk, full_model_stage
from megadual.moe.router import Router
from megadual.parallel.context import ONE_PROCESS, BuildContext
from megadual.parallel.params import ParamTable
from megadual.pipeline.actions import Layout


def stage_specs(num_layers: int, num_stages: int, first: int | None = None,
                last: int | None = None) -> list[StageSpec]:
    """Consecutive layer ranges per stage (see config.pipeline_stage_layers)."""
    bounds = [0, *accumulate(pipeline_stage_layers(num_layers, num_stages, first, last))]
    return [StageSpec(bounds[s], bounds[s + 1], s == 0, s == num_stages - 1) for s in range(num_stages)]


class StageModel(torch.nn.Module):
    """Chunks of one rank (`chunks[c]` is local chunk c), their modules registered under the
    global names: `embedding`, `layers.<global index>`, `final_norm`, `output_layer`, `mtp`.
    Without pipeline parallelism it holds one chunk, the whole model."""

    def __init__(self, config: ModelConfig, chunks: list[GPTChunk]):
        super().__init__()
        self.config = config
        self.chunks = chunks  # a plain list: their modules are registered below by global name
        layers, head = {}, None
        for chunk in chunks:
            if hasattr(chunk, "embedding"):  # a first stage's, or a last stage's tied copy of it
                self.embedding = chunk.embedding
            if chunk.stage.has_head:
                head = chunk
            layers.update(chunk.layers)
        self.layers = torch.nn.ModuleDict({k: layers[k] for k in sorted(layers, key=int)})
        copy_of = {k: chunk.copy for chunk in chunks for k in chunk.layers}
        # Every transformer layer in global order (the MTP modules' last), with its copy flag.
        self._layer_copies = [(layer, copy_of[k]) for k, layer in self.layers.items()]
        if head is not None:
            self.final_norm, self.output_layer, self.mtp = head.final_norm, head.output_layer, head.mtp
            self._layer_copies += [(module.layer, head.copy) for module in head.mtp or ()]
        self.param_table = ParamTable.union([chunk.param_table() for chunk in chunks])

    def routers(self) -> list[tuple[Router, bool]]:
        """(router, in DualPipe's second copy) in global layer order, the same order on mirrored ranks."""
        return [(layer.mlp.router, copy) for layer, copy in self._layer_copies if layer.is_moe]

    def set_aux_loss_grad_scale(self, scale: float) -> None:
        """The lm loss of each micro-batch is divided by the number of micro-batches; the
        balance loss's gradient must be scaled the same way."""
        for layer, _ in self._layer_copies:
            if layer.is_moe:
                layer.mlp.aux_loss_grad_scale = scale

    @contextmanager
    def evaluating(self, mtp: bool = False):
        """Evaluation mode (module.eval()) inside the block; `mtp`: the last stage reports the MTP
        losses too (--mtp-eval-loss), which training alone computes otherwise."""
        for chunk in self.chunks:
            chunk.mtp_in_evaluation = mtp
            chunk.eval()
        try:
            yield
        finally:
            for chunk in self.chunks:
                chunk.mtp_in_evaluation = False
                chunk.train()


def build_full_model(config: ModelConfig, seed: int, ctx: BuildContext = ONE_PROCESS) -> StageModel:
    """The whole model on one pipeline rank."""
    return StageModel(config, [build_chunk(config, full_model_stage(config), seed, ctx)])


def build_stage_model(config: ModelConfig, layout: Layout, pp_rank: int, seed: int,
                      ctx: BuildContext = ONE_PROCESS, first_stage_layers: int | None = None,
                      last_stage_layers: int | None = None) -> StageModel:
    specs = stage_specs(config.num_layers, len(layout.paths[0]), first_stage_layers, last_stage_layers)
    places = {chunk: layout.locate(pp_rank, chunk) for chunk in layout.chunks(pp_rank)}
    built: dict[int, GPTChunk] = {}
    # The chunk with the embedding first: a last stage beside it embeds with it for MTP.
    for chunk in sorted(places, key=lambda c: not specs[places[c][1]].has_embedding):
        path, stage = places[chunk]
        embedder = next((c for c in built.values() if c.stage.has_embedding), None)
        built[chunk] = build_chunk(config, specs[stage], seed, ctx, copy=path > 0,
                                   mtp_embed=embedder.embed if embedder else None)
    return StageModel(config, [built[chunk] for chunk in sorted(built)])


def mirror_rank(layout: Layout, pp_rank: int) -> int | None:
    """The pipeline rank holding the other copies of this rank's stages (None: one copy)."""
    if len(layout.paths) == 1:
        return None
    _, stage = layout.locate(pp_rank, 0)
    return layout.paths[1][stage][0]


def embedding_twin_rank(layout: Layout, pp_rank: int) -> int | None:
    """With MTP, the pipeline rank holding the other copy of this rank's embedding, whose gradient
    must be added to this one's: the ends of a path whose last stage shares no rank with a first
    stage (1F1B with PP > 1), where the last stage keeps a tied copy. None elsewhere."""
    first_ranks = {path[0][0] for path in layout.paths}
    for path in layout.paths:
        first, last = path[0][0], path[-1][0]
        if last not in first_ranks and pp_rank in (first, last):
            return last if pp_rank == first else first
    return None
