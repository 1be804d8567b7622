"""Fixtures any test file can use: `slurm_cluster`, a private two-node Slurm cluster on this host;
`on_device_under_test`, a test's tensors and modules made on the device under test
(`pytestmark = pytest.mark.usefixtures("on_device_under_test")` for a whole file)."""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from megadual.training.device_check import ENV as DEVICE_CHECK
from megadual.training.distributed import free_port
from tests import helpers

# Every run of the suite, its multi-process ones (torchrun inherits the environment) included,
# checks the device contract of its steps (megadual/training/device_check.py).
os.environ.setdefault(DEVICE_CHECK, "1")

CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_local_cluster.sh"
PACKAGES_MISSING = 3  # slurm_local_cluster.sh's exit status when apt-get cannot install Slurm
CLUSTER_PORTS = 3  # slurmctld, then slurmd n1 and n2 on the next two


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster of nodes n1 and n2, everything of it under `directory`."""
    directory: Path

    @property
    def conf(self) -> Path:
        return self.directory / "slurm.conf"

    def env(self) -> dict[str, str]:
        """This process's environment with the Slurm commands pointed at this cluster, for one job.
        It names a free rendezvous port: every cluster numbers its jobs from 1, and the job script's
        default port (20000 + job id) would be the same for the jobs of two clusters."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "MASTER_PORT": str(free_port())}

    def slurmd_log(self, node: str) -> Path:
        return self.directory / "log" / f"slurmd-{node}.log"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
        return True


def free_port_run(count: int) -> int:
    """The first of `count` consecutive TCP ports that are free now. The kernel picks the first,
    so test suites running side by side get different ones."""
    while True:
        first = free_port()
        if first + count <= 65536 and all(_port_free(p) for p in range(first, first + count)):
            return first


@pytest.fixture
def on_device_under_test():
    with helpers.on_device_under_test() as device:
        yield device


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    """One cluster per test session, in a fresh directory on free ports, so suites on one host
    never share (or stop) each other's; stopped at the end of the session."""
    directory = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(directory),
           "SLURM_LOCAL_PORT": str(free_port_run(CLUSTER_PORTS))}

    def cluster_script(command: str, timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run([CLUSTER_SCRIPT, command], env=env, check=False,
                              capture_output=True, text=True, timeout=timeout)

    try:
        start = cluster_script("start", timeout=600)
        if start.returncode == PACKAGES_MISSING:
            pytest.skip(f"Slurm packages could not be installed (no network?): {start.stderr.strip()[-500:]}")
        assert start.returncode == 0, start.stdout + start.stderr
        yield SlurmCluster(directory)
    finally:
        stop = cluster_script("stop", timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
