"""Megatron-shaped log lines, printed by one rank, and optional TensorBoard scalars."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megadual.config import ConfigError
from megadual.model.mtp import mtp_loss_names
from megadual.training.step import RoutingSummary, StepResult, summary_from


def mtp_fields(mtp_losses: list[float]) -> dict[str, float]:
    """{"mtp_1 loss": ..., ...}: each MTP depth's loss under Megatron's log name."""
    return dict(zip(mtp_loss_names(len(mtp_losses)), mtp_losses))


class IntervalLog:
    """Accumulates, on the device, what happened since the last printed line: no step brings its
    logged values to the host; `totals()` brings the interval's over in one transfer when
    --log-interval prints (Megatron's way)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.iterations = self.skipped = 0
        self.seconds = 0.0
        # On the device: StepResult.values summed over the counted (not skipped) steps, the maximum
        # where RoutingSummary keeps maxima; and the count of steps with a non-finite loss.
        self.sums: torch.Tensor | None = None
        self.nan: torch.Tensor | None = None
        self.last: StepResult | None = None  # the latest counted step (its grad norm is logged)

    def add(self, result: StepResult, seconds: float) -> None:
        self.iterations += 1
        self.seconds += seconds
        nan = (~torch.isfinite(result.losses)).any().long()
        self.nan = nan if self.nan is None else self.nan + nan
        if result.skipped:
            self.skipped += 1
            return
        values = result.values
        if self.sums is None:
            self.sums = values
        else:
            summed, kept = self.sums + values, torch.maximum(self.sums, values)
            self.sums = torch.where(routing_maxima(result), kept, summed)
        self.last = result

    def totals(self) -> IntervalTotals:
        """The interval on the host, in one transfer: the nan count, the sums, the last counted step's
        values."""
        counted = self.last is not None
        parts = [self.nan.double().reshape(1)] + ([self.sums, self.last.values] if counted else [])
        values = torch.cat(parts).tolist()
        totals = IntervalTotals(self.iterations, self.skipped, int(values[0]), self.seconds)
        if counted:
            depths, width = self.last.mtp_depths, len(self.last.values)
            sums, last = values[1:1 + width], values[1 + width:]
            totals.lm_loss, totals.mtp_losses = sums[0], sums[1:1 + depths]
            totals.routing = summary_from(sums[1 + depths:])
            totals.grad_norm = self.last.grad_norm
            totals.last = {"lm loss": last[0], "grad norm": self.last.grad_norm,
                           "load_balancing_loss": summary_from(last[1 + depths:]).aux_loss,
                           **mtp_fields(last[1:1 + depths])}
        return totals


def routing_maxima(result: StepResult) -> torch.Tensor:
    """Where StepResult.values holds RoutingSummary's max_over_mean_load and nodes_per_token_max, of
    which an interval logs the maximum (none without experts)."""
    index = torch.arange(len(result.values), device=result.values.device)
    routing = 1 + result.mtp_depths
    return (index == routing + 1) | (index == routing + 3)


@dataclass
class IntervalTotals:
    """An interval's values on the host: sums over its counted (not skipped) steps, maxima for the
    routing summary's maxima; `last`: the latest counted step's scalars (TensorBoard's)."""
    iterations: int
    skipped: int
    nan: int
    seconds: float
    lm_loss: float = 0.0
    mtp_losses: list[float] = field(default_factory=list)
    routing: RoutingSummary = field(default_factory=RoutingSummary)
    grad_norm: float = 0.0
    last: dict[str, float] | None = None


def format_iteration(iteration: int, train_iters: int, consumed: int, lr: float, global_batch: int,
                     tokens_per_batch: int, log: IntervalTotals, is_moe: bool,
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
            r = log.routing
            parts += [f"load_balancing_loss: {r.aux_loss / counted:.6E}",
                      f"moe max/mean expert load: {r.max_over_mean_load:.3f}",
                      f"moe nodes per token: mean {r.nodes_per_token_mean / counted:.2f} "
                      f"max {r.nodes_per_token_max}",
                      f"moe inter-node rows per token: {r.inter_node_rows_per_token / counted:.3f}",
                      f"moe intra-node rows per token: {r.intra_node_rows_per_token / counted:.3f}"]
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
