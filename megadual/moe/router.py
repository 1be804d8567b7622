"""The DeepSeek-V3 router: gate scores, node-limited top-k, expert bias, balance losses.

Selection uses the scores plus a per-expert bias (aux-loss-free balancing); the gate
values use the unbiased scores. Every statistic (balance loss, expert loads, the
bias update) is computed from the final routing, after the node limit.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megadual.config import ModelConfig
from megadual.parallel import comm
from megadual.parallel.linear import fp32_linear
from megadual.parallel.params import ParamSpec


@dataclass
class Routing:
    indices: torch.Tensor  # [tokens, topk] global expert ids
    gates: torch.Tensor  # [tokens, topk] weights of the selected experts
    aux_loss: torch.Tensor  # scalar, already multiplied by --moe-aux-loss-coeff


def node_limited_topk(choice_scores: torch.Tensor, topk: int, num_nodes: int, max_nodes: int) -> torch.Tensor:
    """Top-k experts per token, restricted to the `max_nodes` best nodes of that token.

    Experts are laid out node by node (expert e lives on node e // (E / num_nodes)).
    A node's score is the sum of its best topk/max_nodes scores.
    """
    if num_nodes <= max_nodes:
        return choice_scores.topk(topk, dim=-1).indices
    tokens, experts = choice_scores.shape
    per_node = choice_scores.view(tokens, num_nodes, experts // num_nodes)
    node_scores = per_node.topk(topk // max_nodes, dim=-1).values.sum(-1)
    best_nodes = node_scores.topk(max_nodes, dim=-1).indices
    node_allowed = torch.zeros(tokens, num_nodes, dtype=torch.bool, device=choice_scores.device)
    node_allowed.scatter_(1, best_nodes, True)
    expert_allowed = node_allowed.repeat_interleave(experts // num_nodes, dim=1)
    return choice_scores.masked_fill(~expert_allowed, float("-inf")).topk(topk, dim=-1).indices


def nodes_per_token(indices: torch.Tensor, num_experts: int, num_nodes: int) -> torch.Tensor:
    """Distinct destination nodes of each token's selected experts."""
    node = indices // (num_experts // num_nodes)
    hit = torch.zeros(indices.shape[0], num_nodes, dtype=torch.bool, device=indices.device)
    return hit.scatter_(1, node, True).sum(-1)


def balance_loss(normalized_scores: torch.Tensor, indices: torch.Tensor, num_sequences: int,
                 num_experts: int, topk: int, tp_group=None) -> torch.Tensor:
    """sum_i f_i * P_i averaged over sequences (the report's sequence-wise balance loss).

    Tokens are [sequence position, sequence] flattened, as [s, b] activations are.
    `num_sequences=1` with all tokens gives the batch-wise auxiliary loss. When the
    sequence is split over `tp_group`, f and P are summed over it, so every TP rank
    gets the loss of the whole sequence.
    """
    scores = normalized_scores.view(-1, num_sequences, num_experts)
    length = scores.shape[0] * comm.group_size(tp_group)
    counts = torch.zeros_like(scores).scatter_add_(
        2, indices.view(scores.shape[0], num_sequences, topk), torch.ones_like(scores[..., :topk])).sum(0)
    counts = comm.all_reduce_no_grad(counts.detach(), tp_group)
    score_sums = comm.reduce_from_tp_region(scores.sum(0), tp_group)
    f = counts * (num_experts / (topk * length))
    return (f * score_sums / length).sum(-1).mean()


class RoutingStats:
    """What the routers saw during one training step, for logging and the bias update. The tensors
    stay on the routing's device (no host sync per call); they are None until the first call."""

    SUMS = ("aux_loss", "calls", "tokens", "node_count_sum", "inter_node_rows", "intra_node_rows")

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.tokens_per_expert: torch.Tensor | None = None  # float64 [experts]
        self.aux_loss: torch.Tensor | None = None
        self.node_count_sum: torch.Tensor | None = None
        self.node_count_max: torch.Tensor | None = None
        self.calls = 0
        self.tokens = 0
        self.inter_node_rows = 0  # dispatch rows sent to ranks on other nodes
        self.intra_node_rows = 0  # dispatch rows sent to other ranks of this node

    def record(self, indices: torch.Tensor, aux_loss: torch.Tensor, node_counts: torch.Tensor) -> None:
        load = torch.zeros(self.num_experts, dtype=torch.float64, device=indices.device)
        load.scatter_add_(0, indices.flatten(), torch.ones(indices.numel(), dtype=torch.float64,
                                                           device=indices.device))
        nodes, most = node_counts.sum().double(), node_counts.max()
        if self.tokens_per_expert is None:
            self.tokens_per_expert, self.aux_loss = load, aux_loss.double()
            self.node_count_sum, self.node_count_max = nodes, most
        else:
            self.tokens_per_expert = self.tokens_per_expert + load
            self.aux_loss = self.aux_loss + aux_loss.double()
            self.node_count_sum = self.node_count_sum + nodes
            self.node_count_max = torch.maximum(self.node_count_max, most)
        self.calls += 1
        self.tokens += indices.shape[0]

    def record_dispatch(self, inter_node_rows: int, intra_node_rows: int) -> None:
        """Rows one dispatch all-to-all sends, counted from its send counts (moe/dispatcher.py's Hop)."""
        self.inter_node_rows += inter_node_rows
        self.intra_node_rows += intra_node_rows

    def as_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens per expert then SUMS, as float64; the largest node count), on `device`: what the
        step sums (and maxes) over ranks. A router that saw nothing gives zeros."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        load = self.tokens_per_expert if self.tokens_per_expert is not None else \
            torch.zeros(self.num_experts, dtype=torch.float64, device=device)
        tensors = [self.aux_loss if self.aux_loss is not None else zero, zero + self.calls, zero + self.tokens,
                   self.node_count_sum if self.node_count_sum is not None else zero,
                   zero + self.inter_node_rows, zero + self.intra_node_rows]
        most = self.node_count_max if self.node_count_max is not None else zero.long()
        return torch.cat([load, torch.stack(tensors)]), most.reshape(1).long()


