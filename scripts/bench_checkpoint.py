"""Iteration time around a checkpoint save, with and without --async-save; the cost of the checksums.

    python scripts/bench_checkpoint.py                 # the figures in docs/benchmarks.md
    python scripts/bench_checkpoint.py --rounds 1 --train-iters 4 --save-interval 2 --hidden-size 64

One process (a one-rank world), one thread for training. Each round trains the same dense model
twice, writing a checkpoint every --save-interval iterations: once synchronously, once with
--async-save (which goes first alternates between rounds, so a change in the machine's load hits
both alike). With --log-interval 1 a log line follows every step, so the time between two lines
is one iteration, including the save made after the first of them. Printed per mode: the median
iteration without a save, the median iteration that includes a save (under --async-save: starting
it, and waiting for the one before), and the ratio async / sync of the latter, per round and as a
median. Then the checksum pass that every save makes (CRC-32 over the files just written, in the
page cache) against the time of a synchronous save, and the speed of other hashes on 256 MB.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadual.config import parse_args
from megadual.training.checkpoint.integrity import file_checksum
from megadual.training.distributed import init_distributed
from megadual.training.loop import pretrain

SAVED = re.compile(r"successfully saved checkpoint from iteration +\d+ to .* \[([\d.]+) s\]")


def model_flags(a: argparse.Namespace) -> list[str]:
    return ["--mock-data", "--vocab-size", str(a.vocab_size), "--num-layers", str(a.num_layers),
            "--hidden-size", str(a.hidden_size), "--num-attention-heads", "8", "--seq-length", str(a.seq_length),
            "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "1e-4", "--lr-warmup-iters", "1",
            "--train-iters", str(a.train_iters), "--save-interval", str(a.save_interval), "--log-interval", "1"]


def timed_run(flags: list[str], device: torch.device) -> tuple[list[float], list[float], list[float]]:
    """Iteration times without a save, iteration times including one, and the saves' own times."""
    stamps, saves = [], []

    def log(line: str) -> None:
        if line.startswith(" iteration"):
            stamps.append((int(line.split()[1].split("/")[0]), time.perf_counter()))
        elif SAVED.search(line):
            saves.append(float(SAVED.search(line).group(1)))
    pretrain(parse_args(flags), device, log=log)
    interval = int(flags[flags.index("--save-interval") + 1])
    plain, with_save = [], []
    for (previous, t0), (_, t1) in itertools.pairwise(stamps[1:]):  # the first step warms up
        (with_save if previous % interval == 0 else plain).append(t1 - t0)
    return plain, with_save, saves


def describe(run: tuple[list[float], list[float], list[float]]) -> str:
    plain, with_save = statistics.median(run[0]), statistics.median(run[1])
    return f"iteration {plain * 1e3:.0f} ms, with a save {with_save * 1e3:.0f} ms"


def checksum_speed(folder: Path) -> tuple[float, float]:
    """Seconds to checksum every file of `folder`, and their bytes."""
    start = time.perf_counter()
    size = sum(file_checksum(str(path))["size"] for path in folder.iterdir())
    return time.perf_counter() - start, size


def hash_speeds(megabytes: int = 256) -> dict[str, float]:
    """GB/s of each hash over `megabytes` of random bytes in memory, 16 MB at a time."""
    data = memoryview(os.urandom(megabytes << 20))
    chunks = [data[i:i + (16 << 20)] for i in range(0, len(data), 16 << 20)]
    speeds = {}
    for name, run in [("crc32 (zlib)", lambda: [zlib.crc32(c) for c in chunks]),
                      ("adler32 (zlib)", lambda: [zlib.adler32(c) for c in chunks]),
                      ("sha1", lambda: [hashlib.sha1(c) for c in chunks]),
                      ("blake2b", lambda: [hashlib.blake2b(c) for c in chunks]),
                      ("md5", lambda: [hashlib.md5(c) for c in chunks])]:
        start = time.perf_counter()
        run()
        speeds[name] = len(data) / (time.perf_counter() - start) / 1e9
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-iters", type=int, default=13)
    parser.add_argument("--save-interval", type=int, default=3)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    device = init_distributed()
    with open("/proc/loadavg") as f:
        print(f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
              f"load average {f.read().split()[0]}")
    results = {"sync": [], "async": []}
    ratios = []
    with tempfile.TemporaryDirectory(dir=a.dir) as scratch:
        save = Path(scratch) / "checkpoints"
        for round_ in range(a.rounds):
            modes = ["sync", "async"] if round_ % 2 == 0 else ["async", "sync"]
            for mode in modes:
                shutil.rmtree(save, ignore_errors=True)  # only the last run's checkpoints stay
                flags = model_flags(a) + ["--save", str(save)] + (["--async-save"] if mode == "async" else [])
                results[mode].append(timed_run(flags, device))
            ratio = statistics.median(results["async"][-1][1]) / statistics.median(results["sync"][-1][1])
            ratios.append(ratio)
            print(f"round {round_}: " + " | ".join(f"{mode} {describe(results[mode][-1])}" for mode in modes)
                  + f" | with a save, async / sync {ratio:.3f}")
        folder = max(save.glob("iter_*"))
        seconds, size = checksum_speed(folder)
    for mode, runs in results.items():
        plain = statistics.median(t for run in runs for t in run[0])
        with_save = statistics.median(t for run in runs for t in run[1])
        saves = statistics.median(s for run in runs for s in run[2])
        print(f"{mode:5s}: iteration {plain * 1e3:.0f} ms, with a save {with_save * 1e3:.0f} ms "
              f"(+{(with_save - plain) * 1e3:.0f} ms), the save from its start to published {saves * 1e3:.0f} ms")
    print(f"iteration with a save, async / sync: median over {a.rounds} rounds {statistics.median(ratios):.3f} "
          f"(quartiles {' '.join(f'{q:.3f}' for q in statistics.quantiles(ratios, n=4)) if a.rounds > 1 else '-'})")
    sync_save = statistics.median(s for run in results["sync"] for s in run[2])
    print(f"checksum pass: {size / 1e6:.1f} MB in {seconds * 1e3:.1f} ms ({size / seconds / 1e9:.2f} GB/s), "
          f"{seconds / sync_save:.1%} of a sync save")
    print("hashes over 256 MB in memory, GB/s: "
          + ", ".join(f"{name} {speed:.2f}" for name, speed in hash_speeds().items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
