"""What a training run produced, gathered from every rank to rank 0 under global names.

Used by the layout checker (megadual/verify.py) to compare a parallel run with one process.
Each rank sends its pieces of every parameter (its first-step gradient, its value after the
last step) and buffer, tagged from the parameter table: a TP shard with its dim and rank; a
copy held elsewhere too (DP and TP replicas, the expert-data-parallel ranks of an expert,
DualPipe's mirrored copy of a stage). Rank 0 joins the shards of each name into the whole
tensor, and measures how far the copies of each piece are apart: after the same reduced
gradient and the same optimizer step they must be equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megadual.config import RunConfig
from megadual.pipeline.stage_model import StageModel
from megadual.training.dist_optimizer import optimizer_state_bytes
from megadual.training.loop import RunResult, pretrain
from megadual.training.memory import MemoryReport
from megadual.training.metrics import mtp_fields


@dataclass(frozen=True)
class Piece:
    name: str  # the global name
    tensor: torch.Tensor  # on the CPU
    tp_dim: int | None = None  # a TP shard: the dim it is cut along, its rank, the TP size
    tp_rank: int = 0
    tp_size: int = 1
    mirror: bool = False  # held by DualPipe's second copy of a stage


@dataclass
class Capture:
    """One run as rank 0 saw it. `logged`: every logged value per step (and validation loss per
    evaluation) by its log-line name; `replica_spread`: per name, the largest relative
    difference between two copies of one piece after the last step; `optimizer_state_bytes`:
    what each rank's optimizer holds (dist_optimizer.optimizer_state_bytes); `traffic`: the
    dispatch rows per token each step sent across and inside nodes (layout-dependent, so not
    compared with one process)."""
    logged: dict[str, list[float]] = field(default_factory=dict)
    grad_norms: list[float] = field(default_factory=list)
    first_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    final: dict[str, torch.Tensor] = field(default_factory=dict)
    replica_spread: dict[str, float] = field(default_factory=dict)
    optimizer_state_bytes: list[int] = field(default_factory=list)  # by rank
    traffic: dict[str, list[float]] = field(default_factory=dict)
    memory: list[MemoryReport] = field(default_factory=list)  # every rank's, by rank
    host_syncs: list[int | None] = field(default_factory=list)  # rank 0's per step (MEGADUAL_DEVICE_CHECK)


def relative_difference(value: torch.Tensor | float, reference: torch.Tensor | float) -> float:
    """||value - reference|| / ||reference|| (a scalar's absolute value; 0 when both are equal,
    including both NaN; inf against a zero reference)."""
    value, reference = (torch.as_tensor(t, dtype=torch.float64) for t in (value, reference))
    if torch.equal(value, reference) or (value.isnan().all() and reference.isnan().all()):
        return 0.0
    scale = float(reference.norm())
    return float((value - reference).norm()) / scale if scale > 0 else math.inf


def _pieces(model: StageModel, grads: dict[str, torch.Tensor] | None = None) -> list[Piece]:
    """This rank's pieces: parameter values and buffers, or given `grads` (by name), the gradients."""
    values = grads is None
    pieces = []
    for r in model.param_table:
        tensor = r.param if values else grads[r.name]
        tp = r.spec.tp
        shard = {} if tp is None else {"tp_dim": tp.dim, "tp_rank": tp.rank, "tp_size": tp.size}
        pieces.append(Piece(r.name, tensor.detach().cpu().clone(), mirror=r.mirror, **shard))
    if values:
        pieces += [Piece(name, buffer.detach().cpu().clone(), mirror=chunk.copy)
                   for chunk in model.chunks for name, buffer in chunk.named_buffers()]
    return pieces


def _gather(pieces: list) -> list | None:
    """Every rank's pieces (or other items) on rank 0, in rank order (None elsewhere)."""
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(pieces, everyone, dst=0)
    return None if everyone is None else [p for rank_pieces in everyone for p in rank_pieces]


def assemble(pieces: list[Piece]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(whole tensor by name, largest relative difference between copies of one piece by name).
    The whole tensor joins, per TP shard, the first copy (a first copy of a stage before a mirror)."""
    copies: dict[str, dict[int, list[Piece]]] = {}
    for piece in sorted(pieces, key=lambda p: p.mirror):  # stable: rank order within each kind
        copies.setdefault(piece.name, {}).setdefault(piece.tp_rank, []).append(piece)
    whole, spread = {}, {}
    for name, shards in copies.items():
        firsts = [shards[rank][0] for rank in sorted(shards)]
        if len(firsts) != firsts[0].tp_size:
            raise RuntimeError(f"{name}: {len(firsts)} of its {firsts[0].tp_size} TP shards were gathered")
        whole[name] = firsts[0].tensor if len(firsts) == 1 else torch.cat([p.tensor for p in firsts],
                                                                          firsts[0].tp_dim)
        spread[name] = max(relative_difference(copy.tensor, shard[0].tensor)
                           for shard in shards.values() for copy in shard)
    return whole, spread


def _logged(result: RunResult) -> dict[str, list[float]]:
    steps = result.steps
    logged = {"lm loss": [s.lm_loss for s in steps],
              "load_balancing_loss": [s.routing.aux_loss for s in steps],
              "moe max/mean expert load": [s.routing.max_over_mean_load for s in steps],
              "moe nodes per token mean": [s.routing.nodes_per_token_mean for s in steps],
              "moe nodes per token max": [float(s.routing.nodes_per_token_max) for s in steps]}
    for step in steps:
        for name, loss in mtp_fields(step.mtp_losses).items():
            logged.setdefault(name, []).append(loss)
    logged["validation lm loss"] = []  # present without evaluation too
    for losses in result.validation_losses:
        for name, loss in losses.items():
            logged.setdefault(f"validation {name}", []).append(loss)
    return logged


def _traffic(result: RunResult) -> dict[str, list[float]]:
    return {"moe inter-node rows per token": [s.routing.inter_node_rows_per_token for s in result.steps],
            "moe intra-node rows per token": [s.routing.intra_node_rows_per_token for s in result.steps]}


def capture_run(config: RunConfig, device: torch.device) -> Capture | None:
    """Train as `config` says (quietly) and return what rank 0 gathered; None on other ranks."""
    first_step: dict[str, list[Piece] | None] = {}

    def grad_hook(model: StageModel, gradients) -> None:
        if not first_step:
            first_step["grads"] = _gather(_pieces(model, gradients()))

    result = pretrain(config, device, log=lambda line: None, grad_hook=grad_hook)
    final = _gather(_pieces(result.model))
    memory = _gather([result.memory])
    state_bytes = _gather([optimizer_state_bytes(result.optimizer)])
    if final is None:
        return None
    values, spread = assemble(final)
    grads = assemble(first_step["grads"])[0]
    return Capture(_logged(result), [s.grad_norm for s in result.steps], grads, values, spread, state_bytes,
                   _traffic(result), memory, [s.host_syncs for s in result.steps])
