"""The distributed optimizer (ZeRO-1, Megatron's --use-distributed-optimizer).

AdamW whose FP32 master weights and moments are sharded over each parameter's data-parallel
ranks: the DP group for dense parameters, the expert-DP group for routed experts (the
ParamTable says which). Parameters live in flat buckets (buckets.py), sorted by global name
so that DualPipe's mirrored ranks lay out the same buckets (a stack of experts' rows as one
run, where its first row's name puts it). One step:

1. gradients accumulate in FP32 in the buckets, whatever the model's dtype (autograd's through
   a hook on each parameter, the pipeline's deferred ones through `accumulate_grad`);
2. sequence-parallel partial gradients are summed over TP, each bucket is reduce-scattered
   over its group (and divided by DP, as the plain reduction does), and DualPipe's mirrored
   ranks add their shards, so both copies of a stage hold the same summed shard;
3. the global norm counts every rank's shard once, clipping scales the shards;
4. AdamW updates the shard's masters and moments (weight decay on matrices only), and each
   bucket is all-gathered into the model's weights.

A skipped step stops after 3: weights, masters and moments stay as they were. Per element
this is the plain AdamW's arithmetic (torch's own single-tensor Adam on the shard), so with
the same reductions the weights after a step are the plain optimizer's, bit for bit.
With a BF16 model the buckets hold BF16 weights, FP32 masters beside them. With
--use-precision-aware-optimizer the moments are stored in --exp-avg-dtype / --exp-avg-sq-dtype
(BF16, as DeepSeek-V3 kept them): each step computes in FP32 on an upcast copy of the shard's
moments and rounds them back, and checkpoints hold them in that dtype, so a resumed run
continues bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.adam import adam

from megadual.config import OptimConfig
from megadual.parallel.params import ParamTable
from megadual.parallel.topology import Topology
from megadual.parallel.wgrad import stack_row
from megadual.pipeline.driver import Pipeline
from megadual.training.buckets import Bucket, bucket_order, split_into_buckets
from megadual.training.grads import ReducedGradients, counted_in_norm, sum_partial_over_tp
from megadual.training.optimizer import adamw_group_settings, decayed


@dataclass
class AdamState:
    """Adam's moments of one bucket's shard (in their stored dtypes), and its step count."""
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor

    @classmethod
    def zeros_like(cls, shard: torch.Tensor, cfg: OptimConfig) -> AdamState:
        return cls(torch.zeros_like(shard, dtype=moment_dtype(cfg.exp_avg_dtype)),
                   torch.zeros_like(shard, dtype=moment_dtype(cfg.exp_avg_sq_dtype)),
                   torch.zeros((), dtype=torch.float32))


MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def moment_dtype(name: str) -> torch.dtype:
    """--exp-avg-dtype / --exp-avg-sq-dtype's torch dtype."""
    return MOMENT_DTYPES[name]


def default_bucket_numel(dp: int) -> int:
    """Megatron's default --ddp-bucket-size."""
    return max(40_000_000, 1_000_000 * dp)


