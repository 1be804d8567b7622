"""Checkpoints in Megatron's layout, written with torch.distributed.checkpoint.

SAVE/iter_0000100/      DCP shards (.distcp) + .metadata, and megadual_meta.json
SAVE/latest_checkpointed_iteration.txt

Every rank writes its own shards (model, optimizer). Tensors are keyed
by global parameter name (experts by global expert index), and tensor-parallel shards
are saved as DTensors, pieces of the whole tensor, so a checkpoint loads under any
TP/EP/PP/DP layout. The tracker file is replaced only after every rank has finished
the folder, so a run killed mid-save resumes from the previous checkpoint. No RNG state is
saved: dropout masks are a pure function of (seed, sample, position) (model/dropout.py) and
nothing else draws random numbers after start-up; the `rng_rank*` entries of older
checkpoints are simply not read (DCP loads only the keys asked for).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from megadual.config import RunConfig, model_config_differences
from megadual.pipeline.stage_model import StageModel
from megadual.training.dist_optimizer import DistributedOptimizer

TRACKER = "latest_checkpointed_iteration.txt"
META = "megadual_meta.json"


class CheckpointError(RuntimeError):
    pass


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


# Optimizer state flattened to one key per (parameter, state): a layout-independent key set.
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _as_whole_tensors(model: StageModel, *state_dicts: dict) -> None:
    """Replace each TP shard (and its optimizer states) in the flat state dicts by a DTensor."""
    meshes: dict[int, DeviceMesh] = {}
    records = {r.name: r for r in model.param_table}
    for sd in state_dicts:
        owners = {key: key.removeprefix("state.").rsplit(".", 1)[0] if key.startswith("state.") else key
                  for key in sd}
        for key, owner in owners.items():
            record, value = records.get(owner), sd[key]
            if record is None or record.spec.tp is None or not isinstance(value, torch.Tensor) \
                    or value.shape != record.param.shape:  # e.g. Adam's scalar step
                continue
            tp = record.spec.tp
            mesh = meshes.setdefault(id(tp.group), DeviceMesh.from_group(tp.group, record.param.device.type))
            sd[key] = DTensor.from_local(value, mesh, [Shard(tp.dim)], run_check=False)


def _as_local_tensors(state_dict: dict) -> dict:
    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state_dict.items()}


def _state_dicts(model: StageModel, optimizer) -> tuple[dict, dict]:
    """The model's and the optimizer's state dicts in the checkpoint's form, whichever optimizer:
    the distributed one gives the FP32 weights (its masters) and the same flat, whole state."""
    if not isinstance(optimizer, DistributedOptimizer):
        return get_state_dict(model, optimizer, options=OPTIONS)
    weights, optim_sd = optimizer.state_dict_for_checkpoint()
    return {**get_model_state_dict(model), **weights}, optim_sd


def _restore(model: StageModel, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
    """Load the model, and the optimizer too unless `optim_sd` is None (its masters in any case)."""
    if isinstance(optimizer, DistributedOptimizer):
        set_model_state_dict(model, model_sd, options=StateDictOptions(strict=True))
        optimizer.load_checkpoint_state(model_sd, optim_sd)
    elif optim_sd is not None:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=OPTIONS)
    else:
        set_model_state_dict(model, model_sd, options=StateDictOptions(strict=True))


def save_checkpoint(root: str, model: StageModel, optimizer: torch.optim.Optimizer | DistributedOptimizer,
                    state: TrainState, config: RunConfig) -> str:
    rank = dist.get_rank()
    path = iteration_dir(root, state.iteration)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    _as_whole_tensors(model, model_sd, optim_sd)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)
    if rank == 0:
        meta = {"train_state": dataclasses.asdict(state), "config": dataclasses.asdict(config),
                "world_size": dist.get_world_size()}
        _write_atomically(os.path.join(path, META), json.dumps(meta, indent=1))
    dist.barrier()
    if rank == 0:
        _write_atomically(os.path.join(root, TRACKER), str(state.iteration))
    dist.barrier()
    return path


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_iteration(root: str) -> int | None:
    """The tracked iteration under `root` (the maximum over ranks, as Megatron does)."""
    tracker = os.path.join(root, TRACKER)
    mine = -1
    if os.path.exists(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker} should hold an iteration number, found {text!r}")
        mine = int(text)
    found = torch.tensor(mine)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return None if found.item() < 0 else int(found.item())


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.exists(meta_path) or not os.path.exists(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path} is not a complete megadual checkpoint (missing {META} or .metadata)")
    try:
        with open(meta_path) as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{meta_path} is corrupt, not JSON ({e})") from None


def load_checkpoint(root: str, model: StageModel, optimizer: torch.optim.Optimizer | DistributedOptimizer,
                    config: RunConfig) -> TrainState | None:
    """Restore the latest checkpoint under `root` (--load); None when there is none."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = iteration_dir(root, iteration)
    meta = read_meta(path)
    differences = model_config_differences(meta["config"]["model"], config.model)
    if differences:
        raise CheckpointError(f"--load {path}: the checkpoint's model differs from this run's:\n  "
                              + "\n  ".join(differences))
    t = config.train
    load_optim = not (t.no_load_optim or t.finetune)
    model_sd, optim_sd = _state_dicts(model, optimizer)
    _as_whole_tensors(model, model_sd, optim_sd)
    wanted = {"model": model_sd}
    if load_optim:
        wanted["optimizer"] = optim_sd
    dcp.load(wanted, checkpoint_id=path)
    _restore(model, optimizer, _as_local_tensors(wanted["model"]),
             _as_local_tensors(wanted["optimizer"]) if load_optim else None)
    if t.finetune:
        return TrainState()
    return TrainState(**meta["train_state"])
