"""pretrain_moe.py: fails fast with one message naming the flag or file at fault; runs under torchrun."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megadual.arguments import parse_args
from megadual.data.indexed_dataset import IndexedDatasetBuilder
from megadual.training.distributed import free_port
from megadual.training.loop import pretrain
from tests.helpers import TINY_MOE, single_process_group

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



# Runs pretrain_moe.main once per case in one process (torch is imported once), keeping each
# case's exit status and output apart; an exception escaping main is reported with its traceback.
CASES_DRIVER = """
import contextlib, io, json, os, sys, traceback
import pretrain_moe
sys.modules["tensorboard"] = None  # absent, even where it is installed
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            status = pretrain_moe.main(argv)
        except BaseException:
            status = "raised"
            traceback.print_exc()
    results[name] = [status, output.getvalue()]
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # the next case starts a world of its own
print(json.dumps(results))
"""


def run_cases(cases: dict[str, list[str]]) -> dict[str, tuple[int | str, str]]:
    out = subprocess.run([sys.executable, "-c", CASES_DRIVER, json.dumps(cases)], cwd=ROOT, check=False,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return {name: tuple(result) for name, result in json.loads(out.stdout).items()}


def write_dataset(prefix: Path, documents: int, tokens: list[int]) -> str:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    for _ in range(documents):
        builder.add_document(tokens)
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_bad_data_and_bad_values_fail_at_start_up_with_one_line_each(tmp_path):
    small = write_dataset(tmp_path / "small", 40, list(range(60)))  # 969,30,1 gives its test split no document
    tiny = write_dataset(tmp_path / "tiny", 3, list(range(60)))
    foreign = write_dataset(tmp_path / "foreign", 40, [5, 600, 7])  # ids of a larger vocabulary
    relabelled = write_dataset(tmp_path / "relabelled", 40, list(range(60)))
    idx = Path(f"{relabelled}.idx")
    idx.write_bytes(idx.read_bytes()[:17] + bytes([1]) + idx.read_bytes()[18:])  # dtype uint16 (8) -> uint8 (1)
    short = write_dataset(tmp_path / "short", 2, list(range(10)))  # 20 tokens, a sample is 33
    floats = write_dataset(tmp_path / "floats", 40, list(range(60)))
    idx = Path(f"{floats}.idx")
    idx.write_bytes(idx.read_bytes()[:17] + bytes([7]) + idx.read_bytes()[18:])  # 2-byte uint16 -> float32
    checkpoint = tmp_path / "checkpoint"
    with single_process_group() as device:
        pretrain(parse_args(TINY_MOE + ["--train-iters", "2", "--save", str(checkpoint)]), device, log=print)
    meta = checkpoint / "iter_0000002" / "megadual_meta.json"
    meta.write_text(meta.read_text()[:40])  # cut short
    data = [a for a in TINY_MOE if a != "--mock-data"] + ["--train-iters", "2"]
    bad = {
        "vocabulary": (data + ["--data-path", foreign], f"{foreign}.bin: token id 600 is outside the vocabulary"),
        "dtype": (data + ["--data-path", relabelled], f"{relabelled}.idx: sequence 1 starts at byte 120, but with "
                                                      + "1-byte uint8 tokens"),
        "no validation documents": (data + ["--data-path", tiny, "--split", "98,1,1", "--eval-interval", "1"],
                                    "--split 98,1,1 gives the valid split no documents of"),
        "no validation share": (TINY_MOE + ["--split", "100,0,0", "--eval-interval", "1"],
                                "--eval-interval 1 asks for evaluation but --split 100,0,0 gives"),
        "split": (TINY_MOE + ["--split", "9,x"], "--split '9,x': expected up to 3 comma-separated numbers"),
        "weights": (data + ["--data-path", "0.5", small, "-1", tiny], "--data-path weights must be non-negative"),
        "lr": (TINY_MOE + ["--lr", "-1e-3"], "--lr must be >= 0, got -0.001"),
        "beta1": (TINY_MOE + ["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), got 1.0"),
        "weight decay": (TINY_MOE + ["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
        "tensorboard": (TINY_MOE + ["--tensorboard-dir", str(tmp_path)], "--tensorboard-dir needs the tensorboard"),
        "global batch": (TINY_MOE + ["--global-batch-size", "0"], "--global-batch-size must be positive, got 0"),
        "query groups": (TINY_MOE + ["--group-query-attention", "--num-query-groups", "0"],
                         "--num-query-groups must be positive, got 0"),
        "tokenizer model": (TINY_MOE + ["--tokenizer-model", "tok.json"], "--tokenizer-model is read by"),
        "short corpus": (data + ["--data-path", short, "--split", "1,0,0"],
                         f"the train split of {short} holds 20 tokens (2 documents), fewer than one sample"),
        "float tokens": (data + ["--data-path", floats], f"{floats}.idx: dtype code 7 says float32 tokens"),
        "meta": (TINY_MOE + ["--load", str(checkpoint)], "iter_0000002: megadual_meta.json is truncated"),
    }
    results = run_cases({"small corpus": data + ["--data-path", small], **{k: args for k, (args, _) in bad.items()}})

    status, output = results["small corpus"]
    assert status == 0 and "WARNING: --split 969,30,1 gives the test split no documents of" in output, output
    for name, (_, message) in bad.items():
        status, output = results[name]
        errors = [line for line in output.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert status in (1, 2) and len(errors) == 1 and message in errors[0], (name, output[-3000:])
        assert "iteration" not in output, (name, output[-3000:])  # refused before training
