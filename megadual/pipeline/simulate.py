"""Run per-rank action lists against a cost model: makespan, bubbles, peak activations.

Each rank executes its list top to bottom. A compute action takes its cost and
starts when the rank is free. A maximal run of consecutive SEND/RECV actions is
one batch, posted when the rank reaches it; every message of the batch moves
once both its send and its receive are posted and arrives `latency` later. With
`rendezvous` (the default, what a runtime that waits on a whole
batch_isend_irecv gets), the rank leaves the batch when all its messages have
arrived; without it sends complete at once and only receives wait. No rank able
to move while actions remain is a deadlock, reported with every stuck rank's
next actions.

Bubble of a rank = makespan - the rank's compute time: its idle time between the
first action anywhere and the last action anywhere. The bubbles of the DualPipe
README's table are the worst rank's (`max_bubble`) when costs are drawn as in its
figure: backward-for-input as long as a forward (B = F + W), W <= F, and
max(F, B) <= F&B <= F + B. Then 1F1B gives (PP-1)(F+B), ZB-H1 (PP-1)(F+B-2W),
DualPipe and DualPipeV (PP/2-1)(F&B+B-3W), PP counting stages (2 per rank on V).

    python -m megadual.pipeline.simulate --schedule dualpipe --pp 8 --microbatches 20 --out t.png
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from megadual.pipeline.actions import Action, Kind, match_messages
from megadual.pipeline.hops import Pieces, paired_seconds
from megadual.pipeline.schedules import SCHEDULES, build_schedule, check_schedule, pipeline_layout
from megadual.pipeline.sim_result import Interval, SimResult
from megadual.pipeline.timeline import draw_timeline


class DeadlockError(RuntimeError):
    """No rank can progress while actions remain."""


@dataclass(frozen=True)
class SimCosts:
    """Compute costs of one chunk on one micro-batch, and what its expert all-to-alls take on
    the links (`comm_f` in a forward, `comm_b` in a backward) when nothing hides them. F, B
    and BI expose their communication; a paired F&B hides each side's behind the other's
    compute, so it takes the longer of the two (`paired`). Given the chunk at hop level
    (`hops_f`, `hops_b`: pipeline/hops.py), a paired F&B is timed hop by hop instead."""
    f: float = 1.0
    b: float = 2.0  # full backward: input and weight gradients
    w: float = 1.0
    bi: float | None = None  # backward for input only; default b - w
    fb: float | None = None  # compute of a paired forward and backward; default f + b
    latency: float = 0.0  # one p2p message
    comm_f: float = 0.0
    comm_b: float = 0.0
    hops_f: Pieces | None = None  # the forward's compute pieces and hops (their sums: f, comm_f)
    hops_b: Pieces | None = None  # the full backward's (their sums: b, comm_b)
    forward_first: bool = False  # a pair with this backward starts with a forward step (overlap.py)

    def duration(self, action: Action, rank: int = 0) -> float:
        if action.kind == Kind.FB:
            return paired(self, self)
        if action.kind == Kind.W:
            return self.w
        if action.kind == Kind.F:
            return _alone(self.f, self.hops_f, self.comm_f)
        return _alone(self.b if action.kind == Kind.B else self.b - self.w if self.bi is None else self.bi,
                      self.hops_b, self.comm_b)


def _alone(compute: float, pieces: Pieces | None, comm: float) -> float:
    """A forward or backward alone: its compute and its communication whole, or at hop level (pieces
    scaled to `compute`) what its hops expose."""
    if pieces is None:
        return compute + comm
    total = sum(pieces.compute)
    return compute + pieces.scaled(compute / total if total else 1.0).exposed()


def paired(forward: SimCosts, backward: SimCosts) -> float:
    """A paired F&B of `forward`'s forward and `backward`'s full backward: compute and communication
    overlap, so the longer of the two, or at hop level (both sides' pieces given) the time of
    the interleaved sequence. The pair's compute is `forward.fb` where given (at hop level, every
    compute piece scaled to that sum)."""
    compute = forward.f + backward.b if forward.fb is None else forward.fb
    if forward.hops_f is None or backward.hops_b is None:
        return max(compute, forward.comm_f + backward.comm_b)
    pieces = sum(forward.hops_f.compute) + sum(backward.hops_b.compute)
    scale = compute / pieces if pieces else 1.0
    return paired_seconds(forward.hops_f.scaled(scale), backward.hops_b.scaled(scale), backward.forward_first)


@dataclass(frozen=True)
class StageCosts:
    """Costs that differ between chunks, such as those measured on each stage:
    `chunks[rank, chunk]` for every chunk of the schedule; one p2p `latency` for all.
    A paired F&B pairs its forward chunk's forward with its backward chunk's backward."""

    chunks: Mapping[tuple[int, int], SimCosts]
    latency: float = 0.0

    def duration(self, action: Action, rank: int) -> float:
        own = self.chunks[rank, action.chunk]
        if action.kind == Kind.FB:
            return paired(own, self.chunks[rank, action.b_chunk])
        return own.duration(action)


def peak_activations(actions: list[Action]) -> int:
    """Most forwards whose input-gradient backward has not finished, in units of one
    micro-batch's activations on one chunk (one stage). A paired F&B holds both
    micro-batches while it runs, so it counts one above its surroundings; what a
    deferred W keeps for its weight gradients is not counted (as in the table)."""
    live = peak = 0
    for action in actions:
        if action.forward_of:
            live += 1
            peak = max(peak, live)
        if action.backward_of:
            live -= 1
    return peak


def _steps(actions: list[Action]) -> list[range]:
    """Split a rank's list into compute actions and maximal batches of comm actions."""
    steps, start = [], 0
    while start < len(actions):
        end = start + 1
        if actions[start].is_comm:
            while end < len(actions) and actions[end].is_comm:
                end += 1
        steps.append(range(start, end))
        start = end
    return steps


