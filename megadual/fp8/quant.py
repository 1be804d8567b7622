"""E4M3 quantization with fine-grained scales (DeepSeek-V3 report, section 3.3).

A tensor is cut into blocks of `block_rows x block_cols` elements; each block gets
one FP32 scale, amax(block) / 448, so its largest element lands on the E4M3
maximum. Values are stored as E4M3(x / scale) and read back as E4M3 * scale.

Two granularities feed the GEMMs, and in both the 128 runs along the GEMM's
reduction dim (the last dim of each operand):
- tiles, 1 x 128 (`quantize_tiles`): activations and activation gradients, one
  scale per token per 128 channels;
- blocks, 128 x 128 (`quantize_blocks`): weights.
The weight-gradient GEMM reduces over tokens, so it needs 128 x 1 tiles along the
token dim; `quantize_tiles_transposed` cuts those and returns the transposed
operand, ready for the GEMM. The last tile of a dim that is not a multiple of 128
is simply shorter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
BLOCK = 128
TILE = (1, BLOCK)
WEIGHT_BLOCK = (BLOCK, BLOCK)


@dataclass(frozen=True)
class Fp8Tensor:
    """E4M3 values with one FP32 scale per `block` (rows, cols) of elements.

    data:  E4M3, [..., cols] (leading dims beyond two only for 1 x n tiles)
    scale: FP32, [ceil(rows / block[0]), ceil(cols / block[1])], with the same
           leading dims as `data` for tiles
    """

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        cols = self.data.shape[-1]
        full = self.row_scales().repeat_interleave(self.block[1], dim=1)[:, :cols]
        return (_as_2d(self.data).float() * full).to(dtype).reshape(self.data.shape)

    def row_scales(self) -> torch.Tensor:
        """[rows, column blocks]: the scale that applies to each row of each column block."""
        rows = _as_2d(self.data).shape[0]
        return _as_2d(self.scale).repeat_interleave(self.block[0], dim=0)[:rows]


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    # Explicit row count: reshape(-1, 0) is ambiguous for an expert that got no tokens.
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _scales_from_amax(amax: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
    scale = amax / E4M3_MAX
    if pow2_scales:
        # Round up to a power of two so scaling is exact; frexp gives s = m * 2^e with
        # m in [0.5, 1), so 2^e >= s, and s is itself 2^(e-1) when m == 0.5.
        mantissa, exponent = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).int())
    # An all-zero block quantizes to zeros under any scale; 1 keeps the division finite.
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize(x: torch.Tensor, block: tuple[int, int], pow2_scales: bool = False) -> Fp8Tensor:
    """E4M3 with one scale per `block` of the last two dims (leading dims allowed when block[0] == 1)."""
    block_rows, block_cols = block
    if block_rows != 1 and x.dim() != 2:
        raise ValueError(f"{block_rows}x{block_cols} blocks need a 2-D tensor, got shape {tuple(x.shape)}")
    x2 = _as_2d(x).float()
    rows, cols = x2.shape
    padded_rows, padded_cols = _ceil_to(rows, block_rows), _ceil_to(cols, block_cols)
    if (padded_rows, padded_cols) != (rows, cols):
        x2 = F.pad(x2, (0, padded_cols - cols, 0, padded_rows - rows))  # zeros leave amax unchanged
    blocks = x2.view(padded_rows // block_rows, block_rows, padded_cols // block_cols, block_cols)
    scale = _scales_from_amax(blocks.abs().amax(dim=(1, 3)), pow2_scales)
    q = (blocks / scale[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    data = q.view(padded_rows, padded_cols)[:rows, :cols].contiguous().reshape(x.shape)
    if block_rows == 1:
        scale = scale.reshape(*x.shape[:-1], scale.shape[-1])
    return Fp8Tensor(data, scale, block)


def quantize_tiles(x: torch.Tensor, pow2_scales: bool = False) -> Fp8Tensor:
    """1 x 128 tiles along the last dim (activations, gradients); any leading shape."""
    return quantize(x, TILE, pow2_scales)


def quantize_tiles_transposed(x: torch.Tensor, pow2_scales: bool = False) -> Fp8Tensor:
    """128 x 1 tiles along dim 0 of a 2-D [tokens, features] tensor, returned as the
    [features, tokens] operand (1 x 128 tiles along tokens) of a GEMM that reduces over tokens."""
    return quantize(x.t(), TILE, pow2_scales)


def quantize_blocks(w: torch.Tensor, pow2_scales: bool = False) -> Fp8Tensor:
    """128 x 128 blocks of a 2-D weight."""
    return quantize(w, WEIGHT_BLOCK, pow2_scales)


def quantize_for_dispatch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [..., hidden] -> (E4M3 data [..., hidden], FP32 scales [..., ceil(hidden / 128)]),
    the two tensors the MoE dispatch all-to-all sends instead of BF16 activations."""
    q = quantize_tiles(x)
    return q.data, q.scale


def dequantize_from_dispatch(data: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_for_dispatch`, run by the experts on the received tokens."""
    return Fp8Tensor(data, scales, TILE).dequantize(dtype)
