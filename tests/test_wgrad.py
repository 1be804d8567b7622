import torch

from megadual.parallel.linear import linear
from megadual.parallel.wgrad import WeightGradStore


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
    assert len(store) == 0


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
