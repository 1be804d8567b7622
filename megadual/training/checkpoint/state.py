"""What a checkpoint holds, as state dicts that load under any parallel layout.

Tensors are keyed by global parameter name (experts by global expert index: the rows of the
stacked expert weights, moe/experts.py and stack_rows.py), and tensor-
parallel shards are DTensors, pieces of the whole tensor, so a checkpoint written under one
TP/EP/PP/DP layout loads under another. Each part has one function that gives the state dicts
for saving (and, filled by DCP, for loading) and one that restores them:

    checkpoint_state / restore_state   (the plain or the distributed optimizer)

No RNG state is saved: dropout masks are a pure function of (seed, sample, position)
(model/dropout.py) and nothing else draws random numbers after start-up.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from megadual.pipeline.stage_model import StageModel
from megadual.training.checkpoint import stack_rows, vocab
from megadual.training.dist_optimizer import DistributedOptimizer

# Optimizer state flattened to one key per (parameter, state): a layout-independent key set.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def checkpoint_state(model: StageModel, optimizer: torch.optim.Optimizer | DistributedOptimizer,
                     with_optimizer: bool = True) -> dict:
    """{"model": ..., "optimizer": ...} in the layout-free form, whichever optimizer: the distributed
    one gives its FP32 masters as the weights and the same flat, whole state (gathered over DP)."""
    model_sd = get_model_state_dict(model, options=OPTIONS)
    if isinstance(optimizer, DistributedOptimizer):
        weights, optim_sd = optimizer.state_dict_for_checkpoint()
        model_sd.update(weights)
    elif with_optimizer:
        optim_sd = get_optimizer_state_dict(model, optimizer, options=OPTIONS)
        stack_rows.split(optim_sd, stack_rows.stacks(model.param_table))
    state = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = optim_sd
    for part in state.values():
        _as_whole_tensors(model, part)
    return state


def restore_state(model: StageModel, optimizer: torch.optim.Optimizer | DistributedOptimizer, state: dict) -> None:
    """Load what `checkpoint_state` described (and DCP filled): the model, and the optimizer when the
    state has its part (the distributed optimizer takes its masters from the weights in any case)."""
    model_sd = _as_local_tensors(model, state["model"])
    optim_sd = _as_local_tensors(model, state["optimizer"]) if "optimizer" in state else None
    set_model_state_dict(model, model_sd, options=StateDictOptions(strict=True))
    if isinstance(optimizer, DistributedOptimizer):
        optimizer.load_checkpoint_state(model_sd, optim_sd)
    elif optim_sd is not None:
        stack_rows.join(optim_sd, stack_rows.stacks(model.param_table))
        set_optimizer_state_dict(model, optimizer, optim_sd, options=OPTIONS)


def _as_whole_tensors(model: StageModel, state: dict) -> None:
    """Replace each TP shard (and its optimizer states) in a flat state dict by a DTensor, and
    padded vocabulary tables by their real rows (vocab.py)."""
    meshes: dict[int, DeviceMesh] = {}
    for key, value, record in _by_parameter(model, state):
        tp = record.spec.tp
        mesh = tp and meshes.setdefault(id(tp.group), DeviceMesh.from_group(tp.group, record.param.device.type))
        if vocab.has_padding(record):
            state[key] = vocab.real_rows(record, value, mesh)
        elif tp is not None:
            state[key] = DTensor.from_local(value, mesh, [Shard(tp.dim)], run_check=False)


def _as_local_tensors(model: StageModel, state: dict) -> dict:
    local = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}
    for key, value, record in _by_parameter(model, state, padded=False):
        if vocab.has_padding(record):
            local[key] = vocab.padded_rows(record, value)
    return local


def _by_parameter(model: StageModel, state: dict, padded: bool = True):
    """(key, tensor, record) of the state's tensors shaped as their parameter (`padded`) or as
    its saved real rows: the parameters and their optimizer states, not e.g. Adam's step."""
    records = {r.name: r for r in model.param_table}
    for key, value in list(state.items()):
        owner = key.removeprefix("state.").rsplit(".", 1)[0] if key.startswith("state.") else key
        record = records.get(owner)
        if record is None or not isinstance(value, torch.Tensor) or value.dim() != record.param.dim():
            continue
        if value.shape == record.param.shape if padded else \
                (vocab.has_padding(record) and value.shape[0] == record.spec.real_rows):
            yield key, value, record
