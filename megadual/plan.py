"""python -m megadual.plan: the memory of every rank before launch, and the layouts that fit.

    python -m megadual.plan [pretrain_moe.py flags] --world-size N
    python -m megadual.plan [model flags] --gpus N --gpu-memory-gib G [hardware flags]

The first form predicts, per pipeline rank (every data/tensor/expert-parallel rank of a stage
holds the same at balanced routing), what the memory report measures after the first
iteration: parameters and gradients of the stages it holds (DualPipe: two copies), optimizer
state with and without --use-distributed-optimizer, and the peak activations: the per-micro-
batch activations of each stage (megadual/memory_model.py) walked through the rank's schedule
(megadual/rank_memory.py). The second form searches layouts (megadual/layout_search.py).
"""
from __future__ import annotations

import argparse
import sys
import time

from megadual.config import RunConfig, resolve_device_defaults
from megadual.config_validate import ConfigError, node_size, num_microbatches, validate_world
from megadual.layout_search import Hardware, search
from megadual.parallel.recompute import RecomputePlan
from megadual.rank_memory import layout_of, predict
from pretrain_moe import load_config

MB = 1024.0 * 1024.0


def format_ranks(config: RunConfig, world: int) -> str:
    """Each pipeline rank's predicted memory, with the plain and with the distributed optimizer."""
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
    lines = [(f"{world} ranks: TP{layout.tp} x PP{layout.pp} ({layout.schedule}) x DP{layout.dp}, EP{layout.ep}; "
             f"{num_microbatches(config, layout.dp)} micro-batches of {t.micro_batch_size} x "
             f"{config.model.seq_length} tokens; recomputation: {recompute}; "
             f"{'bf16' if t.bf16 else 'fp32'}{', FP8' if config.fp8.fp8_format else ''}"),
             (f"per rank ({unit})  parameters  gradients  optimizer state (plain / distributed)  peak activations"
             "  total (plain / distributed)")]
    for r, d in zip(ranks, sharded):
        lines.append(f"pipeline rank {r.pp_rank:<3} {r.parameters / scale:>11.3f} {r.gradients / scale:>10.3f} "
                     f"{r.optimizer_state / scale:>16.3f} / {d.optimizer_state_distributed / scale:<19.3f} "
                     f"{r.peak_activations / scale:>16.3f}  {r.total / scale:>8.3f} / {d.total / scale:.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megadual.plan", allow_abbrev=False,
                                     usage="%(prog)s [pretrain_moe.py flags] (--world-size N | --gpus N "
                                           "--gpu-memory-gib G [hardware flags])",
                                     description=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--world-size", type=int, help="predict each rank's memory for the flags' layout")
    parser.add_argument("--gpus", type=int, help="list the layouts that fit this many GPUs")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    hw = Hardware()
    parser.add_argument("--gpu-tflops", type=float, default=hw.tflops, help="achieved BF16 TFLOP/s per GPU")
    parser.add_argument("--nvlink-gbps", type=float, default=hw.nvlink_gbps, help="GB/s per GPU within a node")
    parser.add_argument("--ib-gbps", type=float, default=hw.ib_gbps, help="GB/s per GPU between nodes")
    parser.add_argument("--gpus-per-node", type=int, default=hw.gpus_per_node)
    parser.add_argument("--memory-fraction", type=float, default=hw.memory_fraction,
                        help="of the GPU memory a layout may fill (the rest: CUDA context, buffers, fragmentation)")
    parser.add_argument("--top", type=int, default=10, help="layouts listed")
    return parser


def _config(flags: list[str]) -> RunConfig:
    if "--data-path" not in flags and "--mock-data" not in flags:
        flags = [*flags, "--mock-data"]
    return resolve_device_defaults(load_config(flags), "cuda" if "--bf16" in flags else "cpu")


def main(argv: list[str] | None = None) -> int:
    args, flags = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config = _config(flags)
        if args.gpus:
            hw = Hardware(args.gpus_per_node, args.gpu_tflops, args.nvlink_gbps, args.ib_gbps, args.memory_fraction)
            print(format_search(config, args.gpus, args.gpu_memory_gib, hw, args.top))
            return 0
        if not args.world_size:
            raise ConfigError("give --world-size N (memory per rank) or --gpus N (the layouts that fit)")
        validate_world(config, args.world_size, node_size(config, args.world_size))
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


if __name__ == "__main__":
    sys.exit(main())
