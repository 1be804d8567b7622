"""The paired F&B chunk on an emulated network: how much of the expert all-to-alls the overlap hides.

    python scripts/bench_overlap.py [--ep 2] [--ranks-per-node 1] [--emulate-links match] [--iters 10]

Each of `--ep` processes (one thread each) holds a full MoE model with its share of the
experts; `--ranks-per-node` groups them into emulated nodes (megadual/parallel/emulate.py).
One pair = the forward of micro-batch A and the backward of micro-batch B (whose forward ran
before, untimed). Three ways are timed, alternating within one run:

- no-comm:    A's forward resumed at each all-to-all B's backward launches (pipeline/overlap.py),
              on free links (loopback: the all-to-alls cost next to nothing);
- sequential: A's forward, then B's backward, on the emulated links;
- overlapped: the paired way, on the emulated links.

exposed communication = (overlapped - no-comm) / (sequential - no-comm): the share of the
emulated communication time the pairing leaves visible. It is printed per round (the three
ways of a round run back to back) as median and quartiles, and from the medians and from the
fastest of each way (on a loaded machine interference only adds time). The same fraction
is also taken from the time the ranks spent waiting for all-to-alls (mean over ranks), in
which the compute, the same in all three ways, does not appear, and with it the noise a
loaded machine adds to the compute. `--emulate-links
match` picks the inter-node bandwidth at which one micro-batch's dispatch of one MoE layer
costs what that layer's routed experts compute (measured first, forward); the intra-node
link is then 6x faster. `--breakdown` adds, for one overlapped pair, the time each
all-to-all kept its caller waiting.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadual.config import ModelConfig
from megadual.model.gpt import build_chunk, full_model_stage
from megadual.moe.dispatcher import Hop
from megadual.parallel.comm import BackwardOverlap, Exchange
from megadual.parallel.context import BuildContext
from megadual.parallel.emulate import Link, LinkModel, emulated_links
from megadual.parallel.topology import Layout, Topology
from megadual.pipeline.overlap import overlapped_forward_backward
from megadual.training.distributed import free_port

WAYS = ("no-comm", "sequential", "overlapped")
INTRA_SPEEDUP = 6.0  # NVLink against InfiniBand per GPU, roughly (160 against 25-50 GB/s)


def model_config(args) -> ModelConfig:
    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=2 * args.hidden,
                       num_attention_heads=8, num_query_groups=8, seq_length=args.seq, vocab_size=1024,
                       num_experts=4 * args.ep, moe_ffn_hidden_size=args.hidden, moe_router_topk=4,
                       moe_shared_expert_intermediate_size=args.hidden, moe_first_k_dense=1)


def build_context(args, rank: int) -> BuildContext:
    topo = Topology(Layout(args.ep, ep=args.ep, ranks_per_node=args.ranks_per_node), rank)
    hierarchical = args.dispatcher == "hierarchical"
    return BuildContext(ep_group=topo.group("ep"), num_nodes=topo.layout.nodes_per_ep_group,
                        ep_node_groups=topo.ep_node_groups() if hierarchical else None)


def describe(kind: str) -> str:
    """Which all-to-all this is, from the stack: "F"orward or "B"ackward, the layer's hop, dispatch
    ("out") or combine ("back"). A forward launch names its Exchange, so its backward finds the name."""
    exchange = None
    for frame, _ in traceback.walk_stack(None):  # innermost first: a forward step may run inside a backward
        name, obj = frame.f_code.co_name, frame.f_locals.get("self")
        if name == "exchange_counts":
            return "counts"
        if name == "_launch_backward":
            return "B " + getattr(obj, "label", kind)
        exchange = obj if isinstance(obj, Exchange) and exchange is None else exchange
        if isinstance(obj, Hop):
            exchange.label = f"{obj.label} {'back' if name == 'return_start' else 'out'}"
            return "F " + exchange.label
    return "F " + kind


def label_hops(model) -> None:
    """Name each hop by its layer, for the breakdown."""
    for index, layer in model.layers.items():
        if layer.is_moe:
            for name in ("hop", "inter", "intra"):
                if hasattr(layer.mlp.dispatcher, name):
                    getattr(layer.mlp.dispatcher, name).label = f"L{index} {name}"


def one_pair(model, overlap: BackwardOverlap, batch_a, batch_b, way: str, links: LinkModel,
             ranks_per_node: int) -> tuple[float, torch.Tensor, list]:
    """Seconds of one pair (after a barrier, until every rank is done), A's loss, and the emulated
    collectives of this rank."""
    with emulated_links(LinkModel(), ranks_per_node, describe):  # free links: names B's exchanges
        loss_b = model(*batch_b).loss
    dist.barrier()
    start = time.perf_counter()
    with emulated_links(LinkModel() if way == "no-comm" else links, ranks_per_node, describe) as emulator:
        if way == "sequential":
            loss_a = model(*batch_a).loss
            loss_b.backward()
        else:
            loss_a = overlapped_forward_backward(model.forward_steps(*batch_a), loss_b.backward, nullcontext,
                                                 overlap).loss
    dist.barrier()
    elapsed = time.perf_counter() - start
    loss_a.backward()  # release A's graph, untimed
    model.zero_grad(set_to_none=True)
    return elapsed, loss_a.detach(), emulator.records


def expert_seconds(model, batch, reps: int = 3) -> float:
    """Median forward time of one MoE layer's routed experts on one micro-batch."""
    marks: list[float] = []
    hooks = []
    for layer in model.layers.values():
        if layer.is_moe:
            hooks.append(layer.mlp.experts.register_forward_pre_hook(lambda *_: marks.append(time.perf_counter())))
            hooks.append(layer.mlp.experts.register_forward_hook(lambda *_: marks.append(time.perf_counter())))
    with torch.no_grad():
        for _ in range(reps):
            model(*batch)
    for hook in hooks:
        hook.remove()
    return statistics.median(end - begin for begin, end in zip(marks[::2], marks[1::2]))


