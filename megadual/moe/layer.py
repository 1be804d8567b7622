"""The MoE layer: shared experts plus routed experts, as sub-steps around two all-to-alls.

route -> dispatch_start -> experts_and_combine_start -> combine_wait. Each step after
the first begins by waiting for the all-to-all the previous one launched, so a
schedule running the steps of two micro-batches alternately overlaps one's
all-to-alls with the other's compute: `forward_steps` runs them as a generator that
pauses while each all-to-all is in flight, `forward` runs them in order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megadual.config import ModelConfig
from megadual.moe.dispatcher import PendingCombine, PendingDispatch, TokenDispatcher
from megadual.moe.experts import RoutedExperts
from megadual.moe.router import Router, Routing
from megadual.parallel import comm
from megadual.parallel.context import ONE_PROCESS, BuildContext
from megadual.parallel.mlp import SwiGLUMLP
from megadual.parallel.recompute import NO_RECOMPUTE, run_steps


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
    moe_input: torch.Tensor  # the layer input as the TP region sees it (for the shared experts)
    routed_shape: torch.Size | None = None
    tokens: torch.Tensor | None = None  # [routed tokens, hidden]
    routing: Routing | None = None
    pending_dispatch: PendingDispatch | None = None
    shared_output: torch.Tensor | None = None
    pending_combine: PendingCombine | None = None


class MoELayer(torch.nn.Module):
    """Shared and routed experts, as sub-steps: route, dispatch (start/wait), experts, combine.

    Under TP the routed path works on this rank's part of the sequence (as sequence
    parallelism already splits it), so each token is routed and computed once per
    TP group rather than once per TP rank; without sequence parallelism the sequence
    is split before routing and gathered after the combine.
    """

    def __init__(self, config: ModelConfig, ctx: BuildContext = ONE_PROCESS):
        super().__init__()
        ep_size, ep_rank = comm.group_size(ctx.ep_group), comm.group_rank(ctx.ep_group)
        per_rank = config.num_experts // ep_size
        self.tp = ctx.tp
        # --moe-router-num-groups stands in for nodes (virtual nodes on one machine).
        self.router = Router(config, config.moe_router_num_groups or ctx.num_nodes, ctx.tp.group)
        self.dispatcher = TokenDispatcher(config.num_experts, ctx.ep_group, ctx.fp8_dispatch)
        self.experts = RoutedExperts(config, ep_rank * per_rank, per_rank, ctx.gemm)
        self.shared = None
        if config.moe_shared_expert_intermediate_size:
            self.shared = SwiGLUMLP(config, config.moe_shared_expert_intermediate_size, ctx.tp, ctx.gemm)
        # The lm loss of each micro-batch is divided by the number of micro-batches;
        # the balance loss's gradient must be scaled the same way.
        self.aux_loss_grad_scale = 1.0
        self.recompute = NO_RECOMPUTE  # the chunk's (model/gpt.py)

    @property
    def _splits_sequence(self) -> bool:
        return self.tp.size > 1 and not self.tp.sequence_parallel

    def route(self, x: torch.Tensor) -> MoEState:
        state = MoEState(x)
        routed = comm.split_sequence(x, self.tp.group) if self._splits_sequence else x
        state.routed_shape = routed.shape
        state.tokens = routed.reshape(-1, routed.shape[-1])
        state.routing = self.router(state.tokens, num_sequences=routed.shape[1])
        return state

    def dispatch_start(self, state: MoEState) -> MoEState:
        """Launch the dispatch all-to-all, then run the shared experts while the tokens travel."""
        r = state.routing
        state.pending_dispatch = self.dispatcher.dispatch_start(state.tokens, r.indices, r.gates)
        if self.shared is not None:
            state.shared_output = self.recompute.call("shared_experts", self.shared, state.moe_input)
        return state

    def experts_and_combine_start(self, state: MoEState) -> MoEState:
        """Wait for the dispatched tokens, run the local experts, launch the combine all-to-all."""
        d = self.dispatcher.dispatch_wait(state.pending_dispatch)
        out = self.experts(d.tokens, d.local_experts, d.gates)
        state.pending_combine = self.dispatcher.combine_start(out, d)
        return state

    def combine_wait(self, state: MoEState) -> torch.Tensor:
        out = self.dispatcher.combine_wait(state.pending_combine).view(state.routed_shape)
        if self._splits_sequence:
            out = comm.gather_split_sequence(out, self.tp.group)
        if state.shared_output is not None:
            out = out + state.shared_output
        return _AttachAuxLoss.apply(out, state.routing.aux_loss, self.aux_loss_grad_scale)

    def forward_steps(self, x: torch.Tensor):
        """The layer as a generator that pauses while the dispatch and the combine are in flight."""
        state = self.dispatch_start(self.route(x))
        yield
        state = self.experts_and_combine_start(state)
        yield
        return self.combine_wait(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_steps(self.forward_steps(x))
