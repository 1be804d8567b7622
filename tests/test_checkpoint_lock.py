"""One trainer per --save directory, which must be writable: refused at start-up otherwise; a lock
whose holder is certainly gone is taken over, with a log line."""
import dataclasses
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from megadual.training.checkpoint import CheckpointError
from megadual.training.checkpoint.lock import Holder, SaveLock
from tests.checkpoint_runs import train, train_expecting_error


def write_lock(root, **changes) -> Holder:
    """A lock in `root` as another process would have left it: this process's record, changed."""
    holder = dataclasses.replace(Holder.this_process(), **changes)
    root.mkdir(exist_ok=True)
    (root / "megadual_save.lock").write_text(json.dumps(dataclasses.asdict(holder)))
    return holder


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_second_trainer_is_refused_at_start_up(tmp_path):
    first = SaveLock.acquire(str(tmp_path))
    try:
        message, logged = train_expecting_error(["--train-iters", "2", "--save", str(tmp_path)], CheckpointError)
    finally:
        first.release()
    assert message.startswith(f"--save {tmp_path} is in use by another trainer: pid {os.getpid()} on host "
                              f"{socket.gethostname()}")
    assert message.endswith(f"if that trainer is gone, delete {tmp_path}/megadual_save.lock")
    assert logged.lines == [] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("holder, env, why", [
    ({"pid": "dead"}, {}, "that process is gone"),
    ({"started": -1}, {}, "that process is gone (its pid now belongs to another process)"),
    ({"host": "node7", "job": "slurm:42", "attempt": (0, 0)}, {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"},
     "it was an earlier attempt of slurm:42"),
], ids=["dead pid", "pid reused", "earlier attempt of this Slurm job"])
def test_a_stale_lock_is_taken_over_with_a_log_line(tmp_path, monkeypatch, holder, env, why):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stale = write_lock(tmp_path, **{**holder, "pid": dead_pid()} if holder.get("pid") == "dead" else holder)
    lock = SaveLock.acquire(str(tmp_path))
    assert lock.took_over == f"taking over {tmp_path}/megadual_save.lock from {stale.describe()}: {why}"
    lock.release()
    assert not (tmp_path / "megadual_save.lock").exists()


def test_a_lock_held_on_another_host_is_refused(tmp_path):
    other = write_lock(tmp_path, host="node7", pid=1)
    with pytest.raises(CheckpointError) as refused:
        SaveLock.acquire(str(tmp_path))
    assert f"is in use by another trainer: {other.describe()} holds" in str(refused.value)


def test_a_stale_lock_is_logged_by_the_run(tmp_path):
    stale = write_lock(tmp_path, pid=dead_pid())
    run = train(["--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(tmp_path)])
    assert run.lines[0] == f" taking over {tmp_path}/megadual_save.lock from {stale.describe()}: that process is gone"
    assert not (tmp_path / "megadual_save.lock").exists()  # released at the end


@pytest.mark.parametrize("where", ["file in the path", "the path is a file", "no permission"])
def test_a_save_directory_that_cannot_be_written_is_refused_at_start_up(tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    save, reason = {"file in the path": (blocker / "checkpoints", f"cannot be created: {blocker} is a file"),
                    "the path is a file": (blocker, f"cannot be created: {blocker} is a file"),
                    "no permission": (tmp_path / "read_only" / "checkpoints", "cannot be created: Permission denied")}[where]
    if where == "no permission" and os.geteuid() != 0:
        save.parent.mkdir()
        save.parent.chmod(0o500)
    elif where == "no permission":  # root may write anywhere but where the kernel says no: sysfs
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("running as root, and no /sys/kernel to be refused by")
        save, reason = Path("/sys/kernel/megadual_checkpoints"), "cannot be created: Operation not permitted"
    message, logged = train_expecting_error(["--train-iters", "2", "--save", str(save)], CheckpointError)
    assert message.startswith(f"--save {save} {reason}") and logged.lines == []
