"""Saving never loses the previous checkpoint: a failed save keeps it (stopping the run is tested in a
real process, test_checkpoint_integrity.py; here --save-failures-continue goes on), a skipped step
writes nothing, retention waits for a verified newer one, every moment of a save leaves a loadable
directory, and an async save writes the state of its own iteration while training goes on."""
import errno
import os
import shutil
import threading

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _FileSystemWriter

from megadual.arguments import parse_args
from megadual.training import loop
from megadual.training.checkpoint import CheckpointError
from megadual.training.checkpoint import save as save_module
from megadual.training.checkpoint.coordination import Coordination
from megadual.training.checkpoint.load import find_checkpoint
from megadual.training.step import StepResult
from tests.checkpoint_runs import SMALL, train, train_expecting_error
from tests.helpers import single_process_group

TRACKER = "latest_checkpointed_iteration.txt"


def folders(root) -> list[str]:
    return sorted(name for name in os.listdir(root) if name != TRACKER)


def fail_writes(monkeypatch, on_calls: set[int]) -> None:
    """The DCP shard writes of the saves numbered `on_calls` (from 1) fail as on a full disk."""
    write, calls = _FileSystemWriter.write_data, []

    def write_data(self, plan, planner):
        calls.append(1)
        if len(calls) in on_calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, plan, planner)
    monkeypatch.setattr(_FileSystemWriter, "write_data", write_data)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_with_save_failures_continue_training_goes_on(tmp_path, monkeypatch, mode):
    fail_writes(monkeypatch, {2})
    run = train(["--train-iters", "6", "--save", str(tmp_path), "--save-interval", "2", "--save-failures-continue"]
                + (["--async-save"] if mode == "async" else []))
    assert run.has(f"saving checkpoint at iteration 4 to {tmp_path} failed: rank 0: No space left on device; the "
                   f"previous checkpoint (iteration 2) is kept; training continues (--save-failures-continue)")
    assert run.result.final_state.iteration == 6
    assert (tmp_path / TRACKER).read_text() == "6" and folders(tmp_path) == ["iter_0000002", "iter_0000006"]


def test_a_run_whose_last_save_failed_does_not_end_as_complete(tmp_path, monkeypatch):
    """Under --save-failures-continue too (the save at the end tries iteration 4 again, and fails again):
    the error names the last iteration published."""
    fail_writes(monkeypatch, {2, 3})
    message, logged = train_expecting_error(["--train-iters", "4", "--save", str(tmp_path), "--save-interval", "2",
                                             "--save-failures-continue"], CheckpointError)
    assert logged.has("training continues (--save-failures-continue)")
    assert message == (f"the run trained to iteration 4 but its last save failed; the last checkpoint published in "
                       f"{tmp_path} is iteration 2")


def test_no_checkpoint_from_a_skipped_step(tmp_path, monkeypatch):
    """Steps 2 and 4 are not finite: the save due at 2 waits for step 3; none is written at 4, the end."""
    real_step, steps = loop.train_step, []

    def train_step(*args, **kwargs):
        steps.append(1)
        if len(steps) in (2, 4):
            return StepResult(torch.tensor([float("nan")], dtype=torch.float64), 0, float("nan"), True)
        return real_step(*args, **kwargs)
    monkeypatch.setattr(loop, "train_step", train_step)
    run = train(["--train-iters", "4", "--save", str(tmp_path), "--save-interval", "2"])
    assert folders(tmp_path) == ["iter_0000003"] and (tmp_path / TRACKER).read_text() == "3"
    assert run.has("not saving at iteration 2: its step was skipped (loss or gradient not finite); saving after "
                   "the next step that updates the weights")
    assert run.has("no checkpoint at iteration 4: its step was skipped (loss or gradient not finite)")


