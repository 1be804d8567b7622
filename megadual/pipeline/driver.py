"""Pipeline parallelism for the training loop: one rank's stage model and its schedules.

`Pipeline` runs a training step's micro-batches through the schedule's runtime and makes
the mean loss known to every rank of the pipeline; evaluates forward-only; and sums the
gradients (and router statistics) of DualPipe's mirrored parameter copies.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from megadual.parallel import comm
from megadual.parallel.wgrad import add_to_grad
from megadual.pipeline.actions import Action, Kind, Layout
from megadual.pipeline.runtime import PipelineRuntime
from megadual.pipeline.schedules import build_schedule, pipeline_layout
from megadual.pipeline.stage_model import StageModel, mirror_rank


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
    the deferred weight gradients (runtime.py)."""

    def __init__(self, model: StageModel, schedule: str, split_backward: bool, num_microbatches: int,
                 pp_rank: int, group, group_ranks: Sequence[int], activation_shape: Sequence[int],
                 device: torch.device, autocast: Callable,
                 accumulate_grad: Callable[[torch.Tensor, torch.Tensor], None] = add_to_grad):
        pp_size = len(group_ranks)
        self.model, self.group, self.group_ranks = model, group, list(group_ranks)
        layout = pipeline_layout(schedule, pp_size, num_microbatches)
        # One copy of the model suffices to evaluate: the first path.
        eval_layout = Layout(layout.paths[:1], (range(num_microbatches),))
        common = {"pp_rank": pp_rank, "group_ranks": group_ranks, "group": group,
                  "activation_shape": activation_shape, "dtype": next(model.parameters()).dtype,
                  "device": device, "autocast": autocast}
        actions = build_schedule(schedule, pp_size, num_microbatches, split_backward)[pp_rank]
        self.train_runtime = PipelineRuntime(actions, layout, model.chunks, **common,
                                             accumulate_grad=accumulate_grad)
        self.eval_runtime = PipelineRuntime(forward_only_schedule(eval_layout, pp_size)[pp_rank], eval_layout,
                                            model.chunks, **common)
        mirror = mirror_rank(layout, pp_rank)
        self.mirror = None if mirror is None else self.group_ranks[mirror]
        ends = [layout.is_first_stage(pp_rank, c) or layout.is_last_stage(pp_rank, c)
                for c in range(len(model.chunks))]
        self.reads_data = any(ends)
        # NCCL wants every rank of a group in the group's first collective; the p2p batches have only some.
        dist.barrier(group=group)

    def forward_backward(self, microbatches: Sequence[dict | None]) -> torch.Tensor:
        """The step's forwards and backwards; the mean loss over micro-batches, on every pipeline rank."""
        return self._sum_over_pipeline(self.train_runtime.run(microbatches))

    @torch.no_grad()
    def evaluate(self, microbatches: Sequence[dict | None]) -> torch.Tensor:
        return self._sum_over_pipeline(self.eval_runtime.run(microbatches))

    def _sum_over_pipeline(self, loss: torch.Tensor) -> torch.Tensor:
        # Only ranks holding a last stage contribute; the others hold zero.
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=self.group)
        return loss

    def from_mirror(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mirrored rank's tensor of the same shape, exchanged for this rank's."""
        theirs = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor.contiguous(), self.mirror, self.group),
               dist.P2POp(dist.irecv, theirs, self.mirror, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return theirs

    def sum_mirrored_gradients(self) -> None:
        """Add the mirrored copy's gradients: the same global names in the same order on both ranks,
        so both compute the same sum."""
        self.sum_with_mirror([p.grad for _, p in sorted(self.model.named_parameters())])

    def sum_with_mirror(self, tensors: list[torch.Tensor]) -> None:
        """Add to `tensors` the mirrored rank's, which it lists in the same order and shapes
        (nothing without a mirrored rank)."""
        if self.mirror is not None:
            comm.coalesced(tensors, lambda flat: flat + self.from_mirror(flat))
