"""The iteration-time cost and the activation saving of each recomputation mode against none.

    python scripts/bench_recompute.py [--hidden 256] [--seq 256] [--micro-batch 2] [--layers 4] [--iters 10]

One process (one thread) builds the same MoE model with MLA (a dense first layer, then MoE
layers of 8 routed experts, top-2, and a shared expert) once per mode, from one seed, and times
a forward and backward of one micro-batch; the modes take turns within each round, so a
machine that slows down slows all of them alike. Printed per mode: the median time, its ratio to
no recomputation, the peak bytes held for the backward (ActivationTracker, as the memory
report counts them) and whether the loss and every gradient equal no recomputation's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadual.config import ModelConfig
from megadual.model.gpt import build_chunk, full_model_stage
from megadual.parallel.context import BuildContext
from megadual.parallel.recompute import RecomputePlan
from megadual.training.memory import MB, ActivationTracker

MODES = {
    "none": RecomputePlan(),
    "selective core_attn": RecomputePlan("selective"),
    "selective layernorm": RecomputePlan("selective", modules=frozenset({"layernorm"})),
    "selective mla_up_proj,core_attn": RecomputePlan("selective", modules=frozenset({"mla_up_proj", "core_attn"})),
    "selective moe_act": RecomputePlan("selective", modules=frozenset({"moe_act"})),
    "selective shared_experts": RecomputePlan("selective", modules=frozenset({"shared_experts"})),
    "selective mlp": RecomputePlan("selective", modules=frozenset({"mlp"})),
    "selective moe": RecomputePlan("selective", modules=frozenset({"moe"})),
    "full uniform 1": RecomputePlan("full", "uniform", 1),
    "full block 2": RecomputePlan("full", "block", 2),
}


def model_config(args) -> ModelConfig:
    h = args.hidden
    return ModelConfig(num_layers=args.layers, hidden_size=h, ffn_hidden_size=2 * h, num_attention_heads=8,
                       num_query_groups=8, seq_length=args.seq, vocab_size=1024, num_experts=8,
                       moe_ffn_hidden_size=h, moe_router_topk=2, moe_shared_expert_intermediate_size=h,
                       moe_first_k_dense=1, multi_latent_attention=True, q_lora_rank=h // 2,
                       kv_lora_rank=h // 4, qk_head_dim=h // 8, qk_pos_emb_head_dim=h // 16, v_head_dim=h // 8)


def step(chunk, batch) -> tuple[float, torch.Tensor, int, dict[str, torch.Tensor]]:
    """(seconds, loss, peak activation bytes, gradients) of one forward and backward."""
    tracker = ActivationTracker(chunk.parameters())
    chunk.recompute.observer = tracker
    start = time.perf_counter()
    loss = chunk(*batch)
    loss.backward()
    elapsed = time.perf_counter() - start
    chunk.recompute.observer = None
    grads = {name: p.grad for name, p in chunk.named_parameters()}
    chunk.zero_grad(set_to_none=True)
    return elapsed, loss.detach(), tracker.peak, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = model_config(args)
    chunks = {mode: build_chunk(config, full_model_stage(config), seed=1, ctx=BuildContext(recompute=plan))
              for mode, plan in MODES.items()}
    g = torch.Generator().manual_seed(0)
    tokens, labels = (torch.randint(0, config.vocab_size, (args.micro_batch, args.seq), generator=g) for _ in "tl")
    batch = (tokens, labels, torch.arange(args.micro_batch))
    times = {mode: [] for mode in MODES}
    reference = step(chunks["none"], batch)
    results = {}
    for i in range(args.warmup + args.iters):
        for mode, chunk in chunks.items():
            results[mode] = step(chunk, batch)
            if i >= args.warmup:
                times[mode].append(results[mode][0])
    base = statistics.median(times["none"])
    print(f"MLA + MoE, {args.layers} layers, hidden {args.hidden}, seq {args.seq}, micro-batch {args.micro_batch}, "
          f"1 thread, median of {args.iters}")
    print("| mode | forward+backward (ms) | time / none | peak activations (MB) | / none | bit-identical |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        _, loss, peak, grads = results[mode]
        same = torch.equal(loss, reference[1]) and all(torch.equal(grads[n], g) for n, g in reference[3].items())
        median = statistics.median(times[mode])
        print(f"| {mode} | {median * 1e3:.1f} | {median / base:.2f} | {peak / MB:.2f} | "
              f"{peak / reference[2]:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
