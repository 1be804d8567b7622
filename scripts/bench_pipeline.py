"""Pipeline schedules on CPU: ours (1F1B, interleaved, DualPipe(V)) against torch.distributed.pipelining.

    python scripts/bench_pipeline.py                  # PP=2, the figures in docs/benchmarks.md

One process per pipeline rank, one thread each, gloo on 127.0.0.1. Every schedule runs the
same GPT on the same batch, all stepped in turn round after round (reversed every other
round), so load changes hit them alike; figures are medians over the rounds, ratios also per round.

Per schedule it prints tokens/s, each rank's busy time (forward, backward and W calls)
and bubble (the step's makespan minus that busy time), next to what the simulator
(megadual.pipeline.simulate) predicts from the p2p latency and the costs of each stage
chunk, taken two ways (scripts/pipeline_costs.py): "sim" from each chunk measured alone, "sim*"
from our actions' compute in the steps (they differ where more ranks than cores compute at
once). The load average is printed too: other work inflates every figure.

torch's stages: the same GPTChunks and weights without our W store (torch's B split cannot split it).

With experts (`--num-experts`) and expert parallelism (`--ep`, PP x EP processes, EP folded
into data parallelism), `--emulate-links` runs every step on an emulated network
(megadual/parallel/emulate.py; `--ranks-per-node` ranks per emulated node): the expert
all-to-alls and the pipeline's messages finish no earlier than the links allow. The rows
then are ours only: "no overlap" runs each paired F&B as its F then its B, "hierarchical"
uses that dispatcher, ", overlap" --overlap-moe-expert-parallel-comm, interleaved has V = 2; each
row gives a step's inter-node bytes; the simulator adds the links' time.

    python scripts/bench_pipeline.py --ep 2 --ranks-per-node 1 --num-experts 8 \\
        --emulate-links "inter=...;intra=..."          # DualPipe vs 1F1B vs no overlap, 4 processes

`--ep-across-nodes`: one emulated node per EP rank (all-to-alls cross nodes, pipeline messages do
not). With DualPipe among the rows a markdown table follows (ratios to it per round, sim* per round,
all-to-all waits, bubbles, memory per rank measured and planned: scripts/pipeline_memory.py).
`--save FILE` keeps the measurements; `--report-from FILE` prints the report again.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline_memory
from pipeline_costs import (
    INTERLEAVED_V,
    SEED,
    action_compute,
    link_wait,
    rank_costs,
    shape_specs,
)
from pipeline_report import Run, Sample, report
from pipeline_torch import TorchRunner

from megadual.config import ModelConfig
from megadual.parallel.context import BuildContext
from megadual.parallel.emulate import LinkModel, Record, emulated_links
from megadual.parallel.topology import Layout as Grid
from megadual.parallel.topology import Topology
from megadual.pipeline.actions import Action, Kind, Layout
from megadual.pipeline.runtime import PipelineRuntime
from megadual.pipeline.schedules import build_schedule, pipeline_layout
from megadual.pipeline.stage_model import build_stage_model
from megadual.training.distributed import free_port


@dataclass(frozen=True)
class Bench:
    model: ModelConfig
    pp: int
    microbatches: int
    micro_batch_size: int
    warmup: int
    rounds: int
    cost_reps: int
    ep: int = 1
    ranks_per_node: int = 0  # 0: one node
    links: LinkModel | None = None  # None: no emulation
    ep_nodes: bool = False  # one emulated node per EP rank: all-to-alls cross nodes, pipeline messages do not

    @property
    def world(self) -> int:
        return self.pp * self.ep

    @property
    def grid(self) -> Grid:
        return Grid(self.world, pp=self.pp, ep=self.ep, ranks_per_node=self.ranks_per_node)

    @property
    def nodes_per_ep_group(self) -> int:
        return self.ep if self.ep_nodes else self.grid.nodes_per_ep_group

    def node_of(self, rank: int) -> int:
        return self.grid.coords(rank)[1] % self.ep if self.ep_nodes else rank // self.grid.node_size

    def emulate(self, links: LinkModel):
        """emulated_links with this benchmark's ranks on their nodes."""
        return emulated_links(links, self.grid.node_size, node_of=self.node_of)

    @property
    def tokens_per_step(self) -> int:
        return self.microbatches * self.micro_batch_size * self.model.seq_length * self.ep


