"""Shared test helpers: tiny configs and one-process / multi-process runners."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megadual.training.distributed import free_port

TINY_MOE = ["--mock-data", "--vocab-size", "512", "--num-layers", "3", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "32", "--num-experts", "8",
            "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
            "--moe-shared-expert-intermediate-size", "32", "--moe-first-k-dense", "1",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
            "--lr-warmup-iters", "2", "--log-interval", "1000", "--moe-aux-loss-coeff", "1e-2"]


class single_process_group:
    """A one-rank gloo world for in-process tests."""

    def __enter__(self):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        return torch.device("cpu")

    def __exit__(self, *exc):
        dist.destroy_process_group()
