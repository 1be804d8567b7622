"""Activation recomputation gives the same run, bit for bit: losses, every gradient, the routers'
statistics, with dropout, under the W split and inside a paired forward/backward chunk; the MLA
case with an MTP layer and the grouped-GEMM experts."""
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch

from megadual.model.gpt import build_chunk, full_model_stage
from megadual.parallel.comm import BackwardOverlap
from megadual.parallel.context import BuildContext
from megadual.parallel.recompute import RecomputePlan
from megadual.parallel.wgrad import WeightGradStore
from megadual.pipeline.overlap import overlapped_forward_backward
from tests.test_model import CFG, batch

DROPOUT = replace(CFG, hidden_dropout=0.1, attention_dropout=0.1)
MLA = replace(DROPOUT, multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=8,
              qk_pos_emb_head_dim=4, v_head_dim=8, mtp_num_layers=1)
ALL_MODULES = frozenset({"core_attn", "layernorm", "mlp", "moe", "shared_experts"})  # moe_act: its own test
PLANS = {  # MHA
    "selective-default": RecomputePlan("selective"),
    "selective-layernorm-mlp-shared": RecomputePlan(
        "selective", modules=frozenset({"layernorm", "mlp", "shared_experts"})),
    "selective-moe": RecomputePlan("selective", modules=frozenset({"moe", "core_attn"})),
    "full-uniform-2": RecomputePlan("full", "uniform", 2),
}
MLA_PLANS = {
    "selective-mla_up_proj": RecomputePlan("selective", modules=frozenset({"mla_up_proj"})),
    "selective-all": RecomputePlan("selective", modules=ALL_MODULES | {"mla_up_proj"}),
}


def train_pair(config, plan, grouped_gemm):
    """Micro-batch B forward (weights deferrable), then B's backward paired with A's forward (the
    F&B chunk), then A's backward with its weight gradients deferred to a W."""
    chunk = build_chunk(config, full_model_stage(config), seed=5, ctx=BuildContext(recompute=plan, grouped_gemm=grouped_gemm))
    store, overlap = WeightGradStore(), BackwardOverlap()
    chunk.attach_schedule(store, overlap)
    (tokens_a, labels_a), (tokens_b, labels_b) = batch(1), batch(2)
    samples_a, samples_b = torch.tensor([0, 1]), torch.tensor([2, 3])
    with store.deferrable_forward():
        loss_b = chunk(tokens_b, labels_b, samples_b).loss
    loss_a = overlapped_forward_backward(chunk.forward_steps(tokens_a, labels_a, samples_a), loss_b.backward,
                                         nullcontext, overlap).loss
    with store.deferrable_forward(False), store.split_backward():
        loss_a.backward()
    store.pop()
    routers = [layer.mlp.router.take_stats().tokens_per_expert for layer in chunk.layers.values() if layer.is_moe]
    grads = {name: p.grad for name, p in chunk.named_parameters()}
    return [loss_a.detach(), loss_b.detach()], grads, routers


@pytest.mark.parametrize("config, plans, grouped_gemm", [(DROPOUT, PLANS, False), (MLA, MLA_PLANS, True)],
                         ids=["MHA", "MLA"])
def test_recomputation_changes_nothing(config, plans, grouped_gemm):
    """(The layouts: tests/test_memory_layouts.py; full block recomputation under PP4 DualPipeV.)"""
    losses, grads, routers = train_pair(config, RecomputePlan(), grouped_gemm)
    for name, plan in plans.items():
        got_losses, got_grads, got_routers = train_pair(config, plan, grouped_gemm)
        assert all(torch.equal(a, b) for a, b in zip(got_losses, losses)), name
        assert all(torch.equal(a, b) for a, b in zip(got_routers, routers)), name
        for param, grad in grads.items():
            assert torch.equal(got_grads[param], grad), (name, param)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("grouped_gemm", [False, True], ids=["looped", "grouped"])
def test_moe_act_keeps_the_swiglu_input_in_fp8(grouped_gemm):
    """moe_act keeps the routed and shared experts' SwiGLU input in E4M3 1x128 tiles and recomputes the
    activation and the down-projection's input from it: the forward is unchanged, the gradients differ
    from the full-precision cache by FP8's rounding (measured here: at most 3.4% of a gradient's norm, a
    router's weight; E4M3 keeps 3 mantissa bits, a rounding error up to 6.25%)."""
    losses, grads, routers = train_pair(DROPOUT, RecomputePlan(), grouped_gemm)
    plan = RecomputePlan("selective", modules=frozenset({"moe_act"}))
    got_losses, got_grads, got_routers = train_pair(DROPOUT, plan, grouped_gemm)
    assert all(torch.equal(a, b) for a, b in zip(got_losses, losses))
    assert all(torch.equal(a, b) for a, b in zip(got_routers, routers))
    errors = {name: relative_error(got_grads[name], grad) for name, grad in grads.items()}
    assert max(errors.values()) < 0.05, errors
    # the cache is FP8, not the full-precision input: in the last MoE layer, whose output's gradient
    # meets no FP8 cache, its routed experts' and its shared expert's own
    last = max(int(name.split(".")[1]) for name in grads if ".experts." in name)
    for part in (".experts.", ".shared."):
        assert max(error for name, error in errors.items() if name.startswith(f"layers.{last}.") and part in name) > 1e-4
