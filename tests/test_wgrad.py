import pytest
import torch

from megadual.parallel.linear import linear
from megadual.parallel.wgrad import WeightGradStore

pytestmark = pytest.mark.usefixtures("on_device_under_test")  # made on CUDA under scripts/gpu_check.sh


def test_split_backward_defers_weight_grad_until_pop():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(4, 8))
    linear(x, w).square().sum().backward()
    want_x, want_w = x.grad.clone(), w.grad.clone()

    x.grad, w.grad = None, None
    store = WeightGradStore()
    with store.deferrable_forward():
        y = linear(x, w, store)
    with store.split_backward():
        y.square().sum().backward()
    assert torch.equal(x.grad, want_x)
    assert w.grad is None and len(store) == 1
    store.pop()
    assert torch.allclose(w.grad, want_w, rtol=1e-6, atol=1e-6)
    assert w.grad.grad_fn is None  # no graph keeping the W GEMM's operands alive until the step
    assert len(store) == 0


def test_store_puts_deferred_gradients_where_it_is_told():
    w = torch.nn.Parameter(torch.randn(4, 8))
    received = []
    store = WeightGradStore(lambda param, grad: received.append((param, grad)))
    with store.deferrable_forward():
        y = linear(torch.randn(2, 8), w, store)
    with store.split_backward():
        y.sum().backward()
    store.pop()
    assert w.grad is None and len(received) == 1 and received[0][0] is w


def test_gemm_runs_in_the_input_dtype_outside_autocast():
    """The router's FP32 gate on BF16 weights: the gradient reaches the weight in its own dtype."""
    w = torch.nn.Parameter(torch.randn(4, 8, dtype=torch.bfloat16))
    x = torch.randn(2, 8)
    for deferrable in (False, True):
        w.grad, store = None, WeightGradStore()
        with store.deferrable_forward(deferrable):
            y = linear(x, w, store)
        assert y.dtype == torch.float32
        with store.split_backward():
            y.sum().backward()
        if deferrable:
            store.pop()
        assert w.grad.dtype == torch.bfloat16


def test_deferrable_forward_whose_backward_is_not_split_computes_weight_grad_at_once():
    torch.manual_seed(0)
    x, w = torch.randn(3, 8), torch.nn.Parameter(torch.randn(4, 8))
    store = WeightGradStore()
    with store.deferrable_forward():
        y = linear(x, w, store)
    y.square().sum().backward()
    assert len(store) == 0
    assert torch.allclose(w.grad, 2 * (x @ w.T).T @ x, rtol=1e-5, atol=1e-5)


def test_forward_outside_deferrable_forward_is_not_deferred():
    w = torch.nn.Parameter(torch.randn(4, 8))
    store = WeightGradStore()
    y = linear(torch.randn(2, 8), w, store)
    with store.split_backward():
        y.sum().backward()
    assert w.grad is not None
