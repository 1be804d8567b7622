"""An emulated network, for benchmarks only: collectives finish no earlier than a modelled link allows.

    with emulated_links(LinkModel.parse("inter=25GB/s,10us;intra=150GB/s,2us"), ranks_per_node=1):
        ...  # every all_to_all_single and batch_isend_irecv of this process is emulated

This is an emulation, not a network: the data still moves over the process group (loopback
gloo), and only the completion is delayed. Each rank sends over two outbound links, one to
the ranks of its own node (intra) and one to other nodes (inter, a NIC); nodes are
consecutive blocks of `ranks_per_node` global ranks. A transfer queues behind earlier ones on
its link, takes bytes / bandwidth, and arrives one latency after it leaves. At launch the
sender computes when each peer's data arrives and sends that deadline beside the data (a
tiny all-to-all or message of its own); `wait()` waits for the real data, then sleeps until
the last of its data has arrived and its own sends have left. Launching never blocks, so
compute between launch and wait hides the emulated time as it would hide a real link's.

Emulated: `torch.distributed.all_to_all_single` (sync or async) and `batch_isend_irecv`;
other collectives run at loopback speed. Deadlines are `time.perf_counter()` values, which
every process of one host shares (CLOCK_MONOTONIC), so all ranks must run on one host.
Training never uses this module; the benchmark scripts install it with `--emulate-links`.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
import torch.distributed as dist

_STAMP_TAG = 7919  # p2p tag of the deadline messages, apart from the data's
_UNITS = {"B/s": 1.0, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes per second
    latency: float  # seconds

    def transfer_seconds(self, num_bytes: int) -> float:
        return num_bytes / self.bandwidth


FREE = Link(float("inf"), 0.0)


@dataclass(frozen=True)
class LinkModel:
    inter: Link = FREE
    intra: Link = FREE

    @staticmethod
    def parse(spec: str) -> LinkModel:
        """`inter=25GB/s,10us;intra=150GB/s,2us`; a link left out costs nothing."""
        links = {}
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            match = re.fullmatch(r"(inter|intra)\s*=\s*([\d.eE+-]+)\s*([KMG]?B/s)\s*,\s*([\d.eE+-]+)\s*(n?s|us|ms)",
                                 part)
            if match is None:
                raise ValueError(f"--emulate-links: cannot read {part!r}; expected e.g. "
                                 "'inter=25GB/s,10us;intra=150GB/s,2us'")
            name, bandwidth, bandwidth_unit, latency, latency_unit = match.groups()
            links[name] = Link(float(bandwidth) * _UNITS[bandwidth_unit], float(latency) * _UNITS[latency_unit])
        return LinkModel(**links)

    def free_seconds(self, record: Record) -> float:
        """What a recorded transfer takes on idle links: the two links send at once, so the slower
        of its bytes over each link it used, with that link's latency."""
        return max((link.transfer_seconds(num_bytes) + link.latency
                    for link, num_bytes in ((self.inter, record.bytes_inter), (self.intra, record.bytes_intra))
                    if num_bytes), default=0.0)

    def __str__(self) -> str:
        def show(link: Link) -> str:
            return "free" if link == FREE else f"{link.bandwidth / 1e9:g}GB/s,{link.latency * 1e6:g}us"
        return f"inter={show(self.inter)};intra={show(self.intra)}"


@dataclass
class Record:
    """One emulated collective as this rank saw it."""
    what: str
    bytes_inter: int
    bytes_intra: int
    launched: float
    deadline: float = 0.0
    blocked: float = 0.0  # seconds wait() spent (real wait plus sleep)
    waited_at: float = 0.0  # when wait() was called
    sent: float | None = None  # when this rank's own bytes have left its links; a wait past it is for its peers


