"""Which run wrote a checkpoint, and refusing a start that would replace checkpoints it should not.

Every META file names the run that saved it (`run_id`). A start from scratch and a --finetune
begin a new run; a resume continues the run of the checkpoint it loads. A run saves iterations
after the one it starts from, so at start-up every published folder of --save beyond that
iteration is one it may replace. It is refused, in one line naming both checkpoints, when such a
folder is another run's (a --finetune into the --save it loads from, --load A --save B where B
holds another run), or a newer one of its own loaded past by hand (--load of an older folder).
Resuming --save itself is the one exception for the run's own folders: those beyond the one the
loader picked were never tracked (a save killed before its tracker moved) or do not verify.
--overwrite-checkpoints allows the replacement (logged).

A folder whose META predates run ids counts as this run's; one whose META cannot be read is no
checkpoint anyone can load, so it is not protected.
"""
from __future__ import annotations

import json
import os
import uuid

from megadual.config import RunConfig
from megadual.training.checkpoint.layout import META, CheckpointError, iteration_dir, iteration_folders


def run_id_of(meta: dict) -> str | None:
    return meta.get("run_id")


def claim_save(config: RunConfig, found_path: str | None, found_meta: dict | None, log) -> str:
    """This run's id (the loaded checkpoint's when resuming, else a new one), after checking that
    its saves replace nothing of --save they should not. Runs on rank 0."""
    t = config.train
    resuming = found_meta is not None and not t.finetune
    run_id = (run_id_of(found_meta) if resuming else None) or uuid.uuid4().hex[:12]
    if not t.save or not os.path.isdir(t.save):
        return run_id
    start = found_meta["train_state"]["iteration"] if resuming else 0
    resumes_save = resuming and _same_dir(t.load, t.save)
    conflicts = [(i, owner) for i in sorted(iteration_folders(t.save)) if i > start
                 for owner in [_owner(iteration_dir(t.save, i))]
                 if owner is not _UNREADABLE and (owner not in (None, run_id) or not resumes_save)]
    if not conflicts:
        return run_id
    problem = _describe(config, found_path, start, run_id, conflicts)
    if not t.overwrite_checkpoints:
        raise CheckpointError(f"{problem}; give another --save, or --overwrite-checkpoints to replace them")
    log(f" {problem}; replacing them as --overwrite-checkpoints allows")
    return run_id


_UNREADABLE = object()


def _owner(folder: str):
    """The run id in `folder`'s META; None for a META from before run ids; _UNREADABLE without one."""
    try:
        with open(os.path.join(folder, META)) as f:
            return run_id_of(json.load(f))
    except (OSError, ValueError, AttributeError):
        return _UNREADABLE


def _same_dir(a: str | None, b: str) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def _describe(config: RunConfig, found_path: str | None, start: int, run_id: str,
              conflicts: list[tuple[int, str | None]]) -> str:
    t = config.train
    source = f"--load {found_path}" + (" with --finetune" if t.finetune else "") if found_path else "--load"
    folders = ", ".join(os.path.basename(iteration_dir(t.save, i))
                        + (f" (run {owner})" if owner not in (None, run_id) else " (this run's, newer)")
                        for i, owner in conflicts)
    return (f"{source} starts run {run_id} at iteration {start}, and its saves would replace what --save {t.save} "
            f"holds: {folders}")
