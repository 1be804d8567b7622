"""One trainer per --save directory: a lock file naming its holder, taken at start-up by global rank 0.

A lock whose holder is gone is taken over (and the caller logs it). Whether a holder is gone
is decided only where it can be known:
- on this host: its pid is not running, or is a process started at another time (pid reused);
- on any host: it is an earlier attempt of this very job (same SLURM_JOB_ID with a lower
  SLURM_RESTART_COUNT, or same TORCHELASTIC_RUN_ID with a lower TORCHELASTIC_RESTART_COUNT),
  which Slurm or torchrun have stopped before starting this attempt.
Any other lock held on another host cannot be judged from here: the run is refused, and the
message says which file to delete once that trainer is known to be gone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass

from megadual.training.checkpoint.layout import LOCK, CheckpointError


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: int | None  # the process's start time in clock ticks after boot (Linux), against pid reuse
    job: str | None  # "slurm:JOBID" or "torchrun:RUNID": the launch this process is an attempt of
    attempt: tuple[int, int]  # (SLURM_RESTART_COUNT, TORCHELASTIC_RESTART_COUNT)
    since: str

    @classmethod
    def this_process(cls) -> Holder:
        env = os.environ
        run_id = env.get("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id "none" names no run
        job = (f"slurm:{env['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in env
               else f"torchrun:{run_id}" if run_id != "none" else None)
        attempt = (int(env.get("SLURM_RESTART_COUNT", 0)), int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()), job, attempt,
                   time.strftime("%Y-%m-%d %H:%M:%S"))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (since {self.since}{', ' + self.job if self.job else ''})"

    def gone_because(self, me: Holder) -> str | None:
        """Why this holder has certainly stopped, seen from `me`; None when it may still run."""
        if self.job is not None and self.job == me.job and tuple(self.attempt) < me.attempt:
            return f"it was an earlier attempt of {me.job}"
        if self.host != me.host:
            return None
        if not process_exists(self.pid):
            return "that process is gone"
        if self.started is not None and process_start(self.pid) not in (None, self.started):
            return "that process is gone (its pid now belongs to another process)"
        return None


def process_start(pid: int) -> int | None:
    """Start time of `pid` in clock ticks after boot, from /proc (None elsewhere, or no such pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22 of proc(5), after "pid (comm)"
    except (OSError, IndexError, ValueError):
        return None


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class SaveLock:
    """The lock on one --save directory, held by this process until `release`."""

    def __init__(self, root: str, holder: Holder, took_over: str | None):
        self.root, self.holder, self.took_over = root, holder, took_over
        self.path = os.path.join(root, LOCK)

    @classmethod
    def acquire(cls, root: str) -> SaveLock:
        """Create `root` if needed and take its lock; CheckpointError when `root` cannot be written
        or another trainer holds it. `took_over` says whose stale lock was replaced, if any."""
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"--save {root} cannot be created: {_reason(e, root)}") from e
        me, path = Holder.this_process(), os.path.join(root, LOCK)
        try:
            if _create_exclusively(path, me):
                return cls(root, me, None)
            current = _read(path)
            why = current.gone_because(me)
            if why is None:
                raise CheckpointError(
                    f"--save {root} is in use by another trainer: {current.describe()} holds {path}. Two runs "
                    f"must not write one --save directory; if that trainer is gone, delete {path}")
            _write(path, me)  # replaces the stale lock in one rename
            if _read(path) != me:
                raise CheckpointError(f"--save {root}: another trainer took over {path} at the same time")
            return cls(root, me, f"taking over {path} from {current.describe()}: {why}")
        except OSError as e:
            raise CheckpointError(f"--save {root} cannot be written: {_reason(e, root)}") from e

    def release(self) -> None:
        """Remove the lock, unless another trainer has since taken it over."""
        try:
            if _read(self.path) == self.holder:
                os.remove(self.path)
        except (OSError, CheckpointError):
            pass


def _reason(error: OSError, root: str) -> str:
    """What stands in the way, in plain words: a file where a directory should be, or the OS's reason."""
    path = os.path.abspath(root)
    while path != os.path.dirname(path):
        if os.path.exists(path) and not os.path.isdir(path):
            return f"{path} is a file, not a directory"
        path = os.path.dirname(path)
    return f"{error.strerror} ({error.filename})" if error.filename else error.strerror


def _create_exclusively(path: str, holder: Holder) -> bool:
    """Write the lock beside `path` and link it into place: the lock is never seen half-written.
    False when `path` exists."""
    tmp = f"{path}.{holder.host}.{holder.pid}"
    _write_file(tmp, holder)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def _write(path: str, holder: Holder) -> None:
    tmp = f"{path}.{holder.host}.{holder.pid}"
    _write_file(tmp, holder)
    os.replace(tmp, path)


def _write_file(path: str, holder: Holder) -> None:
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(holder), f)
        f.flush()
        os.fsync(f.fileno())


def _read(path: str) -> Holder:
    try:
        with open(path) as f:
            fields = json.load(f)
        return Holder(**{**fields, "attempt": tuple(fields["attempt"])})
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path} is no megadual lock ({e}); delete it if no trainer uses this --save") from e
