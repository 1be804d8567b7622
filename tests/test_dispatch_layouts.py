"""The node-hierarchical dispatcher trains as the flat one does, and sends fewer rows across nodes.

Virtual nodes (--moe-ranks-per-node) on one machine: EP4 over 2 nodes with M = 1, 2 and EP8
over 4 nodes with M = 1, 2, 4 (--moe-router-max-nodes). For each, the flat (alltoall) and
hierarchical runs are compared on the losses and every first-step gradient, and on the
dispatch traffic the log line reports, counted from the send counts. All runs of one world
size share one launch of the processes.
"""
import re

import pytest

from tests.helpers import TINY_MOE
from tests.multiproc import spawn_runs
from tests.test_parallel_layouts import assert_same_run

ARGS = TINY_MOE + ["--train-iters", "2", "--log-interval", "1", "--moe-router-bias-update-rate", "1e-2"]
LAYOUTS = {"EP4-2nodes": (4, 2, [1, 2], []), "EP8-4nodes": (8, 2, [1, 2, 4], ["--global-batch-size", "16"])}


def logged(log: list[str], field: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{field}: ([\d.]+)", "\n".join(log))]


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_hierarchical_dispatch_matches_flat_and_crosses_each_node_once(layout):
    world, ranks_per_node, max_nodes, extra = LAYOUTS[layout]
    base = ARGS + extra + ["--expert-model-parallel-size", str(world), "--moe-ranks-per-node", str(ranks_per_node)]
    arg_lists = [base + ["--moe-router-max-nodes", str(m), "--moe-token-dispatcher-type", dispatcher]
                 for m in max_nodes for dispatcher in ("alltoall", "hierarchical")]
    runs = spawn_runs(world, arg_lists)
    for m, flat, hierarchical in zip(max_nodes, runs[::2], runs[1::2]):
        assert_same_run(hierarchical, flat)
        flat_inter, inter = (logged(r.log, "moe inter-node rows per token") for r in (flat, hierarchical))
        nodes = [float(v) for v in re.findall(r"moe nodes per token: mean ([\d.]+)", "\n".join(flat.log))]
        intra = logged(hierarchical.log, "moe intra-node rows per token")
        assert len(inter) == len(flat_inter) == 2
        # One row per remote node: fewer than the nodes a token reaches (its own among them, when it
        # is), at most M, and fewer than the flat path's one row per remote rank.
        assert all(0 < i <= n <= m for i, n in zip(inter, nodes)), (inter, nodes, m)
        assert all(i < f for i, f in zip(inter, flat_inter)), (inter, flat_inter)
        assert all(a > 0 for a in intra)
