"""scripts/gpu_check.sh cannot rot: its CPU dry run runs the same commands at tiny sizes (a test file,
the layout checker, the one-process sync and memory check, the planner, the benchmarks); every
test file it lists for CUDA takes its device from device_under_test(); the throughput field it
logs agrees with the FLOP count; an FP8 backend is listed only after a tiny GEMM ran on it."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megadual.arguments import parse_args
from megadual.model.flops import training_flops_per_iteration
from tests.helpers import on_device_under_test

ROOT = Path(__file__).resolve().parents[1]


def fp8_loss_gap_module():
    spec = importlib.util.spec_from_file_location("fp8_loss_gap", ROOT / "scripts" / "fp8_loss_gap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_runs_every_step_and_logs_throughput(tmp_path):
    results = tmp_path / "results.txt"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry-run", str(results)],
                          check=False, capture_output=True, text=True, timeout=900)
    text = results.read_text()
    assert done.returncode == 0, text[-3000:] + done.stderr[-2000:]
    statuses = re.findall(r"^== exit status (\d+): ", text, re.MULTILINE)
    assert statuses == ["0"] * 7, text[-3000:]
    assert re.search(r"^== gpu_check on cpu: torch \S+, CUDA ", text, re.MULTILINE)
    assert "passed" in text and re.search(r"^ep2: 2 processes vs one, .*cpu/gloo", text, re.MULTILINE)
    assert "\nPASS\n" in text
    # gpu_check.sh's TINY: 4 layers, the first dense; in the dry run 2 micro-batches of 1: one transfer
    # per MoE layer per micro-batch forward, and one per step
    assert f"host transfers per step (megadual's watch): {[3 * 2 + 1] * 2}" in text
    assert "measured: [Rank 0]" in text and "pipeline rank 0" in text  # the memory report, the planner's
    assert "grouped / now" in text and "reference" in text
    # the dry run's loss-gap runs: 2 steps, hidden 128, 2 layers, seq 32 (gpu_check.sh's LOSS_GAP)
    config = parse_args(fp8_loss_gap_module().model_args(2, 128, 2, 32) + ["--log-throughput"])
    lines = re.findall(r"^ *(fp32|fp8): iteration .*$", text, re.MULTILINE)
    assert lines == ["fp32", "fp8"], text[-3000:]
    for line in re.findall(r"^ *(?:fp32|fp8): iteration .*$", text, re.MULTILINE):
        ms = float(re.search(r"\| elapsed time per iteration \(ms\): ([\d.]+) \|", line).group(1))
        logged = float(re.search(r"\| throughput per GPU \(TFLOP/s/GPU\): ([\d.]+) \|", line).group(1))
        expected = training_flops_per_iteration(config.model, config.train.global_batch_size) / ms / 1e9
        # both printed rounded: ms to 0.1 (of hundreds), TFLOP/s to 0.001
        assert logged == pytest.approx(expected, rel=1e-3, abs=1e-3), line


def test_every_test_file_listed_for_cuda_takes_the_device_under_test():
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    listed = re.search(r"SINGLE_PROCESS_TESTS=\(([^)]*)\)", script).group(1).split()
    assert len(listed) >= 14
    for name in listed:
        text = (ROOT / name).read_text()
        assert re.search(r"device_under_test\(|single_process_group\(|\"cuda\"|^pytestmark = pytest\.mark\."
                         r"usefixtures\(\"on_device_under_test\"\)", text, re.MULTILINE), \
            f"{name} never asks for the device under test: on a GPU it would test the CPU"


def test_a_file_under_the_fixture_makes_its_tensors_and_modules_on_the_device_under_test(monkeypatch):
    monkeypatch.setenv("MEGADUAL_TEST_DEVICE", "meta")  # stands in for cuda
    with on_device_under_test() as device:
        made = [torch.randn(2), torch.zeros(3, dtype=torch.int64), torch.nn.Linear(2, 2).weight]
    assert device == torch.device("meta") and all(t.device == device for t in made)
    assert torch.zeros(1).device == torch.device("cpu")  # only inside


def test_an_fp8_backend_is_listed_after_a_tiny_gemm_ran_on_it(monkeypatch):
    from megadual.fp8 import gemm
    assert gemm._probe("reference", torch.device("cpu")) is None

    def unsupported(a, b):
        raise RuntimeError("Only row-wise scaling with sm_90 or later\nmore")

    monkeypatch.setitem(gemm._BACKENDS, "reference", unsupported)
    assert gemm._probe.__wrapped__("reference", torch.device("cpu")) == \
        "a tiny reference GEMM failed on cpu: Only row-wise scaling with sm_90 or later"
