"""Stopping early on request: a signal or the time budget ends the run after an iteration every
rank agrees on, with a checkpoint, and resuming from it continues the uninterrupted run exactly."""
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megadual.config import parse_args
from megadual.training.distributed import free_port
from megadual.training.loop import pretrain
from megadual.training.stopping import StopRequests
from tests.helpers import TINY_MOE, single_process_group

ROOT = Path(__file__).resolve().parents[1]
ITERS = 8
ARGS = TINY_MOE + ["--train-iters", str(ITERS)]


def run(args, grad_hook=None):
    with single_process_group() as device:
        return pretrain(parse_args(ARGS + args), device, log=lambda line: None, grad_hook=grad_hook)


def tracked_iteration(save: Path) -> int:
    return int((save / "latest_checkpointed_iteration.txt").read_text())


def test_exit_duration_saves_and_stops(tmp_path):
    result = run(["--exit-duration-in-mins", "1e-6", "--save", str(tmp_path)])  # 60 us: over after one step
    assert len(result.losses) == 1 and "--exit-duration-in-mins" in result.stop_reason
    assert tracked_iteration(tmp_path) == 1


def test_first_ctrl_c_stops_after_the_iteration_and_a_second_would_kill(tmp_path):
    after_ctrl_c = []

    def press_ctrl_c_in_step_2(model, steps=[]):  # noqa: B006 (counts this run's steps)
        steps.append(None)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            after_ctrl_c.append(signal.getsignal(signal.SIGINT))  # the handler has run by now

    result = run(["--save", str(tmp_path)], grad_hook=press_ctrl_c_in_step_2)
    assert result.stop_reason == "received SIGINT" and len(result.losses) == 2
    assert tracked_iteration(tmp_path) == 2
    assert after_ctrl_c == [signal.SIG_DFL]  # so the next Ctrl-C ends the process at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    with StopRequests("SIGTERM", None, torch.device("cpu")) as stop:
        before = stop.agreed_reason()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        results.put((rank, before, stop.agreed_reason(), stop.received is not None))
    dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank():
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(free_port(), results), nprocs=2, start_method="spawn")
    outcomes = sorted(results.get() for _ in range(2))
    assert outcomes == [(0, None, "received SIGTERM", False), (1, None, "received SIGTERM", True)]


ITERATION = re.compile(r"^ iteration +(\d+)/ +\d+ \|.*\| lm loss: (\S+) \|", re.MULTILINE)


def signal_after_first_iteration(command: list, signum: int) -> subprocess.CompletedProcess:
    """Run `command`, send `signum` to it once it logs its first iteration, and wait for it."""
    process = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    stdout = []
    for line in process.stdout:
        stdout.append(line)
        if ITERATION.match(line):
            process.send_signal(signum)
            break
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, "".join(stdout) + out, err)


def test_sigterm_saves_the_current_iteration_and_resuming_continues_exactly(tmp_path):
    """`python pretrain_moe.py` and torchrun (through scripts/pretrain_moe.sh) each get SIGTERM after
    their first iteration; each saves the iteration it is in and stops; resuming from either
    gives the losses of a run that never stopped. (One process each, so all runs do the same
    arithmetic; torchrun itself exits 1 after passing a signal on, which is torchrun's way.)"""
    flags = ARGS + ["--log-interval", "1", "--exit-signal-handler"]
    launchers = {"python": [sys.executable, "pretrain_moe.py"],
                 "torchrun": [ROOT / "scripts" / "pretrain_moe.sh", "--nproc-per-node", "1", "--"]}
    finished = {}
    threads = [threading.Thread(target=lambda name, launcher: finished.update({name: signal_after_first_iteration(
        [*launcher, *flags, "--save", tmp_path / name], signal.SIGTERM)}), args=item) for item in launchers.items()]
    for thread in threads:
        thread.start()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes above (OMP_NUM_THREADS=1): the same arithmetic
    try:
        straight = run([]).losses
        for thread in threads:
            thread.join()
        for name, process in finished.items():
            log = process.stdout + process.stderr
            stopped = tracked_iteration(tmp_path / name)
            assert 1 <= stopped < ITERS, log
            assert f" exiting program at iteration {stopped}: received SIGTERM; checkpoint saved" in log, log
            assert name != "python" or process.returncode == 0, log
            logged = [(int(i), loss) for i, loss in ITERATION.findall(process.stdout)]
            assert logged == [(i + 1, f"{loss:.6E}") for i, loss in enumerate(straight[:stopped])], log
            resumed = run(["--load", str(tmp_path / name)]).losses
            assert resumed == straight[stopped:]  # bit for bit
    finally:
        torch.set_num_threads(threads_before)
