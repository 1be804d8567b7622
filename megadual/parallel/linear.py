"""The linear GEMM as an autograd function whose weight gradient can be deferred.

Every linear layer of the model (TP linears, experts, router, head) goes through
`linear`, so the pipeline's W split covers every weight. The model's linears have
no bias (as in DeepSeek-V3). With `wgrad_store=None` this is `x @ weight.T`.
"""
from __future__ import annotations

import torch

from megadual.pipeline.wgrad import WeightGradStore


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add a deferred gradient into `param.grad`, as autograd would have."""
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


def flat(t: torch.Tensor) -> torch.Tensor:
    """[..., features] -> [tokens, features]."""
    return t.reshape(-1, t.shape[-1])


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, wgrad_store):
        ctx.save_for_backward(x, weight)
        ctx.wgrad_store = wgrad_store
        return x.matmul(weight.t())

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight)
        if ctx.wgrad_store is None:
            return grad_x, flat(grad_out).t().matmul(flat(x)), None
        ctx.wgrad_store.put(lambda: accumulate_grad(weight, flat(grad_out).t().matmul(flat(x))))
        return grad_x, None, None


def linear(x: torch.Tensor, weight: torch.Tensor,
           wgrad_store: WeightGradStore | None = None) -> torch.Tensor:
    """y = x @ weight.T, with the weight gradient routed through `wgrad_store`."""
    return _Linear.apply(x, weight, wgrad_store)
