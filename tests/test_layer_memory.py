"""The planner's per-layer activation count (megadual/plan/memory_model.py) against what each layer kind
really keeps for its backward, measured with the memory report's saved-tensor hooks
(training/memory.py): a tensor a layer starts saving fails here until the planner counts it."""
from contextlib import nullcontext

import pytest
import torch

from megadual.fp8.linear import fp8_linear
from megadual.model.block import TransformerLayer
from megadual.parallel.context import BuildContext
from megadual.parallel.linear import linear
from megadual.parallel.recompute import Recompute, RecomputePlan
from megadual.plan.memory_model import layer_activations, layer_breakdown
from megadual.plan.tensor_bytes import Precision, Shape
from megadual.training.memory import saved_by
from pretrain_moe import load_config
from tests.helpers import TINY_MOE

MLA = ["--multi-latent-attention", "--q-lora-rank", "48", "--kv-lora-rank", "32", "--qk-head-dim", "16",
       "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16"]
KINDS = {  # name: (flags, layer index): layer 0 is dense, 1 MoE; 3 (past --num-layers) an MTP module's
    "MHA dense": ([], 0),
    "MHA MoE": ([], 1),
    "MLA dense": (MLA, 0),
    "MLA MoE": (MLA, 1),
    "MLA no q-lora MoE": ([f for f in MLA if f not in ("--q-lora-rank", "48")], 1),
    "MTP layer": (["--mtp-num-layers", "1"], 3),
}
RECOMPUTE = {
    "none": (),
    "core_attn": ("core_attn",),
    "layernorm mla_up_proj": ("layernorm", "mla_up_proj"),
    "layernorm moe_act": ("layernorm", "moe_act"),  # the router in the norm's region; MLA's latent norms alone
    "mla_up_proj core_attn moe_act": ("mla_up_proj", "core_attn", "moe_act"),
    "layernorm mla_up_proj core_attn moe_act": ("layernorm", "mla_up_proj", "core_attn", "moe_act"),
    "mlp shared_experts moe_act": ("mlp", "shared_experts", "moe_act"),  # moe_act's region inside another
    "moe moe_act": ("moe", "moe_act"),
}


PRECISIONS = {  # --bf16, the distributed optimizer's BF16 weights under it, --fp8-format e4m3 alone and with each
    "bf16": Precision(autocast=True),
    "bf16-weights": Precision(autocast=True, bf16_weights=True),
    "fp8": Precision(fp8=True),
    "fp8-bf16": Precision(autocast=True, fp8=True),  # --bf16 with the plain optimizer's FP32 weights
    "fp8-bf16-weights": Precision(autocast=True, bf16_weights=True, fp8=True),
}


def measured(flags: list[str], index: int, modules: tuple[str, ...], micro_batch: int,
             precision: Precision = Precision()) -> tuple[int, object]:
    config = load_config(TINY_MOE + flags).model
    torch.manual_seed(0)
    layer = TransformerLayer(config, index, BuildContext(gemm=fp8_linear if precision.fp8 else linear))
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    dtype = torch.bfloat16 if precision.bf16_weights else torch.float32
    layer = layer.to(dtype)
    recompute = Recompute(frozenset(modules))
    for module in layer.modules():
        if hasattr(module, "recompute"):
            module.recompute = recompute
    x = torch.randn(config.seq_length, micro_batch, config.hidden_size, dtype=dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if precision.autocast else nullcontext():
        saved, _ = saved_by(layer.forward_steps, (x,), layer.parameters(), recompute)
    return saved, config


FP32_CASES = [(kind, modules, 2) for kind in KINDS for modules in RECOMPUTE] + \
    [("MHA dense", modules, 1) for modules in ("none", "core_attn")]  # SDPA's output layout at one sequence


@pytest.mark.parametrize("kind, modules, micro_batch", FP32_CASES)
def test_planner_counts_every_tensor_a_layer_keeps_in_fp32(kind, modules, micro_batch):
    flags, index = KINDS[kind]
    saved, config = measured(flags, index, RECOMPUTE[modules], micro_batch)
    plan = RecomputePlan("selective", modules=frozenset(RECOMPUTE[modules]))
    shape = Shape(config.seq_length, micro_batch)
    predicted = layer_activations(config, shape, index, plan)
    assert predicted.kept == saved, layer_breakdown(config, shape, index, plan)
    assert sum(predicted.kinds.values()) == predicted.kept


# core_attn alone keeps q, k (and MHA's v) as its region's inputs, not as autocast's casts SDPA keeps
@pytest.mark.parametrize("modules", ["none", "core_attn", "layernorm mla_up_proj core_attn moe_act"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_planner_counts_every_tensor_a_layer_keeps_in_every_precision(kind, precision, modules):
    flags, index = KINDS[kind]
    saved, config = measured(flags, index, RECOMPUTE[modules], 2, PRECISIONS[precision])
    plan = RecomputePlan("selective", modules=frozenset(RECOMPUTE[modules]))
    shape = Shape(config.seq_length, 2, precision=PRECISIONS[precision])
    assert layer_activations(config, shape, index, plan).kept == saved, layer_breakdown(config, shape, index, plan)


@pytest.mark.parametrize("gemm", [linear, fp8_linear], ids=["bf16", "fp8"])
def test_rows_kept_once_give_the_same_gradients(gemm):
    """The routed experts keep each row once, as its index (moe/rows.py; here top-4, BF16 weights, so the
    rows are smaller than their copies per pair), and remake the GEMMs' copies in the backward: the
    gradients are bit for bit those of the `moe` region, inside which the copies per pair are kept."""
    config = load_config(TINY_MOE + ["--moe-router-topk", "4"]).model
    grads = []
    for modules in ((), ("moe",)):
        torch.manual_seed(0)
        layer = TransformerLayer(config, 1, BuildContext(gemm=gemm))
        for p in layer.parameters():
            torch.nn.init.normal_(p, 0.0, 0.1)
        layer = layer.to(torch.bfloat16)
        recompute = Recompute(frozenset(modules))
        for module in layer.modules():
            if hasattr(module, "recompute"):
                module.recompute = recompute
        x = torch.randn(config.seq_length, 2, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        out.float().square().sum().backward()
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
