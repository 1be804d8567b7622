"""AdamW over FP32 master weights (the learning-rate schedule: lr_schedule.py)."""
from __future__ import annotations

import torch

from megadual.config import OptimConfig


def decayed(param: torch.Tensor) -> bool:
    """Weight decay on matrices only; norms (1-D) are not decayed."""
    return param.dim() >= 2


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with two groups: the decayed parameters, then the others."""
    groups = [{"params": [p for _, p in params if decayed(p)], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in params if not decayed(p)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=True)


def adamw_group_settings(cfg: OptimConfig) -> tuple[dict, dict]:
    """The settings `build_optimizer`'s AdamW records for its decayed and its undecayed group, every
    key as torch keeps it (so a checkpoint can carry them without the optimizer)."""
    placeholders = [("matrix", torch.nn.Parameter(torch.empty(0, 0))), ("vector", torch.nn.Parameter(torch.empty(0)))]
    decay, no_decay = build_optimizer(placeholders, cfg).param_groups
    return tuple({k: v for k, v in group.items() if k != "params"} for group in (decay, no_decay))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
