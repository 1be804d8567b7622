"""The MoE layer: shared experts plus routed experts, as four sub-steps.

route -> dispatch -> compute -> combine. `forward` runs them in order; a pipeline
schedule may run them one by one to overlap one micro-batch's all-to-alls with
another micro-batch's compute.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megadual.config import ModelConfig
from megadual.model.layers import SwiGLUMLP
from megadual.moe.dispatcher import Dispatched, TokenDispatcher
from megadual.moe.experts import RoutedExperts
from megadual.moe.router import Router, Routing
from megadual.parallel import comm
from megadual.parallel.linear import linear
from megadual.parallel.tensor import TensorParallel


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the layer output whose backward also starts the aux loss's backward.

    This way a balance loss computed on any pipeline stage reaches the gradients
    without being carried to the last stage.
    """

    @staticmethod
    def forward(ctx, output, aux_loss, grad_scale):
        ctx.grad_scale = grad_scale
        return output

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full((), ctx.grad_scale), None


@dataclass
class MoEState:
    shape: torch.Size
    moe_input: torch.Tensor
    routing: Routing | None = None
    dispatched: Dispatched | None = None
    expert_output: torch.Tensor | None = None


class MoELayer(torch.nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel, ep_group=None, num_nodes: int = 1,
                 gemm: Callable = linear):
        super().__init__()
        ep_size, ep_rank = comm.group_size(ep_group), comm.group_rank(ep_group)
        per_rank = config.num_experts // ep_size
        # --moe-router-num-groups stands in for nodes (virtual nodes on one machine).
        num_nodes = config.moe_router_num_groups or num_nodes
        self.router = Router(config, num_nodes, sequence_parallel=tp.sequence_parallel)
        self.dispatcher = TokenDispatcher(config.num_experts, ep_group)
        self.experts = RoutedExperts(config, ep_rank * per_rank, per_rank, gemm)
        self.shared = None
        if config.moe_shared_expert_intermediate_size:
            self.shared = SwiGLUMLP(config, config.moe_shared_expert_intermediate_size, tp, gemm)
        # The lm loss of each micro-batch is divided by the number of micro-batches;
        # the balance loss's gradient must be scaled the same way.
        self.aux_loss_grad_scale = 1.0

    def route(self, x: torch.Tensor) -> MoEState:
        state = MoEState(x.shape, x)
        state.routing = self.router(x.reshape(-1, x.shape[-1]), num_sequences=x.shape[1])
        return state

    def dispatch(self, state: MoEState) -> MoEState:
        r = state.routing
        flat = state.moe_input.reshape(-1, state.shape[-1])
        state.dispatched = self.dispatcher.dispatch(flat, r.indices, r.gates)
        return state

    def compute(self, state: MoEState) -> MoEState:
        d = state.dispatched
        state.expert_output = self.experts(d.tokens, d.local_experts, d.gates)
        return state

    def combine(self, state: MoEState) -> torch.Tensor:
        out = self.dispatcher.combine(state.expert_output, state.dispatched).view(state.shape)
        if self.shared is not None:
            out = out + self.shared(state.moe_input)
        return _AttachAuxLoss.apply(out, state.routing.aux_loss, self.aux_loss_grad_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.compute(self.dispatch(self.route(x))))