def dispatch_bytes(model, batch, ranks_per_node: int) -> int:
    """Inter-node bytes this rank sends in one MoE layer's token dispatch (the largest all-to-all)."""
    with torch.no_grad(), emulated_links(LinkModel(), ranks_per_node) as emulator:
        model(*batch)
    return max(r.bytes_inter for r in emulator.records)


def matched_links(model, batch, ranks_per_node: int) -> LinkModel:
    """Inter-node bandwidth at which one layer's dispatch costs one layer's expert compute (mean over ranks)."""
    measured = torch.tensor([dispatch_bytes(model, batch, ranks_per_node), expert_seconds(model, batch)],
                            dtype=torch.float64)
    dist.all_reduce(measured)
    num_bytes, seconds = measured.tolist()
    inter = Link(num_bytes / seconds, 10e-6)
    return LinkModel(inter, Link(inter.bandwidth * INTRA_SPEEDUP, 2e-6))


def worker(rank: int, args, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.ep)
    try:
        config = model_config(args)
        model = build_chunk(config, full_model_stage(config), seed=1, ctx=build_context(args, rank))
        label_hops(model)
        overlap = BackwardOverlap()
        model.attach_schedule(None, overlap)
        g = torch.Generator().manual_seed(rank)
        batches = [tuple(torch.randint(0, 1024, (args.micro_batch, args.seq), generator=g) for _ in range(2))
                   for _ in range(2)]
        if args.emulate_links == "match":
            links = matched_links(model, batches[0], args.ranks_per_node)
        else:
            links = LinkModel.parse(args.emulate_links)
        times, waits = {way: [] for way in WAYS}, {way: [] for way in WAYS}
        losses = {}
        for i in range(args.warmup + args.iters):
            for way in (WAYS if i % 2 == 0 else WAYS[::-1]):
                elapsed, losses[way], records = one_pair(model, overlap, *batches, way, links, args.ranks_per_node)
                if i >= args.warmup:
                    times[way].append(elapsed)
                    waits[way].append(sum(r.blocked for r in records))
        breakdown = one_pair(model, overlap, *batches, "overlapped", links, args.ranks_per_node)[2] \
            if args.breakdown else []
        same = all(torch.equal(losses[way], losses["sequential"]) for way in WAYS)
        gathered = [None] * args.ep
        dist.all_gather_object(gathered, (times, waits, breakdown))
        if rank == 0:
            queue.put((str(links), gathered, same))
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def exposed(no_comm: float, sequential: float, overlapped: float) -> float:
    return (overlapped - no_comm) / (sequential - no_comm)


