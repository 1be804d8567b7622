"""The model chunks one pipeline rank holds, seen as one module under the full model's names.

A schedule's Layout says which stages a rank runs: 1F1B stage r; DualPipeV stages r and
2PP-1-r of one model; DualPipe stage r of the forward-direction model and stage PP-1-r of
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

`StageModel.state_dict()` keys are the single-model global names (the chunks of one rank
never hold the same global layer), so checkpoints move between layouts.
"""
from __future__ import annotations

from itertools import accumulate

import torch

from megadual.config import ModelConfig, pipeline_stage_layers
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
    global names: `embedding`, `layers.<global index>`, `final_norm`, `output_layer`. Without
    pipeline parallelism it holds one chunk, the whole model."""

    def __init__(self, config: ModelConfig, chunks: list[GPTChunk]):
        super().__init__()
        self.config = config
        self.chunks = chunks  # a plain list: their modules are registered below by global name
        layers, head = {}, None
        for chunk in chunks:
            if chunk.stage.has_embedding:
                self.embedding = chunk.embedding
            if chunk.stage.has_head:
                head = chunk
            layers.update(chunk.layers)
        self.layers = torch.nn.ModuleDict({k: layers[k] for k in sorted(layers, key=int)})
        if head is not None:
            self.final_norm, self.output_layer = head.final_norm, head.output_layer
        self.param_table = ParamTable.union([chunk.param_table() for chunk in chunks])
        self._copy_of_layer = {k: chunk.copy for chunk in chunks for k in chunk.layers}

    def routers(self) -> list[tuple[Router, bool]]:
        """(router, in DualPipe's second copy) in global layer order, the same order on mirrored ranks."""
        return [(layer.mlp.router, self._copy_of_layer[k]) for k, layer in self.layers.items() if layer.is_moe]

    def set_aux_loss_grad_scale(self, scale: float) -> None:
        """The lm loss of each micro-batch is divided by the number of micro-batches; the
        balance loss's gradient must be scaled the same way."""
        for layer in self.layers.values():
            if layer.is_moe:
                layer.mlp.aux_loss_grad_scale = scale


def build_full_model(config: ModelConfig, seed: int, ctx: BuildContext = ONE_PROCESS) -> StageModel:
    """The whole model on one pipeline rank."""
    return StageModel(config, [build_chunk(config, full_model_stage(config), seed, ctx)])


def build_stage_model(config: ModelConfig, layout: Layout, pp_rank: int, seed: int,
                      ctx: BuildContext = ONE_PROCESS, first_stage_layers: int | None = None,
                      last_stage_layers: int | None = None) -> StageModel:
    specs = stage_specs(config.num_layers, len(layout.paths[0]), first_stage_layers, last_stage_layers)
    chunks = []
    for chunk in range(2):
        try:
            path, stage = layout.locate(pp_rank, chunk)
        except KeyError:
            break
        chunks.append(build_chunk(config, specs[stage], seed, ctx, copy=path > 0))
    return StageModel(config, chunks)


def mirror_rank(layout: Layout, pp_rank: int) -> int | None:
    """The pipeline rank holding the other copies of this rank's stages (None: one copy)."""
    if len(layout.paths) == 1:
        return None
    _, stage = layout.locate(pp_rank, 0)
    return layout.paths[1][stage][0]
