"""Blockwise-scaled FP8 GEMM: out = A @ B^T in FP32 from E4M3 operands with fine-grained scales.

Both operands have the reduction dim K last and one FP32 scale per 128-wide K
block, per row (1x128 tiles) or per 128 rows (128x128 blocks). The product over
each K block is formed from the E4M3 values, promoted to FP32, scaled there by
that block's A and B scales, and summed across K blocks in FP32.

Backends, which compute the same thing:
- "triton": one fused kernel (megadual.fp8.triton_gemm); CUDA with FP8 tensor
  cores (sm_89+), or CPU tensors under TRITON_INTERPRET=1 (for checking only);
- "te": Transformer Engine's Float8BlockScaling GEMM (megadual.fp8.te_gemm); CUDA sm_90+;
- "reference": one torch._scaled_mm per K block with per-row FP32 scales and
  FP32 output, summed in FP32; CPU, or CUDA where torch._scaled_mm takes row-wise
  scales with FP32 output (sm_90 with cuBLAS >= 12.9).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from megadual.fp8.quant import BLOCK, E4M3, Fp8Tensor

# cuBLAS FP8 GEMMs want every dim a multiple of 16.
_SCALED_MM_ALIGN = 16


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _triton_unusable(device: torch.device) -> str | None:
    if not _installed("triton"):
        return "triton is not installed"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return None if (major, minor) >= (8, 9) else f"the Triton kernel needs sm_89+, {device} is sm_{major}{minor}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton runs on {device.type} only in its interpreter (TRITON_INTERPRET=1)"
    return None if device.type == "cpu" else f"Triton has no {device.type} backend"


def _te_unusable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "Transformer Engine runs on CUDA only"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return f"Transformer Engine's blockwise FP8 GEMM needs sm_90+, {device} is sm_{major}{minor}"
    return None if _installed("transformer_engine") else "transformer_engine is not installed"


_UNUSABLE: dict[str, Callable[[torch.device], str | None]] = {
    "reference": lambda device: None,
    "triton": _triton_unusable,
    "te": _te_unusable,
}


def backend_unavailable(backend: str, device: torch.device | str) -> str | None:
    """Why `backend` cannot run on `device` in this process, or None when it can: on CUDA only
    after a tiny GEMM ran (row-wise-scaled torch._scaled_mm, for one, needs sm_90 and a recent
    cuBLAS, which no version check tells)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend not in _UNUSABLE:
        return f"no backend {backend!r}; there are {list(_UNUSABLE)}"
    why = _UNUSABLE[backend](device)
    return why if why is not None or device.type != "cuda" else _probe(backend, device)


@functools.cache
def _probe(backend: str, device: torch.device) -> str | None:
    """None when a 16 x 128 by 16 x 128 GEMM on `backend` runs and equals its dequantized product."""
    from megadual.fp8.quant import quantize_blocks, quantize_tiles
    x = torch.randn(16, BLOCK, device=device, generator=torch.Generator(device).manual_seed(0))
    a, b = quantize_tiles(x), quantize_blocks(x)
    try:
        out = _BACKENDS[backend](a, b)
    except Exception as error:  # what the library raises for an unsupported device differs by version
        return f"a tiny {backend} GEMM failed on {device}: {str(error).strip().splitlines()[0]}"
    want = a.dequantize(torch.float32) @ b.dequantize(torch.float32).t()
    if not torch.allclose(out.float(), want, rtol=1e-3, atol=1e-3):
        return f"a tiny {backend} GEMM on {device} gave wrong values"
    return None


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that run on `device`, the one `fp8_gemm` picks first."""
    device = torch.device(device)
    # On CPU the interpreted Triton kernel is for checking the kernel, never the default.
    order = ["triton", "te", "reference"] if device.type == "cuda" else ["reference", "triton", "te"]
    return [name for name in order if backend_unavailable(name, device) is None]


def _padded_for_scaled_mm(t: Fp8Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(data [rows, K] zero-padded to 16 rows and whole K blocks, row scales [K blocks, rows])."""
    rows, k = t.shape
    pad_rows = -rows % _SCALED_MM_ALIGN
    pad_k = -k % BLOCK
    # F.pad has no E4M3 kernel; the all-zero byte is E4M3 +0.
    data = F.pad(t.data.view(torch.uint8), (0, pad_k, 0, pad_rows)).view(E4M3)
    scales = F.pad(t.row_scales(), (0, 0, 0, pad_rows)).t().contiguous()
    return data, scales


def _gemm_reference(a: Fp8Tensor, b: Fp8Tensor) -> torch.Tensor:
    a_data, a_scales = _padded_for_scaled_mm(a)
    b_data, b_scales = _padded_for_scaled_mm(b)
    out = torch.zeros((a_data.shape[0], b_data.shape[0]), dtype=torch.float32, device=a_data.device)
    for kb in range(a_scales.shape[0]):
        cols = slice(kb * BLOCK, (kb + 1) * BLOCK)
        out += torch._scaled_mm(
            a_data[:, cols], b_data[:, cols].t(),
            scale_a=a_scales[kb].unsqueeze(1), scale_b=b_scales[kb].unsqueeze(0),
            out_dtype=torch.float32,
        )
    result = out[:a.shape[0], :b.shape[0]]
    # A copy when rows were padded: a view would keep the padded storage (e.g. a weight gradient's).
    return result.clone() if result.untyped_storage().nbytes() > result.nbytes else result.contiguous()


def _gemm_triton(a: Fp8Tensor, b: Fp8Tensor) -> torch.Tensor:
    from megadual.fp8.triton_gemm import blockwise_fp8_gemm
    return blockwise_fp8_gemm(a.data, a.row_scales(), b.data, b.row_scales())


def _gemm_te(a: Fp8Tensor, b: Fp8Tensor) -> torch.Tensor:
    from megadual.fp8.te_gemm import te_blockwise_fp8_gemm
    return te_blockwise_fp8_gemm(a, b)


_BACKENDS: dict[str, Callable[[Fp8Tensor, Fp8Tensor], torch.Tensor]] = {
    "reference": _gemm_reference,
    "triton": _gemm_triton,
    "te": _gemm_te,
}


def _check_operands(a: Fp8Tensor, b: Fp8Tensor) -> None:
    for name, t in (("A", a), ("B", b)):
        if t.data.dtype != E4M3 or t.data.dim() != 2 or t.block[1] != BLOCK:
            raise ValueError(f"fp8_gemm operand {name} must be 2-D E4M3 with one scale per {BLOCK}-wide "
                             f"K block, got {t.data.dtype} {tuple(t.shape)} with {t.block} blocks")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm: A is {tuple(a.shape)} and B is {tuple(b.shape)}; "
                         "their last dims (K) differ")
    if a.data.device != b.data.device:
        raise ValueError(f"fp8_gemm: A is on {a.data.device}, B on {b.data.device}")


def fp8_gemm(a: Fp8Tensor, b: Fp8Tensor, backend: str | None = None) -> torch.Tensor:
    """A [M, K] @ B [N, K]^T -> FP32 [M, N], on `backend` or the fastest one available for the device."""
    _check_operands(a, b)
    usable = available_backends(a.data.device)
    name = backend or usable[0]
    if name not in usable:
        raise ValueError(f"FP8 GEMM backend {name!r} is not available on {a.data.device} "
                         f"({backend_unavailable(name, a.data.device)}); available: {usable}")
    if 0 in (a.shape[0], b.shape[0], a.shape[1]):  # e.g. an expert that received no tokens
        return torch.zeros((a.shape[0], b.shape[0]), dtype=torch.float32, device=a.data.device)
    return _BACKENDS[name](a, b)