def fractions(samples: dict[str, list[float]]) -> tuple[float, float, float, float]:
    """Exposed fraction per round (median, quartiles) and of the medians."""
    per_round = sorted(exposed(*rounds) for rounds in zip(*(samples[way] for way in WAYS)))
    quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return (statistics.median(per_round), quartiles[0], quartiles[2],
            exposed(*(statistics.median(samples[way]) for way in WAYS)))


def report(args, links: str, gathered: list, same: bool) -> str:
    times = gathered[0][0]  # every pair ends at a barrier: rank 0's times stand for all
    waits = {way: [statistics.mean(w) for w in zip(*(rank[1][way] for rank in gathered))] for way in WAYS}
    nodes = max(1, args.ep // args.ranks_per_node)
    lines = [(f"EP{args.ep} over {nodes} emulated nodes, {args.dispatcher} dispatch, hidden {args.hidden}, "
              f"seq {args.seq}, micro-batch {args.micro_batch}, layers {args.layers}: one F&B pair, "
              f"{args.iters} rounds; machine load average (1 min) {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"),
             f"links: {links}", f"  {'ms':<11} {'median':>8} {'fastest':>8} {'waiting':>8}"]
    lines += [f"  {way:<11} {statistics.median(times[way]) * 1e3:8.1f} {min(times[way]) * 1e3:8.1f} "
              f"{statistics.median(waits[way]) * 1e3:8.1f}" for way in WAYS]
    fastest = exposed(*(min(times[way]) for way in WAYS))
    lines.append("  exposed communication = (overlapped - no-comm) / (sequential - no-comm), per round median "
                 "(quartiles) and of the medians")
    for name, (median, low, high, of_medians) in (("times", fractions(times)), ("waiting", fractions(waits))):
        extra = f", of the fastest {fastest:.1%}" if name == "times" else ""
        lines.append(f"    from the {name:<8} {median:7.1%} ({low:.1%}-{high:.1%}), {of_medians:.1%}{extra}")
    lines.append(f"  same loss: {same}")
    if gathered[0][2]:
        lines.append("  overlapped pair, rank 0, each emulated collective in launch order "
                     "(what, inter KB, modelled ms, waited ms):")
        for r in gathered[0][2]:
            modelled = (r.deadline - r.launched) * 1e3
            lines.append(f"    {r.what:<16} {r.bytes_inter / 1e3:8.1f} {modelled:8.2f} {r.blocked * 1e3:8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=1, help="emulated nodes of this many ranks")
    parser.add_argument("--dispatcher", choices=("alltoall", "hierarchical"), default="alltoall",
                        help="--moe-token-dispatcher-type")
    parser.add_argument("--emulate-links", default="match",
                        help="'match', or a link model such as 'inter=25GB/s,10us;intra=150GB/s,2us'")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--breakdown", action="store_true", help="wait time of each all-to-all of one pair")
    args = parser.parse_args()
    if args.emulate_links != "match":
        LinkModel.parse(args.emulate_links)  # a bad spec fails here, before any process starts
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(args, free_port(), queue), nprocs=args.ep, start_method="spawn")
    print(report(args, *queue.get()))


if __name__ == "__main__":
    main()
