"""The bash launchers: scripts/pretrain_moe.sh (local torchrun) and scripts/pretrain_moe_slurm.sh
(sbatch) on a real two-node Slurm cluster brought up on this host by scripts/slurm_local_cluster.sh
(the slurm_cluster fixture of tests/conftest.py)."""
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import TINY_MOE

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
ITERS = 16  # enough that a signal sent after the first iteration arrives well before the last
TRAIN = TINY_MOE + ["--train-iters", str(ITERS), "--log-interval", "1"]
TRAIN_3 = TINY_MOE + ["--train-iters", "3", "--log-interval", "1"]
ITERATION_LINE = re.compile(r"^ iteration +(\d+)/ +(\d+) \| consumed samples: .*\| lm loss: (\S+) \|", re.MULTILINE)


def logged_iterations(log: str) -> list[int]:
    return [int(i) for i, _, _ in ITERATION_LINE.findall(log)]


def logged_losses(log: str) -> list[str]:
    return [loss for _, _, loss in ITERATION_LINE.findall(log)]


def test_local_launcher_two_processes(tmp_path):
    # Started from another directory: the script finds pretrain_moe.py itself.
    result = subprocess.run([SCRIPTS / "pretrain_moe.sh", "--nproc-per-node", "2", "--", *TRAIN_3],
                            cwd=tmp_path, check=False, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert " megadual: world size 2, " in result.stdout, log
    assert logged_iterations(result.stdout) == [1, 2, 3], log


class SlurmJob:
    """A job of scripts/pretrain_moe_slurm.sh on the test cluster. `sbatch --wait` runs in a thread
    that takes the job's record as soon as the job ends, before Slurm forgets it (MinJobAge)."""

    def __init__(self, cluster, directory: Path, flags: list[str]):
        self.env = {**cluster.env(), "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1"}
        self.save = directory / "checkpoints"
        self._slurmd_logs = {node: (cluster.slurmd_log(node), cluster.slurmd_log(node).stat().st_size)
                             for node in ("n1", "n2")}
        directory.mkdir()
        self._sbatch = subprocess.Popen(
            ["sbatch", "--wait", "--parsable", "--nodes", "2", "--cpus-per-task", "1",
             "--output", f"{directory}/slurm-%j.out", SCRIPTS / "pretrain_moe_slurm.sh", "--", *flags,
             "--save", self.save], cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.job_id = self._sbatch.stdout.readline().strip().split(";")[0]
        assert self.job_id.isdigit(), self._sbatch.communicate()[1]
        self.output = directory / f"slurm-{self.job_id}.out"
        self._record: str | None = None
        self._watcher = threading.Thread(target=self._take_record_at_end)
        self._watcher.start()

    def _take_record_at_end(self) -> None:
        self._sbatch.communicate()
        self._record = subprocess.run(["scontrol", "-o", "show", "job", self.job_id], env=self.env, check=False,
                                      capture_output=True, text=True).stdout

    def log(self) -> str:
        return self.output.read_text() if self.output.exists() else ""

    def wait(self, timeout: float = 300) -> str:
        """The job's record once it ended (a requeued job ends after its last run)."""
        self._watcher.join(timeout)
        assert self._record is not None, f"job {self.job_id} still running:\n{self.log()}"
        return self._record

    def slurmd_logs_since_submission(self) -> dict[str, str]:
        return {node: log.read_text()[offset:] for node, (log, offset) in self._slurmd_logs.items()}


@pytest.fixture(scope="module")
def unsignalled_job(slurm_cluster, tmp_path_factory) -> SlurmJob:
    """Submitted once, and running while the tests that use it run (two jobs fit the cluster at once)."""
    return SlurmJob(slurm_cluster, tmp_path_factory.mktemp("unsignalled") / "job", TRAIN)


def test_slurm_time_limit_warning_saves_requeues_and_resumes_exactly(slurm_cluster, unsignalled_job, tmp_path):
    """The warning Slurm sends before the time limit (--signal=B:USR1@N; here sent at once with scancel)
    makes every rank save and stop, the job requeue itself and resume: its losses are those of a job that
    was never signalled."""
    job = SlurmJob(slurm_cluster, tmp_path / "job", TRAIN)
    deadline = time.monotonic() + 300
    while not logged_iterations(job.log()):
        assert time.monotonic() < deadline, job.log()
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.job_id], env=job.env, check=True)
    record, output = job.wait(), job.log()
    for field in ("JobState=COMPLETED", "Restarts=1", "ExitCode=0:0"):
        assert field in record, record + output
    stopped = int(re.search(r" exiting program at iteration (\d+): received SIGUSR1; checkpoint saved", output)[1])
    assert 1 <= stopped < ITERS, output
    for line in ("requeued; the next run resumes from", f"run 2, resuming from --save {job.save}",
                 f" successfully loaded checkpoint from {job.save}/iter_{stopped:07d} at iteration {stopped}"):
        assert line in output, output
    unsignalled_job.wait()
    assert logged_iterations(output) == list(range(1, ITERS + 1)), output
    assert logged_losses(output) == logged_losses(unsignalled_job.log()), output
    assert (job.save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)


def test_slurm_launcher_two_nodes(unsignalled_job):
    record, output = unsignalled_job.wait(), unsignalled_job.log()
    # One torchrun per node, one process each: a world of two ranks across the two nodes.
    assert "--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d" in output, output
    assert " megadual: world size 2, " in output, output
    assert logged_iterations(output) == list(range(1, ITERS + 1)), output
    for field in ("JobState=COMPLETED", "ExitCode=0:0", "Restarts=0", "NumNodes=2", "NodeList=n[1-2]"):
        assert field in record, record
    for node, log in unsignalled_job.slurmd_logs_since_submission().items():
        assert f"launch task StepId={unsignalled_job.job_id}.0 " in log, f"{node} launched no task of the job"

    save = unsignalled_job.save
    assert (save / f"iter_{ITERS:07d}").is_dir()
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
