"""Checkpoints in Megatron's layout, written with torch.distributed.checkpoint, never lost or silently wrong.

    SAVE/latest_checkpointed_iteration.txt   the newest complete iteration (max over ranks on load)
    SAVE/iter_0000100/                       DCP shards + .metadata, megadual_meta.json, megadual_manifest.json

Modules, by job:
    layout        folder and file names, the tracker, atomic renames
    lock          one trainer per --save directory
    coordination  every rank agreeing on each step's outcome
    integrity     per-file checksums (the manifest), written on save and verified on load
    state         what is saved: layout-free model and optimizer state dicts
    save          temporary folder -> checksums -> rename -> tracker; async saves; retention
    load          --load resolved to a verified folder (with fallback), restored
    manager       CheckpointManager, what the training loop calls

torch.distributed.checkpoint (and with it DTensor), and so `state`, are imported only by the
functions that save or restore: importing them costs a process about a second, which every run
that never saves or loads would pay.
"""
from megadual.training.checkpoint.layout import META, TRACKER, CheckpointError, TrainState, iteration_dir
from megadual.training.checkpoint.manager import CheckpointManager

__all__ = ["META", "TRACKER", "CheckpointError", "CheckpointManager", "TrainState", "iteration_dir"]
