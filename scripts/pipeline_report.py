"""The report of scripts/bench_pipeline.py: rows of measured steps next to the simulator's prediction."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pipeline_memory
from pipeline_costs import step_compute

from megadual.parallel.emulate import LinkModel
from megadual.pipeline.actions import Action, Kind, Layout
from megadual.pipeline.hops import Pieces
from megadual.pipeline.simulate import SimCosts, StageCosts, paired, simulate

if TYPE_CHECKING:
    from bench_pipeline import Bench, Variant

RATIOS = (("ours 1F1B", "torch Schedule1F1B"), ("ours DualPipeV", "torch ScheduleDualPipeV"),
          ("ours DualPipeV", "ours DualPipeV, recv in place"), ("ours DualPipe", "ours 1F1B"),
          ("ours DualPipe", "ours DualPipe, no overlap"), ("ours DualPipe, hierarchical", "ours DualPipe"))


@dataclass(frozen=True)
class Sample:
    """One timed step as one rank saw it."""
    makespan: float  # seconds, over all ranks
    busy: float  # this rank's compute seconds
    inter_bytes: float  # all ranks
    compute: dict[str, float]  # ours only: each action's compute seconds, by its label (pipeline_costs.action_compute)
    exposed: float = 0.0  # this rank's seconds blocked on emulated all-to-alls
    exposed_on_links: float = 0.0  # the part of it before its own bytes had left (pipeline_costs.link_wait)


@dataclass(frozen=True)
class Memory:
    """Per pipeline rank (parameter bytes, peak activation bytes): measured as the memory report counts them
    (the largest peak of a stage's EP ranks), and planned by megadual.plan."""
    measured: list[tuple[int, int]]
    planned: list[tuple[float, float]]


def stage_memory(per_process: list[tuple[int, tuple[int, int]]]) -> list[tuple[int, int]]:
    """(pp rank, (parameter bytes, peak activation bytes)) of every process -> the largest per pipeline rank."""
    stages: dict[int, tuple[int, int]] = {}
    for pp_rank, (params, peak) in per_process:
        old = stages.get(pp_rank, (0, 0))
        stages[pp_rank] = (max(old[0], params), max(old[1], peak))
    return [stages[r] for r in sorted(stages)]


def exposed_seconds(schedules: list[list[Action]], costs: TracedCosts) -> list[float]:
    """Per rank, the simulator's time its compute actions wait on all-to-alls: each action's duration
    less what it takes on free links."""
    free = replace(costs, stages=StageCosts({key: replace(c, comm_f=0.0, comm_b=0.0, hops_f=None, hops_b=None)
                                             for key, c in costs.stages.chunks.items()}, costs.latency))
    return [sum(max(0.0, costs.duration(a, rank) - free.duration(a, rank)) for a in actions if not a.is_comm)
            for rank, actions in enumerate(schedules)]


def stage_costs(layout: Layout, per_stage: dict[int, dict[str, float]], latency: float) -> StageCosts:
    """Each chunk of the layout costs what its stage measured alone (DualPipe's two directions are cut
    alike)."""
    chunks = {}
    for path in layout.paths:
        for stage, (rank, chunk) in enumerate(path):
            c = per_stage[stage]
            chunks[rank, chunk] = SimCosts(f=c["f"], b=c.get("b", 0.0), w=c.get("w", 0.0), bi=c.get("bi"),
                                           fb=c.get("fb"), comm_f=c.get("comm_f", 0.0), comm_b=c.get("comm_b", 0.0),
                                           hops_f=c.get("hops_f"), hops_b=c.get("hops_b"),
                                           forward_first=c.get("forward_first", False))
    return StageCosts(chunks, latency)


def _slowest(values: list):
    """Of an EP group's measurements of one cost, the largest; of hop-level chunks (pipeline/hops.py),
    piece by piece the longest compute and hop, the mean lead and lag (each rank's wait on its link
    is its hop less its own; sim* takes the mean of the ranks' compute too) and the earliest drain."""
    if not isinstance(values[0], Pieces):
        return max(values)

    def each(name: str, reduce) -> tuple:
        return tuple(map(reduce, zip(*(getattr(pieces, name) for pieces in values))))
    return Pieces(each("compute", max), each("hops", max), each("lead", statistics.fmean),
                  each("lag", statistics.fmean),
                  each("drain", lambda drains: min((d for d in drains if d is not None), default=None)))


def slowest_per_stage(measured: list[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Each stage's costs as the slowest of its ranks measured them (an EP group waits for its slowest)."""
    stages: dict[int, dict[str, list]] = {}
    for per_stage in measured:
        for stage, costs in per_stage.items():
            for key, value in costs.items():
                stages.setdefault(stage, {}).setdefault(key, []).append(value)
    return {stage: {key: _slowest(values) for key, values in costs.items()} for stage, costs in stages.items()}


def step_compute_per_rank(samples: list[tuple[int, list[Sample]]]) -> dict[int, dict[str, float]] | None:
    """Per pipeline rank, each action's compute in the steps, by its label: the median over rounds, the
    mean of the ranks at that pipeline position. None where the steps were not traced (torch's rows). The mean, not the slowest: each rank's compute
    holds its waits for a late EP peer (link_wait), so the EP ranks of a stage agree, and the largest
    of noisy figures would overstate them."""
    if not all(s.compute for _, rounds in samples for s in rounds):
        return None
    by_stage: dict[int, list[dict[str, float]]] = {}
    for pp_rank, rounds in samples:
        by_stage.setdefault(pp_rank, []).append(
            {label: statistics.median(s.compute[label] for s in rounds) for label in rounds[0].compute})
    return {pp_rank: {key: statistics.fmean(m[key] for m in ranks) for key in ranks[0]}
            for pp_rank, ranks in by_stage.items()}


_COMPUTE_OF = {Kind.F: "f", Kind.B: "b", Kind.BI: "bi", Kind.W: "w", Kind.FB: "fb"}


@dataclass(frozen=True)
class TracedCosts:
    """sim*'s costs: each action's compute as the steps traced it (`compute[pp rank][label]`), with its
    stage chunk's hops and links (`stages`). Per action, not per kind: on a CPU shared by more ranks
    than cores a rank computes faster while others wait (warm-up, cool-down, bubbles) than in the
    steady state, and a cost per kind would move that time between the phases of the schedule."""
    stages: StageCosts
    compute: dict[int, dict[str, float]]

    @property
    def latency(self) -> float:
        return self.stages.latency

    def duration(self, action: Action, rank: int) -> float:
        traced = self.compute[rank][str(action)]
        own = replace(self.stages.chunks[rank, action.chunk], **{_COMPUTE_OF[action.kind]: traced})
        if action.kind == Kind.FB:
            return paired(own, self.stages.chunks[rank, action.b_chunk])
        return own.duration(action)


@dataclass(frozen=True)
class Row:
    variant: Variant
    makespans: list[float]  # seconds, per round
    makespan: float  # seconds, median over rounds
    busy: list[float]  # compute seconds per pipeline rank, median over rounds
    bubble: list[float]  # seconds per pipeline rank, median over rounds
    inter_bytes: float  # inter-node bytes of a step, all ranks, median over rounds
    predicted_makespan: float
    predicted_bubble: list[float]
    predicted_from_steps: float | None  # the makespan simulated from the compute the steps took
    compute_in_steps: dict[int, dict[str, float]] | None  # per pipeline rank, per action kind: seconds
    exposed: list[float]  # seconds per pipeline rank blocked on all-to-alls, median over rounds
    exposed_on_links: list[float]  # the part of it on the links (the rest waits for EP peers)
    predicted_exposed: list[float] | None  # sim*'s
    predicted_bubble_from_steps: list[float] | None  # sim*'s
    memory: Memory | None
    from_steps_per_round: list[float] | None  # sorted: each round's sim* (from its own compute) / its step


def summarize(variant: Variant, per_rank: list[list[Sample]], schedules: list[list[Action]],
              costs: StageCosts, costs_in_steps: TracedCosts | None,
              compute_in_steps: dict[int, dict[str, float]] | None, memory: Memory | None = None,
              costs_each_round: list[TracedCosts] | None = None) -> Row:
    """`per_rank[p]`: the samples of pipeline rank p (of the first pipeline); `schedules` and the
    costs: what the simulator predicts from (`costs_each_round`: sim*'s from each round's compute alone,
    against that round's step)."""
    rounds = range(len(per_rank[0]))
    makespans = [per_rank[0][i].makespan for i in rounds]
    busy = [statistics.median(samples[i].busy for i in rounds) for samples in per_rank]
    bubbles = [statistics.median(samples[i].makespan - samples[i].busy for i in rounds) for samples in per_rank]
    # Neither runtime waits for its sends to be received before computing on.
    predicted = simulate(schedules, costs, rendezvous=False)
    from_steps = None if costs_in_steps is None else simulate(schedules, costs_in_steps, rendezvous=False)
    exposed = [statistics.median(samples[i].exposed for i in rounds) for samples in per_rank]
    on_links = [statistics.median(samples[i].exposed_on_links for i in rounds) for samples in per_rank]
    per_round = costs_each_round and sorted(simulate(schedules, c, rendezvous=False).makespan / m
                                            for c, m in zip(costs_each_round, makespans))
    return Row(variant, makespans, statistics.median(makespans), busy, bubbles,
               statistics.median(per_rank[0][i].inter_bytes for i in rounds), predicted.makespan, predicted.bubble,
               from_steps and from_steps.makespan, compute_in_steps, exposed, on_links,
               from_steps and exposed_seconds(schedules, costs_in_steps), from_steps and from_steps.bubble, memory,
               per_round)


def describe(bench: Bench) -> str:
    m = bench.model
    layers = f"{m.num_layers} layers, hidden {m.hidden_size}, FFN {m.ffn_hidden_size}, {m.num_attention_heads} heads"
    if not m.num_experts:
        return f"dense GPT: {layers}, vocab {m.vocab_size}"
    nodes = bench.nodes_per_ep_group
    return (f"MoE GPT: {layers}, vocab {m.vocab_size}; layers from {m.moe_first_k_dense} on: {m.num_experts} "
            f"experts (FFN {m.moe_ffn_hidden_size}, top-{m.moe_router_topk}), shared expert FFN "
            f"{m.moe_shared_expert_intermediate_size}; EP={bench.ep} over {nodes} node{'s' * (nodes > 1)}")


def format_report(bench: Bench, rows: list[Row], costs: dict[tuple, dict[int, dict[str, float]]], latency: float,
                  load: tuple[float, float]) -> str:
    m = bench.model
    ms = 1e3
    lines = [
        (f"PP={bench.pp}, {bench.microbatches} micro-batches of {bench.micro_batch_size} x {m.seq_length} "
         f"tokens ({bench.tokens_per_step} tokens/step), {describe(bench)}; "
         f"1 thread per rank, gloo; median of {bench.rounds} rounds after {bench.warmup} warm-up"),
        (f"p2p latency (one activation message, pipeline ranks 0-1): {latency * ms:.2f} ms; machine load average "
         f"(1 min) {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} cores"),
    ]
    if bench.links is not None:
        placement = ("one node per EP rank (pipeline messages within a node)" if bench.ep_nodes
                     else f"{bench.grid.node_size} rank(s) per node")
        lines.append(f"emulated links: {bench.links}, {placement}")
    for (shape, dispatcher), per_stage in costs.items():
        stages = [per_stage[i] for i in sorted(per_stage)]
        keys = [key for key in ("f", "b", "bi", "w", "comm_f", "comm_b") if key in stages[0]]
        name = shape if dispatcher == "alltoall" else f"{shape} {dispatcher}"
        lines.append(f"chunk costs, {name} stages 0-{len(stages) - 1} (ms): " + " | ".join(
            f"{key.upper()} " + " ".join(f"{c[key] * ms:.1f}" for c in stages) for key in keys))
    if bench.links is not None:
        lines.append(calibration(bench.links, next(iter(costs.values())), rows))

    def per_rank(values: list[float]) -> str:
        return " ".join(f"{v * ms:6.0f}" for v in values)

    header = (f"{'schedule':<30}{'tokens/s':>9}{'step ms':>9}{'sim':>6}{'sim*':>6}{'inter MB':>9} | "
              "busy ms per rank | bubble ms per rank: measured / sim")
    lines += ["", header, "-" * len(header)]
    for row in rows:
        from_steps = "-" if row.predicted_from_steps is None else f"{row.predicted_from_steps * ms:.0f}"
        lines.append(f"{row.variant.label:<30}{bench.tokens_per_step / row.makespan:>9.0f}"
                     f"{row.makespan * ms:>9.0f}{row.predicted_makespan * ms:>6.0f}{from_steps:>6}"
                     f"{row.inter_bytes / 1e6:>9.1f} | "
                     f"{per_rank(row.busy)} | {per_rank(row.bubble)} / {per_rank(row.predicted_bubble)}")
    lines.append("sim: from the chunk costs measured alone; sim*: from the compute each action took in the steps "
                 "(waits on the emulated links taken out; scripts/pipeline_costs.py), per rank (ms):")
    for row in rows:
        if row.compute_in_steps:
            ranks = [row.compute_in_steps[r] for r in sorted(row.compute_in_steps)]
            lines.append(f"  {row.variant.label:<30}" + " | ".join(
                f"{kind.upper()} " + " ".join(f"{c.get(kind, 0.0) * ms:.1f}" for c in ranks)
                for kind in ("f", "b", "bi", "w", "fb") if kind in ranks[0]))
    lines.append("")
    lines += ratio_lines({row.variant.label: row for row in rows})
    lines += comparison_table(rows)
    return "\n".join(lines)


def quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return f"{statistics.median(values):.3f} ({q[0]:.2f}-{q[2]:.2f})"


def comparison_table(rows: list[Row], baseline: str = "ours DualPipe") -> list[str]:
    """The rows as a markdown table next to the simulator (sim*) and the planner: step time, also per
    round as a ratio to `baseline`'s; exposed all-to-all waits, bubbles, memory per pipeline rank."""
    base = next((row for row in rows if row.variant.label == baseline), None)
    if base is None or any(row.predicted_from_steps is None for row in rows):
        return []

    def ms(values) -> str:
        return " ".join(f"{v * 1e3:.0f}" for v in values)

    def mb(values) -> str:
        return " ".join(f"{v / 2 ** 20:.2f}" for v in values)

    lines = ["", ("ms and MB per pipeline rank; exposed: time blocked on all-to-alls inside actions (in brackets: of it, "
                  "on the links; the rest waits for the EP peer, in sim*'s compute); "
                  "step / DualPipe: per-round median (quartiles)"),
             ("| schedule | step ms | step / DualPipe | sim | sim\\* | sim\\* / step, per round | exposed: measured / sim\\* | "
             "bubble: measured / sim\\* | peak activations MB: measured / planned | parameters MB: measured / planned |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        per_round = sorted(r / b for r, b in zip(row.makespans, base.makespans))
        memory = row.memory
        acts = params = "-"
        if memory is not None:
            acts = f"{mb(p for _, p in memory.measured)} / {mb(p for _, p in memory.planned)}"
            params = f"{mb(p for p, _ in memory.measured)} / {mb(p for p, _ in memory.planned)}"
        lines.append(f"| {row.variant.label.removeprefix('ours ')} | {row.makespan * 1e3:.0f} | "
                     f"{quartiles(per_round)} | "
                     f"{row.predicted_makespan * 1e3:.0f} | {row.predicted_from_steps * 1e3:.0f} | "
                     f"{quartiles(row.from_steps_per_round)} | {ms(row.exposed)} ({ms(row.exposed_on_links)}) / "
                     f"{ms(row.predicted_exposed)} | "
                     f"{ms(row.bubble)} / {ms(row.predicted_bubble_from_steps)} | {acts} | {params} |")
    return lines


def calibration(links: LinkModel, per_stage: dict[int, dict], rows: list[Row]) -> str:
    """One MoE layer's dispatch hop on the links against its routed experts' compute (the piece
    between dispatch and combine), medians over the stages' layers measured alone, and the
    inter-node bandwidth at which the two would match (the hop's bytes over the experts' time);
    then the same with the compute as slow as 1F1B's forwards ran in the steps (ranks sharing cores)."""
    hops = [c["hops_f"] for c in per_stage.values() if c.get("hops_f") and c["hops_f"].hops]
    dispatch = statistics.median(h for p in hops for h in p.hops[0::2])
    experts = statistics.median(e for p in hops for e in p.compute[1:-1:2])
    matched = links.inter.bandwidth * dispatch / experts
    line = (f"one micro-batch, one MoE layer (alone): dispatch {dispatch * 1e3:.1f} ms on the links, routed experts "
            f"{experts * 1e3:.1f} ms; they match at inter = {matched / 1e6:.1f} MB/s")
    plain = next((row for row in rows if row.variant.label == "ours 1F1B" and row.compute_in_steps), None)
    if plain is not None:
        slower = statistics.median(plain.compute_in_steps[r]["f"] / per_stage[r]["f"] for r in plain.compute_in_steps)
        line += (f"; in the steps 1F1B's forwards took {slower:.2f}x their time alone, so there the dispatch is "
                 f"{dispatch / (experts * slower):.2f}x the experts, matched at {matched / slower / 1e6:.1f} MB/s")
    return line


def ratio_lines(by_label: dict[str, Row]) -> list[str]:
    lines = []
    for ours, theirs in RATIOS:
        if ours in by_label and theirs in by_label:
            ratio = by_label[theirs].makespan / by_label[ours].makespan
            # Rounds step both back to back, so a round's ratio cancels slow swings of machine speed.
            paired = sorted(t / o for o, t in zip(by_label[ours].makespans, by_label[theirs].makespans))
            quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
            lines.append(f"tokens/s ratio {ours} / {theirs}: {ratio:.3f} (medians); per round: median "
                         f"{statistics.median(paired):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
                         f"{sum(r >= 1 for r in paired)} of {len(paired)} rounds >= 1")
            if by_label[ours].variant.dispatcher != by_label[theirs].variant.dispatcher:
                lines.append(f"inter-node bytes ratio {ours} / {theirs}: "
                             f"{by_label[ours].inter_bytes / by_label[theirs].inter_bytes:.3f}")
    return lines


@dataclass(frozen=True)
class Run:
    """What a run measured, as --save keeps it for --report-from."""
    bench: Bench
    variants: tuple[Variant, ...]
    latency: float
    gathered: list  # per process: (pp rank, dp rank, chunk costs alone, samples per variant, memory per variant)
    load: tuple[float, float]


def report(run: Run) -> str:
    """The report of a run: the rows of each variant next to the simulator and the planner."""
    bench, latency, gathered = run.bench, run.latency, run.gathered
    costs = {key: slowest_per_stage([process[2][key] for process in gathered]) for key in gathered[0][2]}
    first_pipeline = sorted(((pp_rank, samples) for pp_rank, dp_rank, _, samples, _ in gathered if dp_rank == 0),
                            key=lambda item: item[0])
    rows = []
    for i, v in enumerate(run.variants):
        layout, alone = v.layout(bench), costs[v.shape, v.dispatcher]
        per_pipeline_rank = [(pp_rank, samples[i]) for pp_rank, _, _, samples, _ in gathered]
        traced = step_compute_per_rank(per_pipeline_rank)
        in_steps = traced and {pp_rank: step_compute(per_action) for pp_rank, per_action in traced.items()}
        memory = None
        if gathered[0][4][i] is not None:
            memory = Memory(stage_memory([(pp_rank, mem[i]) for pp_rank, _, _, _, mem in gathered]),
                            pipeline_memory.planned(bench, v))
        chunks = stage_costs(layout, alone, latency)
        rounds = range(len(first_pipeline[0][1][i]))
        each_round = traced and [TracedCosts(chunks, step_compute_per_rank(
            [(pp_rank, [samples[r]]) for pp_rank, samples in per_pipeline_rank])) for r in rounds]
        rows.append(summarize(v, [samples[i] for _, samples in first_pipeline], v.actions(bench), chunks,
                              traced and TracedCosts(chunks, traced), in_steps, memory, each_round))
    return format_report(bench, rows, costs, latency, run.load)
