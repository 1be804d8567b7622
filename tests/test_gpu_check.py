"""scripts/gpu_check.sh cannot rot: its CPU dry run (tiny sizes) runs every step but the CUDA tests,
whose files it lists; the throughput field it logs agrees with the FLOP count."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megadual.config import parse_args
from megadual.model.flops import training_flops_per_iteration

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
    assert statuses == ["0"] * 4, text[-3000:]
    assert "tests/test_grouped_gemm.py" in text and "grouped / now" in text and "reference" in text
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
