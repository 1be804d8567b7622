"""The linear GEMM as an autograd function whose weight gradient can be deferred.

Every linear layer of the model (TP linears, experts, router, head) goes through
`linear`, so the pipeline's W split covers every weight. The model's linears have
no bias (as in DeepSeek-V3). Without a store taking the forward it is `F.linear`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megadual.parallel.wgrad import WeightGradStore, store_for_forward


def weight_grad_now_or_deferred(weight: torch.Tensor, weight_grad: Callable[[], torch.Tensor],
                                store: WeightGradStore | None) -> torch.Tensor | None:
    """The weight gradient for autograd to accumulate, or None when a deferring `store` takes the work.
    `weight` must be the parameter object itself, not autograd's saved copy of it (under saved-tensor
    hooks it can be another object), since a store may accumulate into it by identity (the
    distributed optimizer's buckets)."""
    if store is None or not store.deferring:
        return weight_grad()
    store.put(lambda: store.accumulate(weight, weight_grad()))
    return None


def flat(t: torch.Tensor) -> torch.Tensor:
    """[..., features] -> [tokens, features]."""
    return t.reshape(-1, t.shape[-1])


class _Linear(torch.autograd.Function):
    """Autocast is applied here by hand: the backward runs outside autocast, so it keeps
    the forward's GEMM operands (x in the GEMM dtype) to multiply the gradient with.
    Outside autocast the GEMM runs in x's dtype (the router's FP32 gate on BF16 weights)."""

    @staticmethod
    def forward(ctx, x, weight, wgrad_store):
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        gemm_weight = weight.to(x.dtype)
        ctx.save_for_backward(x)
        ctx.weight = weight  # the parameter itself: see weight_grad_now_or_deferred
        ctx.wgrad_store = wgrad_store
        return F.linear(x, gemm_weight)

    @staticmethod
    def backward(ctx, grad_out):
        (x,), weight = ctx.saved_tensors, ctx.weight
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_out.matmul(weight.to(x.dtype))

        def weight_grad() -> torch.Tensor:
            return flat(grad_out).t().matmul(flat(x)).to(weight.dtype)

        return grad_x, weight_grad_now_or_deferred(weight, weight_grad, ctx.wgrad_store), None


def linear(x: torch.Tensor, weight: torch.Tensor,
           wgrad_store: WeightGradStore | None = None) -> torch.Tensor:
    """y = x @ weight.T, with the weight gradient routed through `wgrad_store` when the
    store takes this forward (`WeightGradStore.deferrable_forward`)."""
    store = store_for_forward(wgrad_store)
    if store is None:
        return F.linear(x, weight if torch.is_autocast_enabled(x.device.type) else weight.to(x.dtype))
    return _Linear.apply(x, weight, store)
