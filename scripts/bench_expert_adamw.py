"""AdamW's step over the routed experts' weights: one tensor per expert and projection (as they
were) against one stacked tensor per projection (moe/experts.py), the same elements and values.

    python scripts/bench_expert_adamw.py --iters 40             # the quick-start model's experts
    python scripts/bench_expert_adamw.py --model tiny --iters 40

Builds the model, takes its expert stacks (3 per MoE layer) and, beside them, per-expert copies
(3 x experts per MoE layer), gives both the same gradients, and times AdamW's step (foreach, as
training/optimizer.py builds it) over each, alternating, by CPU time (the machine may be shared).
Both end with equal weights, which it checks.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step import quickstart_flags

from megadual.arguments import parse_args
from megadual.pipeline.stage_model import build_full_model
from megadual.training.optimizer import build_optimizer
from tests.helpers import TINY_MOE


def expert_params(config) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(the stacks, per-expert copies of their rows), with the same random gradients."""
    model = build_full_model(config.model, config.train.seed)
    stacks = [p for name, p in model.named_parameters() if ".experts." in name]
    g = torch.Generator().manual_seed(0)
    rows = []
    for stack in stacks:
        stack.grad = torch.randn(stack.shape, generator=g)
        rows += [torch.nn.Parameter(w.detach().clone()) for w in stack.unbind(0)]
        for row, grad in zip(rows[-len(stack):], stack.grad.unbind(0)):
            row.grad = grad.clone()
    return stacks, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20, help="timed steps of each (after 2 untimed)")
    parser.add_argument("--model", choices=("quickstart", "tiny"), default="quickstart")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = parse_args(quickstart_flags() if args.model == "quickstart" else TINY_MOE)
    stacks, rows = expert_params(config)
    optimizers = {"per expert": build_optimizer([(str(i), p) for i, p in enumerate(rows)], config.optim),
                  "stacked": build_optimizer([(str(i), p) for i, p in enumerate(stacks)], config.optim)}
    seconds = {name: [] for name in optimizers}
    for _ in range(args.iters + 2):
        for name, optimizer in optimizers.items():
            start = time.process_time()
            optimizer.step()
            seconds[name].append(time.process_time() - start)
    assert all(torch.equal(row, stack_row) for row, stack_row in zip(rows, (r for s in stacks for r in s.unbind(0))))
    ms = {name: statistics.median(s[2:]) * 1e3 for name, s in seconds.items()}
    elements = sum(p.numel() for p in stacks)
    print(f"AdamW over the {args.model} model's routed experts ({elements / 1e6:.2f} M elements), "
          f"{torch.get_num_threads()} thread(s), CPU ms per step (median of {args.iters}, alternating)")
    print(f"  per expert ({len(rows)} tensors)  {ms['per expert']:8.2f}")
    print(f"  stacked ({len(stacks)} tensors)     {ms['stacked']:8.2f}")
    print(f"  per expert / stacked  {ms['per expert'] / ms['stacked']:.3f}")


if __name__ == "__main__":
    main()
