"""Where things are in a checkpoint directory (Megatron's layout, plus megadual's working files).

    SAVE/latest_checkpointed_iteration.txt   the tracker: the newest published iteration
    SAVE/iter_0000200/                       a published checkpoint (complete, with its manifest)
    SAVE/.saving_iter_0000300/               a save in progress, renamed to iter_0000300/ when complete
    SAVE/.removing_iter_0000100/             a checkpoint on its way out (retention, replacement)
    SAVE/megadual_save.lock                  the one trainer writing SAVE

Only names starting with `iter_` are checkpoints: a folder appears under that name in one
rename, complete, and leaves under it in one rename, so no reader ever sees half of one.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass

TRACKER = "latest_checkpointed_iteration.txt"
META = "megadual_meta.json"
MANIFEST = "megadual_manifest.json"
LOCK = "megadual_save.lock"
STAGING, REMOVING = ".saving_", ".removing_"
_FOLDER = re.compile(r"iter_(\d{7,})")


@dataclass
class TrainState:
    """Where training stands: the `train_state` entry of a checkpoint's META file."""
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded or saved; the message names the path at fault."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def staging_dir(root: str, iteration: int) -> str:
    return os.path.join(root, STAGING + os.path.basename(iteration_dir(root, iteration)))


def iteration_of(path: str) -> int | None:
    """100 for .../iter_0000100; None for any other name."""
    match = _FOLDER.fullmatch(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def iteration_folders(root: str) -> list[int]:
    """The iterations of the `iter_NNNNNNN` folders under `root`, newest first."""
    found = [iteration_of(name) for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))]
    return sorted((i for i in found if i is not None), reverse=True)


def is_working_file(name: str) -> bool:
    """megadual's own bookkeeping in a save directory: its lock, saves in progress, folders being removed."""
    return name.startswith((LOCK, STAGING, REMOVING))


def holds_checkpoints(root: str) -> bool:
    """A tracker or any `iter_NNNNNNN` folder (complete or not)."""
    return os.path.isdir(root) and (os.path.exists(os.path.join(root, TRACKER)) or bool(iteration_folders(root)))


def read_tracker(root: str) -> int | None:
    """The iteration the tracker names; None without a tracker."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path} should hold an iteration number, found {text!r}")
    return int(text)


def last_published(root: str) -> str:
    """Which checkpoint under `root` the tracker names, in words."""
    try:
        tracked = read_tracker(root)
    except (OSError, CheckpointError) as e:
        return f"the tracker of {root} cannot be read ({e})"
    return f"the last checkpoint published in {root} is iteration {tracked}" if tracked is not None else \
        f"no checkpoint is published in {root}"


def write_tracker(root: str, iteration: int) -> None:
    write_atomically(os.path.join(root, TRACKER), str(iteration))


def write_atomically(path: str, text: str) -> None:
    """`text` in `path`, durably: written beside it, synced, renamed over it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


def fsync_dir(path: str) -> None:
    """Make the renames and new files in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_out(folder: str) -> str:
    """Rename `folder` out of the checkpoint names (one atomic step); returns its new path."""
    parent, name = os.path.split(os.path.normpath(folder))
    gone = os.path.join(parent, REMOVING + name)
    shutil.rmtree(gone, ignore_errors=True)
    os.rename(folder, gone)
    return gone


def remove_checkpoint(folder: str) -> None:
    """Delete a published checkpoint: first out of the checkpoint names, then its files."""
    shutil.rmtree(move_out(folder))


def remove_leftovers(root: str) -> list[str]:
    """Delete what an interrupted save or removal left behind (only its writer may do this)."""
    leftovers = [name for name in os.listdir(root) if name.startswith((STAGING, REMOVING))]
    for name in leftovers:
        shutil.rmtree(os.path.join(root, name))
    return leftovers
