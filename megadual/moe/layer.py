"""The MoE layer: shared experts plus routed experts, as sub-steps around the all-to-alls.

`forward_steps` routes, then runs the dispatcher's routed path (dispatch, experts,
combine), pausing while each all-to-all is in flight; each step after a pause begins by
waiting for the all-to-all the previous one launched, so a schedule running the steps of
two micro-batches alternately overlaps one's all-to-alls with the other's compute.
`forward` runs them in order. The dispatcher is the flat all-to-all, the node-hierarchical
one when the build context carries node groups, or, without expert parallelism, none: the
experts run on the routed tokens as they are.
"""
from __future__ import annotations

from collections.abc import Generator

import torch

from megadual.config import ModelConfig
from megadual.moe.dispatcher import LocalDispatcher, TokenDispatcher
from megadual.moe.experts import FP8_TILES, RoutedExperts
from megadual.moe.hierarchical import HierarchicalDispatcher
from megadual.moe.router import Router
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
        if ep_size == 1:
            self.dispatcher = LocalDispatcher(ctx.fp8_dispatch)
        elif ctx.ep_node_groups is None:
            self.dispatcher = TokenDispatcher(config.num_experts, ctx.ep_group, ctx.num_nodes, ctx.fp8_dispatch)
        else:
            self.dispatcher = HierarchicalDispatcher(config.num_experts, *ctx.ep_node_groups, ctx.fp8_dispatch)
        self.experts = RoutedExperts(config, ep_rank * per_rank, per_rank, ctx.gemm, ctx.grouped_gemm)
        self.shared = None
        if config.moe_shared_expert_intermediate_size:
            self.shared = SwiGLUMLP(config, config.moe_shared_expert_intermediate_size, ctx.tp, ctx.gemm,
                                    moe_act_codec=FP8_TILES)
        # The lm loss of each micro-batch is divided by the number of micro-batches;
        # the balance loss's gradient must be scaled the same way.
        self.aux_loss_grad_scale = 1.0
        self.recompute = NO_RECOMPUTE  # the chunk's (model/gpt.py)

    @property
    def _splits_sequence(self) -> bool:
        return self.tp.size > 1 and not self.tp.sequence_parallel

    def router_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tokens this rank routes [tokens, hidden], the router's logits of them) from the layer's input."""
        routed = comm.split_sequence(x, self.tp.group) if self._splits_sequence else x
        tokens = routed.reshape(-1, routed.shape[-1])
        return tokens, self.router.logits(tokens)

    def forward_steps(self, x: torch.Tensor, routed: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> Generator[None, None, torch.Tensor]:
        """The layer as a generator that pauses while each all-to-all is in flight (see the dispatchers).
        `routed`: `router_input(x)` when already made (with the pre-MLP norm, which recomputes it)."""
        tokens, logits = self.router_input(x) if routed is None else routed
        routing = self.router(tokens, x.shape[1], logits)
        shared = ((lambda: self.recompute.call("shared_experts", self.shared, x)) if self.shared is not None
                  else (lambda: None))
        out, shared_out = yield from self.dispatcher.routed_steps(tokens, routing.indices, routing.gates,
                                                                  self.experts, shared, self.router.stats)
        out = out.view(-1, *x.shape[1:])
        if self._splits_sequence:
            out = comm.gather_split_sequence(out, self.tp.group)
        if shared_out is not None:
            out = out + shared_out
        return _AttachAuxLoss.apply(out, routing.aux_loss, self.aux_loss_grad_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_steps(self.forward_steps(x))

