"""AdamW over FP32 master weights, and Megatron's warmup + decay learning-rate schedule."""
from __future__ import annotations

import math

import torch

from megadual.config import OptimConfig


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms (1-D) are not decayed."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=True)


def learning_rate(iteration: int, cfg: OptimConfig, train_iters: int) -> float:
    """LR for the update made at `iteration` (0-based): linear warmup, then decay to min_lr."""
    decay_iters = cfg.lr_decay_iters or train_iters
    if cfg.lr_warmup_iters and iteration < cfg.lr_warmup_iters:
        return cfg.lr * (iteration + 1) / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    span = max(1, decay_iters - cfg.lr_warmup_iters)
    progress = min(1.0, (iteration - cfg.lr_warmup_iters) / span)
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
