"""YaRN RoPE scaling as DeepSeek-V2/V3 use it (their config's `rope_scaling`, Hugging Face's reading of it).

With a context extension factor s > 1 and the original context L:
- frequencies: a channel pair turning more than beta_fast times over L keeps its frequency, one
  turning fewer than beta_slow times is divided by s, and those in between blend linearly by
  channel index (the bounds are the channel indices of those rotation counts, floored and ceiled);
- RoPE's cos and sin are multiplied by mscale(s, --mscale) / mscale(s, --mscale-all-dim), or by
  mscale(s, 1) when either is 0 (as Hugging Face does);
- the softmax scale is multiplied by mscale(s, --mscale-all-dim)^2 (MLA's, see mla.py);
where mscale(s, m) = 0.1 m ln(s) + 1. DeepSeek-V3: s = 40, L = 4096, beta 32 / 1, mscale and
mscale-all-dim 1, so the magnitude is 1 and the softmax scale grows by 1.369^2.
"""
from __future__ import annotations

import math

import torch

from megadual.config import ModelConfig
from megadual.model.layers import rotary_frequencies


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(head_dim: int, base: float, factor: float, original_max_positions: int,
                     beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Each channel pair's angle per position (float64), interpolated by `factor` where it turns slowly."""
    frequencies = rotary_frequencies(head_dim, base)

    def channel_turning(rotations: float) -> float:  # the channel whose pair turns `rotations` times over L
        return head_dim * math.log(original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(channel_turning(beta_fast)), 0)
    high = min(math.ceil(channel_turning(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    interpolated = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return frequencies / factor * interpolated + frequencies * (1 - interpolated)


def rope_magnitude(config: ModelConfig) -> float:
    """What YaRN multiplies RoPE's cos and sin by (1 without scaling)."""
    factor = config.rope_scaling_factor
    if config.mscale and config.mscale_all_dim:
        return yarn_mscale(factor, config.mscale) / yarn_mscale(factor, config.mscale_all_dim)
    return yarn_mscale(factor, 1.0)


def mla_rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """The frequencies of MLA's decoupled RoPE channels: plain RoPE, or YaRN's when scaled."""
    dim, base = config.qk_pos_emb_head_dim, config.rotary_base
    if config.rope_scaling_factor <= 1.0:
        return rotary_frequencies(dim, base)
    return yarn_frequencies(dim, base, config.rope_scaling_factor, config.original_max_position_embeddings,
                            config.beta_fast, config.beta_slow)
