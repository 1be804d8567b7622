"""Iteration time around a checkpoint save, with and without --async-save; the cost of the checksums.

    python scripts/bench_checkpoint.py                 # the figures in docs/benchmarks.md
    python scripts/bench_checkpoint.py --rounds 1 --train-iters 4 --save-interval 2 --hidden-size 64

One process (a one-rank world), one thread for training. Each round trains the same dense model
twice, writing a checkpoint every --save-interval iterations: once synchronously, once with
--async-save (which goes first alternates between rounds, so a change in the machine's load hits
both alike). Per mode it prints the median of:
- iteration: the time between two log lines (--log-interval 1) with no save between them;
- with a save: the same around a save, so the step plus the save made before it;
- blocked: how long the save held up training (the call that saves, which under --async-save
  copies the state to memory and first waits for the save before, if that is still running);
- published: from the start of a save until its tracker moved (from the save's log line);
and the ratios async / sync of "with a save" and of "blocked", per round and as a median.
Then the checksum pass that every save makes (CRC-32 over the files just written, in the page
cache) against the time of a synchronous save, and the speed of other hashes on 256 MB.
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
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadual.arguments import parse_args
from megadual.training.checkpoint import CheckpointManager
from megadual.training.checkpoint.integrity import file_checksum
from megadual.training.distributed import init_distributed
from megadual.training.loop import pretrain

SAVED = re.compile(r"successfully saved checkpoint from iteration +\d+ to .* \[([\d.]+) s\]")


def model_flags(a: argparse.Namespace) -> list[str]:
    return ["--mock-data", "--vocab-size", str(a.vocab_size), "--num-layers", str(a.num_layers),
            "--hidden-size", str(a.hidden_size), "--num-attention-heads", "8", "--seq-length", str(a.seq_length),
            "--micro-batch-size", "4", "--global-batch-size", "4", "--lr", "1e-4", "--lr-warmup-iters", "1",
            "--train-iters", str(a.train_iters), "--save-interval", str(a.save_interval), "--log-interval", "1"]


@dataclass
class Timings:
    plain: list[float] = field(default_factory=list)
    with_save: list[float] = field(default_factory=list)
    blocked: list[float] = field(default_factory=list)
    published: list[float] = field(default_factory=list)

    def median_ms(self, name: str) -> float:
        return statistics.median(getattr(self, name)) * 1e3


def timed_run(flags: list[str], device: torch.device) -> Timings:
    interval = int(flags[flags.index("--save-interval") + 1])
    timings, stamps = Timings(), []

    def log(line: str) -> None:
        if line.startswith(" iteration"):
            stamps.append((int(line.split()[1].split("/")[0]), time.perf_counter()))
        elif SAVED.search(line):
            timings.published.append(float(SAVED.search(line).group(1)))
    after_step = CheckpointManager.after_step

    def timed_after_step(self, state, skipped):
        start = time.perf_counter()
        after_step(self, state, skipped)
        if state.iteration % interval == 0:
            timings.blocked.append(time.perf_counter() - start)
    CheckpointManager.after_step = timed_after_step
    try:
        pretrain(parse_args(flags), device, log=log)
    finally:
        CheckpointManager.after_step = after_step
    for (previous, t0), (_, t1) in itertools.pairwise(stamps[1:]):  # the first step warms up
        (timings.with_save if previous % interval == 0 else timings.plain).append(t1 - t0)
    return timings


def merged(runs: list[Timings]) -> Timings:
    return Timings(*([x for run in runs for x in getattr(run, f.name)] for f in fields(Timings)))


def describe(t: Timings) -> str:
    return (f"iteration {t.median_ms('plain'):.0f} ms, with a save {t.median_ms('with_save'):.0f} ms, "
            f"blocked {t.median_ms('blocked'):.0f} ms, published {t.median_ms('published'):.0f} ms")


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
    parser.add_argument("--seq-length", type=int, default=128)
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
    ratios = {"with_save": [], "blocked": []}
    with tempfile.TemporaryDirectory(dir=a.dir) as scratch:
        save = Path(scratch) / "checkpoints"
        for round_ in range(a.rounds):
            modes = ["sync", "async"] if round_ % 2 == 0 else ["async", "sync"]
            for mode in modes:
                shutil.rmtree(save, ignore_errors=True)  # only the last run's checkpoints stay
                flags = model_flags(a) + ["--save", str(save)] + (["--async-save"] if mode == "async" else [])
                results[mode].append(timed_run(flags, device))
            for name, values in ratios.items():
                values.append(results["async"][-1].median_ms(name) / results["sync"][-1].median_ms(name))
            print(f"round {round_}: " + " | ".join(f"{mode} {describe(results[mode][-1])}" for mode in modes)
                  + f" | async / sync: with a save {ratios['with_save'][-1]:.3f}, blocked {ratios['blocked'][-1]:.3f}")
        seconds, size = checksum_speed(max(save.glob("iter_*")))
    for mode, runs in results.items():
        print(f"{mode:5s}: {describe(merged(runs))}")
    for name, values in ratios.items():
        spread = " ".join(f"{q:.3f}" for q in statistics.quantiles(values, n=4)) if len(values) > 1 else "-"
        print(f"async / sync, {name.replace('_', ' ')}: median over {a.rounds} rounds {statistics.median(values):.3f} "
              f"(quartiles {spread})")
    sync_save = merged(results["sync"]).median_ms("published") / 1e3
    print(f"checksum pass: {size / 1e6:.1f} MB in {seconds * 1e3:.1f} ms ({size / seconds / 1e9:.2f} GB/s), "
          f"{seconds / sync_save:.1%} of a sync save")
    print("hashes over 256 MB in memory, GB/s: "
          + ", ".join(f"{name} {speed:.2f}" for name, speed in hash_speeds().items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
