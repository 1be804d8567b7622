"""The planner's per-layer activation count (megadual/memory_model.py) against what each layer kind
really keeps for its backward, measured with the memory report's saved-tensor hooks
(training/memory.py): a tensor a layer starts saving fails here until the planner counts it."""
import pytest
import torch

from megadual.memory_model import Shape, layer_activations, layer_breakdown
from megadual.model.block import TransformerLayer
from megadual.parallel.context import BuildContext
from megadual.parallel.recompute import Recompute, RecomputePlan
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
    "mla_up_proj core_attn moe_act": ("mla_up_proj", "core_attn", "moe_act"),
    "mlp shared_experts": ("mlp", "shared_experts"),
    "moe": ("moe",),
}


def measured(flags: list[str], index: int, modules: tuple[str, ...], micro_batch: int) -> tuple[int, object]:
    config = load_config(TINY_MOE + flags).model
    torch.manual_seed(0)
    layer = TransformerLayer(config, index, BuildContext())
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    recompute = Recompute(frozenset(modules))
    for module in layer.modules():
        if hasattr(module, "recompute"):
            module.recompute = recompute
    x = torch.randn(config.seq_length, micro_batch, config.hidden_size, requires_grad=True)
    saved, _ = saved_by(layer.forward_steps, (x,), layer.parameters(), recompute)
    return saved, config


@pytest.mark.parametrize("micro_batch", [1, 2])
@pytest.mark.parametrize("modules", RECOMPUTE)
@pytest.mark.parametrize("kind", KINDS)
def test_planner_counts_every_tensor_a_layer_keeps_in_fp32(kind, modules, micro_batch):
    flags, index = KINDS[kind]
    saved, config = measured(flags, index, RECOMPUTE[modules], micro_batch)
    plan = RecomputePlan("selective", modules=frozenset(RECOMPUTE[modules]))
    shape = Shape(config.seq_length, micro_batch)
    predicted = layer_activations(config, shape, index, plan)
    assert predicted.kept == saved, layer_breakdown(config, shape, index, plan)
    assert sum(predicted.kinds.values()) == predicted.kept
