"""A rank that stops or whose launcher dies ends the run: the others fail with one line after
--distributed-timeout-minutes instead of gloo's 30 minutes, and workers die with their torchrun agent."""
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


def alive(pid: int) -> bool:
    """Running, or stopped: not gone and not a zombie waiting for its new parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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
    try:
        wait_for_first_iteration(agent)
        workers = [int(pid) for pid in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()]
        assert len(workers) == 2
        agent.kill()
        deadline = time.monotonic() + 30
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, workers)), "workers kept running after their agent was killed"
    finally:
        agent.kill()
        agent.communicate()
