"""--load: which checkpoint a run starts from, decided before anything is built, and restoring it.

`find_checkpoint` turns --load into one verified folder, or into a fresh start:
- a file, a path that does not exist (unless it is --save), or a non-empty directory without
  checkpoints (unless it is --save): refused, naming the path;
- a folder named iter_NNNNNNN: that folder, which must verify;
- a directory with a tracker or iter_NNNNNNN folders: the folder the tracker names (the maximum
  over ranks, as Megatron reads it), or when that one does not verify, or there is no tracker,
  the newest folder that does; each one skipped is logged with the reason;
- an empty directory, or --save holding no checkpoint yet: a fresh start, logged.
A fresh start is refused when --save already holds checkpoints that it would replace (with or
without --load), and with --finetune, which needs a checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from megadual.config import (
    RESUME_MAY_CHANGE,
    SCHEDULE_FLAGS,
    OptimConfig,
    RunConfig,
    flag_name,
    model_config_differences,
    resume_rule,
)
from megadual.pipeline.stage_model import StageModel
from megadual.training.checkpoint.coordination import Coordination
from megadual.training.checkpoint.integrity import checkpoint_key, verify
from megadual.training.checkpoint.layout import (
    TRACKER,
    CheckpointError,
    TrainState,
    holds_checkpoints,
    is_working_file,
    iteration_dir,
    iteration_folders,
    iteration_of,
    read_tracker,
)
from megadual.training.checkpoint.meta import read_meta


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder and its megadual_meta.json."""
    path: str
    meta: dict

    @property
    def train_state(self) -> TrainState:
        return TrainState(**self.meta["train_state"])


@dataclass
class _Candidates:
    """What rank 0 found under --load: folders to try in order, or why there are none."""
    folders: list[str] = field(default_factory=list)
    named: bool = False  # --load named one folder: no other may stand in for it
    empty_because: str = ""  # "does not exist", "is empty", "holds no checkpoint"
    notes: list[str] = field(default_factory=list)


def find_checkpoint(config: RunConfig, coord: Coordination, log) -> Checkpoint | None:
    """The checkpoint --load names, verified; None for a fresh start (logged). Every rank gets the
    same answer, or the same CheckpointError."""
    t = config.train
    if not t.load:
        coord.on_rank0(lambda: _check_fresh_start(config, "was not given"))
        return None
    tracked = coord.max(_tracked_or_none(t.load))
    found = coord.on_rank0(lambda: _candidates(t.load, tracked))
    for note in found.notes:
        log(f" {note}")
    if not found.folders:
        coord.on_rank0(lambda: _check_fresh_start(config, found.empty_because))
        log(f" --load {t.load} {found.empty_because}: starting from scratch at iteration 0")
        return None
    skipped, key = [], coord.everywhere(lambda: checkpoint_key(t.checkpoint_key_file))
    for folder in found.folders:
        problem = verify(folder, coord, key)
        if problem is None:
            return _checked(Checkpoint(folder, coord.on_rank0(lambda path=folder: read_meta(path))), config, log)
        if found.named:
            raise CheckpointError(f"--load {folder}: {problem}")
        log(f" skipping checkpoint {folder}: {problem}")
        skipped.append(f"{os.path.basename(folder)}: {problem}")
    raise CheckpointError(f"--load {t.load}: no checkpoint verifies ({'; '.join(skipped)})")


def restore(checkpoint: Checkpoint, model: StageModel, optimizer: torch.optim.Optimizer,
            config: RunConfig, coord: Coordination) -> TrainState:
    """Load `checkpoint` into `model` and `optimizer` (as --finetune and --no-load-optim say); the
    training state to continue from. Only the keys asked for are read, so the `rng_rank*` entries of
    older checkpoints are ignored."""
    from megadual.training.checkpoint.safe_pickle import load
    from megadual.training.checkpoint.state import checkpoint_state, restore_state

    t = config.train
    load_optim = not (t.no_load_optim or t.finetune)
    wanted = checkpoint_state(model, optimizer, with_optimizer=load_optim)
    coord.everywhere(lambda: load(wanted, checkpoint.path, coord.group))
    restore_state(model, optimizer, wanted)
    return TrainState() if t.finetune else checkpoint.train_state


def _tracked_or_none(load: str) -> int:
    """This rank's reading of the tracker under `load`; -1 when there is none (or it is unreadable)."""
    try:
        tracked = read_tracker(load) if os.path.isdir(load) else None
    except CheckpointError:
        tracked = None
    return -1 if tracked is None else tracked


