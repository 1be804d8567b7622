"""Pretrain a DeepSeek-V3-style MoE transformer (Megatron-style flags; see README.md).

    python pretrain_moe.py --mock-data --vocab-size 1024 --num-experts 8 ...
    torchrun --nproc-per-node 4 pretrain_moe.py --tensor-model-parallel-size 2 ...
"""
from __future__ import annotations

import os
import sys

import torch.distributed as dist

from megadual.arguments import build_parser, parse_args, resolve_device_defaults
from megadual.config import ConfigError
from megadual.config_validate import validate_world
from megadual.data.indexed_dataset import DataFileError
from megadual.data.tokenizer import build_tokenizer
from megadual.training.checkpoint import CheckpointError
from megadual.training.distributed import init_distributed, lost_rank_message
from megadual.training.loop import NonFiniteLossError, pretrain
from megadual.training.metrics import require_tensorboard


def load_config(argv: list[str]):
    """Flags -> validated RunConfig; the tokenizer decides the vocabulary size."""
    flags, _ = build_parser().parse_known_args(argv)
    tokenizer = build_tokenizer(flags.tokenizer_type, flags.tokenizer_model, flags.vocab_size)
    return parse_args(argv, tokenizer_vocab_size=tokenizer.vocab_size)


def validate_launch(config) -> None:
    """The layout against the launcher's world (torchrun's environment; none: one process),
    before any process group: a bad layout fails at once instead of in a rendezvous."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate_world(config, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if config.train.tensorboard_dir:
        require_tensorboard()
    check_exit_signal_forwarded(config)


def check_exit_signal_forwarded(config) -> None:
    """Under torchrun, --exit-signal must be one its agent passes on to the workers (its
    --signals-to-handle, which it puts in the workers' environment): any other signal kills the
    agent, and the workers with it, before any rank can save."""
    forwarded = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    signal = config.train.exit_signal
    if not config.train.exit_signal_handler or forwarded is None or \
            signal in [name.strip() for name in forwarded.split(",")]:
        return
    raise ConfigError(f"--exit-signal {signal}: torchrun passes on only {forwarded} (its --signals-to-handle), so "
                      f"{signal} would end it and its workers without a save; give torchrun --signals-to-handle "
                      f"{forwarded},{signal} (scripts/pretrain_moe.sh does)")


def fail(message, status: int) -> int:
    print(f"pretrain_moe.py: error: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """0 when the run trained to the end or stopped as asked (signal, time budget), 2 for bad
    flags, 1 for bad data, checkpoints (a last save that failed included), divergence or a lost
    rank: each one line on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = load_config(argv)
        validate_launch(config)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return fail(e, 2)
    try:
        device = init_distributed(config.train.distributed_timeout_minutes, config.train.distributed_backend)
        config = resolve_device_defaults(config, device.type)
        if dist.get_rank() == 0:
            print(f" megadual: world size {dist.get_world_size()}, device {device}, config {config}", flush=True)
        pretrain(config, device, log=lambda line: print(line, flush=True))
    except (ConfigError, FileNotFoundError, DataFileError, CheckpointError, NonFiniteLossError) as e:
        return fail(e, 1)
    except RuntimeError as e:
        lost = lost_rank_message(e, config.train.distributed_timeout_minutes)
        if lost is None:
            raise
        return fail(lost, 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
