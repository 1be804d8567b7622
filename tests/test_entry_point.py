"""pretrain_moe.py fails fast, with one message naming the flag or file at fault."""
import subprocess
import sys
from pathlib import Path

from tests.helpers import TINY_MOE

ROOT = Path(__file__).resolve().parents[1]


def run(args):
    return subprocess.run([sys.executable, "pretrain_moe.py", *args], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=120)


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
