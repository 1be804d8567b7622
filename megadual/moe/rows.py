"""Rows moved by index, keeping only the index for the backward (indexing and `index_add` would
keep the rows they move)."""
from __future__ import annotations

import torch


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
