"""The command line of python -m megadual.plan: the memory of every rank before launch, and the layouts that fit.

    python -m megadual.plan [pretrain_moe.py flags] --world-size N [--json | --breakdown [PP_RANK]]
    python -m megadual.plan [model flags] --gpus N --gpu-memory-gib G [hardware flags]

The first form predicts, per pipeline rank (every data/tensor/expert-parallel rank of a stage
holds the same at balanced routing), what the memory report measures after the first
iteration: parameters and gradients of the stages it holds (DualPipe: two copies), optimizer
state with and without --use-distributed-optimizer, and the peak activations: the per-micro-
batch activations of each stage (megadual/plan/memory_model.py) walked through the rank's schedule
(megadual/plan/rank_memory.py). Parameters and activations are counted in the dtypes held: BF16
weights under the distributed optimizer with --bf16 (the default for --device cuda), FP32
weights otherwise, whose GEMMs then save BF16 copies. The second form searches layouts
(megadual/plan/layout_search.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from megadual.arguments import resolve_device_defaults
from megadual.config import ConfigError, RunConfig
from megadual.config_validate import node_size, num_microbatches, validate_world
from megadual.parallel.recompute import RecomputePlan
from megadual.plan.layout_search import Hardware, search
from megadual.plan.rank_memory import chunk_activations, layout_of, peak_activations, predict, rank_stages
from pretrain_moe import load_config

MB = 1024.0 * 1024.0


def format_ranks(config: RunConfig, world: int) -> str:
    """Each pipeline rank's predicted memory, with the plain and with the distributed optimizer
    (whose BF16 weights under --bf16 change the parameters and what the layers save)."""
    ranks, sharded = predict(config, world, False), predict(config, world, True)
    layout = layout_of(config, world)
    t, unit = config.train, "GiB" if max(r.total for r in ranks) > 2 ** 30 else "MB"
    scale = 2.0 ** 30 if unit == "GiB" else MB
    plan = RecomputePlan.from_flags(config.train)
    recompute = plan.granularity or "none"
    if plan.granularity == "selective":
        recompute += " (" + ", ".join(sorted(plan.modules)) + ")"
    elif plan.granularity == "full":
        recompute += f" ({plan.method}, {plan.num_layers} layers)"
    o = config.optim
    moments = f"; moments {o.exp_avg_dtype}/{o.exp_avg_sq_dtype}" if o.use_precision_aware_optimizer else ""
    lines = [(f"{world} ranks: TP{layout.tp} x PP{layout.pp} ({layout.schedule}) x DP{layout.dp}, EP{layout.ep}; "
             f"{num_microbatches(config, layout.dp)} micro-batches of {t.micro_batch_size} x "
             f"{config.model.seq_length} tokens; recomputation: {recompute}; "
             f"{'bf16' if t.bf16 else 'fp32'}{', FP8' if config.fp8.fp8_format else ''}{moments}"),
             f"per rank ({unit}), plain / distributed optimizer: parameters, gradients, optimizer state, "
             "peak activations, total"]
    for r, d in zip(ranks, sharded):
        pairs = [f"{a / scale:>9.3f} / {b / scale:<9.3f}" for a, b in ((r.parameters, d.parameters),
                 (r.optimizer_state, d.optimizer_state_distributed), (r.peak_activations, d.peak_activations),
                 (r.total, d.total))]
        lines.append(f"pipeline rank {r.pp_rank:<3} {pairs[0]} {r.gradients / scale:>9.3f} "
                     + " ".join(pairs[1:]).rstrip())
    return "\n".join(lines)


def ranks_json(config: RunConfig, world: int) -> str:
    """The ranks' figures for tools, in MB (the memory report's unit), for the optimizer the flags choose."""
    ranks = [{"pipeline_rank": r.pp_rank, "parameters": r.parameters, "gradients": r.gradients,
              "optimizer_state": r.optimizer_state_held, "peak_activations": r.peak_activations, "total": r.total}
             for r in predict(config, world)]
    return json.dumps({"ranks": [{k: v if k == "pipeline_rank" else round(v / MB, 3) for k, v in r.items()}
                                 for r in ranks]})


def format_breakdown(config: RunConfig, world: int, pp_rank: int | None) -> str:
    """One rank's peak activations (the optimizer the flags choose; default: the rank with the
    highest peak) split by layer (or part) and tensor kind: each chunk's bytes per micro-batch
    times its micro-batches alive at the peak."""
    distributed = config.optim.use_distributed_optimizer
    layout = layout_of(config, world)
    if pp_rank is None:
        pp_rank = max(predict(config, world), key=lambda r: r.peak_activations).pp_rank
    if not 0 <= pp_rank < layout.pp:
        raise ConfigError(f"--breakdown {pp_rank}: the pipeline ranks are 0 to {layout.pp - 1}")
    moment = peak_activations(config, world, pp_rank, distributed)
    chunks = rank_stages(config, layout, num_microbatches(config, layout.dp))[pp_rank]
    alive: dict[tuple[str, str], float] = {}
    for spec, kept, deferred, recast in zip(chunks, moment.kept, moment.deferred, moment.recast):
        acts = chunk_activations(config, layout, spec, distributed)
        recast_acts = chunk_activations(config, layout, spec, distributed, recast_weights=True)
        for count, alike in ((kept - recast, acts), (recast, recast_acts)):
            for name, value in alike.kinds.items():
                part, kind = name.split(" | ", 1)
                alive[part, kind] = alive.get((part, kind), 0.0) + count * value
        if deferred:
            alive["deferred W", "GEMM inputs"] = alive.get(("deferred W", "GEMM inputs"), 0.0) \
                                                  + deferred * acts.weight_inputs
    if moment.transient:
        alive["recomputed region", f"chunk {moment.rising}'s backward"] = moment.transient
    if moment.paired:
        alive["paired F&B", "part-way (forward, backward)"] = moment.paired
    unit, scale = ("GiB", 2.0 ** 30) if moment.bytes > 2 ** 30 else ("MB", MB)
    lines = [f"pipeline rank {pp_rank}: peak activations {moment.bytes / scale:.3f} {unit} "
             f"({'distributed' if distributed else 'plain'} optimizer); micro-batches alive: "
             + ", ".join(f"chunk {c}: {k} whole, {d} down to their W's GEMM inputs"
                         for c, (k, d) in enumerate(zip(moment.kept, moment.deferred))),
             f"{'part':<20} {'kind':<32} {unit:>10} {'share':>6}"]
    for (part, kind), value in alive.items():
        lines.append(f"{part:<20} {kind:<32} {value / scale:>10.3f} {value / moment.bytes:>6.1%}")
    by_kind: dict[str, float] = {}
    for (_, kind), value in alive.items():
        by_kind[kind] = by_kind.get(kind, 0.0) + value
    lines.append("by kind: " + ", ".join(f"{kind} {value / scale:.3f}" for kind, value in
                                         sorted(by_kind.items(), key=lambda item: -item[1])))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megadual.plan", allow_abbrev=False,
                                     usage="%(prog)s [pretrain_moe.py flags] (--world-size N [--json | "
                                           "--breakdown [PP_RANK]] | --gpus N --gpu-memory-gib G [hardware flags])",
                                     description=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--world-size", type=int, help="predict each rank's memory for the flags' layout")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="the device planned for: --bf16 left out is on with cuda (as training sets it)")
    parser.add_argument("--json", action="store_true", help="the ranks' figures (MB) as JSON, for the optimizer "
                                                            "the flags choose")
    parser.add_argument("--breakdown", type=int, nargs="?", const=-1, metavar="PP_RANK",
                        help="one rank's peak activations by layer and tensor kind (default: the highest peak)")
    parser.add_argument("--gpus", type=int, help="list the layouts that fit this many GPUs")
    parser.add_argument("--gpu-memory-gib", type=float, help="memory per GPU (with --gpus)")
    hw = Hardware()
    parser.add_argument("--gpu-tflops", type=float, default=hw.tflops, help="achieved BF16 TFLOP/s per GPU")
    parser.add_argument("--nvlink-gbps", type=float, default=hw.nvlink_gbps, help="GB/s per GPU within a node")
    parser.add_argument("--ib-gbps", type=float, default=hw.ib_gbps, help="GB/s per GPU between nodes")
    parser.add_argument("--gpus-per-node", type=int, default=hw.gpus_per_node)
    parser.add_argument("--memory-fraction", type=float, default=hw.memory_fraction,
                        help="of the GPU memory a layout may fill (the rest: CUDA context, buffers, fragmentation)")
    parser.add_argument("--top", type=int, default=10, help="layouts listed")
    return parser


def _config(flags: list[str], device: str) -> RunConfig:
    if "--data-path" not in flags and "--mock-data" not in flags:
        flags = [*flags, "--mock-data"]
    return resolve_device_defaults(load_config(flags), device)


def _search_arguments(args: argparse.Namespace) -> None:
    if args.gpus <= 0:
        raise ConfigError(f"--gpus must be positive, got {args.gpus}")
    if args.gpu_memory_gib is None or args.gpu_memory_gib <= 0:
        raise ConfigError("--gpus needs --gpu-memory-gib G, the memory of one GPU in GiB (positive)")


def main(argv: list[str] | None = None) -> int:
    args, flags = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.gpus is not None:
            _search_arguments(args)
        config = _config(flags, args.device)
        if args.gpus is not None:
            hw = Hardware(args.gpus_per_node, args.gpu_tflops, args.nvlink_gbps, args.ib_gbps, args.memory_fraction)
            print(format_search(config, args.gpus, args.gpu_memory_gib, hw, args.top))
            return 0
        if not args.world_size or args.world_size < 0:
            raise ConfigError("give --world-size N (memory per rank) or --gpus N (the layouts that fit), N positive")
        validate_world(config, args.world_size, node_size(config, args.world_size))
        if args.json:
            print(ranks_json(config, args.world_size))
        elif args.breakdown is not None:
            print(format_breakdown(config, args.world_size, None if args.breakdown < 0 else args.breakdown))
        else:
            print(format_ranks(config, args.world_size))
    except (ConfigError, ValueError) as error:
        print(f"megadual.plan: error: {error}", file=sys.stderr)
        return 2
    return 0


def format_search(config: RunConfig, gpus: int, memory_gib: float, hw: Hardware, top: int) -> str:
    start = time.perf_counter()
    fits, tried = search(config, gpus, memory_gib, hw)
    m, t = config.model, config.train
    tokens = t.global_batch_size * m.seq_length
    lines = [(f"{gpus} GPUs of {memory_gib:g} GiB, global batch {t.global_batch_size} x {m.seq_length} tokens; "
             f"{hw.describe()}"),
             f"{len(fits)} of {tried} layouts fit ({time.perf_counter() - start:.1f} s); the fastest:",
             f"{'layout':<70} {'max GiB':>8} {'step s':>8} {'tokens/s/GPU':>13}"]
    for fit in fits[:top]:
        lines.append(f"{fit.describe(gpus):<70} {fit.peak_bytes / 2 ** 30:>8.1f} {fit.step_seconds:>8.2f} "
                     f"{tokens / fit.step_seconds / gpus:>13.0f}")
    return "\n".join(lines)

