"""The bash launchers: scripts/pretrain_moe.sh (local torchrun) and scripts/pretrain_moe_slurm.sh
(sbatch) on a real two-node Slurm cluster brought up on this host by scripts/slurm_local_cluster.sh
(the slurm_cluster fixture of tests/conftest.py)."""
import re
import subprocess
from pathlib import Path

from tests.helpers import TINY_MOE

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
TRAIN_3_ITERS = TINY_MOE + ["--train-iters", "3", "--log-interval", "1"]
ITERATION_LINE = re.compile(r"^ iteration +(\d+)/ +3 \| consumed samples: .*\| lm loss: \S+ \|", re.MULTILINE)


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


def test_slurm_launcher_two_nodes(slurm_cluster, tmp_path):
    env = {**slurm_cluster.env(), "NPROC_PER_NODE": "1"}
    slurmd_logs = [slurm_cluster.slurmd_log(node) for node in ("n1", "n2")]
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
