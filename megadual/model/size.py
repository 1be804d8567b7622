"""The parameter count of the model the code builds: in all, and active for one token.

    python -m megadual.model.size @examples/deepseek_v3_671b.args

The one-process model is built on the meta device (no memory) and its parameter table summed:
`total` is the main model (embedding, layers, head); `active` what one token runs through, all of
it but the routed experts, of which each MoE layer runs top-k of its experts; the MTP modules are
counted apart (`mtp`), as DeepSeek counts them (V3: 671B main model + 14B MTP, the MTP module's
own copies of the embedding and head included there; here they are shared, not counted twice).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from megadual.arguments import parse_model_flags
from megadual.config import ModelConfig
from megadual.model.gpt import GPTChunk, full_model_stage


def meta_model(config: ModelConfig) -> GPTChunk:
    """The whole one-process model with its tensors on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return GPTChunk(config, full_model_stage(config))


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int
    mtp: int


def parameter_counts(config: ModelConfig) -> ParameterCounts:
    dense = experts = mtp = 0
    for record in meta_model(config).param_table():
        n = record.param.numel()
        if record.name.startswith("mtp."):
            mtp += n
        elif record.spec.expert:
            experts += n
        else:
            dense += n
    active_experts = experts * config.moe_router_topk // config.num_experts if config.num_experts else 0
    return ParameterCounts(dense + experts, dense + active_experts, mtp)


def describe(counts: ParameterCounts) -> str:
    return (f"parameters: {counts.total / 1e9:.1f}B total, {counts.active / 1e9:.1f}B active per token "
            f"(main model; MTP modules: {counts.mtp / 1e9:.1f}B more)")


if __name__ == "__main__":
    print(describe(parameter_counts(parse_model_flags(sys.argv[1:]).model)))