def test_keep_last_n_removes_older_checkpoints_only_after_a_newer_one_verified(tmp_path, monkeypatch):
    keep = ["--save", str(tmp_path), "--save-interval", "1", "--keep-last-n-checkpoints", "2"]
    run = train(["--train-iters", "6", "--exit-interval", "4"] + keep)
    assert folders(tmp_path) == ["iter_0000003", "iter_0000004"]
    assert run.has("removed checkpoints of iterations 2 (--keep-last-n-checkpoints 2)")
    monkeypatch.setattr(save_module, "verify", lambda folder, coord, key=None: "__0_0.distcp is corrupt (planted)")
    run = train(["--train-iters", "6", "--exit-interval", "5", "--load", str(tmp_path)] + keep)
    assert folders(tmp_path) == ["iter_0000003", "iter_0000004", "iter_0000005"]
    assert run.has(f"keeping the older checkpoints: the new {tmp_path}/iter_0000005 does not verify "
                   f"(__0_0.distcp is corrupt (planted))")


def test_every_moment_of_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """The directory as a kill would leave it before each rename or removal of a save that replaces a
    stale iter_0000004, publishes iteration 4 and removes iteration 2 (the real kills are in
    test_checkpoint_kill.py): each loads the folder its tracker names, iteration 2 or 4."""
    root = tmp_path / "checkpoints"
    train(["--train-iters", "4", "--save", str(root), "--save-interval", "2", "--exit-interval", "2"])
    shutil.copytree(root / "iter_0000002", root / "iter_0000004")  # a complete folder the tracker does not name
    snapshots, rename, replace, rmtree = [], os.rename, os.replace, shutil.rmtree

    def snapshot(operation):
        def before(*args, **kwargs):
            snapshots.append(shutil.copytree(root, tmp_path / f"moment{len(snapshots)}", symlinks=True))
            return operation(*args, **kwargs)
        return before
    monkeypatch.setattr(os, "rename", snapshot(rename))
    monkeypatch.setattr(os, "replace", snapshot(replace))
    monkeypatch.setattr(shutil, "rmtree", snapshot(rmtree))
    run = train(["--train-iters", "4", "--load", str(root), "--save", str(root), "--keep-last-n-checkpoints", "1"])
    monkeypatch.undo()
    assert folders(root) == ["iter_0000004"] and (root / TRACKER).read_text() == "4"
    assert run.has("removed checkpoints of iterations 2 (--keep-last-n-checkpoints 1)")
    assert len(snapshots) >= 8  # DCP's .metadata, metadata, manifest, move out, publish, tracker, 2 removals
    loaded, lines = [], []
    with single_process_group():
        for moment in snapshots:
            found = find_checkpoint(parse_args(SMALL + ["--load", str(moment)]), Coordination(), log=lines.append)
            loaded.append(found.train_state.iteration)
    assert set(loaded) == {2, 4} and loaded[-1] == 4
    assert not [line for line in lines if "skipping" in line]  # the tracker always named a complete folder


def test_an_async_save_holds_its_own_iteration_while_training_goes_on(tmp_path, monkeypatch):
    """The background write of iteration 2 starts only after step 3 changed the weights (the tracker
    still empty then); resuming from it gives the losses of the run that saved it."""
    stepped, real_step, steps, tracker_during_write = threading.Event(), loop.train_step, [], []

    def train_step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            tracker_during_write.append(os.path.exists(tmp_path / TRACKER))
            stepped.set()
        return result
    write = _FileSystemWriter.write_data

    def write_after_step_3(self, plan, planner):
        assert stepped.wait(timeout=120), "step 3 never came"
        return write(self, plan, planner)
    monkeypatch.setattr(loop, "train_step", train_step)
    monkeypatch.setattr(_FileSystemWriter, "write_data", write_after_step_3)
    first = train(["--train-iters", "4", "--save", str(tmp_path), "--save-interval", "2", "--async-save"])
    monkeypatch.undo()
    assert tracker_during_write == [False] and (tmp_path / TRACKER).read_text() == "4"
    resumed = train(["--train-iters", "4", "--load", str(tmp_path / "iter_0000002")])
    assert resumed.result.losses == first.result.losses[2:]  # bit for bit on CPU
