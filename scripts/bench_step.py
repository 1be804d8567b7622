"""The quick-start training step: today's code against the code before issue 14, in one run.

    python scripts/bench_step.py [--iters 20] [--threads 1] [--device cpu|cuda] [--model quickstart|tiny]

Three variants of the quick-start run (scripts/quickstart.sh's model and batch flags, read from
that script; mock data of the sample tokenizer's 4096 tokens; `--model tiny`: the tests' tiny
MoE, to check the script), each its own model and optimizer
from the same seed, trained on the same batches, their steps alternating so that the machine's
load falls on all alike:
  before:  AdamW with foreach=False, the written-out cross entropy, one GEMM per expert
  now:     the CPU defaults (foreach AdamW, torch's fused cross entropy, one GEMM per expert)
  grouped: now with --moe-grouped-gemm (the default on CUDA)
The median and the fastest step time of each are printed, with now/before and grouped/now: the
process's CPU time (with one thread, what the step costs, whatever else the machine runs) and the
wall time. A whole train_step
is timed: forward, backward, gradient reduction, norm, clipping, the optimizer. The variants
compute the same: their losses are printed side by side.

`--parts` times the two changed pieces alone instead, alternating the same way: the cross entropy
(forward and backward of one micro-batch's logits) written out and fused, and the AdamW step
over the quick-start model's parameters with foreach=False and True.
"""
from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megadual.arguments import parse_args, resolve_device_defaults
from megadual.model import gpt
from megadual.parallel.tensor import NO_TP, sharded_cross_entropy, vocab_parallel_cross_entropy
from megadual.pipeline.stage_model import build_full_model
from megadual.training import loop
from megadual.training.optimizer import build_optimizer
from megadual.training.step import train_step
from tests.helpers import TINY_MOE, single_process_group

DATA_FLAGS = {"--data-path", "--split", "--tokenizer-type", "--tokenizer-model", "--save", "--save-interval",
              "--eval-interval", "--eval-iters", "--log-interval"}


def quickstart_flags() -> list[str]:
    """scripts/quickstart.sh's MODEL flags (its ITERS=200), its data replaced by mock data of the
    same vocabulary."""
    script = (ROOT / "scripts" / "quickstart.sh").read_text()
    words = shlex.split(re.search(r"MODEL=\((.*?)\)", script, re.DOTALL).group(1).replace('"$ITERS"', "200"))
    kept, skip = [], False
    for word in words:
        if word.startswith("--"):
            skip = word in DATA_FLAGS
        if not skip:
            kept.append(word)
    return kept + ["--mock-data", "--vocab-size", "4096", "--train-iters", "200"]


class Variant:
    def __init__(self, name: str, config, topo, device: torch.device, written_out_cross_entropy: bool,
                 foreach: bool):
        self.name, self.config, self.topo, self.device = name, config, topo, device
        self.model = loop.build_model(config, topo, device)
        self.optimizer = build_optimizer(list(self.model.named_parameters()), config.optim)
        for group in self.optimizer.param_groups:
            group["foreach"] = foreach
        self.written_out_cross_entropy = written_out_cross_entropy
        self.cpu_seconds: list[float] = []
        self.wall_seconds: list[float] = []
        self.losses: list[float] = []

    def step(self, batches: list[dict]) -> None:
        o = self.config.optim
        fused = gpt.vocab_parallel_cross_entropy
        if self.written_out_cross_entropy:  # the model's loss as it was computed before
            gpt.vocab_parallel_cross_entropy = lambda logits, target, tp, real_vocab: sharded_cross_entropy(
                logits, target, tp.group, real_vocab)
        try:
            cpu, wall = time.process_time(), time.perf_counter()
            result = train_step(self.model, self.optimizer, batches, self.topo, o.lr, o.clip_grad,
                                o.moe_router_bias_update_rate, self.device, self.config.train.bf16)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.cpu_seconds.append(time.process_time() - cpu)
            self.wall_seconds.append(time.perf_counter() - wall)
        finally:
            gpt.vocab_parallel_cross_entropy = fused
        self.losses.append(result.lm_loss)


