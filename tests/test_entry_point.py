"""pretrain_moe.py: fails fast with one message naming the flag or file at fault; runs under torchrun."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megadual.training.distributed import free_port
from tests.helpers import TINY_MOE

ROOT = Path(__file__).resolve().parents[1]


def run(args, env=None, timeout=120):
    return subprocess.run([sys.executable, "pretrain_moe.py", *args], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_missing_data_file_is_named():
    args = [a for a in TINY_MOE if a != "--mock-data"] + ["--data-path", "/nonexistent/corpus_text_document",
                                                          "--train-iters", "2"]
    out = run(args)
    assert out.returncode != 0
    assert "/nonexistent/corpus_text_document" in out.stderr and "--data-path" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_flag_is_named_before_start():
    out = run(TINY_MOE + ["--hidden-size", "66", "--train-iters", "2"])
    assert out.returncode == 2 and "--hidden-size" in out.stderr and "iteration" not in out.stdout


def test_bad_layout_fails_before_the_rendezvous():
    """Rank 0 of a world of 3 that no other rank joins: a rendezvous would wait until the timeout."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    out = run(TINY_MOE + ["--tensor-model-parallel-size", "2"], env=env, timeout=60)
    assert out.returncode == 2, out.stderr[-3000:]
    error = out.stderr.strip().splitlines()
    assert len(error) == 1 and "world size 3 is not divisible by --tensor-model-parallel-size (2)" in error[0]


def logged_losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"\| lm loss: ([0-9.E+-]+) \|", stdout)]


def test_torchrun_four_processes_tp2_ep4_matches_one_process():
    args = TINY_MOE + ["--train-iters", "3", "--log-interval", "1"]
    launch = ["torchrun", "--standalone", "--nproc-per-node", "4", "pretrain_moe.py", *args,
              "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4"]
    parallel = subprocess.run(launch, cwd=ROOT, check=False, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    single = run(args)
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(logged_losses(parallel.stdout)) == 3
    assert logged_losses(parallel.stdout) == pytest.approx(logged_losses(single.stdout), rel=1e-5)
