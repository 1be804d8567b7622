"""The costs scripts/bench_pipeline.py's simulator predicts from, taken two ways.

Alone: each stage chunk's forward, backward, BI and W on one micro-batch, run directly (no
pipeline), one pipeline stage at a time (an EP group's ranks together, the others waiting), so
each is the cost of a rank that has a core to itself, as a rank with its own GPU would. With
emulated links, also what the chunk's all-to-alls take on them, from the bytes they sent.

In the step: each action's compute as our runtime traced it during a timed step, less the
time it spent blocked on emulated all-to-alls. On a machine with fewer cores than ranks this
includes what the other ranks' compute at the same moment takes from it, which the costs
alone leave out.
"""
from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megadual.model.gpt import StageSpec, build_chunk
from megadual.parallel import comm
from megadual.parallel.context import BuildContext
from megadual.parallel.emulate import LinkModel, Record
from megadual.parallel.wgrad import WeightGradStore
from megadual.pipeline.actions import Kind
from megadual.pipeline.hops import Pieces
from megadual.pipeline.stage_model import stage_specs

if TYPE_CHECKING:
    from bench_pipeline import Bench

SEED = 1234
# The runtime traces each action by its str(): F1.3, B0.2, BI0.2, W0.2, F0.1&B1.0.
_KIND_OF_LABEL = (("&", Kind.FB), ("BI", Kind.BI), ("B", Kind.B), ("W", Kind.W), ("F", Kind.F))


INTERLEAVED_V = 2  # the benchmark's virtual stages per rank under interleaved 1F1B


def shape_specs(shape: str, num_layers: int, pp: int) -> list[StageSpec]:
    """The distinct stage chunks of a schedule shape (DualPipe's two directions cut alike)."""
    return stage_specs(num_layers, {"dualpipev": 2 * pp, "interleaved": INTERLEAVED_V * pp}.get(shape, pp))


def chunk_costs(bench: Bench, spec: StageSpec, ctx: BuildContext) -> dict[str, float]:
    """Median seconds of forward, full backward, input-only backward (BI) and W of one chunk on one
    micro-batch, with our W split: a WeightGradStore attached to every linear. With emulated links,
    also what its forward's and backward's all-to-alls take on them (comm_f, comm_b), from the
    bytes they sent (the compute costs are measured without emulation), and the chunk at hop level
    (hops_f, hops_b: its compute between launches, each launch's link time; medians of the reps)."""
    config, micro_batch_size, reps = bench.model, bench.micro_batch_size, bench.cost_reps
    chunk = build_chunk(config, spec, SEED, ctx)
    store = WeightGradStore()
    chunk.attach_schedule(store, None)
    seq, h = config.seq_length, config.hidden_size
    tokens = torch.randint(config.vocab_size, (micro_batch_size, seq))
    hidden = torch.randn(seq, micro_batch_size, h, requires_grad=True)
    grad = None if spec.has_head else torch.randn(seq, micro_batch_size, h)
    times: dict[str, list[float]] = {"f": [], "b": [], "bi": [], "w": []}

    def timed(key: str, fn: Callable, *args):
        start = time.perf_counter()
        result = fn(*args)
        times[key].append(time.perf_counter() - start)
        return result

    def forward(deferrable: bool = False) -> torch.Tensor:
        with store.deferrable_forward(deferrable):
            out = chunk(tokens if spec.has_embedding else hidden, tokens)
        return out.loss if spec.has_head else out

    def split_backward(out: torch.Tensor) -> None:
        with store.split_backward():
            out.backward(grad)

    for _ in range(reps + 1):  # the first round warms up
        out = timed("f", forward)
        timed("b", torch.Tensor.backward, out, grad)
        timed("bi", split_backward, forward(deferrable=True))
        timed("w", store.pop)
    costs = {key: statistics.median(values[1:]) for key, values in times.items()}
    if bench.links is not None:
        overlap = comm.BackwardOverlap()
        chunk.attach_schedule(store, overlap)
        start = tokens if spec.has_embedding else hidden
        measured = [hop_level(bench, chunk, overlap, start, tokens, grad, spec.has_head) for _ in range(reps)]
        costs["hops_f"] = median_pieces([forward for forward, _ in measured])
        costs["hops_b"] = median_pieces([backward for _, backward in measured])
        costs["forward_first"] = overlap.forward_first  # the hierarchical dispatcher's phase
        costs["comm_f"] = sum(costs["hops_f"].hops)
        costs["comm_b"] = sum(costs["hops_b"].hops)
    return costs


def hop_level(bench: Bench, chunk, overlap: comm.BackwardOverlap, start: torch.Tensor, tokens: torch.Tensor,
              grad: torch.Tensor | None, has_head: bool) -> tuple[Pieces, Pieces]:
    """One forward and backward of `chunk` at hop level, marked at each all-to-all pause on free
    links: (forward, backward) Pieces with the link times of `bench.links`."""
    with bench.emulate(LinkModel()) as sent_forward:
        steps = chunk.forward_steps(start, tokens)
        marks = [time.perf_counter()]
        out = run_marked(steps, marks)
        out = out.loss if has_head else out
    forward = hop_pieces(marks, sent_forward.records, bench.links)
    with bench.emulate(LinkModel()) as sent_backward:
        marks = [time.perf_counter()]
        with overlap.filling(lambda: marks.append(time.perf_counter())):
            out.backward(grad)
        marks.append(time.perf_counter())
    return forward, hop_pieces(marks, sent_backward.records, bench.links)


