"""What the checkpoint tests share: a two-layer dense model that saves in a fraction of a second,
run in this process with its log kept, and a directory's contents to compare before and after."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from megadual.arguments import parse_args
from megadual.training.loop import RunResult, pretrain
from tests.helpers import single_process_group

SMALL = ["--mock-data", "--vocab-size", "512", "--num-layers", "2", "--hidden-size", "64",
         "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1000"]


@dataclass
class Logged:
    result: RunResult | None = None
    lines: list[str] = field(default_factory=list)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)


def train(args: list[str]) -> Logged:
    """One run of SMALL + `args` in this process; raises what pretrain raises."""
    logged = Logged()
    with single_process_group() as device:
        logged.result = pretrain(parse_args(SMALL + args), device, log=logged.lines.append)
    return logged


def train_expecting_error(args: list[str], error: type[BaseException]) -> tuple[str, Logged]:
    """The message of the `error` that a run of SMALL + `args` raises, and what it logged first."""
    logged = Logged()
    with single_process_group() as device:
        try:
            pretrain(parse_args(SMALL + args), device, log=logged.lines.append)
        except error as e:
            return str(e), logged
    raise AssertionError(f"no {error.__name__}; the run logged {logged.lines}")


def contents(root) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time: equal before and after means untouched."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return found
