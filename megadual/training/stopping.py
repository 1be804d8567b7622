"""Stopping a run early, at an iteration every rank agrees on.

Three things ask a run to stop before --train-iters: the exit signal (with
--exit-signal-handler; SIGTERM unless --exit-signal says otherwise), Ctrl-C (SIGINT), and
the wall-clock budget of --exit-duration-in-mins. A signal reaches the ranks at different
moments (and a launcher may deliver it to some ranks only), so a handler only records it;
once per iteration `StopRequests.agreed_reason` all-reduces every rank's (signal, out of
time) pair with MAX over the host's gloo group (parallel/collectives.py), and all ranks see the same answer after the same iteration. The loop
then saves and returns, and the process exits 0.

A second Ctrl-C is not caught: the first one restores SIGINT's default action, so the next
one ends the process at once, even inside a collective that never returns.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Self

import torch
import torch.distributed as dist

from megadual.parallel import collectives


class StopRequests:
    """Records stop requests while installed (`with StopRequests(...) as stop:`) and turns
    them into one decision per iteration. Handlers are installed only in the main thread
    (Python allows no other) and the previous ones are restored on exit."""

    def __init__(self, exit_signal: str | None, exit_duration_mins: float | None, device: torch.device):
        self.signals = [signal.SIGINT] + ([signal.Signals[exit_signal]] if exit_signal else [])
        self.deadline = None if exit_duration_mins is None else time.monotonic() + 60 * exit_duration_mins
        self.exit_duration_mins = exit_duration_mins
        self.device = device
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    def _record(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def agreed_reason(self) -> str | None:
        """Why every rank stops after this iteration, or None to go on: the same on all ranks
        (one all-reduce of two integers)."""
        over_time = self.deadline is not None and time.monotonic() >= self.deadline
        votes = torch.tensor([int(self.received or 0), int(over_time)])  # host values: the host group's
        collectives.host_all_reduce(votes, op=dist.ReduceOp.MAX)
        signum, over_time = (int(v) for v in votes.tolist())
        if signum:
            return f"received {signal.Signals(signum).name}"
        if over_time:
            return f"the --exit-duration-in-mins budget of {self.exit_duration_mins:g} minutes ran out"
        return None
