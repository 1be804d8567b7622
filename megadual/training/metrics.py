"""Megatron-shaped log lines, printed by one rank, and optional TensorBoard scalars."""
from __future__ import annotations

import math

from megadual.config_validate import ConfigError
from megadual.training.step import StepResult


class IntervalLog:
    """Averages what happened since the last printed line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.iterations = self.skipped = self.nan = 0
        self.seconds = self.lm_loss = self.aux_loss = 0.0
        self.load_ratio = self.nodes_mean = 0.0
        self.nodes_max = 0

    def add(self, result: StepResult, seconds: float) -> None:
        self.iterations += 1
        self.seconds += seconds
        self.nan += int(not math.isfinite(result.lm_loss))
        if result.skipped:
            self.skipped += 1
            return
        self.lm_loss += result.lm_loss
        self.aux_loss += result.routing.aux_loss
        self.load_ratio = max(self.load_ratio, result.routing.max_over_mean_load)
        self.nodes_mean += result.routing.nodes_per_token_mean
        self.nodes_max = max(self.nodes_max, result.routing.nodes_per_token_max)
        self.grad_norm = result.grad_norm


def format_iteration(iteration: int, train_iters: int, consumed: int, lr: float, global_batch: int,
                     tokens_per_batch: int, log: IntervalLog, is_moe: bool) -> str:
    ms = 1000.0 * log.seconds / max(1, log.iterations)
    counted = max(1, log.iterations - log.skipped)
    parts = [f" iteration {iteration:8d}/{train_iters:8d}",
             f"consumed samples: {consumed:12d}",
             f"elapsed time per iteration (ms): {ms:.1f}",
             f"tokens per second: {tokens_per_batch / max(ms, 1e-9) * 1000.0:.1f}",
             f"learning rate: {lr:.6E}",
             f"global batch size: {global_batch:5d}"]
    if log.iterations > log.skipped:
        parts.append(f"lm loss: {log.lm_loss / counted:.6E}")
        if is_moe:
            parts += [f"load_balancing_loss: {log.aux_loss / counted:.6E}",
                      f"moe max/mean expert load: {log.load_ratio:.3f}",
                      f"moe nodes per token: mean {log.nodes_mean / counted:.2f} max {log.nodes_max}"]
        parts.append(f"grad norm: {log.grad_norm:.3f}")
    parts += [f"number of skipped iterations: {log.skipped:3d}", f"number of nan iterations: {log.nan:3d}"]
    return " | ".join(parts) + " |"


def format_validation(iteration: int, loss: float) -> str:
    ppl = math.exp(min(20.0, loss))
    line = f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
    bar = "-" * len(line)
    return f"{bar}\n{line}\n{bar}"


class TensorBoard:
    """Writes scalars when --tensorboard-dir is given and tensorboard is installed."""

    def __init__(self, log_dir: str | None):
        self.writer = None
        if log_dir:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir)

    def scalars(self, iteration: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, iteration)
            self.writer.flush()


def require_tensorboard() -> None:
    """--tensorboard-dir needs the tensorboard package; the entry point asks before any work."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)") from None
