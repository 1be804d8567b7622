"""Tensor-parallel layers: sharded linears, vocabulary-parallel embedding and cross entropy.

A TP region starts with `enter_tp_region` (copy, or all-gather of the sequence under
sequence parallelism) and ends with `leave_tp_region` (all-reduce, or reduce-scatter
of the sequence). Inside, column-sharded linears split the output features and
row-sharded linears split the input features, as in Megatron-LM.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megadual.parallel import collectives, comm
from megadual.parallel.linear import InputCache, linear
from megadual.parallel.params import ParamSpec, TPShard


@dataclass(frozen=True)
class TensorParallel:
    group: object = None
    sequence_parallel: bool = False

    @property
    def size(self) -> int:
        return comm.group_size(self.group)

    @property
    def rank(self) -> int:
        return comm.group_rank(self.group)


NO_TP = TensorParallel()


def enter_tp_region(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    if tp.sequence_parallel:
        return comm.gather_sequence(x, tp.group)
    return comm.copy_to_tp_region(x, tp.group)


def leave_tp_region(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    if tp.sequence_parallel:
        return comm.reduce_scatter_sequence(x, tp.group)
    return comm.reduce_from_tp_region(x, tp.group)


def tp_spec(dim: int | None, tp: TensorParallel, init_std: float | None, expert: bool = False,
            grad_partial_over_tp: bool = False, real_rows: int | None = None) -> ParamSpec:
    """The spec of a parameter split over `tp` along `dim` (None, or TP of one: whole)."""
    shard = TPShard(dim, tp.rank, tp.size, tp.group) if dim is not None and tp.size > 1 else None
    return ParamSpec(init_std, shard, expert=expert, grad_partial_over_tp=grad_partial_over_tp, real_rows=real_rows)


def local_shape(shape: list[int], spec: ParamSpec) -> list[int]:
    if spec.tp is None:
        return list(shape)
    if shape[spec.tp.dim] % spec.tp.size:
        raise ValueError(f"dim {shape[spec.tp.dim]} is not divisible by TP size {spec.tp.size}")
    return [n // spec.tp.size if d == spec.tp.dim else n for d, n in enumerate(shape)]


class ShardedLinear(torch.nn.Module):
    """A bias-free linear whose weight [out, in] is split over TP along `shard_dim`.

    shard_dim 0 is Megatron's column-parallel linear, 1 its row-parallel linear;
    `shard_dim=None` keeps the weight whole (replicated; `grad_partial_over_tp` when each
    TP rank applies it to its own tokens). `gemm` is the linear function (full precision
    or FP8); `wgrad_store` is set by the pipeline runtime. `real_rows`: the output head's
    vocabulary before padding (the rows after it are padding, see ParamSpec).
    """

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, shard_dim: int | None,
                 init_std: float, gemm: Callable = linear, expert: bool = False,
                 grad_partial_over_tp: bool = False, real_rows: int | None = None):
        super().__init__()
        self.param_specs = {"weight": tp_spec(shard_dim, tp, init_std, expert, grad_partial_over_tp, real_rows)}
        self.weight = torch.nn.Parameter(torch.empty(local_shape([out_features, in_features],
                                                                 self.param_specs["weight"])))
        self.gemm = gemm
        self.wgrad_store = None

    def forward(self, x: torch.Tensor, cache: InputCache | None = None) -> torch.Tensor:
        """`cache`: shared by the linears reading this x (parallel/linear.py)."""
        return self.gemm(x, self.weight, self.wgrad_store, cache)


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding table of `vocab_size` (padded) rows split over TP; output leaves the TP region.
    The rows from `real_rows` on are padding (no token id reaches them; see ParamSpec)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel, init_std: float,
                 real_rows: int | None = None):
        super().__init__()
        self.tp = tp
        self.rows = vocab_size // tp.size
        self.param_specs = {"weight": tp_spec(0, tp, init_std, real_rows=real_rows)}
        self.weight = torch.nn.Parameter(torch.empty(self.rows, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.tp.rank * self.rows
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return leave_tp_region(out.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, real_vocab):
        logits = logits.float()
        vocab_local = logits.shape[-1]
        padding = max(0, min(vocab_local, (comm.group_rank(group) + 1) * vocab_local - real_vocab))
        if padding:  # the padded vocabulary's columns take no probability
            logits = logits.masked_fill(torch.arange(vocab_local, device=logits.device) >= vocab_local - padding,
                                        -math.inf)
        logits_max = logits.max(dim=-1).values
        if comm.group_size(group) > 1:
            collectives.all_reduce(logits_max, group, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        local = target - comm.group_rank(group) * vocab_local
        outside = (local < 0) | (local >= vocab_local)
        local = local.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if comm.group_size(group) > 1:
            collectives.all_reduce(target_logit, group)
            collectives.all_reduce(sum_exp, group)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax.clone()
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local.unsqueeze(-1), -hit.unsqueeze(-1))
        return grad * grad_loss.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp: TensorParallel,
                                 real_vocab: int | None = None):
    """Per-token cross entropy of logits split over TP along the vocabulary (whole without TP,
    where torch's fused kernel computes the same in about 0.6 of the time), over the first
    `real_vocab` columns of the whole (None: all): the padding takes no probability, so the
    loss and every gradient are the same however TP pads."""
    if tp.size == 1:
        logits = logits.float().flatten(0, -2)
        return F.cross_entropy(logits[:, :real_vocab], target.flatten(), reduction="none").view(target.shape)
    return sharded_cross_entropy(logits, target, tp.group, real_vocab)


def sharded_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group, real_vocab: int | None = None
                          ) -> torch.Tensor:
    """Per-token cross entropy of logits split over `group` along the vocabulary, written out."""
    real_vocab = logits.shape[-1] * comm.group_size(group) if real_vocab is None else real_vocab
    return _VocabParallelCrossEntropy.apply(logits, target, group, real_vocab)


def attach_wgrad_store(module: torch.nn.Module, store) -> None:
    """Route the weight gradients of every linear in `module` through `store`."""
    for sub in module.modules():
        if hasattr(sub, "wgrad_store"):
            sub.wgrad_store = store
