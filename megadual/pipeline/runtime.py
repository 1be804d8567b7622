"""Executes one pipeline rank's action list (schedules.py) for one optimizer step.

API (the training loop and scripts/bench_pipeline.py use it directly):

    runtime = PipelineRuntime(actions, layout, chunks, pp_rank, group_ranks, group=None,
                              activation_shape=(seq, micro_batch, hidden), dtype=torch.float32,
                              device=None (cpu), autocast=contextlib.nullcontext, trace=False,
                              recv_lookahead=None, accumulate_grad=add_to_grad)
    losses = runtime.run(microbatches)  # {log name: mean over micro-batches}, see below
    runtime.trace                       # Trace of the last run when trace=True, else None

- `actions`: this rank's list from `build_schedule(...)[pp_rank]`; `layout`: the matching
  `pipeline_layout(...)`. `chunks[c]` is the module of local chunk c, called as
  `chunks[c](inputs, labels, samples)`: `inputs` are the token ids [micro_batch, seq] on a first
  stage and the received hidden states otherwise; `labels` are given on a last stage only,
  elsewhere None; `samples` are the micro-batch's "sample_ids" (None when absent), and a fourth
  argument its "documents" (data/documents.py; None when absent). A last stage
  returns its loss as an object with `.loss`, the scalar its backward starts from, and
  `.add_to(totals)`, which adds the values it reports to the dict `totals` by name
  (gpt.StageLoss: "lm loss", "mtp_1 loss", ...). FB actions also use
  `chunks[c].forward_steps(inputs, labels, samples, documents)`, the same forward as a generator that
  pauses at each expert all-to-all. A GPTChunk is such a module;
  `stage_model.build_stage_model(model_config, layout, pp_rank, seed).chunks` builds a rank's.
  A runtime whose actions include backwards gives each chunk its own WeightGradStore (the W
  split) and BackwardOverlap (the F&B pairing) with `chunks[c].attach_schedule(store, overlap)`.
  `accumulate_grad(param, grad)` is where the stores put deferred weight gradients: by default
  added into `param.grad`, with the distributed optimizer into its FP32 buckets.
- `group_ranks[p]` is the global rank of pipeline rank p in the process group `group`
  (None: the default group) over which activations and gradients travel.
- `activation_shape`/`dtype`: every tensor passed between stages has this shape and dtype,
  so receives can be posted before the sender computes. For GPTChunk that is
  [seq (/ TP under sequence parallelism), micro_batch, hidden] in the parameter dtype: the
  residual stream stays in the parameters' dtype under autocast (the embedding output is
  full precision and every residual add promotes to it).
- `microbatches[m]`: dict with "tokens" and "labels" [micro_batch, seq] of micro-batch m, for
  every m of the layout, and its "sample_ids" [micro_batch] (the dropout masks' key); a rank
  holding no first or last stage needs only the sample ids (or None without dropout) and the
  "documents" when there are any.
- `run` returns, by name, the sums of the reported losses of the micro-batches whose last
  stage is on this rank, divided by the number of micro-batches M (empty on a rank holding
  no last stage); each backward starts from `.loss` / M, so the gradients are those of the
  mean loss. Summing `run`'s results over the pipeline gives the mean losses. An action list
  with no backward runs forward-only (evaluation): nothing is kept for a backward, and the
  caller wraps `run` in torch.no_grad().

Actions: F runs a forward; B a full backward; BI a backward whose weight gradients the
chunk's store defers; W runs the oldest deferred weight gradients of the chunk; FB a paired
forward and backward, the forward's steps run in the shadow of the backward's expert
all-to-alls and the other way round (`forward_backward`, pipeline/overlap.py).
Communication is the Mailbox's (pipeline/p2p.py). On gloo each RECV is posted
`recv_lookahead` computes before the place it stands in the list (`post_receives_ahead`),
so the transfer runs while this rank computes instead of after: gloo moves a message only
once its receive is posted. The default lookahead is 1 on gloo. On other backends (NCCL)
it is 0: there, p2p ops between two ranks share one stream and a receive posted ahead of
its batch could block the peer's send behind it.
A stage whose neighbour is on this rank (DualPipeV's turn at the last rank) hands the
tensor over locally. Activations are dropped as soon as their backward ran.

Trace: `Trace.events` lists (label, start, end) in perf_counter seconds for every compute
action (label `str(action)`) and communication batch (label "comm:" + actions). A rank's
measured bubble is `trace.span() - trace.compute_seconds()`, or, against a makespan taken
over all ranks, `makespan - trace.compute_seconds()`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megadual.parallel import comm
from megadual.parallel.wgrad import WeightGradStore, add_to_grad
from megadual.pipeline.actions import BACKWARD_KINDS, Action, Kind, Layout
from megadual.pipeline.overlap import overlapped_forward_backward
from megadual.pipeline.p2p import Mailbox

# Where a tensor produced on this rank goes: (send kind to a peer, receive kind it fills locally).
_FORWARD = (Kind.SEND_F, Kind.RECV_F)
_BACKWARD = (Kind.SEND_B, Kind.RECV_B)


@dataclass
class Trace:
    events: list[tuple[str, float, float]] = field(default_factory=list)

    def compute_seconds(self) -> float:
        return sum(end - start for label, start, end in self.events if not label.startswith("comm:"))

    def span(self) -> float:
        return self.events[-1][2] - self.events[0][1] if self.events else 0.0


class PipelineRuntime:
    def __init__(self, actions: list[Action], layout: Layout, chunks: Sequence[torch.nn.Module], pp_rank: int,
                 group_ranks: Sequence[int], group=None, activation_shape: Sequence[int] = (),
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 autocast: Callable = nullcontext, trace: bool = False, recv_lookahead: int | None = None,
                 accumulate_grad: Callable[[torch.Tensor, torch.Tensor], None] = add_to_grad):
        waits_per_op = dist.is_initialized() and dist.get_backend(group) == "gloo"
        if recv_lookahead is None:
            recv_lookahead = int(waits_per_op)
        if recv_lookahead and not waits_per_op:
            raise ValueError("recv_lookahead > 0 needs a backend with one handle per p2p op (gloo)")
        self.actions = post_receives_ahead(actions, recv_lookahead)
        self.layout, self.chunks, self.rank = layout, list(chunks), pp_rank
        self.device = device or torch.device("cpu")
        self.autocast, self.tracing = autocast, trace
        self.num_microbatches = sum(len(m) for m in layout.microbatches)
        self.training = any(a.backward_of is not None for a in actions)
        self.mailbox = Mailbox(group_ranks, group, activation_shape, dtype, self.device, waits_per_op,
                               self.training)
        self.stores = [WeightGradStore(accumulate_grad) for _ in self.chunks]
        self.overlaps = [comm.BackwardOverlap() for _ in self.chunks]
        self._split_later = {a.backward_of for a in actions if a.kind == Kind.BI}
        if self.training:  # a forward-only runtime on the same chunks leaves the training ones in place
            for chunk, store, overlap in zip(self.chunks, self.stores, self.overlaps):
                chunk.attach_schedule(store, overlap)
        self.trace: Trace | None = None

    def run(self, microbatches: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        if len(microbatches) != self.num_microbatches:
            raise ValueError(f"the schedule runs {self.num_microbatches} micro-batches, "
                             f"got {len(microbatches)}")
        self._microbatches = microbatches
        self.mailbox.reset()
        self._saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._reported: dict[str, torch.Tensor] = {}
        self.trace = Trace() if self.tracing else None
        i = 0
        while i < len(self.actions):
            if self.actions[i].is_comm:
                j = i
                while j < len(self.actions) and self.actions[j].is_comm:
                    j += 1
                self._timed("comm:" + " ".join(map(str, self.actions[i:j])), self.mailbox.post,
                            self.actions[i:j])
                i = j
            else:
                self.mailbox.wait_for_inputs(self.actions[i], self._timed)
                self._timed(str(self.actions[i]), self._compute, self.actions[i])
                i += 1
        self.mailbox.finish_sends()
        self._check_drained()
        self._microbatches = None
        return {name: total / self.num_microbatches for name, total in self._reported.items()}

    def _timed(self, label: str, fn: Callable, arg) -> None:
        start = time.perf_counter()
        fn(arg)
        if self.trace is not None:
            self.trace.events.append((label, start, time.perf_counter()))

    def _compute(self, action: Action) -> None:
        if action.kind == Kind.F:
            self.forward(action.chunk, action.mb)
        elif action.kind in BACKWARD_KINDS:
            self.backward(action.chunk, action.mb, split=action.kind == Kind.BI)
        elif action.kind == Kind.W:
            self.stores[action.chunk].pop()
        elif action.kind == Kind.FB:
            self.forward_backward(action)
        else:
            raise ValueError(f"not a compute action: {action}")

    def forward(self, chunk: int, mb: int) -> None:
        inputs, labels, samples, documents = self._forward_inputs(chunk, mb)
        with self.autocast(), self._deferrable(chunk, mb):
            output = self.chunks[chunk](inputs, labels, samples, documents)
        self._forward_done(chunk, mb, inputs, output)

    def _deferrable(self, chunk: int, mb: int):
        """Only forwards whose backward will be a BI build linears that can defer (wgrad.py)."""
        return self.stores[chunk].deferrable_forward((chunk, mb) in self._split_later)

    def _forward_inputs(self, chunk: int, mb: int) -> tuple[torch.Tensor, torch.Tensor | None,
                                                             torch.Tensor | None, object | None]:
        """(token ids or received hidden states, labels on a last stage else None, sample ids,
        document boundaries or None)."""
        batch = self._microbatches[mb]
        if self.layout.is_first_stage(self.rank, chunk):
            inputs = batch["tokens"].to(self.device)
        else:
            inputs = self.mailbox.take((Kind.RECV_F, chunk, mb))
        labels = batch["labels"].to(self.device) if self.layout.is_last_stage(self.rank, chunk) else None
        if batch is None:
            return inputs, labels, None, None
        documents = batch.get("documents")
        return inputs, labels, batch.get("sample_ids"), documents and documents.to(self.device)

    def _forward_done(self, chunk: int, mb: int, inputs: torch.Tensor, output) -> None:
        """Count the loss or pass the output on; keep what the backward needs."""
        last = self.layout.is_last_stage(self.rank, chunk)
        if last:
            output.add_to(self._reported)
            output = output.loss / self.num_microbatches
        if self.training:
            first = self.layout.is_first_stage(self.rank, chunk)
            self._saved[(chunk, mb)] = (None if first else inputs, output)
        if not last:
            self._deliver(_FORWARD, chunk, mb, +1, output.detach())

    def backward(self, chunk: int, mb: int, split: bool) -> None:
        inputs, output = self._saved.pop((chunk, mb))
        last = self.layout.is_last_stage(self.rank, chunk)
        grad = None if last else self.mailbox.take((Kind.RECV_B, chunk, mb))
        with self.stores[chunk].split_backward() if split else nullcontext():
            torch.autograd.backward(output, grad)
        if inputs is not None:
            self._deliver(_BACKWARD, chunk, mb, -1, inputs.grad)

    def forward_backward(self, action: Action) -> None:
        """The paired F&B action: the full backward of (b_chunk, b_mb) runs, and the forward of
        (chunk, mb) advances one step each time that backward launches an expert all-to-all
        (pipeline/overlap.py), so each one's all-to-alls travel while the other computes."""
        inputs, labels, samples, documents = self._forward_inputs(action.chunk, action.mb)
        with self._deferrable(action.chunk, action.mb):
            output = overlapped_forward_backward(
                self.chunks[action.chunk].forward_steps(inputs, labels, samples, documents),
                lambda: self.backward(action.b_chunk, action.b_mb, split=False), self.autocast,
                self.overlaps[action.b_chunk])
        self._forward_done(action.chunk, action.mb, inputs, output)

    def _deliver(self, kinds: tuple[Kind, Kind], chunk: int, mb: int, step: int,
                 tensor: torch.Tensor) -> None:
        """Hand a stage's output (step=+1) or input gradient (step=-1) to the neighbouring stage:
        to this rank's chunk that holds it, or to the mailbox for the SEND action."""
        send, recv = kinds
        rank, neighbour_chunk = self.layout.neighbour(self.rank, chunk, step)
        if rank == self.rank:
            self.mailbox.deliver_locally((recv, neighbour_chunk, mb), tensor)
        else:
            self.mailbox.to_send((send, chunk, mb), tensor, f"rank {self.rank} chunk {chunk} micro-batch {mb}")

    def _check_drained(self) -> None:
        left = {**self.mailbox.leftovers(),
                "forwards without backward": list(self._saved) if self.training else [],
                "deferred weight gradients": [c for c, s in enumerate(self.stores) if len(s)]}
        left = {what: keys for what, keys in left.items() if keys}
        if left:
            raise RuntimeError(f"pipeline rank {self.rank}: the schedule left work behind: {left}")


def post_receives_ahead(actions: list[Action], lookahead: int) -> list[Action]:
    """The list with each RECV moved `lookahead` compute actions earlier (at most to the
    start). Receives keep their order among themselves, and so stay matched in order with
    their peers' sends; sends stay where they are."""
    if lookahead == 0:
        return list(actions)
    slots: list[list[Action]] = [[]]  # slots[k]: the communication before compute k
    computes: list[Action] = []
    for action in actions:
        if not action.is_comm:
            computes.append(action)
            slots.append([])
        elif action.is_send:
            slots[-1].append(action)
        else:
            slots[max(0, len(computes) - lookahead)].append(action)
    moved = slots[0]
    for compute, slot in zip(computes, slots[1:]):
        moved += [compute, *slot]
    return moved