@dataclass(frozen=True)
class Variant:
    """One row of the table: a schedule run by one implementation."""

    label: str
    impl: str  # "ours" or "torch"
    shape: str  # our schedule of the same shape: what the simulator predicts from
    split_backward: bool  # whether the shape has W actions
    recv_lookahead: int | None = None  # ours only: PipelineRuntime's (None: the backend's default)
    pairs_overlap: bool = True  # False: each F&B runs as its F, then its B
    dispatcher: str = "alltoall"  # --moe-token-dispatcher-type
    overlap: bool = False  # --overlap-moe-expert-parallel-comm (1F1B, interleaved)

    def actions(self, bench: Bench) -> list[list[Action]]:
        lists = build_schedule(self.shape, bench.pp, bench.microbatches, self.split_backward, self.v, self.overlap)
        return lists if self.pairs_overlap else [without_pairs(actions) for actions in lists]

    def layout(self, bench: Bench) -> Layout:
        return pipeline_layout(self.shape, bench.pp, bench.microbatches, self.v)

    v = property(lambda self: INTERLEAVED_V if self.shape == "interleaved" else 1)  # virtual stages per rank


VARIANTS = (
    Variant("ours 1F1B", "ours", "1f1b", False),
    Variant("torch Schedule1F1B", "torch", "1f1b", False),
    Variant("ours 1F1B + W split (ZB-H1)", "ours", "1f1b", True),
    Variant("ours 1F1B, overlap", "ours", "1f1b", True, overlap=True),
    Variant("ours interleaved 1F1B", "ours", "interleaved", True),
    Variant("ours interleaved, overlap", "ours", "interleaved", True, overlap=True),
    Variant("ours DualPipe", "ours", "dualpipe", True),
    Variant("ours DualPipe, no overlap", "ours", "dualpipe", True, pairs_overlap=False),
    Variant("ours DualPipe, hierarchical", "ours", "dualpipe", True, dispatcher="hierarchical"),
    Variant("ours DualPipeV", "ours", "dualpipev", True),
    Variant("ours DualPipeV, recv in place", "ours", "dualpipev", True, recv_lookahead=0),
    Variant("torch ScheduleDualPipeV", "torch", "dualpipev", True),
)


def runs_here(variant: Variant, bench: Bench) -> bool:
    """torch's rows run without expert parallelism only, the overlap flag's with it; the hierarchical
    row where it differs from the flat one (an EP group over several nodes of several ranks)."""
    if variant.impl == "torch":
        return bench.ep == 1
    if variant.overlap:  # pairs hide expert all-to-alls: none without EP
        return bench.ep > 1
    if variant.dispatcher == "hierarchical":
        per_node = bench.ep // bench.nodes_per_ep_group
        return bench.nodes_per_ep_group > 1 and per_node > 1
    return True


def build_context(bench: Bench, topo: Topology, dispatcher: str) -> BuildContext:
    return BuildContext(ep_group=topo.group("ep"), num_nodes=bench.nodes_per_ep_group,
                        ep_node_groups=topo.ep_node_groups() if dispatcher == "hierarchical" else None)


def without_pairs(actions: list[Action]) -> list[Action]:
    """Each paired F&B as its forward, then its (full) backward."""
    return [part for a in actions
            for part in ((Action(Kind.F, a.chunk, a.mb), Action(Kind.B, a.b_chunk, a.b_mb))
                         if a.kind == Kind.FB else (a,))]


