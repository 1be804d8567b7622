"""Pipeline parallelism for the training loop: one rank's stage model and its schedules.

`Pipeline` runs a training step's micro-batches through the schedule's runtime and makes
the mean losses known to every rank of the pipeline; evaluates forward-only; and sums the
gradients of parameters held on two ranks: DualPipe's mirrored copies (and their router
statistics), and the embedding the last stage ties to the first for multi-token prediction.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megadual.model.gpt import loss_names
from megadual.parallel import collectives, comm
from megadual.parallel.wgrad import add_to_grad
from megadual.pipeline.actions import Action, Kind, Layout
from megadual.pipeline.runtime import PipelineRuntime
from megadual.pipeline.schedules import build_schedule, pipeline_layout
from megadual.pipeline.stage_model import StageModel, embedding_twin_rank, mirror_rank


def forward_only_schedule(layout: Layout, pp_size: int) -> list[list[Action]]:
    """Every micro-batch's forward through every stage of its path, in ticks: stage s of
    micro-batch m runs at tick m + s. In each tick a rank receives its inputs, computes, and
    sends its outputs, which are exactly what the next stages receive in the next tick; so
    the communication batches of all ranks match tick by tick."""
    # ticks[(t, rank)]: the (receives, forwards, sends) of that rank in tick t, by stage
    ticks: dict[tuple[int, int], tuple[list[Action], list[Action], list[Action]]] = {}
    for path, places in enumerate(layout.paths):
        for stage, (rank, chunk) in enumerate(places):
            before = places[stage - 1][0] if stage > 0 else rank
            after = places[stage + 1][0] if stage + 1 < len(places) else rank
            for mb in layout.microbatches[path]:
                recvs, forwards, sends = ticks.setdefault((mb + stage, rank), ([], [], []))
                if before != rank:
                    recvs.append(Action(Kind.RECV_F, chunk, mb, peer=before))
                forwards.append(Action(Kind.F, chunk, mb))
                if after != rank:
                    sends.append(Action(Kind.SEND_F, chunk, mb, peer=after))
    schedules: list[list[Action]] = [[] for _ in range(pp_size)]
    for (_, rank), (recvs, forwards, sends) in sorted(ticks.items(), key=lambda item: item[0]):
        schedules[rank] += recvs + forwards + sends
    return schedules


class Pipeline:
    """One rank of a pipeline: `model` holds its chunks; `group`/`group_ranks` are the
    pipeline's process group and its global ranks by pipeline rank; `accumulate_grad` takes
    the deferred weight gradients (runtime.py); `virtual_stages` and `overlap` as build_schedule's."""

    def __init__(self, model: StageModel, schedule: str, split_backward: bool, num_microbatches: int,
                 pp_rank: int, group, group_ranks: Sequence[int], activation_shape: Sequence[int],
                 device: torch.device, autocast: Callable,
                 accumulate_grad: Callable[[torch.Tensor, torch.Tensor], None] = add_to_grad,
                 virtual_stages: int = 1, overlap: bool = False):
        pp_size = len(group_ranks)
        self.model, self.group, self.group_ranks, self.device = model, group, list(group_ranks), device
        layout = pipeline_layout(schedule, pp_size, num_microbatches, virtual_stages)
        # One copy of the model suffices to evaluate: the first path.
        eval_layout = Layout(layout.paths[:1], (range(num_microbatches),))
        common = {"pp_rank": pp_rank, "group_ranks": group_ranks, "group": group,
                  "activation_shape": activation_shape, "dtype": next(model.parameters()).dtype,
                  "device": device, "autocast": autocast}
        self._train_schedule = (schedule, split_backward, virtual_stages, overlap, accumulate_grad, common)
        self.train_runtimes: dict[int, PipelineRuntime] = {}  # by micro-batch count (--rampup-batch-size)
        self.train_runtime(num_microbatches)
        self.eval_runtime = PipelineRuntime(forward_only_schedule(eval_layout, pp_size)[pp_rank], eval_layout,
                                            model.chunks, **common)
        mirror = mirror_rank(layout, pp_rank)
        self.mirror = None if mirror is None else self.group_ranks[mirror]
        twin = embedding_twin_rank(layout, pp_rank) if model.config.mtp_num_layers else None
        self.embedding_twin = None if twin is None else self.group_ranks[twin]
        ends = [layout.is_first_stage(pp_rank, c) or layout.is_last_stage(pp_rank, c)
                for c in range(len(model.chunks))]
        self.reads_data = any(ends)
        # NCCL wants every rank of a group in the group's first collective; the p2p batches have only some.
        collectives.barrier(group)

    def train_runtime(self, num_microbatches: int) -> PipelineRuntime:
        """The training schedule's runtime for `num_microbatches` (built on first use; the stage
        placement does not depend on the count)."""
        if num_microbatches not in self.train_runtimes:
            schedule, split_backward, virtual_stages, overlap, accumulate_grad, common = self._train_schedule
            pp_size = len(self.group_ranks)
            actions = build_schedule(schedule, pp_size, num_microbatches, split_backward, virtual_stages,
                                     overlap)[common["pp_rank"]]
            layout = pipeline_layout(schedule, pp_size, num_microbatches, virtual_stages)
            self.train_runtimes[num_microbatches] = PipelineRuntime(
                actions, layout, self.model.chunks, **common,
                accumulate_grad=accumulate_grad)
        return self.train_runtimes[num_microbatches]

    def forward_backward(self, microbatches: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        """The step's forwards and backwards; the mean losses over micro-batches by log name
        (gpt.loss_names), on every pipeline rank."""
        return self._sum_over_pipeline(self.train_runtime(len(microbatches)).run(microbatches))

    @torch.no_grad()
    def evaluate(self, microbatches: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        """Forward-only through one copy; the losses as forward_backward's (MTP's zero unless evaluated)."""
        return self._sum_over_pipeline(self.eval_runtime.run(microbatches))

    def _sum_over_pipeline(self, reported: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Only ranks holding a last stage contribute; the others hold zeros.
        names = loss_names(self.model.config)
        zero = torch.zeros((), device=self.device)
        values = torch.stack([reported.get(name, zero).detach().float() for name in names])
        collectives.all_reduce(values, self.group)
        return dict(zip(names, values))

    def _exchange(self, tensor: torch.Tensor, peer: int) -> torch.Tensor:
        """Global rank `peer`'s tensor of the same shape, exchanged for this rank's."""
        theirs = torch.empty_like(tensor)
        ops = [collectives.send(tensor.contiguous(), peer, self.group), collectives.receive(theirs, peer, self.group)]
        for work in collectives.batch_isend_irecv(ops):
            work.wait()
        return theirs

    def from_mirror(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mirrored rank's tensor of the same shape, exchanged for this rank's."""
        return self._exchange(tensor, self.mirror)

    def sum_shared_gradients(self) -> None:
        """Add the gradients of this rank's parameters held on another rank too: the tied
        embedding's twin (1F1B with MTP), then the mirrored copy's (DualPipe), in the same
        order on both ranks of a pair, so both compute the same sum and the copies stay equal."""
        if self.embedding_twin is not None:
            grad = self.model.embedding.weight.grad
            grad += self._exchange(grad, self.embedding_twin)
        self.sum_with_mirror([p.grad for _, p in sorted(self.model.named_parameters())])

    def sum_with_mirror(self, tensors: list[torch.Tensor]) -> None:
        """Add to `tensors` the mirrored rank's, which it lists in the same order and shapes
        (nothing without a mirrored rank)."""
        if self.mirror is not None:
            comm.coalesced(tensors, lambda flat: flat + self.from_mirror(flat))
