"""Without expert parallelism: the quick-start training step with the dispatcher skipped against
the flat dispatcher's exchange at one rank (row plan, gather, exchange, index_add), as a ratio.

    python scripts/bench_local_dispatch.py --iters 20

One process, the quick-start model (scripts/quickstart.sh: 4 layers, hidden 128, 8 experts
top-2, seq 128, micro-batch 4, 2 micro-batches per step) on mock tokens. Each round trains
one step with each dispatcher, the order alternating; both share the model and its
optimizer, and their losses must be equal. The ratio is skipped / exchanged per round,
reported as the median and quartiles over the rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadual.config import ModelConfig
from megadual.model.gpt import build_chunk, full_model_stage
from megadual.moe.dispatcher import LocalDispatcher, TokenDispatcher
from megadual.moe.layer import MoELayer

QUICKSTART = ModelConfig(num_layers=4, hidden_size=128, ffn_hidden_size=344, num_attention_heads=4,
                         seq_length=128, vocab_size=4096, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=128,
                         moe_shared_expert_intermediate_size=128, moe_first_k_dense=1, moe_router_num_groups=4,
                         moe_router_max_nodes=2)
WAYS = ("skipped", "exchanged")


def train_step(model, optimizer, batches) -> tuple[float, float]:
    start = time.perf_counter()
    losses = []
    for tokens, labels in batches:
        loss = model(tokens, labels) / len(batches)
        loss.backward()
        losses.append(loss.detach())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, float(sum(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_chunk(QUICKSTART, full_model_stage(QUICKSTART), seed=1)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    dispatchers = {"skipped": LocalDispatcher(), "exchanged": TokenDispatcher(QUICKSTART.num_experts)}
    generator = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, QUICKSTART.vocab_size, (4, QUICKSTART.seq_length), generator=generator)
                     for _ in range(2)) for _ in range(2)]
    # lr 0: every step sees the same weights, so the two ways must give the same loss each round.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    times = {way: [] for way in WAYS}
    same = True
    for i in range(args.warmup + args.iters):
        losses = {}
        for way in (WAYS if i % 2 == 0 else WAYS[::-1]):
            for layer in layers:
                layer.dispatcher = dispatchers[way]
            elapsed, losses[way] = train_step(model, optimizer, batches)
            if i >= args.warmup:
                times[way].append(elapsed)
        same &= losses["skipped"] == losses["exchanged"]
    ratios = sorted(a / b for a, b in zip(times["skipped"], times["exchanged"]))
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"quick-start model, one process, {args.threads} thread(s), {args.iters} rounds; machine load average "
          f"(1 min) {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for way in WAYS:
        print(f"  {way:<10} step median {statistics.median(times[way]) * 1e3:7.1f} ms  "
              f"fastest {min(times[way]) * 1e3:7.1f} ms")
    print(f"  skipped / exchanged per round: median {statistics.median(ratios):.3f} "
          f"(quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}); of the fastest "
          f"{min(times['skipped']) / min(times['exchanged']):.3f}   same loss: {same}")


if __name__ == "__main__":
    main()
