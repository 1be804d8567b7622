"""FP8 linear against the FP32 linear: forward, input and weight gradients, FP8 cache, W split.

Every one of the three outputs is a single FP8 GEMM of two quantized operands, so
each obeys the GEMM bound of test_fp8_gemm.py: relative Frobenius error below
sqrt(2/3) * 2^-4 = 5.1% (measured ~3.7%). The loss is <y, g> for a fixed g, so the
output gradient is exactly g and the gradient errors come from the FP8 GEMMs alone.
"""
import math

import pytest
import torch

from megadual.fp8.linear import fp8_linear
from megadual.fp8.quant import E4M3
from megadual.parallel.linear import linear
from megadual.parallel.wgrad import WeightGradStore

pytestmark = pytest.mark.usefixtures("on_device_under_test")  # made on CUDA under scripts/gpu_check.sh

BOUND = math.sqrt(2 / 3) * 2**-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run(fn, x, w, g, store=None):
    x = x.detach().clone().requires_grad_()
    w = torch.nn.Parameter(w.detach().clone())
    y = fn(x, w, store) if store is not None else fn(x, w)
    (y * g).sum().backward()
    return y.detach(), x.grad, w.grad


# (leading shape, in, out): 256 tokens with K multiples of 128; 100 tokens with a ragged K of 200
SHAPES = [((4, 64), 384, 256), ((100,), 200, 160)]


@pytest.mark.parametrize("lead,d_in,d_out", SHAPES)
def test_forward_and_gradients_match_fp32_linear(lead, d_in, d_out):
    torch.manual_seed(d_in)
    x = torch.randn(*lead, d_in)
    w = torch.randn(d_out, d_in) * d_in**-0.5
    g = torch.randn(*lead, d_out)
    got = run(fp8_linear, x, w, g)
    want = run(linear, x, w, g)
    for name, a, b in zip(("y", "grad x", "grad w"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert 2**-10 < rel_err(a, b) < BOUND, name


def test_bf16_input_gives_bf16_output_and_input_grad():
    torch.manual_seed(1)
    x = torch.randn(2, 8, 256, dtype=torch.bfloat16)
    w = torch.randn(128, 256) * 0.06
    g = torch.randn(2, 8, 128, dtype=torch.bfloat16)
    y, gx, gw = run(fp8_linear, x, w, g)
    assert y.dtype == gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    _, want_gx, want_gw = run(linear, x.float(), w, g.float())
    assert rel_err(gx, want_gx) < BOUND and rel_err(gw, want_gw) < BOUND


def test_input_is_cached_for_backward_in_fp8_only():
    torch.manual_seed(2)
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(128, 256))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fp8_linear(x, w).sum().backward()
    activation_sized = [t for t in saved if t.numel() == x.numel()]
    assert activation_sized and all(t.dtype == E4M3 for t in activation_sized)
    # besides that: the FP32 scales (one per feature per 128 tokens) and the master weight itself
    others = [t for t in saved if t.numel() != x.numel()]
    assert all(t is w or (t.dtype == torch.float32 and t.shape == (256, 1)) for t in others)


def test_deferred_weight_grad_equals_immediate():
    torch.manual_seed(3)
    x = torch.randn(3, 40, 384, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(256, 384) * 0.05)
    g = torch.randn(3, 40, 256)
    (fp8_linear(x, w) * g).sum().backward()
    want_x, want_w = x.grad.clone(), w.grad.clone()

    x.grad, w.grad = None, None
    store = WeightGradStore()
    with store.deferrable_forward():
        y = fp8_linear(x, w, store)
    with store.split_backward():
        (y * g).sum().backward()
    assert torch.equal(x.grad, want_x)
    assert w.grad is None and len(store) == 1
    store.pop()
    assert torch.equal(w.grad, want_w)


def test_frozen_weight_still_gives_input_grad():
    torch.manual_seed(4)
    x = torch.randn(32, 256)
    w = torch.randn(64, 256)
    g = torch.randn(32, 64)
    _, want_gx, _ = run(fp8_linear, x, w, g)
    x = x.clone().requires_grad_()
    (fp8_linear(x, w) * g).sum().backward()
    assert torch.equal(x.grad, want_gx)


def test_expert_with_no_tokens_gets_zero_gradients():
    w = torch.nn.Parameter(torch.randn(256, 128))
    x = torch.zeros(0, 128, requires_grad=True)
    fp8_linear(x, w).sum().backward()
    assert x.grad.shape == (0, 128) and torch.equal(w.grad, torch.zeros_like(w))
