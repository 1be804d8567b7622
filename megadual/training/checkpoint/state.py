"""What a checkpoint holds, as state dicts that load under any parallel layout.

Tensors are keyed by global parameter name (experts by global expert index), and tensor-
parallel shards are DTensors, pieces of the whole tensor, so a checkpoint written under one
TP/EP/PP/DP layout loads under another. Each part has one function that gives its state dict
for saving (and, filled by DCP, for loading) and one that restores it:

    model_state / restore_model_state
    optimizer_state / restore_optimizer_state     (the pair a distributed optimizer replaces)

No RNG state is saved: dropout masks are a pure function of (seed, sample, position)
(model/dropout.py) and nothing else draws random numbers after start-up.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0


# Optimizer state flattened to one key per (parameter, state): a layout-independent key set.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def model_state(model: StageModel) -> dict:
    state = get_model_state_dict(model, options=OPTIONS)
    _as_whole_tensors(model, state)
    return state


def restore_model_state(model: StageModel, state: dict) -> None:
    set_model_state_dict(model, _as_local_tensors(state), options=StateDictOptions(strict=True))


def optimizer_state(model: StageModel, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state, one entry per (global parameter name, state), TP shards as DTensors."""
    state = get_optimizer_state_dict(model, optimizer, options=OPTIONS)
    _as_whole_tensors(model, state)
    return state


def restore_optimizer_state(model: StageModel, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, _as_local_tensors(state), options=OPTIONS)


def _as_whole_tensors(model: StageModel, state: dict) -> None:
    """Replace each TP shard (and its optimizer states) in a flat state dict by a DTensor."""
    meshes: dict[int, DeviceMesh] = {}
    records = {r.name: r for r in model.param_table}
    for key, value in state.items():
        owner = key.removeprefix("state.").rsplit(".", 1)[0] if key.startswith("state.") else key
        record = records.get(owner)
        if record is None or record.spec.tp is None or not isinstance(value, torch.Tensor) \
                or value.shape != record.param.shape:  # e.g. Adam's scalar step
            continue
        tp = record.spec.tp
        mesh = meshes.setdefault(id(tp.group), DeviceMesh.from_group(tp.group, record.param.device.type))
        state[key] = DTensor.from_local(value, mesh, [Shard(tp.dim)], run_check=False)


def _as_local_tensors(state: dict) -> dict:
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items()}
