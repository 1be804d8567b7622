"""The linear GEMM as an autograd function whose weight gradient can be deferred.

Every linear layer of the model (TP linears, experts, router, head) goes through
`linear`, so the pipeline's W split covers every weight. The model's linears have
no bias (as in DeepSeek-V3). Without a store taking the forward it is `F.linear`.

GEMMs that read one input (gate and up, MLA's two down-projections) share an `InputCache`, so
the copy each would save for its backward (autocast's cast, the FP8 quantization) is made once.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from megadual.parallel.wgrad import WeightGradStore, store_for_forward


def weight_grad_now_or_deferred(weight: torch.Tensor, weight_grad: Callable[[], torch.Tensor],
                                store: WeightGradStore | None) -> torch.Tensor | None:
    """The weight gradient for autograd to accumulate, or None when a deferring `store` takes the work.
    `weight` must be the parameter object itself, not autograd's saved copy of it (under saved-tensor
    hooks it can be another object), since a store may accumulate into it by identity (the
    distributed optimizer's buckets)."""
    if store is None or not store.deferring:
        return weight_grad()
    store.put(lambda: store.accumulate(weight, weight_grad()))
    return None


class InputCache:
    """What the GEMMs reading one input made of it (its autocast cast, its FP8 quantizations), made
    once: the GEMMs then save the same tensor for their backwards. Lives for one forward call.

    `remake`: the input made again (routed experts' rows, gathered again by index). Each tensor made
    here is then listed in `recipes` (a weak reference to it, how to make it from the input again,
    which of its tensors it is), so that a saved-tensor hook may keep the recipe in its place
    (moe/rows.py)."""

    def __init__(self, remake: Callable[[], torch.Tensor] | None = None) -> None:
        self._made: dict[str, object] = {}
        self.remake = remake
        self.recipes: list[tuple[weakref.ref, Callable[[torch.Tensor], object], int]] = []

    def get(self, key: str, make: Callable[[torch.Tensor], object], x: torch.Tensor) -> object:
        """make(x), made once per key."""
        if key not in self._made:
            self._made[key] = made = make(x)
            if self.remake is not None:
                self.recipes += [(weakref.ref(t), make, i) for i, t in enumerate(tensors_of(made))]
        return self._made[key]


def tensors_of(made: object) -> tuple[torch.Tensor, ...]:
    """The tensors of what an InputCache made: the tensor, or an Fp8Tensor's data and scale."""
    return (made,) if torch.is_tensor(made) else (made.data, made.scale)


def gemm_input(x: torch.Tensor, cache: InputCache | None) -> torch.Tensor:
    """x as a GEMM under the current autocast reads it (cast once per `cache`)."""
    if not torch.is_autocast_enabled(x.device.type):
        return x
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype) if cache is None else cache.get(f"autocast {dtype}", partial(torch.Tensor.to, dtype=dtype), x)


def flat(t: torch.Tensor) -> torch.Tensor:
    """[..., features] -> [tokens, features]."""
    return t.reshape(-1, t.shape[-1])


class _Linear(torch.autograd.Function):
    """Autocast is applied here by hand: the backward runs outside autocast, so it keeps
    the forward's GEMM operands (x in the GEMM dtype) to multiply the gradient with.
    Outside autocast the GEMM runs in x's dtype (the router's FP32 gate on BF16 weights)."""

    @staticmethod
    def forward(ctx, x, weight, wgrad_store, cache):
        x = gemm_input(x, cache)
        gemm_weight = weight.to(x.dtype)
        ctx.save_for_backward(x)
        ctx.weight = weight  # the parameter itself: see weight_grad_now_or_deferred
        ctx.wgrad_store = wgrad_store
        return F.linear(x, gemm_weight)

    @staticmethod
    def backward(ctx, grad_out):
        (x,), weight = ctx.saved_tensors, ctx.weight
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_out.matmul(weight.to(x.dtype))

        def weight_grad() -> torch.Tensor:
            return flat(grad_out).t().matmul(flat(x)).to(weight.dtype)

        return grad_x, weight_grad_now_or_deferred(weight, weight_grad, ctx.wgrad_store), None, None


def linear(x: torch.Tensor, weight: torch.Tensor, wgrad_store: WeightGradStore | None = None,
           cache: InputCache | None = None) -> torch.Tensor:
    """y = x @ weight.T, with the weight gradient routed through `wgrad_store` when the
    store takes this forward (`WeightGradStore.deferrable_forward`); GEMMs given one `cache`
    save one copy of their common input."""
    store = store_for_forward(wgrad_store)
    if store is None:
        autocast = torch.is_autocast_enabled(x.device.type)
        return F.linear(gemm_input(x, cache), weight if autocast else weight.to(x.dtype))
    return _Linear.apply(x, weight, store, cache)


class _Fp32Linear(torch.autograd.Function):
    """x @ weight.T in FP32 from a lower-precision x, which is kept in its own dtype (cast again
    in the backward) rather than as the FP32 copy the GEMM reads."""

    @staticmethod
    def forward(ctx, x, weight, wgrad_store):
        ctx.save_for_backward(x)
        ctx.weight, ctx.wgrad_store = weight, wgrad_store  # the parameter: see weight_grad_now_or_deferred
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad_out):
        (x,), weight = ctx.saved_tensors, ctx.weight
        grad_x = grad_out.matmul(weight.float()).to(x.dtype)

        def weight_grad() -> torch.Tensor:
            return flat(grad_out).t().matmul(flat(x).float()).to(weight.dtype)

        return grad_x, weight_grad_now_or_deferred(weight, weight_grad, ctx.wgrad_store), None


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, wgrad_store: WeightGradStore | None = None) -> torch.Tensor:
    """`linear` in FP32 whatever the dtypes of x and the weight and autocast (the router's gate);
    its backward keeps x as given, not an FP32 copy of it."""
    with torch.autocast(x.device.type, enabled=False):
        if x.dtype == torch.float32:
            return linear(x, weight, wgrad_store)
        return _Fp32Linear.apply(x, weight, store_for_forward(wgrad_store))
