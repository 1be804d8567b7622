"""torch.distributed.pipelining's schedules on the same stage chunks, for scripts/bench_pipeline.py's torch rows."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from pipeline_costs import SEED, shape_specs

from megadual.model.gpt import StageLoss, build_chunk

if TYPE_CHECKING:
    from bench_pipeline import Bench, Variant


class BusyClock:
    """Accumulates the time spent inside the callables it wraps."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return wrapper


class _TensorOutput(torch.nn.Module):
    """A GPTChunk whose last stage returns its loss tensor instead of a StageLoss: torch's stages
    pass tensors only."""

    def __init__(self, chunk: torch.nn.Module):
        super().__init__()
        self.chunk = chunk

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.chunk(inputs, labels)
        return out.loss if isinstance(out, StageLoss) else out


def _loss_is_output(loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The last stage returns the loss itself (labels come in as a keyword argument)."""
    return loss


class TorchRunner:
    """torch's schedule on its PipelineStages; busy time is taken around the stages' forward and
    backward calls."""

    def __init__(self, variant: Variant, bench: Bench, rank: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

        specs = shape_specs(variant.shape, bench.model.num_layers, bench.pp)
        indices = [rank] if variant.shape == "1f1b" else [rank, 2 * bench.pp - 1 - rank]
        self.clock = BusyClock()
        stages = []
        for index in indices:
            module = _TensorOutput(build_chunk(bench.model, specs[index], SEED))
            stage = PipelineStage(module, index, len(specs), torch.device("cpu"))
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                setattr(stage, name, self.clock.timed(getattr(stage, name)))
            stages.append(stage)
        self.modules = [stage.submod for stage in stages]
        if variant.shape == "1f1b":
            self.schedule = Schedule1F1B(stages[0], bench.microbatches, _loss_is_output, scale_grads=False)
        else:
            self.schedule = ScheduleDualPipeV(stages, bench.microbatches, _loss_is_output, scale_grads=False)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """Runs one step; returns this rank's busy seconds."""
        self.clock.seconds = 0.0
        self.schedule.step(tokens, target=labels, labels=labels, return_outputs=False)
        return self.clock.seconds
