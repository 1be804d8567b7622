"""One-process access to checkpoint folders for offline tools (the Hugging Face converter): the
folder layout, manifest and tracker that training writes, and the verification it does on load."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from megadual.training.checkpoint.integrity import checksums, problem_with, read_manifest, write_manifest
from megadual.training.checkpoint.layout import (
    TRACKER,
    CheckpointError,
    fsync_dir,
    holds_checkpoints,
    iteration_dir,
    read_tracker,
    staging_dir,
    write_tracker,
)
from megadual.training.checkpoint.meta import read_meta


def tracked_checkpoint(root: str, key: bytes | None = None) -> tuple[str, dict]:
    """(folder, its megadual_meta.json) of the iteration the tracker under `root` names, every file
    verified against the folder's manifest (signed with `key`, when given)."""
    iteration = read_tracker(root)
    if iteration is None:
        raise CheckpointError(f"{root} has no {TRACKER}")
    folder = iteration_dir(root, iteration)
    try:
        manifest = read_manifest(folder, key)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    for name, expected in manifest.items():
        problem = problem_with(folder, name, expected, key)
        if problem is not None:
            raise CheckpointError(f"{folder}: {problem}")
    return folder, read_meta(folder)


def publish_checkpoint(root: str, iteration: int, write: Callable[[str], None], key: bytes | None = None) -> str:
    """Write `root`/iter_N as a training save does: `write(folder)` fills a temporary folder, whose
    files are checksummed into its manifest (signed with `key`, when given) before it is renamed into
    place and the tracker moves."""
    final = iteration_dir(root, iteration)
    if os.path.exists(final):
        raise CheckpointError(f"{final} exists; checkpoints are never overwritten")
    staging = staging_dir(root, iteration)
    shutil.rmtree(staging, ignore_errors=True)  # what a killed conversion left
    os.makedirs(staging)
    try:
        write(staging)
        write_manifest(staging, checksums(staging, sorted(os.listdir(staging)), key is not None), key)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.rename(staging, final)
    fsync_dir(root)
    write_tracker(root, iteration)
    return final


def what_is_in(folder: str) -> str | None:
    """What a tool's output folder already holds, in words; None when it does not exist or is empty."""
    if not os.path.isdir(folder):
        return "is a file" if os.path.exists(folder) else None
    names = sorted(os.listdir(folder))
    if holds_checkpoints(folder):
        tracked = read_tracker(folder) if os.path.exists(os.path.join(folder, TRACKER)) else None
        return "holds checkpoints" + (f" (its tracker names iteration {tracked})" if tracked is not None else "")
    if names:
        return f"holds {len(names)} file(s): {', '.join(names[:4])}" + (", ..." if len(names) > 4 else "")
    return None
