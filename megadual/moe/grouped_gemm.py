"""Many experts' linears as one grouped GEMM (torch._grouped_mm), each expert keeping its own weight.

The tokens arrive sorted by expert; `offsets[e]` is where expert e's rows end. The weights
stay separate parameters (so the ParamTable, checkpoints and resharding still see one weight
per global expert) and are stacked for the GEMM; the backward hands each its own gradient,
deferred to a W action like any linear's when the pipeline splits the backward.
"""
from __future__ import annotations

import torch

from megadual.parallel.wgrad import WeightGradStore, store_for_forward


class _GroupedLinear(torch.autograd.Function):
    """Keeps x and the offsets; the weights are stacked again in the backward rather than kept
    stacked (a copy of every local expert's weight per micro-batch in flight)."""

    @staticmethod
    def forward(ctx, x, offsets, wgrad_store, *weights):
        stacked = torch.stack(weights)  # [experts, out, in]
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, stacked = x.to(dtype), stacked.to(dtype)
        ctx.save_for_backward(x, offsets)
        ctx.weights, ctx.wgrad_store = weights, wgrad_store
        return torch._grouped_mm(x, stacked.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, offsets = ctx.saved_tensors
        stacked = torch.stack(ctx.weights).to(x.dtype)
        grad_out = grad_out.to(x.dtype).contiguous()
        grad_x = torch._grouped_mm(grad_out, stacked, offs=offsets)

        def weight_grads() -> torch.Tensor:  # [experts, out, in]; zero for an expert without tokens
            return torch._grouped_mm(grad_out.t(), x, offs=offsets)

        store = ctx.wgrad_store
        if store is None or not store.deferring:
            return grad_x, None, None, *(g.to(w.dtype) for g, w in zip(weight_grads(), ctx.weights))
        weights = ctx.weights
        store.put(lambda: [store.accumulate(w, g.to(w.dtype)) for w, g in zip(weights, weight_grads())])
        return grad_x, None, None, *(None for _ in weights)


def grouped_linear(x: torch.Tensor, counts: list[int], weights: list[torch.Tensor],
                   wgrad_store: WeightGradStore | None = None) -> torch.Tensor:
    """Rows [0, counts[0]) of `x` through weights[0] ([out, in]), the next counts[1] through
    weights[1], and so on, as one GEMM."""
    offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    return _GroupedLinear.apply(x, offsets, store_for_forward(wgrad_store), *weights)
