"""Every collective of megadual, under one device contract.

A training step's collectives take tensors on the run's device (`use_device`, set once by
training/distributed.py): NCCL accepts nothing else, and a host tensor there would also stop
the host until the device caught up. Each tensor is checked before it is handed to
torch.distributed (its device, a dtype NCCL carries, contiguity) and a tensor that breaks the
contract raises naming the line that passed it - a few attribute reads, so the check stays on.

Values that belong on the host (a checkpoint step's outcome, the stop vote) go through
`host_group()`, a gloo group over the world made here and nowhere else, with CPU tensors.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

# What ProcessGroupNCCL carries (float8 travels as uint8 views; see moe/dispatcher.py's codec).
NCCL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                         torch.int32, torch.int64, torch.bool})


class ContractError(RuntimeError):
    """A collective given a tensor that would fail (or stall the host) under NCCL on the run's device."""


class _State:
    device: torch.device | None = None  # None: not set (a test that built its own group); devices unchecked
    timeout: timedelta | None = None  # the host group's (--distributed-timeout-minutes; None: torch's)
    host: tuple[object, object] | None = None  # (the world group it was made for, the gloo group)


_state = _State()


def use_device(device: torch.device | None, timeout: timedelta | None = None) -> None:
    """The device every step collective's tensors must be on (None: any), and how long the host
    group's collectives wait (a stopped rank must end the run there too)."""
    _state.device = None if device is None else torch.device(device)
    _state.timeout = timeout


_HERE = os.path.abspath(__file__)
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))


def call_site() -> str:
    """`file:line (function)` of the nearest frame outside this module and torch."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != _HERE and not path.startswith(_TORCH):
            return f"{os.path.relpath(path)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def check(tensor: torch.Tensor, call: str, host: bool = False) -> torch.Tensor:
    """Raise ContractError naming the caller unless `tensor` may enter `call`: on the run's device
    (on the CPU for a `host` collective), of an NCCL dtype, contiguous."""
    wanted = torch.device("cpu") if host else _state.device
    if wanted is not None and tensor.device != wanted:
        where = "the host group takes CPU tensors" if host else \
            f"this run's collectives take tensors on {wanted} (host values go through collectives.host_group())"
        raise ContractError(f"{call_site()}: {call} of a tensor on {tensor.device}; {where}")
    if tensor.dtype not in NCCL_DTYPES:
        raise ContractError(f"{call_site()}: {call} of a {tensor.dtype} tensor, which NCCL does not carry")
    if not tensor.is_contiguous():
        raise ContractError(f"{call_site()}: {call} of a non-contiguous tensor (NCCL sends the storage as it lies)")
    return tensor


def size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


# The step's collectives: `group` None is the world, as in torch.distributed.

def all_reduce(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM, async_op: bool = False):
    return dist.all_reduce(check(tensor, "all_reduce"), op=op, group=group, async_op=async_op)


def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, group=None) -> None:
    for part in parts:
        check(part, "all_gather")
    dist.all_gather(parts, check(tensor, "all_gather"), group=group)


def all_gather_single(out: torch.Tensor, tensor: torch.Tensor, group=None) -> None:
    dist.all_gather_single(check(out, "all_gather_single"), check(tensor, "all_gather_single"), group=group)


def reduce_scatter(out: torch.Tensor, parts: list[torch.Tensor], group=None) -> None:
    for part in parts:
        check(part, "reduce_scatter")
    dist.reduce_scatter(check(out, "reduce_scatter"), parts, group=group)


def reduce_scatter_single(out: torch.Tensor, tensor: torch.Tensor, group=None) -> None:
    dist.reduce_scatter_single(check(out, "reduce_scatter_single"), check(tensor, "reduce_scatter_single"),
                               group=group)


def all_to_all_single(out: torch.Tensor, tensor: torch.Tensor, output_splits=None, input_splits=None,
                      group=None, async_op: bool = False):
    return dist.all_to_all_single(check(out, "all_to_all_single"), check(tensor, "all_to_all_single"),
                                  output_splits, input_splits, group=group, async_op=async_op)


def send(tensor: torch.Tensor, peer: int, group=None) -> dist.P2POp:
    """A send for `batch_isend_irecv`."""
    return dist.P2POp(dist.isend, check(tensor, "isend"), peer, group)


def receive(tensor: torch.Tensor, peer: int, group=None) -> dist.P2POp:
    """A receive for `batch_isend_irecv`."""
    return dist.P2POp(dist.irecv, check(tensor, "irecv"), peer, group)


def batch_isend_irecv(ops: list[dist.P2POp]) -> list:
    return dist.batch_isend_irecv(ops)


def barrier(group=None) -> None:
    dist.barrier(group=group)


# The host's collectives.

def host_group():
    """The gloo group over the world for host values (None before the world starts). Made on the
    first call after the world starts, which every rank reaches at the same point (the checkpoint
    manager's start-up, before any step)."""
    if not dist.is_initialized():
        return None
    world = dist.group.WORLD
    if _state.host is None or _state.host[0] is not world:
        _state.host = (world, dist.new_group(backend="gloo", timeout=_state.timeout))
    return _state.host[1]


def host_all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a CPU tensor over the world through the host group (in place; returned)."""
    group = host_group()
    if size(group) > 1:
        dist.all_reduce(check(tensor, "host all_reduce", host=True), op=op, group=group)
    return tensor
