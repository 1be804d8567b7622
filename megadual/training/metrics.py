"""Megatron-shaped log lines, printed by one rank, and optional TensorBoard scalars."""
from __future__ import annotations

import math

from megadual.config import ConfigError
from megadual.model.mtp import mtp_loss_names
from megadual.training.step import StepResult


def mtp_fields(mtp_losses: list[float]) -> dict[str, float]:
    """{"mtp_1 loss": ..., ...}: each MTP depth's loss under Megatron's log name."""
    return dict(zip(mtp_loss_names(len(mtp_losses)), mtp_losses))


class IntervalLog:
    """Averages what happened since the last printed line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.iterations = self.skipped = self.nan = 0
        self.seconds = self.lm_loss = self.aux_loss = 0.0
        self.mtp_losses: list[float] = []
        self.load_ratio = self.nodes_mean = 0.0
        self.inter_node_rows = self.intra_node_rows = 0.0
        self.nodes_max = 0

    def add(self, result: StepResult, seconds: float) -> None:
        self.iterations += 1
        self.seconds += seconds
        self.nan += int(not all(map(math.isfinite, [result.lm_loss, *result.mtp_losses])))
        if result.skipped:
            self.skipped += 1
            return
        self.lm_loss += result.lm_loss
        sums = self.mtp_losses or [0.0] * len(result.mtp_losses)
        self.mtp_losses = [total + loss for total, loss in zip(sums, result.mtp_losses)]
        self.aux_loss += result.routing.aux_loss
        self.load_ratio = max(self.load_ratio, result.routing.max_over_mean_load)
        self.nodes_mean += result.routing.nodes_per_token_mean
        self.nodes_max = max(self.nodes_max, result.routing.nodes_per_token_max)
        self.inter_node_rows += result.routing.inter_node_rows_per_token
        self.intra_node_rows += result.routing.intra_node_rows_per_token
        self.grad_norm = result.grad_norm


def format_iteration(iteration: int, train_iters: int, consumed: int, lr: float, global_batch: int,
                     tokens_per_batch: int, log: IntervalLog, is_moe: bool,
                     flops_per_rank: float | None = None) -> str:
    """`flops_per_rank`: one iteration's model FLOPs over the ranks (--log-throughput), else None."""
    ms = 1000.0 * log.seconds / max(1, log.iterations)
    counted = max(1, log.iterations - log.skipped)
    parts = [f" iteration {iteration:8d}/{train_iters:8d}",
             f"consumed samples: {consumed:12d}",
             f"elapsed time per iteration (ms): {ms:.1f}",
             f"tokens per second: {tokens_per_batch / max(ms, 1e-9) * 1000.0:.1f}",
             *throughput(flops_per_rank, ms),
             f"learning rate: {lr:.6E}",
             f"global batch size: {global_batch:5d}"]
    if log.iterations > log.skipped:
        parts.append(f"lm loss: {log.lm_loss / counted:.6E}")
        parts += [f"{name}: {loss / counted:.6E}" for name, loss in mtp_fields(log.mtp_losses).items()]
        if is_moe:
            parts += [f"load_balancing_loss: {log.aux_loss / counted:.6E}",
                      f"moe max/mean expert load: {log.load_ratio:.3f}",
                      f"moe nodes per token: mean {log.nodes_mean / counted:.2f} max {log.nodes_max}",
                      f"moe inter-node rows per token: {log.inter_node_rows / counted:.3f}",
                      f"moe intra-node rows per token: {log.intra_node_rows / counted:.3f}"]
        parts.append(f"grad norm: {log.grad_norm:.3f}")
    parts += [f"number of skipped iterations: {log.skipped:3d}", f"number of nan iterations: {log.nan:3d}"]
    return " | ".join(parts) + " |"


def throughput(flops_per_rank: float | None, ms: float) -> list[str]:
    """Megatron's field (its digits stretched so that a CPU's fraction of a TFLOP/s shows)."""
    if flops_per_rank is None:
        return []
    return [f"throughput per GPU (TFLOP/s/GPU): {flops_per_rank / max(ms, 1e-9) / 1e9:.3f}"]


def format_validation(iteration: int, losses: dict[str, float]) -> str:
    """Megatron's validation line: value and perplexity of each loss ("lm loss", "mtp_1 loss", ...)."""
    fields = "".join(f" {name} value: {loss:.6E} | {name} PPL: {math.exp(min(20.0, loss)):.6E} |"
                     for name, loss in losses.items())
    line = f" validation loss at iteration {iteration} |{fields} "
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
