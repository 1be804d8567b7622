"""The world as a PP x DP x TP grid, with expert parallelism folded into DP x TP.

Rank order (fastest first): TP, DP, PP, as in Megatron-LM, so TP groups are on one
node. Within one pipeline stage the DP*TP ranks, numbered dp_rank*TP + tp_rank,
are cut into EP groups of consecutive ranks; ranks holding the same experts form
an expert-data-parallel group. An EP group spanning several nodes is cut two ways
for the node-hierarchical dispatch: `ep_inter`, the ranks with one in-node index (one
per node, by node), and `ep_intra`, the ranks of one node (by in-node index). Every
group is built here, once, and looked up by name; nothing else calls new_group.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from megadual.config_validate import validate_layout


def nodes_per_ep_group(ep: int, ranks_per_node: int) -> int:
    """Nodes one EP group spans: its `ep` consecutive ranks of a stage's DP x TP numbering (TP
    inside, so TP does not widen it), aligned to `ep` (validate_layout: EP divides the node or
    the node divides EP)."""
    return max(1, ep // ranks_per_node)


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    ranks_per_node: int = 0  # 0: one node holds the whole world

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def node_size(self) -> int:
        return self.ranks_per_node or self.world_size

    def validate(self) -> None:
        validate_layout(self.world_size, self.tp, self.pp, self.ep, self.node_size)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """rank -> (pp_rank, dp_rank, tp_rank)."""
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    @property
    def nodes_per_ep_group(self) -> int:
        return nodes_per_ep_group(self.ep, self.node_size)

    def group_members(self) -> dict[str, list[list[int]]]:
        """Every named group as lists of global ranks."""
        stage = self.dp * self.tp
        tp = [[self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]
        dp = [[self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]
        pp = [[self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]
        ep = [[p * stage + e * self.ep + j for j in range(self.ep)]
              for p in range(self.pp) for e in range(stage // self.ep)]
        edp = [[p * stage + e * self.ep + j for e in range(stage // self.ep)]
               for p in range(self.pp) for j in range(self.ep)]
        dp_tp = [[p * stage + i for i in range(stage)] for p in range(self.pp)]
        per_node = self.ep // self.nodes_per_ep_group
        ep_inter = [group[i::per_node] for group in ep for i in range(per_node)]
        ep_intra = [group[i:i + per_node] for group in ep for i in range(0, self.ep, per_node)]
        return {"tp": tp, "dp": dp, "pp": pp, "ep": ep, "edp": edp, "dp_tp": dp_tp, "ep_inter": ep_inter,
                "ep_intra": ep_intra}


class Topology:
    """This rank's coordinates and process groups under a Layout."""

    def __init__(self, layout: Layout, rank: int, timeout: timedelta | None = None):
        """`timeout`: how long a collective of these groups waits (None: torch's default)."""
        layout.validate()
        self.layout, self.rank = layout, rank
        self.pp_rank, self.dp_rank, self.tp_rank = layout.coords(rank)
        self.groups: dict[str, object] = {}
        self.members: dict[str, list[int]] = {}
        distributed = dist.is_available() and dist.is_initialized()
        for name, lists in layout.group_members().items():
            for ranks in lists:
                group = dist.new_group(ranks, timeout=timeout) if distributed and len(ranks) > 1 else None
                if rank in ranks:
                    self.groups[name], self.members[name] = group, ranks

    def group(self, name: str):
        """The named group of this rank (None when it has one member)."""
        return self.groups[name]

    def ep_node_groups(self) -> tuple[object, object] | None:
        """(ep_inter, ep_intra) when the EP group spans several nodes with several ranks on each:
        the groups of the node-hierarchical dispatch; otherwise None, as it would be the flat one."""
        if len(self.members["ep_inter"]) > 1 and len(self.members["ep_intra"]) > 1:
            return self.group("ep_inter"), self.group("ep_intra")
        return None

    @property
    def ep_rank(self) -> int:
        return self.members["ep"].index(self.rank)
