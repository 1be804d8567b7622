"""Rows moved by index, keeping only the index for the backward (indexing and `index_add` would
keep the rows they move), and the experts' copies of gathered rows kept as the index too."""
from __future__ import annotations

from functools import partial
from typing import Self

import torch
from torch.autograd.graph import saved_tensors_hooks

from megadual.parallel.linear import InputCache, tensors_of
from megadual.parallel.recompute import Recompute


class _SumRowsInto(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return rows.new_zeros(num_rows, *rows.shape[1:]).index_add_(0, index, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def sum_rows_into(rows: torch.Tensor, index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows, ...]: row i the sum of the `rows` whose `index` is i (zeros where none is)."""
    return _SumRowsInto.apply(rows, index, num_rows)


class _Remade:
    """In place of a saved copy of gathered rows: made again from the rows in the backward."""
    __slots__ = ("make", "part", "remake")

    def __init__(self, remake, make, part: int):
        self.remake, self.make, self.part = remake, make, part

    def tensor(self) -> torch.Tensor:
        return tensors_of(self.make(self.remake()))[self.part]


def _unpack(packed):
    return packed.tensor() if isinstance(packed, _Remade) else packed


class RowsKeptOnce:
    """While the routed experts run: what their gate and up GEMMs save of the rows gathered from
    `tokens` (the FP8 copy, the autocast cast, made by the InputCaches handed out by `cache`) is kept
    as the index it was gathered by, and gathered and made again in the backward. So a row that
    reaches several local experts is kept once (as DeepSeek-V3 keeps each dispatched row once per
    rank), bit for bit the same; only where `tokens` take fewer bytes than the `pairs` copies of
    `copy_bytes` per element (FP8: 1; None: autocast's dtype, or the rows' own), so not where
    rows meet about one expert each. Inside a recomputed region (`moe`) the region drops all anyway."""

    def __init__(self, tokens: torch.Tensor, pairs: int, copy_bytes: int | None, recompute: Recompute):
        self.tokens, self.observer = tokens, recompute.observer
        if copy_bytes is None:
            device = tokens.device.type
            copy_bytes = (torch.get_autocast_dtype(device).itemsize if torch.is_autocast_enabled(device)
                          else tokens.element_size())
        smaller = tokens.numel() * tokens.element_size() < pairs * tokens.shape[-1] * copy_bytes
        self.active = smaller and torch.is_grad_enabled() and not recompute.in_region
        self._caches: list[tuple[InputCache, torch.Tensor]] = []
        self._hooks: saved_tensors_hooks | None = None

    def cache(self, rows: torch.Tensor) -> InputCache:
        """The InputCache of the gate and up GEMMs reading tokens[rows]."""
        if not self.active:
            return InputCache()
        cache = InputCache(partial(torch.Tensor.__getitem__, self.tokens, rows))
        self._caches.append((cache, rows))
        return cache

    def __enter__(self) -> Self:
        if self.active:
            self._hooks = saved_tensors_hooks(self._pack, _unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
        self._hooks, self._caches = None, []  # no cycle through the hooks: the rows go with the backward

    def _pack(self, tensor: torch.Tensor):
        for cache, rows in self._caches:
            for ref, make, part in cache.recipes:
                if ref() is tensor:
                    if self.observer is not None:
                        self.observer.saved(self.tokens)
                        self.observer.saved(rows)
                    return _Remade(cache.remake, make, part)
        if self.observer is not None:  # what Recompute.observed does outside these GEMMs
            self.observer.saved(tensor)
        return tensor
