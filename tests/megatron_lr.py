"""Megatron-LM's learning rate (OptimizerParamScheduler.get_lr), restated from its definition for
the tests that check megadual's schedule against it."""
import math


def megatron_lr(num_steps, max_lr, min_lr, warmup, decay, style, wsd_style=None, wsd_decay=None):
    """Megatron's OptimizerParamScheduler.get_lr at num_steps (warm-up from 0)."""
    if warmup > 0 and num_steps <= warmup:
        return max_lr * num_steps / warmup
    if style == "constant":
        return max_lr
    if num_steps > decay:
        return min_lr
    ratio = (num_steps - warmup) / (decay - warmup)
    if style == "linear":
        coeff = 1 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1)
    else:  # WSD
        start = decay - wsd_decay
        if num_steps <= start:
            coeff = 1.0
        else:
            r = (num_steps - start) / wsd_decay
            coeff = {"linear": 1 - r, "cosine": 0.5 * (math.cos(math.pi * r) + 1), "exponential": 2 * 0.5 ** r - 1,
                     "minus_sqrt": 1 - math.sqrt(r)}[wsd_style]
    return min_lr + coeff * (max_lr - min_lr)
