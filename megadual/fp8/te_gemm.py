"""Blockwise FP8 GEMM through Transformer Engine's Float8BlockScaling recipe (cuBLAS, Hopper).

Only imported where `transformer_engine` is installed (it is not in CI). TE keeps
its block scales in an internal, version-dependent layout, so instead of building
its tensors by hand the operands are handed over as values: dequantized to FP32
and quantized again by TE's Float8BlockQuantizer with the same 1x128 / 128x128
blocks. That round trip is lossless for amax/448 scales (the default): the
largest element of each block maps back onto 448, so TE derives the same scale
and every value lands on the E4M3 code it came from.
"""
from __future__ import annotations

import inspect

import torch
import transformer_engine_torch as tex
from transformer_engine.pytorch.cpp_extensions import general_gemm
from transformer_engine.pytorch.tensor.float8_blockwise_tensor import Float8BlockQuantizer

from megadual.fp8.quant import Fp8Tensor


def _to_te(t: Fp8Tensor):
    quantizer = Float8BlockQuantizer(
        tex.DType.kFloat8E4M3, rowwise=True, columnwise=False, amax_epsilon=0.0,
        force_pow_2_scales=False, block_scaling_dim=1 if t.block[0] == 1 else 2,
    )
    return quantizer(t.dequantize(torch.float32))


def _workspace_kwargs() -> dict:
    # Older TE releases take a cuBLAS workspace argument; newer ones manage it themselves.
    if "workspace" not in inspect.signature(general_gemm).parameters:
        return {}
    from transformer_engine.pytorch.module.base import get_workspace
    return {"workspace": get_workspace()}


def te_blockwise_fp8_gemm(a: Fp8Tensor, b: Fp8Tensor) -> torch.Tensor:
    """A [M, K] @ B [N, K]^T in FP32; TE's "TN" GEMM computes second @ first^T."""
    out, *_ = general_gemm(
        _to_te(b), _to_te(a), out_dtype=torch.float32, layout="TN",
        use_split_accumulator=True,  # FP32 promotion of the partial sums, as in the recipe
        **_workspace_kwargs(),
    )
    return out
