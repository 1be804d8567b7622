"""Blockwise-scaled FP8 GEMM against float64, on scaled-down DeepSeek-V3 linear shapes.

Bound: each E4M3 operand element carries a rounding error of at most half an ulp,
uniform within it, i.e. relative RMS <= 2^-4 / sqrt(3) (see test_fp8_quant.py). For
zero-mean random operands the output error is a sum of independent product errors,
so the relative Frobenius error of A @ B^T is at most the RMS of the two operands'
errors combined: sqrt(2/3) * 2^-4 = 5.1%. (Measured: ~3.7%.) Beyond quantization,
the GEMM itself must be exact up to FP32 accumulation: against the float64 product
of the dequantized operands the relative error is below 1e-5.

Every backend is a test case on every device, skipped with the reason where it
cannot run. On CPU the Triton kernel runs in Triton's interpreter, in a child
process: TRITON_INTERPRET must be set before triton is imported, and set in this
process it would also interpret the kernel on a GPU.
"""
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from unittest import mock

import pytest
import torch

from megadual.fp8.gemm import available_backends, backend_unavailable, fp8_gemm
from megadual.fp8.quant import quantize, quantize_blocks, quantize_tiles

QUANTIZATION_BOUND = math.sqrt(2 / 3) * 2**-4
ACCUMULATION_BOUND = 1e-5

DEVICE_BACKENDS = [(d, b) for d in ("cpu", "cuda") for b in ("reference", "triton", "te")]
INTERPRETED = ("cpu", "triton")
# (M, N) for the interpreter, which takes 4 s for 256 x 512 x 1024 and 0.3 s for this; ragged
# against its 32 x 32 tiles
INTERPRETED_SHAPE = (72, 80)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def exact_product(a, b) -> torch.Tensor:
    return a.dequantize().double() @ b.dequantize().double().t()


def _interpret_triton() -> None:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def triton_interpreter():
    """A child process whose Triton kernels run in the interpreter."""
    with mock.patch.dict(os.environ, TRITON_INTERPRET="1"):
        why = backend_unavailable("triton", "cpu")
    if why:
        pytest.skip(f"{why} (pip install -r requirements-test.txt)")
    with ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), initializer=_interpret_triton) as child:
        yield child


@pytest.fixture
def gemm(request, device, backend):
    """fp8_gemm on `backend`: in the interpreter's child process for Triton on CPU."""
    if (device, backend) == INTERPRETED:
        child = request.getfixturevalue("triton_interpreter")
        return lambda a, b: child.submit(fp8_gemm, a, b, backend).result()
    why = backend_unavailable(backend, device)
    if why:
        pytest.skip(why)
    return lambda a, b: fp8_gemm(a, b, backend)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("k", [1024, 384, 200])  # hidden 7168 trimmed; 3 blocks; ragged last block
@pytest.mark.parametrize("weight_blocks", [True, False], ids=["Bblocks", "Btiles"])
def test_gemm_error_vs_float64(gemm, device, backend, k, weight_blocks):
    m, n = INTERPRETED_SHAPE if (device, backend) == INTERPRETED else (256, 512)
    torch.manual_seed(k)
    x = torch.randn(m, k, device=device)
    w = torch.randn(n, k, device=device) * 0.02
    a = quantize_tiles(x)
    b = quantize_blocks(w) if weight_blocks else quantize_tiles(w)
    out = gemm(a, b)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert rel_err(out, exact_product(a, b)) < ACCUMULATION_BOUND
    err = rel_err(out, x.double() @ w.double().t())
    assert 2**-10 < err < QUANTIZATION_BOUND


def test_blockwise_scaling_isolates_outlier_rows_unlike_per_tensor():
    torch.manual_seed(0)
    m, k, n = 256, 1024, 512
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.02
    outliers = torch.tensor([3, 77, 150, 201])
    normal = torch.ones(m, dtype=torch.bool)
    normal[outliers] = False
    spiked = x.clone()
    spiked[outliers] *= 3e4  # outlier tokens; under one scale the others sink towards E4M3 subnormals
    ref = spiked.double() @ w.double().t()

    blockwise = fp8_gemm(quantize_tiles(spiked), quantize_blocks(w))
    per_tensor = exact_product(quantize(spiked, (m, k)), quantize(w, (n, k)))
    blockwise_err = rel_err(blockwise[normal], ref[normal])
    assert blockwise_err < QUANTIZATION_BOUND
    assert rel_err(per_tensor[normal], ref[normal]) > 3 * blockwise_err
    # 1x128 tiles: the normal rows come out bit for bit as if the outliers were not there
    calm = fp8_gemm(quantize_tiles(x), quantize_blocks(w))
    assert torch.equal(blockwise[normal], calm[normal])


def test_empty_operand_gives_zeros():
    b = quantize_blocks(torch.randn(64, 256))
    out = fp8_gemm(quantize_tiles(torch.randn(0, 256)), b)
    assert out.shape == (0, 64)


def test_rejects_mismatched_k_and_unavailable_backend():
    a = quantize_tiles(torch.randn(4, 256))
    with pytest.raises(ValueError, match="last dims"):
        fp8_gemm(a, quantize_blocks(torch.randn(8, 384)))
    with pytest.raises(ValueError, match="not available"):
        fp8_gemm(a, quantize_blocks(torch.randn(8, 256)), backend="no-such-backend")
    with pytest.raises(ValueError, match="scale per 128-wide K block"):
        fp8_gemm(a, quantize(torch.randn(8, 256), (8, 256)))


def test_cpu_default_is_reference():
    assert available_backends("cpu")[0] == "reference"
