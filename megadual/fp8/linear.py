"""FP8 linear layer: `megadual.parallel.linear.linear` with all three GEMMs in E4M3.

    Fprop  y  = x  @ W^T    x: 1x128 tiles along in-features,  W: 128x128 blocks
    Dgrad  dx = dy @ W      dy: 1x128 tiles along out-features, W^T: 128x128 blocks
    Wgrad  dW = dy^T @ x    dy and x: 128x1 tiles along tokens (the reduction dim)

The input is cached for backward only in FP8, already quantized along tokens the
way Wgrad reads it (Dgrad does not need it). The weight is not cached in FP8: the
FP32 master weight is saved instead (it is alive anyway) and quantized again in
backward, which costs one pass over the weight rather than an FP8 copy of it per
micro-batch in flight. As with the plain linear, the Wgrad GEMM goes through the
WeightGradStore when one is given, so the zero-bubble W split covers FP8 layers.
"""
from __future__ import annotations

import torch

from megadual.fp8.gemm import fp8_gemm
from megadual.fp8.quant import (
    TILE,
    Fp8Tensor,
    dequantize_from_dispatch,
    quantize_blocks,
    quantize_for_dispatch,
    quantize_tiles,
    quantize_tiles_transposed,
)
from megadual.parallel.linear import InputCache, flat, weight_grad_now_or_deferred
from megadual.parallel.wgrad import WeightGradStore, store_for_forward

__all__ = ["dequantize_from_dispatch", "fp8_linear", "quantize_for_dispatch"]


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, wgrad_store, cache):
        x2 = flat(x)
        cache = InputCache() if cache is None else cache  # GEMMs sharing x share its quantizations
        y = fp8_gemm(cache.get("fp8 tiles", quantize_tiles, x2), quantize_blocks(weight))
        if ctx.needs_input_grad[1]:
            x_by_tokens = cache.get("fp8 tiles by tokens", quantize_tiles_transposed, x2)
            ctx.save_for_backward(x_by_tokens.data, x_by_tokens.scale)
        else:
            ctx.save_for_backward(None, None)
        ctx.weight = weight  # the parameter itself: see weight_grad_now_or_deferred
        ctx.wgrad_store = store_for_forward(wgrad_store)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        y = y.to(x.dtype)
        if y.untyped_storage().nbytes() > y.nbytes:  # a view of the GEMM's padded result: not kept whole
            y = y.clone()
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        (x_data, x_scale), weight = ctx.saved_tensors, ctx.weight
        dy = flat(grad_out)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_gemm(quantize_tiles(dy), quantize_blocks(weight.t()))
            grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None, None

        # Quantized now, so a deferred W keeps dy alive in FP8 rather than in full precision.
        dy_by_tokens = quantize_tiles_transposed(dy)
        x_by_tokens = Fp8Tensor(x_data, x_scale, TILE)

        def weight_grad() -> torch.Tensor:
            return fp8_gemm(dy_by_tokens, x_by_tokens).to(weight.dtype)

        return grad_x, weight_grad_now_or_deferred(weight, weight_grad, ctx.wgrad_store), None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, wgrad_store: WeightGradStore | None = None,
               cache: InputCache | None = None) -> torch.Tensor:
    """y = x @ weight.T with FP8 GEMMs, the weight gradient routed through `wgrad_store` when
    the store takes this forward (`WeightGradStore.deferrable_forward`); GEMMs given one `cache`
    quantize (and keep) their common input once."""
    return _Fp8Linear.apply(x, weight, wgrad_store, cache)
