"""Memory per pipeline rank for scripts/bench_pipeline.py: measured as the memory report measures it
(training/memory.py: parameter storages, and the peak bytes held for the backward counted by its
ActivationTracker during one step), and planned by megadual.plan for the same flags."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from megadual.arguments import resolve_device_defaults
from megadual.plan.rank_memory import predict
from megadual.training.memory import ActivationTracker, storage_bytes
from pretrain_moe import load_config

if TYPE_CHECKING:
    from bench_pipeline import Bench, Variant


def measured(modules: list[torch.nn.Module], step: Callable[[], object]) -> tuple[int, int]:
    """(parameter bytes, peak activation bytes) of one step of `modules` (a rank's chunks)."""
    params = [p for module in modules for p in module.parameters()]
    tracker = ActivationTracker(params)
    for module in modules:
        module.recompute.observer = tracker
    try:
        step()
    finally:
        for module in modules:
            module.recompute.observer = None
    return storage_bytes(params), tracker.peak


def plan_flags(bench: Bench, variant: Variant) -> list[str]:
    """pretrain_moe.py's flags for the benchmark's model, batch and the variant's schedule."""
    m = bench.model
    flags = ["--mock-data", "--no-bf16", "--num-layers", m.num_layers, "--hidden-size", m.hidden_size,
             "--ffn-hidden-size", m.ffn_hidden_size, "--num-attention-heads", m.num_attention_heads,
             "--seq-length", m.seq_length, "--vocab-size", m.vocab_size,
             "--micro-batch-size", bench.micro_batch_size,
             "--global-batch-size", bench.microbatches * bench.micro_batch_size * bench.ep,
             "--pipeline-model-parallel-size", bench.pp, "--pipeline-schedule", variant.shape]
    if m.num_experts:
        flags += ["--num-experts", m.num_experts, "--moe-ffn-hidden-size", m.moe_ffn_hidden_size,
                  "--moe-router-topk", m.moe_router_topk, "--moe-first-k-dense", m.moe_first_k_dense,
                  "--moe-shared-expert-intermediate-size", m.moe_shared_expert_intermediate_size,
                  "--expert-model-parallel-size", bench.ep]
    if variant.shape == "interleaved":
        flags += ["--num-virtual-stages-per-pipeline-rank", variant.v]
    if variant.overlap:
        flags.append("--overlap-moe-expert-parallel-comm")
    if not variant.split_backward:
        flags.append("--no-pipeline-split-backward")
    return [str(flag) for flag in flags]


def planned(bench: Bench, variant: Variant) -> list[tuple[float, float]]:
    """Per pipeline rank, megadual.plan's (parameter bytes, peak activation bytes)."""
    config = resolve_device_defaults(load_config(plan_flags(bench, variant)), "cpu")
    return [(rank.parameters, rank.peak_activations) for rank in predict(config, bench.world)]
