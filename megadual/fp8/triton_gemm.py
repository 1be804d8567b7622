"""Blockwise-scaled FP8 GEMM as one Triton kernel: out[M, N] = A[M, K] @ B[N, K]^T in FP32.

Each program owns a BLOCK_M x BLOCK_N output tile and walks K in 128-wide steps.
Every step is one tensor-core `tl.dot` over a single K block (so the tensor
cores' limited-precision accumulation never spans more than 128 products), whose
FP32 result is multiplied by the A row scales and B row scales of that K block
and added to an FP32 accumulator held in registers: the promotion DeepSeek-V3
does on CUDA cores, fused into the GEMM.

Importing this module imports triton; `megadual.fp8.gemm` only does so when
triton is installed. Under TRITON_INTERPRET=1 the same kernel runs on CPU
tensors in Triton's interpreter, which is how it is checked without a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

K_BLOCK = 128


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter would run every candidate while autotuning; one small tile is enough to check.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in [
            (128, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4), (128, 256, 8, 3), (64, 64, 4, 4),
        ]
    ]


@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.jit
def _blockwise_fp8_gemm_kernel(
    a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr,
    M, N, K,
    stride_am, stride_bn, stride_om, stride_a_scale, stride_b_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Programs sweep GROUP_M row tiles per column tile so neighbouring programs share B tiles in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]  # B^T tile, [BLOCK_K, BLOCK_N]
    a_scale_ptrs = a_scale_ptr + offs_m * stride_a_scale
    b_scale_ptrs = b_scale_ptr + offs_n * stride_b_scale

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=in_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & in_n[None, :], other=0.0)
        a_scale = tl.load(a_scale_ptrs + kb, mask=in_m, other=0.0)
        b_scale = tl.load(b_scale_ptrs + kb, mask=in_n, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_scale[:, None] * b_scale[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=in_m[:, None] & in_n[None, :])


def blockwise_fp8_gemm(a: torch.Tensor, a_scales: torch.Tensor,
                       b: torch.Tensor, b_scales: torch.Tensor) -> torch.Tensor:
    """A [M, K] and B [N, K] in E4M3 with row scales [M, ceil(K/128)] and [N, ceil(K/128)] -> FP32 [M, N]."""
    a, b = a.contiguous(), b.contiguous()
    a_scales, b_scales = a_scales.float().contiguous(), b_scales.float().contiguous()
    (m, k), n = a.shape, b.shape[0]
    out = torch.empty((m, n), dtype=torch.float32, device=a.device)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _blockwise_fp8_gemm_kernel[grid](
        a, b, out, a_scales, b_scales, m, n, k,
        a.stride(0), b.stride(0), out.stride(0), a_scales.stride(0), b_scales.stride(0),
        BLOCK_K=K_BLOCK,
    )
    return out