class Router(torch.nn.Module):
    def __init__(self, config: ModelConfig, num_nodes: int, tp_group=None):
        """`tp_group`: the TP ranks that each route a different part of the sequence."""
        super().__init__()
        self.config, self.num_nodes, self.tp_group = config, num_nodes, tp_group
        self.weight = torch.nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        # Each TP rank routes part of the tokens: the weight's gradient is summed over TP.
        self.param_specs = {"weight": ParamSpec(config.init_method_std,
                                                grad_partial_over_tp=comm.group_size(tp_group) > 1)}
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))
        self.stats = RoutingStats(config.num_experts)
        self.wgrad_store = None

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """FP32, even from BF16 weights; the GEMM keeps `tokens` as they are (no FP32 copy)."""
        return fp32_linear(tokens, self.weight, self.wgrad_store)

    def forward(self, tokens: torch.Tensor, num_sequences: int, logits: torch.Tensor | None = None) -> Routing:
        """`logits`: `self.logits(tokens)` when already computed."""
        c = self.config
        logits = self.logits(tokens) if logits is None else logits
        if c.moe_router_score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            normalized = scores / scores.sum(-1, keepdim=True)
        else:
            scores = normalized = torch.softmax(logits, dim=-1)
        choice = scores.detach()
        if c.moe_router_enable_expert_bias:
            choice = choice + self.expert_bias
        indices = node_limited_topk(choice, c.moe_router_topk, self.num_nodes, c.moe_router_max_nodes)
        gates = scores.gather(-1, indices)
        if c.moe_router_score_function == "sigmoid":
            gates = gates / gates.sum(-1, keepdim=True)
        gates = gates * c.moe_router_topk_scaling_factor
        aux = self._aux_loss(normalized, indices, num_sequences)
        self.stats.record(indices, aux.detach(), nodes_per_token(indices, c.num_experts, self.num_nodes))
        return Routing(indices, gates.to(tokens.dtype), aux)

    def _aux_loss(self, normalized: torch.Tensor, indices: torch.Tensor, num_sequences: int) -> torch.Tensor:
        c = self.config
        if c.moe_router_load_balancing_type == "none" or c.moe_aux_loss_coeff == 0:
            return normalized.new_zeros(())
        groups = num_sequences if c.moe_router_load_balancing_type == "seq_aux_loss" else 1
        loss = balance_loss(normalized, indices, groups, c.num_experts, c.moe_router_topk, self.tp_group)
        return loss * c.moe_aux_loss_coeff

    @contextmanager
    def stats_paused(self):
        """Routing inside this block is not counted (a recomputed forward routes a second time)."""
        stats, self.stats = self.stats, RoutingStats(self.config.num_experts)
        try:
            yield
        finally:
            self.stats = stats

    def take_stats(self) -> RoutingStats:
        stats, self.stats = self.stats, RoutingStats(self.config.num_experts)
        return stats

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, rate: float | torch.Tensor) -> None:
        """b += rate * sign(mean load - load): over-loaded experts become less attractive. `rate` may be
        a tensor on the device (zero for a skipped step), so the step decides without a host sync."""
        load = tokens_per_expert.to(self.expert_bias.device, torch.float32)
        self.expert_bias += rate * torch.sign(load.mean() - load)
