"""Process-group start-up: torchrun's environment, or a one-process world."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from megadual.parallel import collectives


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: float | None = None, backend: str | None = None) -> torch.device:
    """Join (or, run without torchrun, create) the process group; return this rank's device, which
    every step collective's tensors must then be on (parallel/collectives.py).

    Even a single process initializes torch.distributed, so one process and many run
    the same code. `backend` (--distributed-backend) is any string init_process_group takes;
    None: NCCL on CUDA, gloo on CPU. Several ranks share GPU 0 when there are fewer GPUs than
    local ranks (only a backend such as cuda:gloo allows that; NCCL refuses it). A collective
    that waits longer than `timeout_minutes` (--distributed-timeout-minutes; None: torch's
    default) raises.
    """
    exit_with_torchrun_agent()
    alone = "RANK" not in os.environ
    if alone:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = None if timeout_minutes is None else timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        backend = backend or default_backend(device)
        if alone:
            init_one_rank_group(backend, timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    collectives.use_device(device, timeout)
    return device


def init_one_rank_group(backend: str, timeout: timedelta | None = None) -> None:
    """A world of one process, its store listening on a port the kernel gives it as it binds:
    a port found free first and bound later can be taken in between by a process beside it."""
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_torchrun_agent() -> None:
    """Under torchrun on Linux, have the kernel SIGKILL this worker as soon as its agent dies.

    torchrun starts every worker in a session of its own, so an agent killed with SIGKILL (or
    by the OOM killer) takes nobody with it, and its workers would train on and write
    checkpoints by themselves. PR_SET_PDEATHSIG is delivered by the kernel, at once, even
    while this process is blocked in a collective or holds the GIL, which a thread polling
    getppid() would not be; the kernel ties it to the thread that started us, and torchrun's
    agent starts its workers from its main thread, which lives exactly as long as the agent.
    Outside torchrun (a plain `python`, which may be meant to outlive its shell) nothing is set.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent == 1 or os.getppid() != parent:  # the agent died before the call: no signal will come
        sys.exit("pretrain_moe.py: error: the torchrun agent that started this worker is gone")


# What gloo says when a peer does not answer in time, or has gone (NCCL raises DistError).
_LOST_PEER = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")


def lost_rank_message(error: BaseException, timeout_minutes: float) -> str | None:
    """One line for a collective that failed because another rank stopped, hung or died;
    None for any other error."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not isinstance(error, dist.DistError) and not any(text in first_line for text in _LOST_PEER):
        return None
    if not dist.is_initialized():
        return (f"rank {os.environ.get('RANK', '?')}: the process group did not start within "
                f"--distributed-timeout-minutes ({timeout_minutes:g}): a rank did not join ({first_line})")
    if "Timed out" in first_line or "timeout" in first_line.lower():
        why = f"got no answer within --distributed-timeout-minutes ({timeout_minutes:g}): a rank is stopped or hung"
    else:
        why = "lost its connection to another rank, which failed or was killed"
    return f"rank {dist.get_rank()}: a collective {why} ({first_line})"