def simulate(schedules: list[list[Action]], costs: SimCosts | StageCosts = SimCosts(),
             rendezvous: bool = True) -> SimResult:
    """Time every rank's list; raises UnmatchedCommError or DeadlockError."""
    partner: dict[tuple[int, int], tuple[int, int]] = {}
    for send, recv in match_messages(schedules):
        partner[send], partner[recv] = recv, send
    steps = [_steps(actions) for actions in schedules]
    pos = [0] * len(schedules)
    clock = [0.0] * len(schedules)
    posted: dict[tuple[int, int], float] = {}
    timeline: list[list[Interval]] = [[] for _ in schedules]

    def batch_done(rank: int, batch: range) -> float | None:
        done = clock[rank]
        for index in batch:
            if not rendezvous and schedules[rank][index].is_send:
                continue
            other = partner[(rank, index)]
            if other not in posted:
                return None
            done = max(done, max(posted[(rank, index)], posted[other]) + costs.latency)
        return done

    moved = True
    while moved:
        moved = False
        for rank, actions in enumerate(schedules):
            while pos[rank] < len(steps[rank]):
                step = steps[rank][pos[rank]]
                first = actions[step[0]]
                if not first.is_comm:
                    end = clock[rank] + costs.duration(first, rank)
                    timeline[rank].append(Interval(clock[rank], end, first))
                    clock[rank] = end
                elif (rank, step[0]) not in posted:
                    posted.update({(rank, index): clock[rank] for index in step})
                    moved = True
                    continue
                else:
                    done = batch_done(rank, step)
                    if done is None:
                        break
                    clock[rank] = done
                pos[rank] += 1
                moved = True

    stuck = [rank for rank in range(len(schedules)) if pos[rank] < len(steps[rank])]
    if stuck:
        waits = [" ".join(str(schedules[rank][i]) for i in steps[rank][pos[rank]]) for rank in stuck]
        raise DeadlockError("deadlock: " + "; ".join(
            f"rank {rank} waits at {wait}" for rank, wait in zip(stuck, waits)))
    return SimResult(
        makespan=max(clock, default=0.0),
        busy=[sum(i.end - i.start for i in intervals) for intervals in timeline],
        peak_activations=[peak_activations(actions) for actions in schedules],
        timeline=timeline,
    )


def format_report(result: SimResult) -> str:
    lines = [f"{'rank':>4} {'busy':>10} {'bubble':>10} {'peak act':>8}"]
    for rank, (busy, bubble, peak) in enumerate(zip(result.busy, result.bubble, result.peak_activations)):
        lines.append(f"{rank:>4} {busy:>10g} {bubble:>10g} {peak:>8}")
    lines.append(f"makespan {result.makespan:g}, worst bubble {result.max_bubble:g}, "
                 f"peak activations {max(result.peak_activations)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedule", choices=SCHEDULES, default="dualpipe")
    parser.add_argument("--pp", type=int, default=8, help="pipeline ranks")
    parser.add_argument("--microbatches", type=int, default=20)
    parser.add_argument("--virtual-stages", type=int, default=None, help="V of --schedule interleaved (default 2)")
    parser.add_argument("--overlap", action="store_true", help="1f1b/interleaved: pair steady forwards and "
                                                               "backwards (--overlap-moe-expert-parallel-comm)")
    parser.add_argument("--no-split-backward", action="store_true", help="full backwards only, no W")
    parser.add_argument("--cost-f", type=float, default=1.0)
    parser.add_argument("--cost-b", type=float, default=2.0, help="full backward")
    parser.add_argument("--cost-w", type=float, default=1.0)
    parser.add_argument("--cost-bi", type=float, default=None, help="default: cost-b - cost-w")
    parser.add_argument("--cost-fb", type=float, default=None, help="paired F&B; default: cost-f + cost-b")
    parser.add_argument("--latency", type=float, default=0.0, help="per p2p message")
    parser.add_argument("--eager-sends", action="store_true", help="sends never wait for their receive")
    parser.add_argument("--print-actions", action="store_true", help="print every rank's action list")
    parser.add_argument("--out", default=None, help="PNG timeline to write")
    args = parser.parse_args(argv)

    virtual = args.virtual_stages or (2 if args.schedule == "interleaved" else 1)
    try:
        schedules = build_schedule(args.schedule, args.pp, args.microbatches, not args.no_split_backward,
                                   virtual, args.overlap)
    except ValueError as error:
        parser.error(str(error))
    check_schedule(schedules, pipeline_layout(args.schedule, args.pp, args.microbatches, virtual))
    costs = SimCosts(args.cost_f, args.cost_b, args.cost_w, args.cost_bi, args.cost_fb, args.latency)
    result = simulate(schedules, costs, rendezvous=not args.eager_sends)
    if args.print_actions:
        for rank, actions in enumerate(schedules):
            print(f"rank {rank}: {' '.join(map(str, actions))}")
    print(f"{args.schedule}: {args.pp} ranks, {args.microbatches} micro-batches, {costs}")
    print(format_report(result))
    if args.out:
        title = (f"{args.schedule}  PP ranks={args.pp}  micro-batches={args.microbatches}  "
                 f"makespan={result.makespan:g}  worst bubble={result.max_bubble:g}")
        draw_timeline(result, args.out, title)
        print(f"timeline written to {args.out}")


if __name__ == "__main__":
    main()
