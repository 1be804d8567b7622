"""DeepSeek-V3 routing: node limit, bias for selection only, balance loss, bias update."""
import itertools

import pytest
import torch

from megadual.config import ModelConfig
from megadual.moe.router import Router, balance_loss, node_limited_topk, nodes_per_token

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


def test_sequence_balance_loss_matches_formula():
    torch.manual_seed(0)
    s, b, e, k = 6, 3, 8, 2
    scores = torch.rand(s * b, e)
    normalized = scores / scores.sum(-1, keepdim=True)
    idx = scores.topk(k).indices
    want = 0.0
    for seq in range(b):
        tokens = [t * b + seq for t in range(s)]
        for i in range(e):
            f = e / (k * s) * sum(int(i in idx[t].tolist()) for t in tokens)
            p = sum(float(normalized[t, i]) for t in tokens) / s
            want += f * p
    got = balance_loss(normalized, idx, b, e, k)
    assert abs(float(got) - want / b) < 1e-6


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