def make_batch(bench: Bench, dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and labels, [micro-batches * micro-batch size, seq], the same on every rank of a pipeline."""
    generator = torch.Generator().manual_seed(SEED + dp_rank)
    shape = (bench.microbatches * bench.micro_batch_size, bench.model.seq_length)
    tokens = torch.randint(bench.model.vocab_size, shape, generator=generator)
    return tokens, torch.roll(tokens, -1, dims=1)


class OurRunner:
    """Our runtime on our action lists; busy time is the sum of its traced compute actions."""

    def __init__(self, variant: Variant, bench: Bench, topo: Topology):
        layout = variant.layout(bench)
        actions = variant.actions(bench)[topo.pp_rank]
        ctx = build_context(bench, topo, variant.dispatcher)
        self.modules = build_stage_model(bench.model, layout, topo.pp_rank, SEED, ctx).chunks
        m = bench.model
        self.runtime = PipelineRuntime(actions, layout, self.modules, topo.pp_rank, topo.members["pp"],
                                       topo.group("pp"),
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


def p2p_latency(bench: Bench, topo: Topology, reps: int = 20) -> float:
    """One-way time of one activation message between pipeline ranks 0 and 1 (ping-pong / 2), plus
    its modelled time on the emulated link between their nodes."""
    buffer = torch.zeros(bench.model.seq_length, bench.micro_batch_size, bench.model.hidden_size)
    first, second = topo.members["pp"][:2]
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        if topo.rank == first:
            dist.send(buffer, second)
            dist.recv(buffer, second)
        elif topo.rank == second:
            dist.recv(buffer, first)
            dist.send(buffer, first)
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.broadcast(elapsed, 0)
    latency = elapsed.item() / (2 * reps)
    if bench.links is not None:
        num_bytes = buffer.numel() * buffer.element_size()
        inter = bench.node_of(first) != bench.node_of(second)
        latency += bench.links.free_seconds(Record("send", num_bytes if inter else 0, 0 if inter else num_bytes, 0))
    return latency


def timed_step(runner: TorchRunner | OurRunner, tokens: torch.Tensor, labels: torch.Tensor,
               bench: Bench) -> Sample:
    """One step, on the emulated links if any; gradients zeroed first."""
    for module in runner.modules:
        module.zero_grad(set_to_none=True)
    links = bench.emulate(bench.links) if bench.links else nullcontext()
    dist.barrier()
    start = time.perf_counter()
    with links as emulator:
        busy = runner.step(tokens, labels)
    elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    records = emulator.records if emulator else []
    sent = torch.tensor(float(sum(r.bytes_inter for r in records)))
    dist.all_reduce(sent)
    ours = isinstance(runner, OurRunner)
    compute = action_compute(runner.runtime.trace.events, records) if ours else {}
    all_to_alls = [r for r in records if r.what == "all_to_all"]
    exposed = sum(r.blocked for r in all_to_alls)
    return Sample(elapsed.item(), busy, sent.item(), compute, exposed, sum(map(link_wait, all_to_alls)))


def step_memory(runner: TorchRunner | OurRunner, tokens: torch.Tensor, labels: torch.Tensor,
                bench: Bench) -> tuple[int, int] | None:
    """Our rows: (parameter bytes, peak activation bytes) of one untimed step, as the memory report counts them."""
    if not isinstance(runner, OurRunner):
        return None
    for module in runner.modules:
        module.zero_grad(set_to_none=True)
    return pipeline_memory.measured(runner.modules, lambda: runner.step(tokens, labels))


def worker(rank: int, bench: Bench, variants: tuple[Variant, ...], port: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=bench.world)
    try:
        topo = Topology(bench.grid, rank)
        tokens, labels = make_batch(bench, topo.dp_rank)
        shapes = list(dict.fromkeys((v.shape, v.dispatcher) for v in variants))
        costs = rank_costs(bench, shapes, topo.pp_rank, lambda dispatcher: build_context(bench, topo, dispatcher))
        runners = [OurRunner(v, bench, topo) if v.impl == "ours" else TorchRunner(v, bench, rank) for v in variants]
        latency = p2p_latency(bench, topo)
        for runner in runners:
            for _ in range(bench.warmup):
                timed_step(runner, tokens, labels, bench)
        memory = [step_memory(runner, tokens, labels, bench) for runner in runners]
        samples: list[list[Sample]] = [[] for _ in variants]
        for round_ in range(bench.rounds):
            order = list(zip(runners, samples))
            for runner, out in order if round_ % 2 == 0 else reversed(order):
                out.append(timed_step(runner, tokens, labels, bench))
        gathered = [None] * bench.world
        dist.all_gather_object(gathered, (topo.pp_rank, topo.dp_rank, costs, samples, memory))
        if rank == 0:
            queue.put((latency, gathered))
    finally:
        dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2, help="pipeline ranks")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel ranks per stage (PP x EP processes)")
    parser.add_argument("--ranks-per-node", type=int, default=0, help="ranks per emulated node (0: one node)")
    parser.add_argument("--emulate-links", default=None, metavar="SPEC",
                        help="emulated network, e.g. 'inter=25GB/s,10us;intra=150GB/s,2us' (default: none)")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--ffn-hidden-size", type=int, default=688)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--num-experts", type=int, default=0, help="0: a dense GPT")
    parser.add_argument("--moe-ffn-hidden-size", type=int, default=256)
    parser.add_argument("--moe-router-topk", type=int, default=4)
    parser.add_argument("--moe-shared-expert-intermediate-size", type=int, default=256)
    parser.add_argument("--moe-first-k-dense", type=int, default=0)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--num-microbatches", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per schedule")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per schedule, interleaved")
    parser.add_argument("--cost-reps", type=int, default=5, help="repetitions per measured chunk cost")
    parser.add_argument("--ep-across-nodes", action="store_true",
                        help="one emulated node per EP rank (the EP all-to-alls cross nodes, the pipeline's messages "
                             "stay within one), instead of --ranks-per-node consecutive ranks per node")
    parser.add_argument("--save", default=None, metavar="FILE", help="keep the measurements for --report-from FILE "
                                                                     "(given alone: print the report again)")
    parser.add_argument("--schedules", nargs="+", default=None, choices=[v.label for v in VARIANTS],
                        metavar="LABEL", help=f"rows to run (default: those the layout runs), from: "
                                              f"{'; '.join(v.label for v in VARIANTS)}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
                        num_query_groups=args.num_attention_heads, seq_length=args.seq_length,
                        vocab_size=args.vocab_size, num_experts=args.num_experts,
                        moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_router_topk=args.moe_router_topk,
                        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
                        moe_first_k_dense=args.moe_first_k_dense)
    links = None if args.emulate_links is None else LinkModel.parse(args.emulate_links)
    bench = Bench(model, args.pp, args.num_microbatches, args.micro_batch_size, args.warmup, args.rounds,
                  args.cost_reps, args.ep, args.ranks_per_node, links, args.ep_across_nodes)
    bench.grid.validate()
    variants = tuple(v for v in VARIANTS if (v.label in args.schedules if args.schedules else runs_here(v, bench)))
    for v in variants:
        if not runs_here(v, bench):
            raise SystemExit(f"{v.label} does not run with --ep {bench.ep} --ranks-per-node {bench.ranks_per_node}")
        v.actions(bench)  # validates the sizes
        shape_specs(v.shape, model.num_layers, bench.pp)

    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    workers = mp.start_processes(worker, args=(bench, variants, free_port(), queue), nprocs=bench.world,
                                 start_method="spawn", join=False)
    # Read while joining: rank 0's put blocks until the pipe is read once the results outgrow its buffer.
    result = None
    while not workers.join(timeout=1.0):  # raises where a worker failed
        if result is None and not queue.empty():
            result = queue.get()
    latency, gathered = queue.get() if result is None else result
    run = Run(bench, variants, latency, gathered, (load_before, os.getloadavg()[0]))
    if args.save:
        with open(args.save, "wb") as file:
            pickle.dump(run, file)
    print(report(run))


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--report-from"]:
        with open(args[1], "rb") as file:
            print(report(pickle.load(file)))
    else:
        main(args)
