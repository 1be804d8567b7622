"""Stopping early on request: a signal or the time budget ends the run after an iteration every
rank agrees on, with a checkpoint, and resuming from it continues the uninterrupted run exactly.
A rank that stops without being asked is the other case: every process group gives up on it after
--distributed-timeout-minutes (test_lost_ranks.py shows the run ending)."""
import os
import re
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megadual.arguments import parse_args
from megadual.parallel import collectives
from megadual.training.distributed import free_port, init_distributed
from megadual.training.loop import build_topology, pretrain
from megadual.training.stopping import StopRequests
from tests.helpers import TINY_MOE, single_process_group

ROOT = Path(__file__).resolve().parents[1]
ITERS = 12
ARGS = TINY_MOE + ["--train-iters", str(ITERS)]


def run(args, grad_hook=None):
    with single_process_group() as device:
        return pretrain(parse_args(ARGS + args), device, log=lambda line: None, grad_hook=grad_hook)


def tracked_iteration(save: Path) -> int:
    return int((save / "latest_checkpointed_iteration.txt").read_text())


@pytest.mark.parametrize("save_flags", [[], ["--async-save"]], ids=["sync", "async"])
def test_exit_duration_saves_and_stops(tmp_path, save_flags):
    """With --async-save the run returns only once the background save is published."""
    result = run(["--exit-duration-in-mins", "1e-6", "--save", str(tmp_path), *save_flags])  # 60 us: one step
    assert len(result.losses) == 1 and "--exit-duration-in-mins" in result.stop_reason
    assert tracked_iteration(tmp_path) == 1


def test_first_ctrl_c_stops_after_the_iteration_and_a_second_would_kill(tmp_path):
    steps, after_ctrl_c = [], []
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs as a background job

    def press_ctrl_c_in_step_2(model, gradients):
        steps.append(model)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            after_ctrl_c.append(signal.getsignal(signal.SIGINT))  # the handler has run by now

    result = run(["--save", str(tmp_path)], grad_hook=press_ctrl_c_in_step_2)
    assert result.stop_reason == "received SIGINT" and len(result.losses) == 2
    assert tracked_iteration(tmp_path) == 2
    assert after_ctrl_c == [signal.SIG_DFL]  # so the next Ctrl-C ends the process at once
    assert signal.getsignal(signal.SIGINT) is before  # restored after the run


def _rank(rank: int, port: int, results) -> None:
    """One rank of a world started as pretrain_moe.py starts it: reports the stop decisions
    before and after rank 1 alone gets SIGTERM, and the timeout of every process group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(timeout_minutes=0.5)
    topo = build_topology(parse_args(TINY_MOE + ["--expert-model-parallel-size", "2",
                                                 "--distributed-timeout-minutes", "0.5"]))
    groups = {"world": dist.group.WORLD, "host": collectives.host_group(),
              **{name: g for name, g in topo.groups.items() if g is not None}}
    timeouts = {name: g._get_backend(torch.device("cpu")).options._timeout for name, g in groups.items()}
    with StopRequests("SIGTERM", None, torch.device("cpu")) as stop:
        before = stop.agreed_reason()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        results.put((rank, before, stop.agreed_reason(), stop.received is not None, timeouts))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> list[tuple]:
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(free_port(), results), nprocs=2, start_method="spawn")
    return sorted(results.get() for _ in range(2))


def test_a_signal_to_one_rank_stops_every_rank(two_ranks):
    decisions = [(rank, before, after, received) for rank, before, after, received, _ in two_ranks]
    assert decisions == [(0, None, "received SIGTERM", False), (1, None, "received SIGTERM", True)]


def test_every_process_group_waits_the_distributed_timeout(two_ranks):
    """A rank that stops leaves the others waiting in whichever collective comes next: every group
    (the world, and each one Topology builds) must give up after --distributed-timeout-minutes."""
    for *_, timeouts in two_ranks:
        assert {"world", "host", "dp", "dp_tp", "ep"} <= set(timeouts)  # and the dispatch's node groups
        assert set(timeouts.values()) == {timedelta(seconds=30)}


ITERATION = re.compile(r"^ iteration +(\d+)/ +\d+ \|.*\| lm loss: (\S+) \|", re.MULTILINE)


def signal_after_first_iteration(command: list, signum: int) -> subprocess.CompletedProcess:
    """Run `command`, send `signum` to it once it logs its first iteration, and wait for it
    (stdout and stderr together, in `stdout`)."""
    process = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = []
    for line in process.stdout:
        output.append(line)
        if ITERATION.match(line):
            process.send_signal(signum)
            break
    output.append(process.communicate(timeout=300)[0])
    return subprocess.CompletedProcess(command, process.returncode, "".join(output))


def readme_torchrun() -> list[str]:
    """README's plain torchrun command, up to pretrain_moe.py, with one process."""
    line = re.search(r"^torchrun .*pretrain_moe\.py", (ROOT / "README.md").read_text().replace("\\\n", ""),
                     re.MULTILINE)[0].split()
    return [*line[:line.index("--nproc-per-node") + 1], "1", *line[line.index("--nproc-per-node") + 2:]]


def test_sigterm_saves_the_current_iteration_and_resuming_continues_exactly(tmp_path):
    """`python pretrain_moe.py` and torchrun (through scripts/pretrain_moe.sh) each get SIGTERM after
    their first iteration, README's plain torchrun command SIGUSR1; each saves the iteration it is
    in and stops; resuming from any gives the losses of a run that never stopped. (One process
    each, so all runs do the same arithmetic; torchrun itself exits 1 after passing a signal on,
    which is torchrun's way.)"""
    flags = ARGS + ["--log-interval", "1", "--exit-signal-handler"]
    launchers = {"python": ([sys.executable, "pretrain_moe.py"], signal.SIGTERM),
                 "torchrun": ([ROOT / "scripts" / "pretrain_moe.sh", "--nproc-per-node", "1", "--"], signal.SIGTERM),
                 "readme-torchrun": (readme_torchrun() + ["--exit-signal", "SIGUSR1"], signal.SIGUSR1)}
    finished = {}

    def stop_after_first_iteration(name, launcher, signum):
        finished[name] = signal_after_first_iteration([*launcher, *flags, "--save", tmp_path / name], signum)

    threads = [threading.Thread(target=stop_after_first_iteration, args=(name, *how)) for name, how in launchers.items()]
    for thread in threads:
        thread.start()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes above (OMP_NUM_THREADS=1): the same arithmetic
    try:
        straight = run([]).losses
        for thread in threads:
            thread.join()
        for name, process in finished.items():
            log = process.stdout
            stopped = tracked_iteration(tmp_path / name)
            assert 1 <= stopped < ITERS, log
            assert f" exiting program at iteration {stopped}: received {launchers[name][1].name}; checkpoint saved" \
                in log, log
            assert name != "python" or process.returncode == 0, log
            logged = [(int(i), loss) for i, loss in ITERATION.findall(process.stdout)]
            assert logged == [(i + 1, f"{loss:.6E}") for i, loss in enumerate(straight[:stopped])], log
            resumed = run(["--load", str(tmp_path / name)]).losses
            assert resumed == straight[stopped:]  # bit for bit
    finally:
        torch.set_num_threads(threads_before)
