"""A rank's routed experts of one projection are one parameter (moe/experts.py), named per expert.

The optimizers see three expert tensors per MoE layer, and a checkpoint written when each expert
had its own parameters (per-expert keys for the weights and for AdamW's state) loads into the
stacks, after which one more AdamW step equals the per-expert optimizer's, bit for bit.
"""
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from megadual.arguments import parse_args
from megadual.parallel.topology import Layout, Topology
from megadual.parallel.wgrad import add_to_grad
from megadual.pipeline.stage_model import build_full_model
from megadual.training.checkpoint import safe_pickle
from megadual.training.checkpoint.state import OPTIONS, checkpoint_state, restore_state
from megadual.training.dist_optimizer import DistributedOptimizer
from megadual.training.optimizer import build_optimizer
from tests.helpers import TINY_MOE, single_process_group

MOE_LAYERS, EXPERTS = 2, 8  # TINY_MOE: 3 layers, the first dense; 8 experts, all on the one rank


def expert_tensors(params) -> int:
    return sum(1 for name, _ in params if ".experts." in name)


def test_optimizers_see_three_expert_tensors_per_moe_layer():
    config = parse_args(TINY_MOE)
    model = build_full_model(config.model, seed=1)
    adamw = build_optimizer(list(model.named_parameters()), config.optim)
    held = [p for group in adamw.param_groups for p in group["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    assert expert_tensors([(names[id(p)], p) for p in held]) == 3 * MOE_LAYERS
    assert {tuple(p.shape) for n, p in model.named_parameters() if ".experts." in n} == {(EXPERTS, 32, 64),
                                                                                        (EXPERTS, 64, 32)}
    expert_records = [r for r in model.param_table if r.spec.expert]
    assert len(expert_records) == 3 * EXPERTS * MOE_LAYERS  # what names, counts and saves: one per expert
    distributed = DistributedOptimizer(model.param_table, Topology(Layout(1), 0), config.optim)
    expert_ids = {id(r.owner) for r in expert_records}
    assert len(expert_ids) == 3 * MOE_LAYERS
    assert expert_ids <= {key for bucket in distributed.buckets for key in bucket.main_grads}
    # A deferred weight gradient (the W split) of one expert, given as the row the expert computed
    # with, lands in that expert's gradient alone, in either optimizer's gradients.
    record = next(r for r in expert_records if r.row == 5)
    grad = torch.randn(record.param.shape, generator=torch.Generator().manual_seed(0))
    add_to_grad(record.owner.unbind(0)[5], grad)
    distributed.accumulate_grad(record.owner.unbind(0)[5], grad)
    in_buckets = {name: g for bucket in distributed.buckets for name, g in bucket.views(bucket.grads).items()}
    for other in expert_records:
        want = grad if other is record else torch.zeros_like(other.param)
        assert torch.equal(in_buckets[other.name], want), other.name
        if other.owner is record.owner:
            assert torch.equal(other.grad, want), other.name


class _Named(torch.nn.Module):
    """A module tree holding tensors under dotted names: the model as it was, each expert's weight
    its own parameter."""

    def __init__(self, tensors: dict[str, torch.Tensor], params: set[str]):
        super().__init__()
        for name, tensor in tensors.items():
            owner = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, torch.nn.Module())
                owner = owner._modules[part]
            if name in params:
                owner.register_parameter(leaf, torch.nn.Parameter(tensor.clone()))
            else:
                owner.register_buffer(leaf, tensor.clone())


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grads: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        param.grad = grads[name].clone()
    optimizer.step()


def test_a_checkpoint_with_a_parameter_per_expert_loads_into_the_stacks(tmp_path):
    config = parse_args(TINY_MOE)
    with single_process_group():
        model = build_full_model(config.model, seed=1)
        names = [r.name for r in model.param_table]
        before = _Named(model.state_dict(), set(names))
        assert [n for n, _ in before.named_parameters()] == names  # the old module order
        old = build_optimizer(list(before.named_parameters()), config.optim)
        generator = torch.Generator().manual_seed(3)
        grads = {n: torch.randn(p.shape, generator=generator) for n, p in before.named_parameters()}
        one_step(before, old, grads)
        saved = {"model": get_model_state_dict(before, options=OPTIONS),
                 "optimizer": get_optimizer_state_dict(before, old, options=OPTIONS)}
        assert "state.layers.1.mlp.experts.local.3.up.weight.exp_avg" in saved["optimizer"]
        dcp.save(saved, checkpoint_id=str(tmp_path))

        new = build_optimizer(list(model.named_parameters()), config.optim)
        state = checkpoint_state(model, new)
        assert state["model"].keys() == saved["model"].keys()
        assert state["optimizer"].keys() == saved["optimizer"].keys()
        safe_pickle.load(state, str(tmp_path))
        restore_state(model, new, state)

        values = dict(before.named_parameters())
        assert all(torch.equal(r.param, values[r.name]) for r in model.param_table)
        again = checkpoint_state(model, new)  # and saved again as it was, key for key
        for part in ("model", "optimizer"):
            for key, value in saved[part].items():
                assert torch.equal(again[part][key], value) if torch.is_tensor(value) else \
                    again[part][key] == value, key
        old_state = {n: old.state[p] for n, p in before.named_parameters()}
        for record in model.param_table:
            moments = new.state[record.owner]
            for key in ("exp_avg", "exp_avg_sq"):
                row = moments[key] if record.row is None else moments[key][record.row]
                assert torch.equal(row, old_state[record.name][key]), (record.name, key)
        # One more step each: AdamW on the stacks is AdamW on the experts' own weights, bit for bit.
        one_step(before, old, grads)
        stacked = {}
        for record in model.param_table:
            stacked.setdefault(record.owner, {})[record.row] = grads[record.name]
        for name, param in model.named_parameters():
            rows = stacked[param]
            param.grad = rows[None].clone() if None in rows else torch.stack([rows[i] for i in range(len(rows))])
        new.step()
        values = dict(before.named_parameters())
        assert all(torch.equal(r.param, values[r.name]) for r in model.param_table)
