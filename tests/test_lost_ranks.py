"""A rank that stops or whose launcher dies ends the run: the others fail with one line after
--distributed-timeout-minutes instead of gloo's 30 minutes, and workers die with their torchrun agent."""
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megadual.training.distributed import free_port
from tests.helpers import TINY_MOE

ROOT = Path(__file__).resolve().parents[1]
LONG_RUN = TINY_MOE + ["--train-iters", "100000", "--log-interval", "1"]


def start(command: list, **env) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def wait_for_first_iteration(process: subprocess.Popen) -> None:
    for line in process.stdout:
        if line.startswith(" iteration "):
            return
    raise AssertionError(f"no iteration logged: {process.communicate()[1][-3000:]}")


def process_state(pid: int) -> tuple[str, str] | None:
    """(state letter, start time) of a process, None when it is gone; the start time tells a
    process from a later one that got the same pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return fields[0], fields[19]


def alive(worker: tuple[int, str]) -> bool:
    """Running, or stopped: not gone, not a zombie waiting to be reaped, and not a new process."""
    pid, started = worker
    state = process_state(pid)
    return state is not None and state[0] != "Z" and state[1] == started


def test_stopped_rank_ends_the_run_after_the_distributed_timeout():
    """Two ranks started by hand; rank 1 is frozen with SIGSTOP after the first iteration, so
    rank 0 waits in its next collective, for 0.1 minutes (6 s), and then stops with one line."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    ranks = [start([sys.executable, "pretrain_moe.py", *LONG_RUN, "--distributed-timeout-minutes", "0.1"],
                   RANK=str(r), LOCAL_RANK=str(r), **env) for r in range(2)]
    try:
        wait_for_first_iteration(ranks[0])
        ranks[1].send_signal(signal.SIGSTOP)
        _, err = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 1, err[-3000:]
        assert err.strip().splitlines() == [
            "pretrain_moe.py: error: rank 0: a collective got no answer within --distributed-timeout-minutes "
            "(0.1): a rank is stopped or hung (" + err.split("(0.1): a rank is stopped or hung (", 1)[-1].strip()]
        assert "Timed out waiting 6000ms" in err
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()


def test_workers_exit_when_their_torchrun_agent_is_killed():
    agent = start(["torchrun", "--standalone", "--nproc-per-node", "2", "pretrain_moe.py", *LONG_RUN])
    workers = []
    try:
        wait_for_first_iteration(agent)
        pids = [int(pid) for pid in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]
        workers = [(pid, process_state(pid)[1]) for pid in pids]
        assert len(workers) == 2
        agent.kill()
        deadline = time.monotonic() + 30
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, workers)), "workers kept running after their agent was killed"
    finally:
        agent.kill()
        for pid, _ in filter(alive, workers):  # survivors hold the output pipes open
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        agent.communicate()
