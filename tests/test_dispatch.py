"""Dispatch traffic, counted from the send counts: the flat all-to-all against the node-hierarchical one.

The layout of these checks: EP8 over 4 nodes of 2 ranks, 16 experts (2 per rank, 4 per node),
seen from EP rank 0 (node 0, in-node index 0). The multi-process equality of the two
dispatchers is in test_dispatch_layouts.py.
"""
import pytest
import torch

from megadual.moe.dispatcher import count_traffic, plan_rows
from megadual.moe.router import node_limited_topk

EXPERTS, RANKS, NODES, TOPK = 16, 8, 4, 4
PER_RANK, PER_NODE = EXPERTS // RANKS, EXPERTS // NODES
RANK_NODES = [q // (RANKS // NODES) for q in range(RANKS)]


def destinations(send_counts: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(send_counts)), torch.tensor(send_counts))


def flat_rows(indices: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Per token, the flat path's rows to other nodes; and its (inter, intra) count."""
    plan = plan_rows(indices, torch.ones(indices.shape, dtype=torch.float32), PER_RANK, RANKS)
    remote = torch.tensor(RANK_NODES)[destinations(plan.send_counts)] != 0
    per_token = torch.bincount(plan.source[remote], minlength=indices.shape[0])
    return per_token, count_traffic(plan.send_counts, RANK_NODES, 0)


def hierarchical_rows(indices: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Per token, hop 1's rows to other nodes (hop 1 runs over the ranks with in-node index 0,
    one per node); and hop 1's (inter, intra) count."""
    plan = plan_rows(indices, torch.ones(indices.shape, dtype=torch.float32), PER_NODE, NODES)
    remote = destinations(plan.send_counts) != 0
    per_token = torch.bincount(plan.source[remote], minlength=indices.shape[0])
    return per_token, count_traffic(plan.send_counts, range(NODES), 0)


def test_a_token_crosses_to_a_node_once_and_is_forwarded_inside_it():
    # Experts 8 and 10 sit on ranks 4 and 5, both on node 2: the flat path sends two rows there.
    indices = torch.tensor([[8, 10, 1, 0]])
    per_token, (inter, intra) = flat_rows(indices)
    assert per_token.tolist() == [2] and (inter, intra) == (2, 0)  # experts 0 and 1 are on rank 0 itself
    per_token, (inter, intra) = hierarchical_rows(indices)
    assert per_token.tolist() == [1] and (inter, intra) == (1, 0)
    # Node 2's rank with in-node index 0 (rank 4) receives the row (node-local experts 0 and 2, gates
    # on) and forwards it to its in-node neighbour, rank 5; the slot of expert 8 stays on rank 4.
    at_node = plan_rows(torch.tensor([[0, 2, -1, -1]]), torch.ones(1, 4), PER_RANK, RANKS // NODES)
    assert at_node.send_counts == [1, 1]
    assert at_node.experts.tolist() == [[0, -1, -1, -1], [-1, 0, -1, -1]]
    assert count_traffic(at_node.send_counts, [0, 0], 0) == (0, 1)


@pytest.mark.parametrize("max_nodes", [1, 2, 4])
def test_inter_node_rows_never_exceed_the_remote_nodes_of_a_tokens_experts(max_nodes):
    scores = torch.rand(512, EXPERTS, generator=torch.Generator().manual_seed(max_nodes))
    indices = node_limited_topk(scores, TOPK, NODES, max_nodes)
    remote_nodes = torch.tensor([len(set(nodes.tolist()) - {0}) for nodes in indices // PER_NODE])
    flat, _ = flat_rows(indices)
    hierarchical, _ = hierarchical_rows(indices)
    assert torch.equal(hierarchical, remote_nodes)
    assert int(hierarchical.max()) <= max_nodes
    assert bool((flat >= hierarchical).all())
    assert bool((flat > hierarchical).any())  # some token's experts sit on two ranks of a remote node


def test_fp8_dispatch_forwards_without_changing_a_token():
    # Hop 2 of the hierarchical dispatch quantizes the tokens hop 1 dequantized: that gives the same
    # values (each row's largest element keeps its scale), so both paths feed the experts alike.
    from megadual.fp8.quant import dequantize_from_dispatch, quantize_for_dispatch
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 64)[:, None]
    once = dequantize_from_dispatch(*quantize_for_dispatch(x), torch.float32)
    assert torch.equal(dequantize_from_dispatch(*quantize_for_dispatch(once), torch.float32), once)


@pytest.mark.parametrize("fp8_dispatch", [False, True])
def test_without_expert_parallelism_the_layer_skips_the_exchange_and_computes_the_same(fp8_dispatch):
    from dataclasses import replace

    from megadual.moe.dispatcher import LocalDispatcher, TokenDispatcher
    from megadual.moe.layer import MoELayer
    from megadual.parallel.context import ONE_PROCESS
    from tests.test_model import CFG
    layer = MoELayer(CFG, replace(ONE_PROCESS, fp8_dispatch=fp8_dispatch))
    assert isinstance(layer.dispatcher, LocalDispatcher)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2, generator=generator)
    x = torch.randn(16, 2, CFG.hidden_size, generator=generator)

    def run():
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        out.square().sum().backward()
        grads = [inputs.grad] + [p.grad for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return out.detach(), grads

    skipped, skipped_grads = run()
    layer.dispatcher = TokenDispatcher(CFG.num_experts, fp8_dispatch=fp8_dispatch)  # the exchange at one rank
    exchanged, exchanged_grads = run()
    assert torch.equal(skipped, exchanged)
    assert all(torch.equal(a, b) for a, b in zip(skipped_grads, exchanged_grads))
