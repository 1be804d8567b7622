"""Pipeline schedules on CPU: ours (1F1B, DualPipe, DualPipeV) against torch.distributed.pipelining.

    python scripts/bench_pipeline.py                  # PP=2, the figures in docs/benchmarks.md
    python scripts/bench_pipeline.py --pp 4           # 4 processes: oversubscribes a 2-core machine

One process per pipeline rank, one thread each, gloo on 127.0.0.1. Every schedule
runs the same dense GPT (megadual.model.gpt chunks cut by global layer index) on
the same batch. All schedules are built up front and then stepped in turn, round
after round (in reverse order every other round), so a change in the machine's load
hits them alike; each figure is the median over the timed rounds, and each ratio is
also given per round, between the two steps of that round.

Per schedule it prints tokens/s, each rank's busy time (forward, backward and W calls,
timed around each) and bubble: the step's makespan (after a barrier, until the last
rank is done) minus that rank's busy time. Next to them, what the simulator
(megadual.pipeline.simulate) predicts for the same schedule shape from the F, B, BI
and W costs of each stage chunk (measured on each chunk directly, all ranks at once
before the steps) and the p2p latency measured between ranks 0 and 1. The machine's load average is printed too: on a shared machine other
work inflates every figure.

torch's stages are the same GPTChunk modules with the same weights. They have no
weight-gradient store attached, so their linears are plain F.linear, which torch's
split of B into input and weight halves (by walking the autograd graph) needs: it
cannot split a custom autograd Function such as the one our W split uses.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadual.config import ModelConfig
from megadual.model.gpt import StageLoss, StageSpec, build_chunk
from megadual.parallel.wgrad import WeightGradStore
from megadual.pipeline.actions import Layout
from megadual.pipeline.runtime import PipelineRuntime
from megadual.pipeline.schedules import build_schedule, pipeline_layout
from megadual.pipeline.simulate import SimCosts, StageCosts, simulate
from megadual.pipeline.stage_model import build_stage_model, stage_specs
from megadual.training.distributed import free_port

SEED = 1234


@dataclass(frozen=True)
class Bench:
    model: ModelConfig
    pp: int
    microbatches: int
    micro_batch_size: int
    warmup: int
    rounds: int
    cost_reps: int

    @property
    def tokens_per_step(self) -> int:
        return self.microbatches * self.micro_batch_size * self.model.seq_length


@dataclass(frozen=True)
class Variant:
    """One row of the table: a schedule run by one implementation."""

    label: str
    impl: str  # "ours" or "torch"
    shape: str  # our schedule of the same shape: what the simulator predicts from
    split_backward: bool  # whether the shape has W actions
    recv_lookahead: int | None = None  # ours only: PipelineRuntime's (None: the backend's default)


VARIANTS = (
    Variant("ours 1F1B", "ours", "1f1b", False),
    Variant("torch Schedule1F1B", "torch", "1f1b", False),
    Variant("ours 1F1B + W split (ZB-H1)", "ours", "1f1b", True),
    Variant("ours DualPipe", "ours", "dualpipe", True),
    Variant("ours DualPipeV", "ours", "dualpipev", True),
    Variant("ours DualPipeV, recv in place", "ours", "dualpipev", True, recv_lookahead=0),
    Variant("torch ScheduleDualPipeV", "torch", "dualpipev", True),
)
RATIOS = (("ours 1F1B", "torch Schedule1F1B"), ("ours DualPipeV", "torch ScheduleDualPipeV"),
          ("ours DualPipeV", "ours DualPipeV, recv in place"))


def shape_specs(shape: str, num_layers: int, pp: int) -> list[StageSpec]:
    """The distinct stage chunks of a schedule shape (DualPipe's two directions cut alike)."""
    return stage_specs(num_layers, 2 * pp if shape == "dualpipev" else pp)


def make_batch(bench: Bench) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and labels, [micro-batches * micro-batch size, seq], the same on every rank."""
    generator = torch.Generator().manual_seed(SEED)
    shape = (bench.microbatches * bench.micro_batch_size, bench.model.seq_length)
    tokens = torch.randint(bench.model.vocab_size, shape, generator=generator)
    return tokens, torch.roll(tokens, -1, dims=1)


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


# ----------------------------------------------------------------------------------------------
# Chunk costs for the simulator, measured on the chunks directly (no pipeline)


def chunk_costs(config: ModelConfig, spec: StageSpec, micro_batch_size: int, reps: int) -> dict[str, float]:
    """Median seconds of forward, full backward, input-only backward (BI) and W of one chunk on one
    micro-batch, with our W split: a WeightGradStore attached to every linear."""
    chunk = build_chunk(config, spec, SEED)
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
    return {key: statistics.median(values[1:]) for key, values in times.items()}


def rank_costs(bench: Bench, shapes: list[str], rank: int) -> dict[str, dict[int, dict[str, float]]]:
    """Per schedule shape, the costs of this rank's share of the shape's stage chunks, by stage
    index. All ranks measure at once, so the costs are those of a machine as loaded as during
    the steps."""
    costs = {}
    for shape in shapes:
        specs = shape_specs(shape, bench.model.num_layers, bench.pp)
        costs[shape] = {index: chunk_costs(bench.model, specs[index], bench.micro_batch_size, bench.cost_reps)
                        for index in range(rank, len(specs), bench.pp)}
    return costs


def stage_costs(layout: Layout, per_stage: dict[int, dict[str, float]], latency: float) -> StageCosts:
    """Each chunk of the layout costs what its stage measured (DualPipe's two directions are cut alike)."""
    chunks = {}
    for path in layout.paths:
        for stage, place in enumerate(path):
            c = per_stage[stage]
            chunks[place] = SimCosts(f=c["f"], b=c["b"], w=c["w"], bi=c["bi"])
    return StageCosts(chunks, latency)


# ----------------------------------------------------------------------------------------------
# torch.distributed.pipelining


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


class OurRunner:
    """Our runtime on our action lists; busy time is the sum of its traced compute actions."""

    def __init__(self, variant: Variant, bench: Bench, rank: int):
        layout = pipeline_layout(variant.shape, bench.pp, bench.microbatches)
        actions = build_schedule(variant.shape, bench.pp, bench.microbatches, variant.split_backward)[rank]
        self.modules = build_stage_model(bench.model, layout, rank, SEED).chunks
        m = bench.model
        self.runtime = PipelineRuntime(actions, layout, self.modules, rank, range(bench.pp),
                                       activation_shape=(m.seq_length, bench.micro_batch_size, m.hidden_size),
                                       trace=True, recv_lookahead=variant.recv_lookahead)
        self.mbs = bench.micro_batch_size

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> float:
        """Runs one step; returns this rank's busy seconds."""
        self.runtime.run([{"tokens": t, "labels": y}
                          for t, y in zip(tokens.split(self.mbs), labels.split(self.mbs))])
        return self.runtime.trace.compute_seconds()


# ----------------------------------------------------------------------------------------------
# The per-rank worker


def p2p_latency(bench: Bench, rank: int, reps: int = 20) -> float:
    """One-way time of one activation message between ranks 0 and 1 (ping-pong / 2)."""
    buffer = torch.zeros(bench.model.seq_length, bench.micro_batch_size, bench.model.hidden_size)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        if rank == 0:
            dist.send(buffer, 1)
            dist.recv(buffer, 1)
        elif rank == 1:
            dist.recv(buffer, 0)
            dist.send(buffer, 0)
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.broadcast(elapsed, 0)
    return elapsed.item() / (2 * reps)


def timed_step(runner: TorchRunner | OurRunner, tokens: torch.Tensor,
               labels: torch.Tensor) -> tuple[float, float]:
    """(makespan over all ranks, this rank's busy seconds) of one step; gradients zeroed first."""
    for module in runner.modules:
        module.zero_grad(set_to_none=True)
    dist.barrier()
    start = time.perf_counter()
    busy = runner.step(tokens, labels)
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item(), busy


def worker(rank: int, bench: Bench, variants: tuple[Variant, ...], port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=bench.pp)
    try:
        tokens, labels = make_batch(bench)
        costs = rank_costs(bench, list(dict.fromkeys(v.shape for v in variants)), rank)
        runners = [(OurRunner if v.impl == "ours" else TorchRunner)(v, bench, rank) for v in variants]
        latency = p2p_latency(bench, rank)
        for runner in runners:
            for _ in range(bench.warmup):
                timed_step(runner, tokens, labels)
        samples: list[list[tuple[float, float]]] = [[] for _ in variants]
        for round_ in range(bench.rounds):
            order = list(zip(runners, samples))
            for runner, out in order if round_ % 2 == 0 else reversed(order):
                out.append(timed_step(runner, tokens, labels))
        gathered = [None] * bench.pp
        dist.all_gather_object(gathered, (costs, samples))
        if rank == 0:
            queue.put((latency, gathered))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Row:
    variant: Variant
    makespans: list[float]  # seconds, per round
    makespan: float  # seconds, median over rounds
    busy: list[float]  # compute seconds per rank, median over rounds
    bubble: list[float]  # seconds per rank, median over rounds
    predicted_makespan: float
    predicted_bubble: list[float]


def summarize(variant: Variant, per_rank: list[list[tuple[float, float]]],
              per_stage: dict[int, dict[str, float]], latency: float, pp: int, microbatches: int) -> Row:
    rounds = range(len(per_rank[0]))
    makespans = [per_rank[0][i][0] for i in rounds]
    busy = [statistics.median(per_rank[r][i][1] for i in rounds) for r in range(pp)]
    bubbles = [statistics.median(per_rank[r][i][0] - per_rank[r][i][1] for i in rounds) for r in range(pp)]
    schedules = build_schedule(variant.shape, pp, microbatches, variant.split_backward)
    costs = stage_costs(pipeline_layout(variant.shape, pp, microbatches), per_stage, latency)
    # Neither runtime waits for its sends to be received before computing on.
    predicted = simulate(schedules, costs, rendezvous=False)
    return Row(variant, makespans, statistics.median(makespans), busy, bubbles, predicted.makespan,
               predicted.bubble)


def format_report(bench: Bench, rows: list[Row], costs: dict[str, dict[int, dict[str, float]]], latency: float,
                  load: tuple[float, float]) -> str:
    m = bench.model
    ms = 1e3
    lines = [
        (f"PP={bench.pp}, {bench.microbatches} micro-batches of {bench.micro_batch_size} x {m.seq_length} "
         f"tokens ({bench.tokens_per_step} tokens/step), dense GPT: {m.num_layers} layers, hidden "
         f"{m.hidden_size}, FFN {m.ffn_hidden_size}, {m.num_attention_heads} heads, vocab {m.vocab_size}; "
         f"1 thread per rank, gloo; median of {bench.rounds} rounds after {bench.warmup} warm-up"),
        (f"p2p latency (one activation message, ranks 0-1): {latency * ms:.2f} ms; machine load average "
         f"(1 min) {load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} cores"),
    ]
    for shape, per_stage in costs.items():
        stages = [per_stage[i] for i in sorted(per_stage)]
        lines.append(f"chunk costs, {shape} stages 0-{len(stages) - 1} (ms): " + " | ".join(
            f"{key.upper()} " + " ".join(f"{c[key] * ms:.1f}" for c in stages) for key in ("f", "b", "bi", "w")))

    def per_rank(values: list[float]) -> str:
        return " ".join(f"{v * ms:6.0f}" for v in values)

    header = (f"{'schedule':<30}{'tokens/s':>9}{'step ms':>9}{'sim':>6} | busy ms per rank | "
              "bubble ms per rank: measured / sim")
    lines += ["", header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row.variant.label:<30}{bench.tokens_per_step / row.makespan:>9.0f}"
                     f"{row.makespan * ms:>9.0f}{row.predicted_makespan * ms:>6.0f} | {per_rank(row.busy)} | "
                     f"{per_rank(row.bubble)} / {per_rank(row.predicted_bubble)}")
    by_label = {row.variant.label: row for row in rows}
    lines.append("")
    for ours, theirs in RATIOS:
        if ours in by_label and theirs in by_label:
            ratio = by_label[theirs].makespan / by_label[ours].makespan
            # Rounds step both back to back, so a round's ratio cancels slow swings of machine speed.
            paired = sorted(t / o for o, t in zip(by_label[ours].makespans, by_label[theirs].makespans))
            quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
            lines.append(f"tokens/s ratio {ours} / {theirs}: {ratio:.3f} (medians); per round: median "
                         f"{statistics.median(paired):.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
                         f"{sum(r >= 1 for r in paired)} of {len(paired)} rounds >= 1")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2, help="pipeline ranks (processes)")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--ffn-hidden-size", type=int, default=688)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--num-microbatches", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per schedule")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per schedule, interleaved")
    parser.add_argument("--cost-reps", type=int, default=5, help="repetitions per measured chunk cost")
    parser.add_argument("--schedules", nargs="+", default=[v.label for v in VARIANTS],
                        choices=[v.label for v in VARIANTS], metavar="LABEL",
                        help=f"rows to run, from: {'; '.join(v.label for v in VARIANTS)}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
                        num_query_groups=args.num_attention_heads, seq_length=args.seq_length,
                        vocab_size=args.vocab_size)
    bench = Bench(model, args.pp, args.num_microbatches, args.micro_batch_size, args.warmup, args.rounds,
                  args.cost_reps)
    variants = tuple(v for v in VARIANTS if v.label in args.schedules)
    for v in variants:
        build_schedule(v.shape, bench.pp, bench.microbatches, v.split_backward)  # validates the sizes
        shape_specs(v.shape, model.num_layers, bench.pp)

    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(bench, variants, free_port(), queue), nprocs=bench.pp,
                       start_method="spawn")
    latency, gathered = queue.get()
    costs = {shape: {stage: c for measured, _ in gathered for stage, c in measured[shape].items()}
             for shape in gathered[0][0]}
    rows = [summarize(v, [samples[i] for _, samples in gathered], costs[v.shape], latency, bench.pp,
                      bench.microbatches)
            for i, v in enumerate(variants)]
    print(format_report(bench, rows, costs, latency, (load_before, os.getloadavg()[0])))


if __name__ == "__main__":
    main()
