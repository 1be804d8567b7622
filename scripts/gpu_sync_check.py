"""One process training a few steps, counting what stops the host: the host transfers megadual's
step makes (training/device_check.py's watch) and, on CUDA, every synchronization the CUDA caching
allocator and kernels report (torch.cuda.set_sync_debug_mode("warn")); then the memory report
(torch.cuda.max_memory_allocated on CUDA) that `python -m megadual.plan` predicts for the same flags.

    python scripts/gpu_sync_check.py [pretrain_moe.py flags]      (scripts/gpu_check.sh runs it)
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MEGADUAL_DEVICE_CHECK", "1")  # before megadual reads it

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megadual.arguments import resolve_device_defaults
from megadual.training.distributed import init_distributed  # noqa: E402
from megadual.training.loop import pretrain  # noqa: E402
from pretrain_moe import load_config  # noqa: E402


def main(argv: list[str]) -> int:
    config = load_config(argv)
    device = init_distributed(config.train.distributed_timeout_minutes, config.train.distributed_backend)
    config = resolve_device_defaults(config, device.type)
    print(f"device {device}, backend {dist.get_backend()}, world {dist.get_world_size()}", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = pretrain(config, device, log=lambda line: print(line, flush=True))
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    cuda_syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    print(f"host transfers per step (megadual's watch): {[s.host_syncs for s in result.steps]}")
    print(f"CUDA synchronizations over the run (set_sync_debug_mode): "
          f"{len(cuda_syncs) if device.type == 'cuda' else 'n/a on ' + device.type}")
    for site in sorted({f"{w.filename}:{w.lineno}" for w in cuda_syncs})[:20]:
        print(f"  {site}")
    if result.memory is not None:
        print("measured:", result.memory.format())
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
