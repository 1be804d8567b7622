"""E4M3 tile / block quantization: scales, error bounds, tile independence, ragged K.

Error bound used throughout: E4M3 normals have 3 mantissa bits, so rounding x/scale
to nearest errs by at most half an ulp, 2^-4 of its magnitude; below the smallest
normal (2^-6) the spacing is 2^-9, so the error is at most 2^-10 in scaled units.
Per element: |x - dq(q(x))| <= max(|x| * 2^-4, scale * 2^-10), with a hair of
slack for the FP32 division and product.
"""
import pytest
import torch

from megadual.fp8.quant import (
    E4M3,
    E4M3_MAX,
    dequantize_from_dispatch,
    quantize,
    quantize_blocks,
    quantize_for_dispatch,
    quantize_tiles,
    quantize_tiles_transposed,
)

pytestmark = pytest.mark.usefixtures("on_device_under_test")  # made on CUDA under scripts/gpu_check.sh

SLACK = 1 + 2**-16


def element_bound(x: torch.Tensor, scale_per_element: torch.Tensor) -> torch.Tensor:
    return torch.maximum(x.abs().double() * 2**-4, scale_per_element.double() * 2**-10) * SLACK


def tile_amax(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Per-block amax written with explicit slices (independent of the padding trick in quant.py)."""
    row_starts, col_starts = range(0, x.shape[0], rows), range(0, x.shape[1], cols)
    return torch.stack([
        torch.stack([x[i:i + rows, j:j + cols].abs().max() for j in col_starts]) for i in row_starts
    ])


def wide_range(*shape: int) -> torch.Tensor:
    """Values spread over many binades, so some tiles reach into E4M3 subnormals."""
    return torch.randn(*shape) * torch.exp2(torch.randn(*shape) * 3)


@pytest.mark.parametrize("k", [1024, 200])
def test_tile_scales_are_amax_over_448_with_ragged_last_tile(k):
    torch.manual_seed(0)
    x = wide_range(16, k)
    x[7, :128] = 0.0
    q = quantize_tiles(x)
    assert q.data.dtype == E4M3 and q.data.shape == x.shape
    assert q.scale.shape == (16, -(-k // 128))
    amax = tile_amax(x, 1, 128)
    expected = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    assert torch.equal(q.scale, expected)
    # the largest element of every non-zero tile lands on the E4M3 maximum
    codes = tile_amax(q.data.float(), 1, 128)
    assert torch.equal(codes[amax > 0], torch.full_like(codes[amax > 0], E4M3_MAX))
    assert torch.all(q.dequantize()[7, :128] == 0)


@pytest.mark.parametrize("k", [1024, 200])
def test_tile_error_within_e4m3_bound_per_element(k):
    torch.manual_seed(1)
    x = wide_range(64, k)
    q = quantize_tiles(x)
    scale = q.scale.repeat_interleave(128, dim=1)[:, :k]
    err = (x.double() - q.dequantize().double()).abs()
    assert torch.all(err <= element_bound(x, scale))
    tile_max = tile_amax(x, 1, 128).repeat_interleave(128, dim=1)[:, :k].double()
    assert torch.all(err <= tile_max * 2**-4 * SLACK)
    assert err.max() > 0  # it really is quantized


def test_pow2_scales_are_powers_of_two_covering_the_tile():
    torch.manual_seed(2)
    x = wide_range(32, 300)
    q = quantize_tiles(x, pow2_scales=True)
    mantissa, _ = torch.frexp(q.scale)
    assert torch.all(mantissa == 0.5)
    amax = tile_amax(x, 1, 128)
    assert torch.all(q.scale >= amax / E4M3_MAX) and torch.all(q.scale < 2 * amax / E4M3_MAX)
    scale = q.scale.repeat_interleave(128, dim=1)[:, :300]
    err = (x.double() - q.dequantize().double()).abs()
    assert torch.all(err <= element_bound(x, scale))


def test_outlier_changes_only_its_own_tile():
    torch.manual_seed(3)
    x = torch.randn(8, 512)
    spiked = x.clone()
    spiked[2, 300] = 1e6  # tile (row 2, cols 256..383); pushes its neighbours below E4M3 normals
    before = quantize_tiles(x).dequantize()
    after = quantize_tiles(spiked).dequantize()
    in_tile = torch.zeros_like(x, dtype=torch.bool)
    in_tile[2, 256:384] = True
    in_tile_not_spike = in_tile.clone()
    in_tile_not_spike[2, 300] = False
    assert torch.equal(after[~in_tile], before[~in_tile])
    err_before = (before - x)[in_tile_not_spike].abs().max()
    err_after = (after - spiked)[in_tile_not_spike].abs().max()
    assert err_after > 10 * err_before  # the outlier's tile pays for it ...
    # ... whereas one scale for the whole tensor makes every element pay
    per_tensor = quantize(spiked, tuple(x.shape)).dequantize()
    assert (per_tensor - spiked)[~in_tile].abs().max() > 10 * (after - spiked)[~in_tile].abs().max()


def test_weight_blocks_128x128_ragged_and_independent():
    torch.manual_seed(4)
    w = wide_range(300, 200)
    q = quantize_blocks(w)
    assert q.scale.shape == (3, 2)
    assert torch.equal(q.scale, tile_amax(w, 128, 128) / E4M3_MAX)
    scale = q.row_scales().repeat_interleave(128, dim=1)[:, :200]
    assert torch.all((w.double() - q.dequantize().double()).abs() <= element_bound(w, scale))
    spiked = w.clone()
    spiked[260, 10] = 1e6  # block (2, 0)
    other = torch.ones_like(w, dtype=torch.bool)
    other[256:, :128] = False
    assert torch.equal(quantize_blocks(spiked).dequantize()[other], q.dequantize()[other])


def test_transposed_tiles_run_along_tokens():
    torch.manual_seed(5)
    x = wide_range(200, 96)  # [tokens, features], 200 tokens: a ragged last token tile
    q = quantize_tiles_transposed(x)
    assert q.shape == (96, 200) and q.scale.shape == (96, 2)
    assert torch.equal(q.scale, tile_amax(x, 128, 1).t() / E4M3_MAX)
    assert torch.equal(q.dequantize(), quantize_tiles(x.t().contiguous()).dequantize())
    scale = q.scale.repeat_interleave(128, dim=1)[:, :200]
    assert torch.all((x.t().double() - q.dequantize().double()).abs() <= element_bound(x.t(), scale))


def test_dispatch_round_trip_keeps_leading_dims_and_dtype():
    torch.manual_seed(6)
    x = torch.randn(2, 5, 300, dtype=torch.bfloat16)
    data, scales = quantize_for_dispatch(x)
    assert data.dtype == E4M3 and data.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (2, 5, 3)
    back = dequantize_from_dispatch(data, scales, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    full_scale = scales.reshape(10, 3).repeat_interleave(128, dim=1)[:, :300].reshape(x.shape)
    # plus one BF16 rounding (<= 2^-9 of a value within 2^-4 of |x|) on the way back
    bound = element_bound(x, full_scale) + x.abs().double() * 2**-8
    assert torch.all((x.double() - back.double()).abs() <= bound)
    assert not torch.equal(back, x)
