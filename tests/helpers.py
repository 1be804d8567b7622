"""Shared test helpers: tiny configs and one-process / multi-process runners."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megadual.parallel import collectives
from megadual.training.distributed import default_backend, init_one_rank_group

TINY_MOE = ["--mock-data", "--vocab-size", "512", "--num-layers", "3", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "32", "--num-experts", "8",
            "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
            "--moe-shared-expert-intermediate-size", "32", "--moe-first-k-dense", "1",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
            "--lr-warmup-iters", "2", "--log-interval", "1000", "--moe-aux-loss-coeff", "1e-2"]


def device_under_test() -> torch.device:
    """MEGADUAL_TEST_DEVICE (default cpu): scripts/gpu_check.sh runs the single-process tests on cuda."""
    return torch.device(os.environ.get("MEGADUAL_TEST_DEVICE", "cpu"))


@contextmanager
def on_device_under_test():
    """Every tensor made without a device= and every module built inside, on device_under_test():
    the one-process test files that use it (the `on_device_under_test` fixture, tests/conftest.py)
    run on CUDA under scripts/gpu_check.sh. A test that passes a generator makes it there too."""
    device = device_under_test()
    with device:
        yield device


class single_process_group:
    """A one-rank world for in-process tests, on `device` (default: device_under_test()), with the
    trainer's backend for it (NCCL on CUDA, gloo on CPU) and its device contract: every step
    collective takes tensors on `device`, host values go through the host's gloo group."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or device_under_test()

    def __enter__(self):
        init_one_rank_group(default_backend(self.device))
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        collectives.use_device(self.device)
        return self.device

    def __exit__(self, *exc):
        collectives.use_device(None)
        dist.destroy_process_group()