@dataclass
class Emulator:
    """This rank's outbound links and what it sent over them."""
    links: LinkModel
    ranks_per_node: int
    rank: int
    describe: Callable[[str], str] | None = None  # names a record (benchmarks' breakdowns)
    node_of: Callable[[int], int] | None = None  # rank -> node, where nodes are not consecutive ranks
    free_at: dict[str, float] = field(default_factory=lambda: {"inter": 0.0, "intra": 0.0})
    records: list[Record] = field(default_factory=list)

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node if self.node_of is None else self.node_of(rank)

    def link_name(self, peer: int) -> str | None:
        if peer == self.rank:
            return None
        return "intra" if self.node(peer) == self.node(self.rank) else "inter"

    def send(self, bytes_to: dict[int, int], what: str) -> tuple[dict[int, float], Record]:
        """Queue `bytes_to[peer]` on the links now; each peer's arrival time, and the record."""
        now = time.perf_counter()
        by_link = {"inter": 0, "intra": 0}
        for peer, num_bytes in bytes_to.items():
            if (name := self.link_name(peer)) is not None:
                by_link[name] += num_bytes
        departs = {}
        for name, num_bytes in by_link.items():
            link = getattr(self.links, name)
            start = max(now, self.free_at[name])
            departs[name] = self.free_at[name] = start + link.transfer_seconds(num_bytes)
        arrivals = {peer: now if (name := self.link_name(peer)) is None
                    else departs[name] + getattr(self.links, name).latency for peer in bytes_to}
        what = self.describe(what) if self.describe else what
        record = Record(what, by_link["inter"], by_link["intra"], now, max(departs.values()), sent=max(departs.values()))
        self.records.append(record)
        return arrivals, record


class _EmulatedWork:
    """A Work whose wait() returns no earlier than the modelled deadline."""

    def __init__(self, works: Sequence, record: Record, deadline_of):
        self._works, self._record, self._deadline_of = works, record, deadline_of

    def wait(self, timeout=None) -> bool:
        start = self._record.waited_at = time.perf_counter()
        for work in self._works:
            if work is not None:
                work.wait()
        self._record.deadline = max(self._record.deadline, self._deadline_of())
        _sleep_until(self._record.deadline)
        self._record.blocked += time.perf_counter() - start
        return True

    def is_completed(self) -> bool:
        return all(w is None or w.is_completed() for w in self._works) and \
            time.perf_counter() >= self._record.deadline


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _row_bytes(tensor: torch.Tensor) -> int:
    return tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0


def _all_to_all_single(emulator: Emulator, original, output, input, output_split_sizes=None,
                       input_split_sizes=None, group=None, async_op=False):
    ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    splits = input_split_sizes or [input.shape[0] // len(ranks)] * len(ranks)
    arrivals, record = emulator.send({peer: n * _row_bytes(input) for peer, n in zip(ranks, splits)},
                                     "all_to_all")
    stamps_out = torch.tensor([arrivals[peer] for peer in ranks], dtype=torch.float64)
    stamps_in = torch.empty_like(stamps_out)
    works = [original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=True),
             original(stamps_in, stamps_out, group=group, async_op=True)]
    work = _EmulatedWork(works, record, lambda: float(stamps_in.max()))
    if async_op:
        return work
    work.wait()
    return None


def _batch_isend_irecv(emulator: Emulator, original, ops: list) -> list:
    """Each message is followed by its arrival deadline (tag _STAMP_TAG), sent by the sender."""
    wrapped, plan = [], []
    for op in ops:
        stamp = torch.empty(1, dtype=torch.float64)
        if op.op is dist.isend:
            arrivals, record = emulator.send({op.peer: op.tensor.numel() * op.tensor.element_size()}, "send")
            stamp[0] = arrivals[op.peer]
            stamp_op = dist.P2POp(dist.isend, stamp, op.peer, op.group, tag=_STAMP_TAG)
        else:
            record = Record("recv", 0, 0, time.perf_counter())
            stamp_op = dist.P2POp(dist.irecv, stamp, op.peer, op.group, tag=_STAMP_TAG)
        wrapped += [op, stamp_op]
        plan.append((record, stamp, op.op is dist.isend))
    works = original(wrapped)
    result = []
    for i, (record, stamp, is_send) in enumerate(plan):
        deadline_of = (lambda r=record: r.deadline) if is_send else (lambda s=stamp: float(s[0]))
        result.append(_EmulatedWork(works[2 * i: 2 * i + 2], record, deadline_of))
    return result


@contextmanager
def emulated_links(links: LinkModel, ranks_per_node: int, describe: Callable[[str], str] | None = None,
                   node_of: Callable[[int], int] | None = None) -> Iterator[Emulator]:
    """Emulate `links` for this process's collectives inside the block (see the module doc);
    `describe(kind)` names each record, e.g. from the caller's stack; `node_of(rank)` places the
    ranks on nodes where consecutive ranks do not share one."""
    emulator = Emulator(links, ranks_per_node, dist.get_rank(), describe, node_of)
    a2a, p2p = dist.all_to_all_single, dist.batch_isend_irecv
    with mock.patch.object(dist, "all_to_all_single", lambda *a, **k: _all_to_all_single(emulator, a2a, *a, **k)), \
            mock.patch.object(dist, "batch_isend_irecv", lambda ops: _batch_isend_irecv(emulator, p2p, ops)):
        yield emulator
