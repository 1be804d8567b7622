"""The decoder: layout-free initialization, MoE math against a naive loop, causality, W split."""
import pytest
import torch

from megadual.config import ModelConfig
from megadual.model.gpt import StageSpec, build_chunk, full_model_stage
from megadual.moe.layer import MoELayer
from megadual.parallel.params import ParamSpec, ParamTable, TPShard
from megadual.parallel.rng import initialize_parameters
from megadual.parallel.wgrad import WeightGradStore
from tests.helpers import device_under_test

pytestmark = pytest.mark.usefixtures("on_device_under_test")  # made on CUDA under scripts/gpu_check.sh

CFG = ModelConfig(num_layers=3, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  seq_length=16, vocab_size=128, num_experts=8, moe_ffn_hidden_size=16,
                  moe_shared_expert_intermediate_size=16, moe_router_topk=4, moe_router_num_groups=4,
                  moe_router_max_nodes=2, moe_router_topk_scaling_factor=2.5)


def batch(seed=0, b=2):
    g = torch.Generator(device_under_test()).manual_seed(seed)
    return torch.randint(0, 128, (b, 16), generator=g), torch.randint(0, 128, (b, 16), generator=g)


def test_initial_weights_depend_only_on_seed_and_global_name():
    full = dict(build_chunk(CFG, full_model_stage(CFG), seed=7).named_parameters())
    again = dict(build_chunk(CFG, full_model_stage(CFG), seed=7).named_parameters())
    other_seed = dict(build_chunk(CFG, full_model_stage(CFG), seed=8).named_parameters())
    last_stage = dict(build_chunk(CFG, StageSpec(2, 3, False, True), seed=7).named_parameters())
    assert all(torch.equal(full[n], again[n]) for n in full)
    assert not torch.equal(full["layers.1.attention.q.weight"], other_seed["layers.1.attention.q.weight"])
    assert set(last_stage) < set(full)
    assert all(torch.equal(full[n], p) for n, p in last_stage.items())


class _Holder(torch.nn.Module):
    def __init__(self, shape, spec):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(shape))
        self.param_specs = {"w": spec}


def test_tensor_parallel_shards_are_slices_of_the_full_weight():
    full = _Holder((8, 6), ParamSpec(1.0))
    initialize_parameters(ParamTable.build(full), seed=3)
    for rank in range(2):
        shard = _Holder((4, 6), ParamSpec(1.0, TPShard(0, rank, 2, None)))
        initialize_parameters(ParamTable.build(shard), seed=3)
        assert torch.equal(shard.w, full.w[4 * rank:4 * rank + 4])


def test_a_parameter_without_a_spec_is_refused():
    module = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="Linear declares no ParamSpec for its parameter weight"):
        ParamTable.build(module)


def test_moe_layer_equals_naive_per_token_sum():
    torch.manual_seed(0)
    layer = MoELayer(CFG)
    initialize_parameters(ParamTable.build(layer), seed=1)
    x = torch.randn(16, 2, 32)
    out = layer(x)
    flat = x.reshape(-1, 32)
    routing = layer.router(flat, num_sequences=2)
    want = layer.shared(x).reshape(-1, 32).clone()
    experts = list(layer.experts.local.values())
    for t in range(flat.shape[0]):
        for slot in range(4):
            e = int(routing.indices[t, slot])
            want[t] += routing.gates[t, slot] * experts[e](flat[t:t + 1])[0]
    assert torch.allclose(out.reshape(-1, 32), want, atol=1e-5)


def test_attention_is_causal():
    model = build_chunk(CFG, StageSpec(0, 1, True, False), seed=1)
    tokens, _ = batch()
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 128
    a, b = model(tokens), model(changed)  # [s, b, h]
    assert torch.allclose(a[:10], b[:10], atol=1e-6)
    assert not torch.allclose(a[10:], b[10:])


def test_weight_gradient_split_gives_identical_gradients():
    tokens, labels = batch()
    plain = build_chunk(CFG, full_model_stage(CFG), seed=1)
    plain(tokens, labels).loss.backward()
    split = build_chunk(CFG, full_model_stage(CFG), seed=1)
    store = WeightGradStore()
    split.attach_schedule(store, None)
    with store.deferrable_forward():
        loss = split(tokens, labels).loss
    with store.split_backward():
        loss.backward()
    deferred = [n for n, p in split.named_parameters() if p.grad is None]
    assert any("experts" in n for n in deferred) and any("attention" in n for n in deferred)
    store.pop()
    grads = dict(plain.named_parameters())
    for name, p in split.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-6), name


def test_fp8_dispatch_delivers_dequantized_tokens_and_full_precision_grads():
    from megadual.fp8.quant import dequantize_from_dispatch, quantize_for_dispatch
    from megadual.moe.dispatcher import Hop
    x = torch.randn(10, 256, requires_grad=True)
    idx = torch.randint(0, 8, (10, 2))
    hop = Hop(None, 8, [0], fp8=True)
    d = hop.wait(hop.start(x, idx, torch.ones(10, 2), overlap=None))
    want = dequantize_from_dispatch(*quantize_for_dispatch(x.detach()[d.token_of_row]), torch.float32)
    assert torch.equal(d.tokens, want) and not torch.equal(d.tokens, x.detach()[d.token_of_row])
    d.tokens.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
