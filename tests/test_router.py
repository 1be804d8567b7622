"""DeepSeek-V3 routing: node limit, bias for selection only, balance loss, bias update."""
import itertools
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from megadual.config import ModelConfig
from megadual.moe.router import Router, RoutingStats, balance_loss, node_limited_topk, nodes_per_token
from megadual.parallel.params import ParamSpec
from megadual.parallel.tensor import attach_wgrad_store
from megadual.parallel.wgrad import WeightGradStore

pytestmark = pytest.mark.usefixtures("on_device_under_test")  # made on CUDA under scripts/gpu_check.sh

CFG = ModelConfig(hidden_size=16, num_experts=8, moe_router_topk=4, moe_router_max_nodes=2,
                  moe_router_num_groups=4, moe_aux_loss_coeff=1.0, moe_router_topk_scaling_factor=2.5)


def brute_force_node_limited(scores, topk, nodes, limit):
    per_node = scores.numel() // nodes
    node_score = [scores[n * per_node:(n + 1) * per_node].topk(topk // limit).values.sum() for n in range(nodes)]
    best = sorted(range(nodes), key=lambda n: -node_score[n])[:limit]
    allowed = [e for e in range(scores.numel()) if e // per_node in best]
    return set(sorted(allowed, key=lambda e: -scores[e])[:topk])


def test_node_limited_topk_matches_definition_and_limits_nodes():
    torch.manual_seed(0)
    scores = torch.rand(200, 8)
    chosen = node_limited_topk(scores, 4, 4, 2)
    assert int(nodes_per_token(chosen, 8, 4).max()) == 2
    for t in range(200):
        assert set(chosen[t].tolist()) == brute_force_node_limited(scores[t], 4, 4, 2)
    unrestricted = scores.topk(4).indices
    assert not torch.equal(chosen.sort().values, unrestricted.sort().values)  # the limit does bind


def test_node_limit_is_a_no_op_when_nodes_do_not_exceed_m():
    scores = torch.rand(50, 8)
    assert torch.equal(node_limited_topk(scores, 4, 4, 4), scores.topk(4).indices)
    assert torch.equal(node_limited_topk(scores, 4, 1, 4), scores.topk(4).indices)


def seeded_router(seed: int, std: float, tokens: int) -> tuple[Router, torch.Tensor]:
    torch.manual_seed(seed)
    router = Router(CFG, num_nodes=4)
    torch.nn.init.normal_(router.weight, std=std)
    return router, torch.randn(tokens, 16)


def test_bias_steers_selection_but_not_gate_values():
    router, x = seeded_router(0, 0.5, 64)
    plain = router(x, num_sequences=1)
    router.expert_bias[7] = 10.0
    biased = router(x, num_sequences=1)
    assert (biased.indices == 7).any(-1).all() and not (plain.indices == 7).any(-1).all()
    scores = torch.sigmoid(x @ router.weight.t())
    want = scores.gather(-1, biased.indices)
    want = want / want.sum(-1, keepdim=True) * 2.5
    assert torch.allclose(biased.gates, want, atol=1e-6)
    assert torch.allclose(biased.gates.sum(-1), torch.full((64,), 2.5), atol=1e-5)


def written_out_balance_loss(normalized, idx, b, e, k) -> float:
    """The report's sequence-wise loss sum_i f_i P_i, averaged over the b sequences (tokens [s, b])."""
    s = normalized.shape[0] // b
    want = 0.0
    for seq in range(b):
        tokens = [t * b + seq for t in range(s)]
        for i in range(e):
            f = e / (k * s) * sum(int(i in idx[t].tolist()) for t in tokens)
            p = sum(float(normalized[t, i]) for t in tokens) / s
            want += f * p
    return want / b


def test_sequence_balance_loss_matches_formula():
    torch.manual_seed(0)
    s, b, e, k = 6, 3, 8, 2
    scores = torch.rand(s * b, e)
    normalized = scores / scores.sum(-1, keepdim=True)
    idx = scores.topk(k).indices
    got = balance_loss(normalized, idx, b, e, k)
    assert abs(float(got) - written_out_balance_loss(normalized, idx, b, e, k)) < 1e-6


@pytest.mark.parametrize("kind", ["seq_aux_loss", "aux_loss", "none"])
def test_aux_loss_is_the_chosen_balance_loss_times_its_coefficient(kind):
    """--moe-router-load-balancing-type: per sequence, over the whole micro-batch as one, or none."""
    torch.manual_seed(2)
    router = Router(replace(CFG, moe_router_load_balancing_type=kind, moe_aux_loss_coeff=0.3), num_nodes=4)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(40, 16)
    r = router(x, num_sequences=4)
    scores = torch.sigmoid(x @ router.weight.t()).detach().cpu().double()
    normalized = scores / scores.sum(-1, keepdim=True)
    groups = {"seq_aux_loss": 4, "aux_loss": 1}.get(kind)
    want = 0.3 * written_out_balance_loss(normalized, r.indices.cpu(), groups, 8, 4) if groups else 0.0
    assert abs(float(r.aux_loss.detach()) - want) < 1e-6


def test_routing_statistics_add_up_the_counted_routings():
    """What a step logs and the bias update reads: every expert's tokens, the aux losses, calls, tokens,
    destination nodes (sum and most) and dispatch rows, summed over the routings of the step, a
    recomputed routing (stats_paused) left out; taking them starts the next step from nothing."""
    torch.manual_seed(4)
    router = Router(replace(CFG, moe_router_max_nodes=4), num_nodes=4)  # tokens reach 1 to 4 nodes
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(40, 16)
    first = router(x[:37], num_sequences=1)
    with router.stats_paused():
        router(x, num_sequences=4)
    second = router(x[37:], num_sequences=1)
    router.stats.record_dispatch(5, 7)
    router.stats.record_dispatch(1, 2)
    stats = router.take_stats()
    chosen = torch.cat([first.indices, second.indices]).cpu()
    nodes = [len({e // 2 for e in row}) for row in chosen.tolist()]  # 8 experts on 4 nodes
    load = [sum(row.count(e) for row in chosen.tolist()) for e in range(8)]
    sums, most = stats.as_tensors(x.device)
    assert sums.dtype == torch.float64 and sums[:8].tolist() == load
    assert sums[9:].tolist() == [2, 40, sum(nodes), 6, 9]  # calls, tokens, node counts, inter-, intra-node rows
    assert abs(float(sums[8]) - float(first.aux_loss.detach() + second.aux_loss.detach())) < 1e-6
    assert most.tolist() == [max(nodes)] and max(nodes[:37]) != max(nodes[37:])  # the most of both calls
    router(x[:5], num_sequences=1)
    assert router.take_stats().tokens_per_expert.sum() == 5 * 4  # the next step counts from nothing
    sums, most = RoutingStats(8).as_tensors(x.device)  # a router that saw nothing
    assert sums.tolist() == [0.0] * 14 and most.tolist() == [0]
    many = RoutingStats(8)
    many.tokens = 2 ** 24 + 1  # a step's tokens past float32's integers: counted exactly
    assert many.as_tensors(x.device)[0][10].item() == 2 ** 24 + 1


def test_gates_in_the_tokens_dtype_and_the_weight_gradient_deferred_to_its_w():
    """The gate is computed in FP32 (fp32_linear) but returned in the tokens' dtype; under the W split
    the router's weight gradient waits for the store's W as every other linear's does."""
    router, x = seeded_router(5, 1.0, 12)
    assert router(x.bfloat16(), num_sequences=1).gates.dtype == torch.bfloat16
    store = WeightGradStore()
    attach_wgrad_store(router, store)
    with store.deferrable_forward():
        routing = router(x, num_sequences=1)
    with store.split_backward():
        routing.gates.square().sum().backward()
    assert router.weight.grad is None and len(store) == 1
    store.pop()
    assert router.weight.grad is not None


def test_router_weight_is_initialized_and_its_gradient_summed_over_tp_when_tp_splits_the_sequence():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        tp = dist.new_group([0, 1])
        assert Router(CFG, 4, tp).param_specs == {"weight": ParamSpec(CFG.init_method_std, grad_partial_over_tp=True)}
        assert Router(CFG, 4).param_specs == {"weight": ParamSpec(CFG.init_method_std, grad_partial_over_tp=False)}
    finally:
        dist.destroy_process_group()


def test_stats_and_aux_loss_use_final_node_limited_routing():
    router, x = seeded_router(1, 1.0, 40)
    r = router(x, num_sequences=4)
    stats = router.take_stats()
    assert torch.equal(stats.tokens_per_expert, torch.bincount(r.indices.flatten(), minlength=8).double())
    assert stats.node_count_max <= 2
    normalized = torch.sigmoid(x @ router.weight.t())
    normalized = normalized / normalized.sum(-1, keepdim=True)
    assert torch.allclose(r.aux_loss, balance_loss(normalized, r.indices, 4, 8, 4))


def test_bias_update_moves_against_load():
    router = Router(CFG, num_nodes=4)
    router.update_bias(torch.tensor([10., 0, 5, 5, 5, 5, 5, 5]), rate=0.01)
    assert router.expert_bias[0] < 0 < router.expert_bias[1]
    assert router.expert_bias[2] == 0


def test_every_combination_of_max_nodes_respects_limit():
    scores = torch.rand(30, 16)
    for nodes, limit in itertools.product([2, 4, 8], [1, 2]):
        if 4 // limit > 16 // nodes:
            continue  # rejected by config validation: a node cannot supply topk/M experts
        chosen = node_limited_topk(scores, 4, nodes, limit)
        assert int(nodes_per_token(chosen, 16, nodes).max()) <= limit