def _candidates(load: str, tracked: int) -> _Candidates:
    if os.path.isfile(load):
        raise CheckpointError(f"--load {load} is a file; give a checkpoint directory (holding {TRACKER}) "
                              f"or one of its iter_NNNNNNN folders")
    if not os.path.exists(load):
        return _Candidates(empty_because="does not exist")
    if iteration_of(load) is not None:
        return _Candidates([load], named=True)
    folders, found = iteration_folders(load), _Candidates()
    if tracked >= 0:
        found.folders = [iteration_dir(load, tracked)] + [iteration_dir(load, i) for i in folders if i < tracked]
        found.notes += [f"not loading {iteration_dir(load, i)}: it is newer than {TRACKER} ({tracked})"
                        for i in folders if i > tracked]
    elif folders:
        found.folders = [iteration_dir(load, i) for i in folders]
        found.notes.append(f"{load} has no readable {TRACKER}: trying its newest checkpoint folders")
    elif any(not is_working_file(name) for name in os.listdir(load)):
        found.empty_because = "holds no checkpoint"
    else:
        found.empty_because = "is empty"
    return found


def _check_fresh_start(config: RunConfig, why: str) -> None:
    """Refuse a start from scratch that would replace checkpoints or that cannot be meant."""
    t = config.train
    load = f"--load {t.load}" if t.load else "--load"
    if t.finetune:
        raise CheckpointError(f"--finetune needs a checkpoint, but {load} {why}")
    if t.save and holds_checkpoints(t.save):
        raise CheckpointError(
            f"{load} {why}, but --save {t.save} holds checkpoints ({_newest(t.save)}): a run from scratch would "
            f"replace them. To resume them, give --load {t.save}; to start over, give an empty --save directory")
    if not t.load or why == "is empty":
        return
    if t.save is None or os.path.realpath(t.load) != os.path.realpath(t.save):
        raise CheckpointError(f"--load {t.load} {why}" + (f" (no {TRACKER}, no iter_NNNNNNN folder)"
                                                          if why == "holds no checkpoint" else ""))


def _newest(root: str) -> str:
    try:
        tracked = read_tracker(root)
    except CheckpointError as e:
        return str(e)
    return f"the tracker names iteration {tracked}" if tracked is not None else \
        f"newest folder: {os.path.basename(iteration_dir(root, iteration_folders(root)[0]))}"


def _checked(checkpoint: Checkpoint, config: RunConfig, log) -> Checkpoint:
    t = config.train
    if checkpoint.meta.get("weights_only") and not (t.finetune or t.no_load_optim):
        raise CheckpointError(f"--load {checkpoint.path} holds model weights only, no optimizer state (it was "
                              "converted with scripts/convert_checkpoint.py --from-hf): give --finetune to train "
                              "from it")
    differences = model_config_differences(checkpoint.meta["config"]["model"], config.model, RESUME_MAY_CHANGE)
    if differences:
        raise CheckpointError(f"--load {checkpoint.path}: the checkpoint's model differs from this run's:\n  "
                              + "\n  ".join(differences) + f"\n({resume_rule()})")
    log(f" loading checkpoint from {checkpoint.path} at iteration {checkpoint.train_state.iteration}")
    return checkpoint


def resumed_schedule(checkpoint: Checkpoint | None, config: RunConfig, log) -> OptimConfig:
    """The optimizer flags to train with, the LR schedule's as Megatron decides on a resume: this
    run's with --override-opt-param-scheduler (or --finetune, or no checkpoint), the checkpoint's with
    --use-checkpoint-opt-param-scheduler, and otherwise the two must agree (refused, naming them)."""
    o, t = config.optim, config.train
    if checkpoint is None or t.finetune or t.override_opt_param_scheduler:
        return o
    saved_optim, saved_train = checkpoint.meta["config"]["optim"], checkpoint.meta["config"]["train"]
    saved = {name: saved_optim.get(name, getattr(OptimConfig, name)) for name in SCHEDULE_FLAGS}
    if t.use_checkpoint_opt_param_scheduler:
        # The checkpoint's decay horizon left at its default was that run's length.
        for unit, length in (("iters", saved_train.get("train_iters")), ("samples", saved_train.get("train_samples"))):
            if saved[f"lr_decay_{unit}"] is None:
                saved[f"lr_decay_{unit}"] = length
        log(f" using the checkpoint's LR schedule: {saved}")
        return replace(o, **saved)
    differing = [f"{flag_name(name)}: checkpoint has {saved[name]!r}, this run has {getattr(o, name)!r}"
                 for name in SCHEDULE_FLAGS if saved[name] != getattr(o, name)]
    if differing:
        raise CheckpointError(f"--load {checkpoint.path}: the LR schedule differs from the checkpoint's:\n  "
                              + "\n  ".join(differing) + "\ngive --override-opt-param-scheduler to train with "
                              "this run's, or --use-checkpoint-opt-param-scheduler to keep the checkpoint's "
                              f"({resume_rule()})")
    return o
