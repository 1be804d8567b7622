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
    num_nodes: int = 1  # nodes the EP group spans, for node-limited routing
    gemm: Callable = linear  # the linear GEMM: full precision, or fp8.linear.fp8_linear
    fp8_dispatch: bool = False  # tokens travel to their experts in E4M3
    recompute: RecomputePlan = field(default_factory=RecomputePlan)  # activations recomputed in the backward


ONE_PROCESS = BuildContext()
