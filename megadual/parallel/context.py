"""What a rank's layers are built with: the groups they communicate over and the GEMM they run."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from megadual.parallel.linear import linear
from megadual.parallel.recompute import RecomputePlan
from megadual.parallel.tensor import NO_TP, TensorParallel


@dataclass(frozen=True)
class BuildContext:
    """The default builds the one-process, full-precision model."""
    tp: TensorParallel = NO_TP
    ep_group: object = None  # the expert-parallel group; None: every expert on this rank
    num_nodes: int = 1  # nodes the EP group spans, for node-limited routing and the dispatch's traffic count
    gemm: Callable = linear  # the linear GEMM: full precision, or fp8.linear.fp8_linear
    fp8_dispatch: bool = False  # tokens travel to their experts in E4M3
    recompute: RecomputePlan = field(default_factory=RecomputePlan)  # activations recomputed in the backward
    # (inter-node, intra-node) groups of a node-hierarchical dispatch; None: the flat all-to-all
    ep_node_groups: tuple[object, object] | None = None
    grouped_gemm: bool = False  # routed experts as one grouped GEMM (moe/grouped_gemm.py)


ONE_PROCESS = BuildContext()