class DistributedOptimizer:
    """AdamW over `table`'s parameters, sharded over their data-parallel groups of `topo`. The
    model's weights become views into the buckets, in `model_dtype`; the FP32 masters are taken
    from the weights as they are when this is built."""

    def __init__(self, table: ParamTable, topo: Topology, cfg: OptimConfig,
                 model_dtype: torch.dtype = torch.float32, bucket_numel: int | None = None):
        self.table, self.topo = table, topo
        bucket_numel = bucket_numel or default_bucket_numel(topo.layout.dp)
        self.buckets: list[Bucket] = []
        for group, expert in (("dp", False), ("edp", True)):
            records = bucket_order([r for r in table if r.spec.expert == expert])
            self.buckets += [Bucket(run, topo.group(group), model_dtype)
                             for run in split_into_buckets(records, bucket_numel)]
        self._main_grads = {key: grad for bucket in self.buckets for key, grad in bucket.main_grads.items()}
        self.states = [AdamState.zeros_like(b.master, cfg) for b in self.buckets]
        self.param_groups = list(adamw_group_settings(cfg))  # decayed, undecayed; set_learning_rate sets lr
        self._decayed_ranges = [_merged([(p.start, p.end) for record, p in b.pieces if decayed(record.param)])
                                for b in self.buckets]

    def accumulate_grad(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Add a weight gradient autograd did not accumulate (the pipeline's deferred W) into the
        parameter's FP32 gradient (a stack row's into its row), as autograd's go."""
        param, row = stack_row(param)
        main_grad = self._main_grads[id(param)]
        (main_grad if row is None else main_grad[row]).add_(grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the FP32 gradients (the buffers stay: `set_to_none` only matches torch's signature)."""
        for bucket in self.buckets:
            bucket.grads.zero_()

    def reduce_gradients(self, pipeline: Pipeline | None = None) -> ReducedGradients:
        """Reduce-scatter the step's gradients into this rank's shards (step 2)."""
        sum_partial_over_tp([self._main_grads[id(r.param)] for r in self.table if r.spec.grad_partial_over_tp],
                            self.topo)
        for bucket in self.buckets:
            bucket.reduce_scatter_grads(1.0 / self.topo.layout.dp)
        shards = [bucket.grad_shard for bucket in self.buckets]
        if pipeline is not None:
            pipeline.sum_with_mirror(shards)
        counted = [bucket.grad_shard[p.start:p.end] for bucket in self.buckets for record, p in bucket.pieces
                   if counted_in_norm(record, self.topo, sharded_over_dp=True)]
        return ReducedGradients(shards, counted, self._whole_gradients)

    def _whole_gradients(self) -> dict[str, torch.Tensor]:
        """Every parameter's reduced gradient, its shards gathered from the group."""
        return {name: grad for bucket in self.buckets for name, grad in
                bucket.views(bucket.gather(bucket.grad_shard)).items()}

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the shards (step 4), then every bucket back into the model's weights."""
        decay = self.param_groups[0]  # the undecayed group differs only in its weight decay
        lr, (beta1, beta2) = decay["lr"], decay["betas"]
        for bucket, state, ranges in zip(self.buckets, self.states, self._decayed_ranges):
            # Decoupled weight decay first, as torch's AdamW does it, on the matrices' pieces only.
            for start, end in ranges if decay["weight_decay"] else ():
                bucket.master[start:end].mul_(1 - lr * decay["weight_decay"])
            # FP32 arithmetic whatever the moments are stored in (.float() is the moment itself in FP32).
            exp_avg, exp_avg_sq = state.exp_avg.float(), state.exp_avg_sq.float()
            adam([bucket.master], [bucket.grad_shard], [exp_avg], [exp_avg_sq], [], [state.step],
                 foreach=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=0.0,
                 eps=decay["eps"], maximize=False)
            for stored, computed in ((state.exp_avg, exp_avg), (state.exp_avg_sq, exp_avg_sq)):
                if stored is not computed:
                    stored.copy_(computed)
            bucket.all_gather_params()

    def state_tensors(self) -> list[torch.Tensor]:
        """The optimizer state this rank holds: each bucket's shard of Adam's moments and its step
        count, and the FP32 masters where they are not the model's own weights (a BF16 model)."""
        return [t for bucket, state in zip(self.buckets, self.states)
                for t in (state.exp_avg, state.exp_avg_sq, state.step)
                + (() if bucket.master is bucket.param_shard else (bucket.master,))]

    def state_dict_for_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(FP32 weights, optimizer state) in the plain optimizer's layout-free form: by global
        parameter name, `state.<name>.{step,exp_avg,exp_avg_sq}` and `param_groups.<name>.<key>`,
        each tensor whole over DP (all-gathered: 12 bytes per parameter while the save lasts)."""
        weights, optim = {}, {}
        for bucket, state in zip(self.buckets, self.states):
            masters, exp_avg, exp_avg_sq = (bucket.views(bucket.gather(t))
                                            for t in (bucket.master, state.exp_avg, state.exp_avg_sq))
            for record in bucket.records:
                name = record.name
                weights[name] = masters[name]
                optim.update({f"state.{name}.step": state.step.clone(), f"state.{name}.exp_avg": exp_avg[name],
                              f"state.{name}.exp_avg_sq": exp_avg_sq[name]})
        for record in self.table:
            group = self.param_groups[0 if decayed(record.param) else 1]
            optim.update({f"param_groups.{record.name}.{key}": value for key, value in group.items()})
        return weights, optim

    def load_checkpoint_state(self, weights: dict[str, torch.Tensor], optim: dict | None = None) -> None:
        """Set the masters and the model's weights from whole FP32 `weights` by parameter name, and,
        given `optim` (as state_dict_for_checkpoint makes it), the moments and the step count."""
        for bucket, state in zip(self.buckets, self.states):
            bucket.fill_shard(bucket.master, weights)
            if optim is not None:
                names = [r.name for r in bucket.records]
                bucket.fill_shard(state.exp_avg, {n: optim[f"state.{n}.exp_avg"] for n in names})
                bucket.fill_shard(state.exp_avg_sq, {n: optim[f"state.{n}.exp_avg_sq"] for n in names})
                state.step.copy_(optim[f"state.{names[0]}.step"])
            bucket.all_gather_params()


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent [start, end) ranges joined."""
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            start = merged.pop()[0]
        merged.append((start, end))
    return merged


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | DistributedOptimizer) -> int:
    """Bytes of optimizer state this rank holds (the memory report's figure): the storages under
    the optimizer's state tensors, each whole and once - Adam's moments and step counts, and
    master weights kept apart from the model's. The distributed optimizer's fall as 1/DP."""
    if isinstance(optimizer, DistributedOptimizer):
        tensors = optimizer.state_tensors()
    else:
        tensors = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
