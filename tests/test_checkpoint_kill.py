"""A trainer killed in the middle of a save (sync, or async while training goes on) leaves the previous
checkpoint loadable: the next run takes over its lock, clears the half-written folder and resumes
with the losses of a run that was never killed."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.checkpoint_runs import SMALL, train

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--train-iters", "6"]


@pytest.fixture(scope="module")
def straight() -> list[float]:
    return train(ARGS).result.losses


def run_until_paused(args: list[str], iteration: int, marker: Path) -> subprocess.Popen:
    """pretrain_moe.py in a process of its own, stopped inside the save of `iteration`."""
    child = subprocess.Popen([sys.executable, "tests/save_paused.py", str(iteration), str(marker), *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the save of iteration {iteration} never paused:\n{child.communicate()[0][-3000:]}")
        time.sleep(0.1)
    return child


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, straight, mode):
    save = tmp_path / "checkpoints"
    flags = ["--save", str(save), "--load", str(save), "--save-interval", "2"] + (["--async-save"] if mode == "async"
                                                                                  else [])
    child = run_until_paused(SMALL + ARGS + flags, 4, tmp_path / "paused")
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    half = save / ".saving_iter_0000004"
    assert "__0_0.distcp" in os.listdir(half) and ".metadata" not in os.listdir(half)

    resumed = train(ARGS + flags)
    taken = resumed.lines[0]
    assert taken.startswith(f" taking over {save}/megadual_save.lock from pid {child.pid} on host ")
    assert taken.endswith(": that process is gone")
    assert resumed.has(f" successfully loaded checkpoint from {save}/iter_0000002 at iteration 2")
    assert resumed.has(f" removed what an interrupted save left in {save}: .saving_iter_0000004")
    assert resumed.result.losses == straight[2:]  # bit for bit on CPU
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                        "latest_checkpointed_iteration.txt"]
