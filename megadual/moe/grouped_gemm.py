"""Many experts' linears as one grouped GEMM (torch._grouped_mm) over their stacked weight.

The tokens arrive sorted by expert; `offsets[e]` is where expert e's rows end. The weight is the
projection's stack [experts, out, in] (moe/experts.py), one parameter, so neither direction
stacks anything; its gradient comes out stacked, deferred to a W action like any linear's when
the pipeline splits the backward.
"""
from __future__ import annotations

import torch

from megadual.parallel.wgrad import WeightGradStore, store_for_forward


class _GroupedLinear(torch.autograd.Function):
    """Keeps x and the offsets (the weight is the parameter itself, alive anyway)."""

    @staticmethod
    def forward(ctx, x, offsets, wgrad_store, weight):
        gemm_weight = weight
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, gemm_weight = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x, offsets)
        ctx.weight, ctx.wgrad_store = weight, wgrad_store
        return torch._grouped_mm(x, gemm_weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, offsets = ctx.saved_tensors
        weight = ctx.weight
        grad_out = grad_out.to(x.dtype).contiguous()
        grad_x = torch._grouped_mm(grad_out, weight.to(x.dtype), offs=offsets)

        def weight_grad() -> torch.Tensor:  # [experts, out, in]; zero for an expert without tokens
            return torch._grouped_mm(grad_out.t(), x, offs=offsets).to(weight.dtype)

        store = ctx.wgrad_store
        if store is None or not store.deferring:
            return grad_x, None, None, weight_grad()
        store.put(lambda: store.accumulate(weight, weight_grad()))
        return grad_x, None, None, None


def grouped_linear(x: torch.Tensor, counts: list[int], weight: torch.Tensor,
                   wgrad_store: WeightGradStore | None = None) -> torch.Tensor:
    """Rows [0, counts[0]) of `x` through weight[0] ([out, in]), the next counts[1] through
    weight[1], and so on, as one GEMM."""
    offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
    return _GroupedLinear.apply(x, offsets, store_for_forward(wgrad_store), weight)
