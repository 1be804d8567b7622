"""Tensor names and row orders: megadual's global names <-> Hugging Face `DeepseekV3ForCausalLM`'s.

Transformer layer i is `model.layers.<i>`; MTP module k (ours `mtp.<k>`) is `model.layers.<L + k>`
with L = --num-layers, DeepSeek's numbering of MTP layers after the last layer. An MTP layer holds,
besides a transformer layer's tensors, `enorm`, `hnorm`, `eh_proj` and `shared_head.norm` (its
norm before the head), and, in DeepSeek's released files, its own copies of the embedding
(`embed_tokens`) and head (`shared_head.head`), which megadual shares with the main model: export
writes the copies, import checks they equal the main model's.

Routed experts are stored one tensor per expert and projection (`mlp.experts.<e>.gate_proj`), the
layout of DeepSeek's files and of transformers' `save_pretrained`. The RoPE rows of the query
projection (per head) and of `kv_a_proj_with_mqa` are reordered: see model/mla.py.
"""
from __future__ import annotations

import re

import torch

from megadual.config import ModelConfig
from megadual.model.mla import half_split_to_interleaved, interleaved_to_half_split

TOP = {"embedding.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
       "output_layer.weight": "lm_head.weight"}
# A transformer layer's tensors: ours (after `layers.<i>.`) -> HF's (after `model.layers.<i>.`).
LAYER = {
    "input_norm.weight": "input_layernorm.weight",
    "pre_mlp_norm.weight": "post_attention_layernorm.weight",
    "attention.q_down.weight": "self_attn.q_a_proj.weight",
    "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attention.q_up.weight": "self_attn.q_b_proj.weight",
    "attention.q.weight": "self_attn.q_proj.weight",
    "attention.kv_down.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attention.kv_up.weight": "self_attn.kv_b_proj.weight",
    "attention.proj.weight": "self_attn.o_proj.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.expert_bias": "mlp.gate.e_score_correction_bias",
    "mlp.shared.gate.weight": "mlp.shared_experts.gate_proj.weight",
    "mlp.shared.up.weight": "mlp.shared_experts.up_proj.weight",
    "mlp.shared.down.weight": "mlp.shared_experts.down_proj.weight",
    "mlp.experts.local.{e}.gate.weight": "mlp.experts.{e}.gate_proj.weight",
    "mlp.experts.local.{e}.up.weight": "mlp.experts.{e}.up_proj.weight",
    "mlp.experts.local.{e}.down.weight": "mlp.experts.{e}.down_proj.weight",
}
# An MTP module's own tensors besides its layer's: ours (after `mtp.<k>.`) -> HF's.
MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
           "final_norm.weight": "shared_head.norm.weight"}
# The main model's tensors each MTP layer of DeepSeek's files repeats.
MTP_COPIES = {"embedding.weight": "embed_tokens.weight", "output_layer.weight": "shared_head.head.weight"}

_QUERY_PROJECTIONS = ("attention.q_up.weight", "attention.q.weight")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{e\}", r"(?P<e>\d+)"))


def _rename(name: str, table: dict[str, str]) -> str | None:
    for source, target in table.items():
        match = _pattern(source).fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    return None


def hf_name(name: str, num_layers: int) -> str:
    """The HF name of our global tensor name."""
    if name in TOP:
        return TOP[name]
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)", name) or re.fullmatch(r"mtp\.(\d+)\.layer\.(.+)", name)
    mtp = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if layer:
        index = int(layer[1]) + (num_layers if name.startswith("mtp.") else 0)
        rest = _rename(layer[2], LAYER)
    elif mtp:
        index, rest = num_layers + int(mtp[1]), _rename(mtp[2], MTP_OWN)
    else:
        rest = None
    if rest is None:
        raise KeyError(f"no Hugging Face name for megadual tensor {name}")
    return f"model.layers.{index}.{rest}"


def our_name(name: str, num_layers: int) -> str | None:
    """Our global name of an HF tensor name; None for an MTP layer's copy of the embedding or head
    (see `mtp_copy_of`). KeyError for a name megadual has no tensor for."""
    for ours, theirs in TOP.items():
        if name == theirs:
            return ours
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if layer is None:
        raise KeyError(f"megadual has no tensor for Hugging Face's {name}")
    index, rest = int(layer[1]), layer[2]
    if index < num_layers:
        ours = _rename(rest, _inverse(LAYER))
        if ours is None:
            raise KeyError(f"megadual has no tensor for Hugging Face's {name}")
        return f"layers.{index}.{ours}"
    if rest in MTP_COPIES.values():
        return None
    prefix = f"mtp.{index - num_layers}."
    own = _rename(rest, _inverse(MTP_OWN))
    ours = own if own is not None else _rename(rest, _inverse(LAYER))
    if ours is None:
        raise KeyError(f"megadual has no tensor for Hugging Face's {name}")
    return prefix + (ours if own is not None else "layer." + ours)


def mtp_copy_of(name: str) -> str | None:
    """For an MTP layer's copy of the embedding or head (`model.layers.<j>.embed_tokens.weight`),
    the name of our tensor it copies; else None."""
    rest = name.split(".", 3)[-1]
    return next((ours for ours, theirs in MTP_COPIES.items() if rest == theirs), None)


def mtp_copies(num_layers: int, mtp_num_layers: int) -> dict[str, str]:
    """HF names of the copies export writes -> the name of our tensor each copies."""
    return {f"model.layers.{num_layers + k}.{theirs}": ours
            for k in range(mtp_num_layers) for ours, theirs in MTP_COPIES.items()}


def _inverse(table: dict[str, str]) -> dict[str, str]:
    return {theirs: ours for ours, theirs in table.items()}


def _reorder_rope_rows(name: str, tensor: torch.Tensor, config: ModelConfig, reorder) -> torch.Tensor:
    rope = config.qk_pos_emb_head_dim
    if name.endswith(_QUERY_PROJECTIONS):
        per_head = tensor.view(config.num_attention_heads, -1, tensor.shape[-1])
        return torch.cat([per_head[:, :-rope], reorder(per_head[:, -rope:])], 1).view_as(tensor)
    if name.endswith("attention.kv_down.weight"):
        return torch.cat([tensor[:-rope], reorder(tensor[-rope:])])
    return tensor


def to_hf_rows(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Our tensor `name` in HF's row order (its RoPE rows interleaved, as with `rope_interleave`)."""
    return _reorder_rope_rows(name, tensor, config, half_split_to_interleaved)


def from_hf_rows(name: str, tensor: torch.Tensor, config: ModelConfig, interleaved: bool = True) -> torch.Tensor:
    """HF's tensor for our `name` in our row order; `interleaved`: the HF config's `rope_interleave`."""
    return _reorder_rope_rows(name, tensor, config, interleaved_to_half_split) if interleaved else tensor