def cpu_ms_per_call(pieces: dict, iters: int) -> dict[str, float]:
    """Median CPU milliseconds of each of `pieces` (name -> callable), called in turn `iters` times."""
    seconds = {name: [] for name in pieces}
    for _ in range(iters + 2):
        for name, piece in pieces.items():
            start = time.process_time()
            piece()
            seconds[name].append(time.process_time() - start)
    return {name: statistics.median(s[2:]) * 1e3 for name, s in seconds.items()}


def time_parts(config, iters: int) -> None:
    m, t = config.model, config.train
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(m.seq_length, t.micro_batch_size, m.vocab_size, generator=g, requires_grad=True)
    target = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length), generator=g).t()
    model = build_full_model(m, t.seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    optimizers = {}
    for foreach in (False, True):
        optimizers[foreach] = build_optimizer(list(model.named_parameters()), config.optim)
        for group in optimizers[foreach].param_groups:
            group["foreach"] = foreach
    ms = cpu_ms_per_call({
        "cross entropy, written out": lambda: sharded_cross_entropy(logits, target, None).mean().backward(),
        "cross entropy, fused": lambda: vocab_parallel_cross_entropy(logits, target, NO_TP).mean().backward(),
        "AdamW foreach=False": optimizers[False].step,
        "AdamW foreach=True": optimizers[True].step}, iters)
    print(f"pieces of the quick-start step, CPU ms per call (median of {iters}), {torch.get_num_threads()} thread(s)")
    for name, value in ms.items():
        print(f"  {name:28s} {value:8.2f}")
    print(f"  fused / written out  {ms['cross entropy, fused'] / ms['cross entropy, written out']:.3f}  "
          f"(x{t.global_batch_size // t.micro_batch_size} micro-batches a step)")
    print(f"  foreach / loop       {ms['AdamW foreach=True'] / ms['AdamW foreach=False']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20, help="timed steps per variant (after 2 untimed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("quickstart", "tiny"), default="quickstart")
    parser.add_argument("--parts", action="store_true", help="time the cross entropy and AdamW alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = quickstart_flags() if args.model == "quickstart" else TINY_MOE
    config = resolve_device_defaults(parse_args(flags + ["--no-moe-grouped-gemm"]), args.device)
    if args.parts:
        time_parts(config, args.iters)
        return
    grouped = replace(config, parallel=replace(config.parallel, moe_grouped_gemm=True))
    device = torch.device(args.device)
    with single_process_group(device):
        topo = loop.build_topology(config)
        variants = [Variant("before", config, topo, device, written_out_cross_entropy=True, foreach=False),
                    Variant("now", config, topo, device, written_out_cross_entropy=False, foreach=True),
                    Variant("grouped", grouped, topo, device, written_out_cross_entropy=False, foreach=True)]
        t, m = config.train, config.model
        g = torch.Generator().manual_seed(t.seed)
        for _ in range(args.iters + 2):
            tokens = torch.randint(0, m.vocab_size, (t.global_batch_size, m.seq_length + 1), generator=g)
            batches = [{"tokens": chunk[:, :-1], "labels": chunk[:, 1:]}
                       for chunk in tokens.split(t.micro_batch_size)]
            for variant in variants:
                variant.step(batches)
    cpu = {v.name: statistics.median(v.cpu_seconds[2:]) * 1e3 for v in variants}
    cpu_min = {v.name: min(v.cpu_seconds[2:]) * 1e3 for v in variants}
    wall = {v.name: statistics.median(v.wall_seconds[2:]) * 1e3 for v in variants}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.model} step on {name} (torch {torch.__version__}), {torch.get_num_threads()} thread(s), "
          f"median of {args.iters} steps each, alternating")
    print(f"  {'variant':8s} {'CPU ms':>9s} {'min CPU':>9s} {'wall ms':>9s}  last lm losses")
    for v in variants:
        losses = " ".join(f"{x:.6f}" for x in v.losses[-3:])
        print(f"  {v.name:8s} {cpu[v.name]:9.1f} {cpu_min[v.name]:9.1f} {wall[v.name]:9.1f}  {losses}")
    for new, old in (("now", "before"), ("grouped", "now")):
        print(f"  {new} / {old}: CPU time {cpu[new] / cpu[old]:.3f} (fastest {cpu_min[new] / cpu_min[old]:.3f}), "
              f"wall time {wall[new] / wall[old]:.3f}")


if __name__ == "__main__":
    main()
