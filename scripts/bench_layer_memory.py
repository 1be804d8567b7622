"""Bytes one MLA + MoE decoder layer keeps for its backward, per token, at DeepSeek-V3's dimensions,
measured with the memory report's saved-tensor hooks (training/memory.py) on one layer's forward.

    python scripts/bench_layer_memory.py [--seq 256] [--precision bf16-fp8] [--recompute-modules ...]

The layer is V3's (hidden 7168, 128 heads, MLA ranks q 1536 / kv 512 / qk 128 / rope 64 / v 128,
8 routed of 256 experts with FFN 2048, one shared expert of 2048), one process, micro-batch 1,
measured as the EP rank that holds a token's 8 experts (see build_layer). Precision
`bf16-fp8` is DeepSeek's: BF16 weights and autocast, FP8 GEMMs; the default recomputation is
DeepSeek's too (the norms and MLA's up-projections; the SwiGLU from its FP8-cached input). Prints
one markdown row: KB (1000 bytes) per token.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megadual.model.block import TransformerLayer
from megadual.model.yarn import mla_rope_frequencies
from megadual.moe.experts import RoutedExperts
from megadual.parallel.context import BuildContext
from megadual.parallel.linear import linear
from megadual.parallel.recompute import Recompute
from megadual.training.memory import saved_by
from pretrain_moe import load_config

V3 = ["--mock-data", "--vocab-size", "512", "--num-layers", "1", "--hidden-size", "7168",
      "--num-attention-heads", "128", "--multi-latent-attention", "--q-lora-rank", "1536", "--kv-lora-rank", "512",
      "--qk-head-dim", "128", "--qk-pos-emb-head-dim", "64", "--v-head-dim", "128", "--num-experts", "256",
      "--moe-router-topk", "8", "--moe-ffn-hidden-size", "2048", "--moe-shared-expert-intermediate-size", "2048",
      "--moe-first-k-dense", "0", "--micro-batch-size", "1", "--global-batch-size", "1"]
PRECISIONS = {"fp32": (False, False), "bf16": (True, False), "fp8": (False, True), "bf16-fp8": (True, True)}
# DeepSeek recomputes the norms and MLA's up-projections (mla_up_proj: one region from the latents
# through the core attention, so q, k, v are not kept; core_attn adds nothing to it), and the SwiGLU
# from its FP8 input
DEEPSEEK_RECOMPUTE = ["layernorm", "mla_up_proj", "core_attn", "moe_act"]


def build_layer(seq: int, bf16: bool, fp8: bool) -> tuple[TransformerLayer, object]:
    config = load_config(V3 + ["--seq-length", str(seq)]).model
    gemm = linear
    if fp8:
        from megadual.fp8 import linear as fp8
        gemm = fp8.fp8_linear
    with torch.device("meta"):
        layer = TransformerLayer(config, 0, BuildContext(gemm=gemm))
        # One EP rank's share: every token's 8 experts on it (the router's bias steers them to the
        # first 8), only those 8 built, so the weights fit a small machine and every expert GEMM
        # runs; what the layer keeps depends on the (token, expert) pairs, not on which weights they meet.
        layer.mlp.experts = RoutedExperts(config, 0, config.moe_router_topk, gemm)
    layer = layer.to_empty(device="cpu")
    layer.attention.rope_frequencies = mla_rope_frequencies(config)  # a plain tensor, made on meta
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for module in layer.modules():
            if type(module).__name__ == "RMSNorm":
                module.weight.fill_(1.0)
        layer.mlp.router.expert_bias.zero_()[:config.moe_router_topk] = 100.0
    return (layer.to(torch.bfloat16) if bf16 else layer), config


def measure(seq: int, precision: str, modules: list[str]) -> tuple[int, object]:
    """(bytes saved, the model config) of one layer's forward."""
    bf16, fp8 = PRECISIONS[precision]
    layer, config = build_layer(seq, bf16, fp8)
    recompute = Recompute(frozenset(modules))
    for module in layer.modules():
        if hasattr(module, "recompute"):
            module.recompute = recompute
    x = torch.randn(seq, 1, config.hidden_size, generator=torch.Generator().manual_seed(1))
    x = x.to(torch.bfloat16 if bf16 else torch.float32).requires_grad_()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        saved, _ = saved_by(layer.forward_steps, (x,), layer.parameters(), recompute)
    return saved, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-fp8")
    parser.add_argument("--recompute-modules", nargs="*", default=DEEPSEEK_RECOMPUTE)
    args = parser.parse_args()
    torch.manual_seed(0)
    saved, _ = measure(args.seq, args.precision, args.recompute_modules)
    print(f"| {args.precision} | {' '.join(args.recompute_modules) or '-'} | {args.seq} | "
          f"{saved / args.seq / 1000:.1f} |")


if __name__ == "__main__":
    main()
