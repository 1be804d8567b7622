"""The bash launchers: scripts/pretrain_moe.sh (local torchrun) and scripts/pretrain_moe_slurm.sh
(sbatch) on a real two-node Slurm cluster brought up on this host by scripts/slurm_local_cluster.sh."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TINY_MOE

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TRAIN_3_ITERS = TINY_MOE + ["--train-iters", "3", "--log-interval", "1"]
ITERATION_LINE = re.compile(r"^ iteration +(\d+)/ +3 \| consumed samples: .*\| lm loss: \S+ \|", re.MULTILINE)
PACKAGES_MISSING = 3  # slurm_local_cluster.sh's exit status when apt-get cannot install Slurm


def logged_iterations(log: str) -> list[int]:
    return [int(i) for i in ITERATION_LINE.findall(log)]


def test_local_launcher_two_processes(tmp_path):
    # Started from another directory: the script finds pretrain_moe.py itself.
    result = subprocess.run([SCRIPTS / "pretrain_moe.sh", "--nproc-per-node", "2", "--", *TRAIN_3_ITERS],
                            cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert " megadual: world size 2, " in result.stdout, log
    assert logged_iterations(result.stdout) == [1, 2, 3], log


def cluster_script(command: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPTS / "slurm_local_cluster.sh", command],
                          check=False, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def slurm_conf():
    """SLURM_CONF of a running two-node local cluster; stopped afterwards if this fixture started it."""
    already_up = cluster_script("status", timeout=60).returncode == 0
    try:
        start = cluster_script("start", timeout=600)
        if start.returncode == PACKAGES_MISSING:
            pytest.skip(f"Slurm packages could not be installed (no network?): {start.stderr.strip()[-500:]}")
        assert start.returncode == 0, start.stdout + start.stderr
        yield re.search(r"export SLURM_CONF=(\S+)", start.stdout).group(1)
    finally:
        if not already_up:
            stop = cluster_script("stop", timeout=120)
            assert stop.returncode == 0, stop.stdout + stop.stderr


def test_slurm_launcher_two_nodes(slurm_conf, tmp_path):
    env = {**os.environ, "SLURM_CONF": slurm_conf, "NPROC_PER_NODE": "1"}
    slurmd_logs = [Path(slurm_conf).parent / "log" / f"slurmd-{node}.log" for node in ("n1", "n2")]
    log_offsets = [log.stat().st_size for log in slurmd_logs]
    save = tmp_path / "checkpoints"

    job = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--nodes", "2", "--cpus-per-task", "1",
         "--output", f"{tmp_path}/slurm-%j.out", SCRIPTS / "pretrain_moe_slurm.sh",
         "--", *TRAIN_3_ITERS, "--save", save],
        cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=300)
    job_id = job.stdout.strip().split(";")[0]
    output_file = tmp_path / f"slurm-{job_id}.out"
    output = output_file.read_text() if output_file.exists() else ""
    assert job.returncode == 0, job.stdout + job.stderr + output

    # One torchrun per node, one process each: a world of two ranks across the two nodes.
    assert "--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d" in output, output
    assert " megadual: world size 2, " in output, output
    assert logged_iterations(output) == [1, 2, 3], output
    record = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env,
                            capture_output=True, text=True, check=True).stdout
    for field in ("JobState=COMPLETED", "ExitCode=0:0", "NumNodes=2", "NodeList=n[1-2]"):
        assert field in record, record
    for log, offset in zip(slurmd_logs, log_offsets):
        with open(log) as f:
            f.seek(offset)
            assert f"launch task StepId={job_id}.0 " in f.read(), f"{log} launched no task of job {job_id}"

    assert (save / "iter_0000003").is_dir()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
