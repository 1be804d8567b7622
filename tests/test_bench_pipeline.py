"""scripts/bench_pipeline.py runs end to end at the tiniest size (no timing is checked)."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_pipeline.py"
TINY = ["--pp", "2", "--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "2", "--seq-length", "16", "--vocab-size", "64", "--micro-batch-size", "1",
        "--num-microbatches", "4", "--warmup", "1", "--rounds", "1", "--cost-reps", "1"]


def test_bench_pipeline_tiny(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY], cwd=tmp_path, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("ours 1F1B", "torch Schedule1F1B", "ours 1F1B + W split (ZB-H1)", "ours DualPipe ",
                "ours DualPipeV", "torch ScheduleDualPipeV"):
        assert f"\n{row}" in result.stdout, result.stdout
    assert "tokens/s ratio ours DualPipeV / torch ScheduleDualPipeV: " in result.stdout, result.stdout


def test_bench_pipeline_expert_parallel_on_emulated_links(tmp_path):
    rows = ["ours 1F1B", "ours DualPipe", "ours DualPipe, no overlap"]
    moe = ["--ep", "2", "--ranks-per-node", "1", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
           "--moe-router-topk", "2", "--moe-shared-expert-intermediate-size", "32",
           "--emulate-links", "inter=20MB/s,10us", "--schedules", *rows]
    result = subprocess.run([sys.executable, str(SCRIPT), *TINY, *moe], cwd=tmp_path, check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMM_F" in result.stdout and "emulated links: inter=0.02GB/s" in result.stdout, result.stdout
    for row in rows:
        assert f"\n{row} " in result.stdout, result.stdout
    assert "tokens/s ratio ours DualPipe / ours DualPipe, no overlap: " in result.stdout, result.stdout
