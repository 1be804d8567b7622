"""The node-hierarchical dispatcher trains as the flat one does, and sends fewer rows across nodes.

Eight processes on virtual nodes of two ranks (--moe-ranks-per-node 2), 16 experts, top-4:
EP4 over 2 nodes with M = 1, 2 and EP8 over 4 nodes with M = 1, 2, 4 (--moe-router-max-nodes),
M = 2 with FP8 (GEMMs and dispatch). For each, the hierarchical run is compared with the flat
(alltoall) run by megadual.verify's comparison - logged values, grad norm, every first-step
gradient and every final parameter - on the dispatch traffic counted from the send counts, and
on the host-sync budget (one transfer per MoE layer per micro-batch forward for both hops).
All runs share one launch of the processes. The per-token bound on inter-node rows is checked
in test_dispatch.py.
"""
from dataclasses import replace

from megadual.verify import Tolerance, compare, launch_all
from tests.helpers import TINY_MOE

ARGS = TINY_MOE + ["--train-iters", "1", "--lr-warmup-iters", "1", "--moe-router-bias-update-rate", "1e-2",
                   "--no-bf16", "--global-batch-size", "16", "--moe-ranks-per-node", "2", "--num-experts", "16",
                   "--moe-router-topk", "4"]
FP8 = ["--fp8-format", "e4m3", "--moe-fp8-dispatch"]
CASES = {"EP4 M1": (4, 1, []), "EP4 M2 fp8": (4, 2, FP8), "EP8 M1": (8, 1, []), "EP8 M2 fp8": (8, 2, FP8),
         "EP8 M4": (8, 4, [])}
# The two paths sum a token's expert outputs in different orders (inside the node first, then
# across). Largest differences measured over these cases (and 2-iteration runs): logged values
# 1.7e-08, grad norm 2.8e-08, first-step gradients 3.9e-07, final values 6.8e-06; about 10x.
HIERARCHICAL_VS_FLAT = Tolerance("hierarchical vs flat", logged=2e-7, grad_norm=3e-7, grads=4e-6, final=7e-5)
# FP8 GEMMs quantize the gradients, where a difference that small can move an element across a
# rounding step: measured 3.1e-04 on one first-step gradient (EP4 M2, layers.0.mlp.down.weight).
FP8_GRADS = 3e-3


def test_hierarchical_dispatch_matches_flat_and_crosses_each_node_once():
    runs = {(name, dispatcher): (8, ARGS + extra + ["--expert-model-parallel-size", str(ep),
                                                    "--moe-router-max-nodes", str(m),
                                                    "--moe-token-dispatcher-type", dispatcher])
            for name, (ep, m, extra) in CASES.items() for dispatcher in ("alltoall", "hierarchical")}
    captures = launch_all(runs)
    for name, (ep, m, extra) in CASES.items():
        flat, hierarchical = captures[name, "alltoall"], captures[name, "hierarchical"]
        tolerance = replace(HIERARCHICAL_VS_FLAT, grads=FP8_GRADS) if FP8[0] in extra else HIERARCHICAL_VS_FLAT
        report = compare(hierarchical, flat, tolerance)
        assert report.passed, report.format(name)
        flat_inter, inter = (c.traffic["moe inter-node rows per token"][0] for c in (flat, hierarchical))
        intra = hierarchical.traffic["moe intra-node rows per token"][0]
        # One row per remote node of the token's experts (at most M, fewer than the nodes it reaches
        # when its own is among them), where the flat path sends one per remote rank.
        nodes = flat.logged["moe nodes per token mean"][0]
        assert 0 < inter <= nodes <= m and inter < flat_inter, (name, inter, nodes, flat_inter)
        assert intra > 0, name
        # The host-sync budget (tests/test_host_syncs.py): one transfer per MoE layer per micro-batch
        # forward, both hops' counts in it, and one per step; 2 MoE layers, 1 micro-batch per rank.
        assert hierarchical.host_syncs == flat.host_syncs == [2 * 1 + 1], (name, hierarchical.host_syncs)