def median_pieces(measured: list[Pieces]) -> Pieces:
    """Element by element, the median of several measurements of one chunk at hop level (a single
    lead or lag is a few milliseconds, and one run's noise is of that size)."""
    def median(name: str) -> tuple[float, ...]:
        return tuple(map(statistics.median, zip(*(getattr(pieces, name) for pieces in measured))))
    drains = [statistics.median(values) if None not in values else None
              for values in zip(*(pieces.drain for pieces in measured))]
    return Pieces(median("compute"), median("hops"), median("lead"), median("lag"), tuple(drains))


def run_marked(steps, marks: list[float]):
    """Run a forward_steps generator to its end, marking the time after each step; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            marks.append(time.perf_counter())
            return done.value
        marks.append(time.perf_counter())


def hop_pieces(marks: list[float], records: list[Record], links: LinkModel) -> Pieces:
    """The chunk at hop level (pipeline/hops.py): the compute between consecutive marks (each a pause
    after an all-to-all launch, with free links), the link time of what each piece launched, how
    long the piece computed on after its last launch (the shared expert beside a dispatch), how
    long the next piece computed before waiting for it (a backward's other branches), and where a
    piece waited for an exchange it launched itself (the token counts: a drain)."""
    compute = tuple(b - a for a, b in itertools.pairwise(marks))
    hops, last = [0.0] * (len(compute) - 1), [None] * (len(compute) - 1)
    drain: list[float | None] = [None] * len(compute)
    for record in records:
        piece = next((i for i in range(len(hops)) if record.launched <= marks[i + 1]), len(hops) - 1)
        within = next((i for i in range(len(compute)) if marks[i] <= record.launched
                       and record.waited_at < marks[i + 1]), None)
        if within is not None and drain[within] is None:
            drain[within] = record.launched - marks[within]
        if hops:
            hops[piece] += links.free_seconds(record)
            if within is None and (last[piece] is None or record.launched >= last[piece].launched):
                last[piece] = record
    lead = tuple(0.0 if r is None else max(0.0, marks[i + 1] - r.launched) for i, r in enumerate(last))
    lag = tuple(0.0 if r is None else min(compute[i + 1], max(0.0, r.waited_at - marks[i + 1]))
                for i, r in enumerate(last))
    return Pieces(compute, tuple(hops), lead, lag, tuple(drain))


def rank_costs(bench: Bench, shapes: list[tuple[str, str]], pp_rank: int,
               build_context: Callable[[str], BuildContext]) -> dict[tuple, dict]:
    """Per (schedule shape, dispatcher), the costs alone of this rank's share of the shape's stage
    chunks, by stage index, measured one pipeline rank at a time."""
    costs = {}
    for shape, dispatcher in shapes:
        specs = shape_specs(shape, bench.model.num_layers, bench.pp)
        ctx = build_context(dispatcher)
        for turn in range(bench.pp):
            dist.barrier()
            if turn == pp_rank:
                costs[shape, dispatcher] = {index: chunk_costs(bench, specs[index], ctx)
                                            for index in range(pp_rank, len(specs), bench.pp)}
        dist.barrier()
    return costs


def link_wait(record: Record) -> float:
    """The part of a recorded wait spent on the links. An all-to-all's wait past the time its own bytes
    left this rank's links (`sent`) is for its EP peers to arrive at it: in the steps, a peer that
    reaches the collective late, which the simulator (one rank per pipeline stage, links modelled
    from this rank's side) does not see, so it stays in the action's cost. A receive waits wholly
    on the link or the sender, which the simulator times itself."""
    if record.what != "all_to_all" or record.sent is None:
        return record.blocked
    return min(record.blocked, max(0.0, record.sent - record.waited_at))


def action_compute(events: list[tuple[str, float, float]], records: list[Record]) -> dict[str, float]:
    """Compute seconds of each action of one traced step, by its label: its time less its waits on the
    emulated links (link_wait)."""
    waits = [(r.waited_at, link_wait(r)) for r in records]
    return {label: end - start - sum(seconds for at, seconds in waits if start <= at <= end)
            for label, start, end in events if not label.startswith("comm:")}


def step_compute(per_action: dict[str, float]) -> dict[str, float]:
    """Mean compute seconds per action kind ("f", "b", "bi", "w", "fb") of the actions' (action_compute).
    The mean, as the step takes the sum: actions that ran while other ranks shared the cores are slower."""
    by_kind: dict[str, list[float]] = {}
    for label, seconds in per_action.items():
        kind = next(kind for marker, kind in _KIND_OF_LABEL if marker in label)
        by_kind.setdefault(kind.value.lower(), []).append(seconds)
    return {kind: statistics.fmean(values) for kind, values in by_kind.items()}
