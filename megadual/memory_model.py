"""The memory of one rank, counted before launch: what `python -m megadual.plan` predicts and the
memory report (training/memory.py) measures.

Parameters, gradients and optimizer state are counted per parameter tensor of the stages a rank
holds (DualPipe: both copies). Activations are counted per micro-batch and stage, layer type by
layer type, as the tensors our layers save for the backward (fp32 unless said otherwise):

    norm (RMSNorm)       its input, 1/rms, the normed values, its output (saved by the next GEMM)
    MHA                  q, k, v, the attention output and the log-sum-exp; RoPE tables (per position)
    MLA                  the latents and their norms, q and k (with RoPE), the key/value up-projection,
                         the attention output and the log-sum-exp
    dense MLP / expert   gate, up, silu(gate), and the down projection's input
    router               scores, their sum, the top-k ids (int64) and gates; per sequence the balance loss's
    dispatch / combine   per sent row its source token (int64, twice: nonzero's pair) and the chosen-here mask;
                         the rows coming back (none without expert parallelism: no dispatcher)
    routed experts       per (token, expert) pair the expert's input and output, its gate, the
                         pair's row and slot (int64), and the expert MLP's own
    head and loss        the final norm, the fp32 softmax over the vocabulary, the labels
    embedding            the token ids (int64)
    MTP module (each)    the token ids, enorm and hnorm, eh_proj's input, its layer, its norm and the
                         head and loss again

How many (token, expert) pairs and rows an EP rank sees depends on the routing; the count here
is the expected one at balanced load: T x top-k pairs per rank, where T is the tokens a rank
routes, and T x (distinct ranks a token reaches) rows. Recomputation drops what a region saves
and keeps its inputs (parallel/recompute.py); the region recomputed in a backward adds its
activations for the while. The peak over a step walks the rank's schedule: each forward adds
its chunk's micro-batch activations, a backward frees them, except that a backward whose weight
gradients wait for a W (the W split) leaves the linears' inputs until that W.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache
from typing import Self

from megadual.config import ModelConfig
from megadual.parallel.recompute import RecomputePlan
from megadual.pipeline.actions import Action, Kind

FP32, INT64 = 4, 8


@dataclass(frozen=True)
class Shape:
    """What sizes one rank's layers run at: the micro-batch, TP (sequence parallel), EP, dtypes."""
    seq: int
    micro_batch: int
    tp: int = 1
    sequence_parallel: bool = False
    ep: int = 1
    gemm_bytes: int = FP32  # what a GEMM saves its input in: 4, 2 under bf16 autocast, 1 with FP8 caches
    num_groups: int = 0  # nodes (or virtual node groups) of node-limited routing; 0: none

    @property
    def tokens(self) -> int:
        return self.seq * self.micro_batch

    @property
    def local_tokens(self) -> int:
        """Tokens this TP rank holds outside TP regions (its part of the sequence under sequence parallelism)."""
        return self.tokens // self.tp if self.sequence_parallel else self.tokens

    @property
    def routed_tokens(self) -> int:
        """Tokens one TP rank routes: its part of the sequence."""
        return self.tokens // self.tp


@dataclass
class Activations:
    """Bytes one micro-batch leaves on one stage: `kept` until its backward, `weight_inputs` of those
    kept until its W when the backward defers weight gradients, and `transient`: how far its
    backward rises above `kept` when it recomputes a region (the region's activations, less what
    the backward of the pieces after it has freed by then), and `transient_deferring` the same
    for a backward that defers its weight gradients (the pieces after the region leave their
    GEMM inputs to the W)."""
    kept: float = 0.0
    weight_inputs: float = 0.0
    transient: float = -math.inf
    transient_deferring: float = -math.inf
    kinds: dict[str, float] = dataclasses.field(default_factory=dict)  # `kept` by tensor kind

    def add(self, saved: float, gemm_inputs: float = 0.0, recomputed: bool = False, kept_inputs: float = 0.0,
            recomputed_extra: float = 0.0, kind: str = "other") -> None:
        """The next piece in forward order: it saves `saved` bytes, `gemm_inputs` of them GEMM
        inputs; recomputed, only `kept_inputs` stay, and its backward recomputes the rest and
        `recomputed_extra` (copies of tensors still held outside the region)."""
        transient = saved - kept_inputs + recomputed_extra if recomputed else -math.inf
        kept = kept_inputs if recomputed else saved
        self += Activations(kept, gemm_inputs, transient, transient, {kind: kept})

    def __iadd__(self, later: Activations) -> Self:
        """`later` comes after these in the forward, so its backward runs first."""
        self.transient = max(self.transient - later.kept, later.transient)
        self.transient_deferring = max(self.transient_deferring - later.kept + later.weight_inputs,
                                       later.transient_deferring)
        self.kept += later.kept
        self.weight_inputs += later.weight_inputs
        for kind, kept in later.kinds.items():
            self.kinds[kind] = self.kinds.get(kind, 0.0) + kept
        return self


def distinct_ranks_per_token(config: ModelConfig, ep: int) -> float:
    """Expected EP ranks a token's top-k experts live on, experts drawn uniformly at random."""
    per_rank, e, k = config.num_experts // ep, config.num_experts, config.moe_router_topk
    return ep * (1.0 - math.comb(e - per_rank, k) / math.comb(e, k))


def norm_bytes(s: Shape, hidden: int) -> tuple[float, float]:
    """(saved bytes, of which the GEMM input) of an RMSNorm followed by GEMMs: its input, 1/rms and
    the normed values (fp32, this rank's tokens under sequence parallelism), and its output as
    the GEMMs save it (the whole sequence)."""
    own = s.tokens // (s.tp if s.sequence_parallel else 1) * FP32 * (2 * hidden + 1)
    return own + s.tokens * s.gemm_bytes * hidden, s.tokens * s.gemm_bytes * hidden


def ceil_div(n: float, d: int) -> float:
    return -(-n // d)


def codec_bytes(rows: float, cols: int) -> float:
    """An E4M3 copy of [rows, cols] in 1 x 128 tiles along cols, with its FP32 scales (moe_act's cache)."""
    return rows * cols + rows * ceil_div(cols, 128) * FP32


def mla_latent_bytes(c: ModelConfig, s: Shape) -> tuple[float, float]:
    """(saved, of which the norms' own) before MLA's up-projections: the down-projections' outputs (the
    key/value one whole, the latent norm reads a view of it), the latent norms' 1/rms and normed
    values (this rank's tokens), and the latents [query input; c_KV; k_R] the up-projections read."""
    lt, rope, kv = s.local_tokens, c.qk_pos_emb_head_dim, c.kv_lora_rank
    latent = (c.q_lora_rank or c.hidden_size) + kv + rope
    q_down = lt * FP32 * c.q_lora_rank
    norms = lt * FP32 * ((c.q_lora_rank + 1 if c.q_lora_rank else 0) + kv + 1)
    return q_down + lt * FP32 * (kv + rope) + norms + s.tokens * s.gemm_bytes * latent, norms


def attention_pieces(c: ModelConfig, s: Shape, mods: frozenset[str]) -> list[tuple[str, float, float, bool, float]]:
    """The attention after its input norm as (kind, saved, GEMM inputs, recomputed, kept if recomputed)
    in forward order. SDPA's fused kernel keeps q, k, v, its output and the log-sum-exp; MLA's values
    and output are padded to the query/key head dim (model/mla.py)."""
    t, g = s.tokens, s.gemm_bytes
    heads = c.num_attention_heads // s.tp
    lse = t * FP32 * heads
    if not c.multi_latent_attention:
        groups, d = c.num_query_groups // s.tp, c.head_dim
        qkv = t * g * (heads * d + 2 * groups * d)
        out = t * g * heads * d
        # SDPA's output is [s, b, heads, d] in memory: the output projection keeps a view of it, so a
        # recomputed core attention frees only the log-sum-exp
        return [("attention: q, k, v", qkv + 2 * s.seq * d * FP32, 0.0, False, 0.0),
                ("attention: core", out + lse, out, "core_attn" in mods, out)]
    qk, v = c.qk_head_dim + c.qk_pos_emb_head_dim, c.v_head_dim
    latents, norms = mla_latent_bytes(c, s)
    norm_recomputed = bool({"layernorm", "mla_up_proj"} & mods)
    tables = 2 * s.seq * c.qk_pos_emb_head_dim * FP32
    q_k = 2 * t * g * heads * qk
    kv_up = t * g * heads * (c.qk_head_dim + v)  # what core_attn keeps of v: the key/value up-projection
    core = 2 * t * g * heads * qk + lse  # the padded values and output, the log-sum-exp
    latent_gemm_in = t * g * ((c.q_lora_rank or c.hidden_size) + c.kv_lora_rank + c.qk_pos_emb_head_dim)
    pieces = [("MLA: latents", latents, latent_gemm_in, norm_recomputed, latents - norms)]
    if {"mla_up_proj", "core_attn"} <= mods:
        pieces.append(("MLA: up-projections and core", tables + q_k + core, 0.0, True, 0.0))
    else:
        pieces.append(("MLA: q, k (RoPE tables)", tables + q_k, 0.0, "mla_up_proj" in mods, q_k))
        pieces.append(("MLA: core", core, 0.0, "core_attn" in mods, kv_up if "core_attn" in mods else 0.0))
    pieces.append(("attention: proj input", t * g * heads * v, t * g * heads * v, False, 0.0))
    return pieces


def mlp_bytes(tokens: float, ffn: int, gemm_bytes: int) -> float:
    """gate, up (kept by the SwiGLU, which recomputes silu(gate)) and the down projection's input."""
    return tokens * gemm_bytes * 3 * ffn


def layer_activations(c: ModelConfig, s: Shape, layer: int, plan: RecomputePlan) -> Activations:
    """One micro-batch of one layer on one rank, selective recomputation applied, pieces in forward order."""
    acts = _layer_activations(c, s, c.is_moe_layer(layer), plan)
    return dataclasses.replace(acts, kinds=dict(acts.kinds))


def layer_breakdown(c: ModelConfig, s: Shape, layer: int, plan: RecomputePlan) -> dict[str, float]:
    """Bytes one micro-batch of `layer` keeps for its backward on one rank, by tensor kind."""
    return dict(layer_activations(c, s, layer, plan).kinds)


@cache  # the planner's search asks for the same few layers thousands of times
def _layer_activations(c: ModelConfig, s: Shape, moe: bool, plan: RecomputePlan) -> Activations:
    mods, t, h, g = plan.selective_modules, s.tokens, c.hidden_size, s.gemm_bytes
    norm, norm_gemm_in = norm_bytes(s, h)
    norm_kept = s.local_tokens * FP32 * h + norm_gemm_in  # its input, and its output the GEMMs hold
    acts = Activations()
    acts.add(norm, norm_gemm_in, "layernorm" in mods, kept_inputs=norm_kept, kind="input norm")
    for kind, saved, gemm_in, recomputed, kept in attention_pieces(c, s, mods):
        acts.add(saved, gemm_in, recomputed, kept_inputs=kept, kind=kind)
    acts.add(norm, norm_gemm_in, "layernorm" in mods, kept_inputs=norm_kept, kind="pre-MLP norm")
    if not moe:
        ffn = c.ffn_hidden_size // s.tp
        acts.add(mlp_bytes(t, ffn, g), t * g * ffn, "mlp" in mods, kind="MLP")
    else:
        acts += moe_activations(c, s, mods)
    return acts


def moe_activations(c: ModelConfig, s: Shape, mods: frozenset[str]) -> Activations:
    """The MoE layer after the pre-MLP norm, at balanced load (see the module's doc)."""
    t, h, g, k, e = s.routed_tokens, c.hidden_size, s.gemm_bytes, c.moe_router_topk, c.num_experts
    rows = t * distinct_ranks_per_token(c, s.ep)
    pairs, f = t * k, c.moe_ffn_hidden_size
    router = t * (FP32 * (e + 2 + k) + INT64 * k) + s.micro_batch * FP32 * e
    dispatch = rows * (2 * INT64 + k) if s.ep > 1 else 0.0  # EP1: no dispatcher
    # per pair: its row and slot (int64), the gathered row, the gate; gate, up and the down's input
    gathered = pairs * (2 * INT64 + g * h + g)
    swiglu_in = codec_bytes(pairs, f) * 2 if "moe_act" in mods else pairs * g * 2 * f
    shared_ffn = c.moe_shared_expert_intermediate_size // s.tp
    shared = mlp_bytes(s.tokens, shared_ffn, g)
    acts = Activations()
    if "moe" in mods:
        acts.add(router + dispatch + gathered + swiglu_in + pairs * g * f + shared,
                 pairs * g * (h + f) + s.tokens * g * shared_ffn, True, kind="MoE (recomputed)")
        return acts
    acts.add(router, kind="router")
    acts.add(dispatch, kind="dispatch and combine")
    acts.add(gathered, pairs * g * h, kind="experts: rows, gates")
    acts.add(swiglu_in, kind="experts: SwiGLU input")
    acts.add(pairs * g * f, pairs * g * f, kind="experts: down input")
    acts.add(shared, s.tokens * g * shared_ffn, "shared_experts" in mods, kind="shared expert")
    return acts


def stage_activations(c: ModelConfig, s: Shape, layers: range, embedding: bool, head: bool,
                      plan: RecomputePlan) -> Activations:
    """One micro-batch of one stage (chunk) of `layers`, with the embedding and/or the head."""
    t, h = s.tokens, c.hidden_size
    acts = Activations()
    if embedding:
        acts.add(t * INT64, kind="token ids")
    full = {group.start: group for group in plan.full_layer_groups(len(layers))}
    position = 0
    while position < len(layers):
        group = full.get(position)
        if group is None:
            acts += layer_activations(c, s, layers[position], plan)
            position += 1
            continue
        whole = Activations()
        for i in group:
            whole += layer_activations(c, s, layers[i], RecomputePlan())
        local_t = t // s.tp if s.sequence_parallel else t
        acts.add(whole.kept, whole.weight_inputs, True, kept_inputs=local_t * FP32 * h,
                 kind="recomputed layers' inputs")
        position = group.stop
    if head:
        acts.add(*head_bytes(c, s), kind="head and loss")
        for depth in range(c.mtp_num_layers):
            acts += mtp_activations(c, s, depth, plan)
    return acts


def head_bytes(c: ModelConfig, s: Shape) -> tuple[float, float]:
    """(saved, GEMM inputs) of the final norm, the head and the loss."""
    saved, gemm_in = norm_bytes(s, c.hidden_size)
    return saved + s.tokens * (FP32 * c.vocab_size // s.tp + INT64 + 1), gemm_in


def mtp_activations(c: ModelConfig, s: Shape, depth: int, plan: RecomputePlan) -> Activations:
    """One MTP module (model/mtp.py) after the head: the embedded token ids, enorm and hnorm, eh_proj's
    input [2h], its transformer layer (selective recomputation applied), its norm, the shared head."""
    t, h = s.tokens, c.hidden_size
    local_t = t // s.tp if s.sequence_parallel else t
    norms = 2 * local_t * FP32 * (2 * h + 1)
    acts = Activations()
    acts.add(t * INT64 + norms + local_t * s.gemm_bytes * 2 * h, local_t * s.gemm_bytes * 2 * h, kind="MTP inputs")
    acts += layer_activations(c, s, c.num_layers + depth, plan)
    acts.add(*head_bytes(c, s), kind="head and loss")
    return acts


MemoryStep = tuple[int, int, bool, int]  # chunk of the forward, of the backward, BI (defers a W), W's; -1: none


def memory_steps(actions: list[Action]) -> tuple[MemoryStep, ...]:
    """The actions of a rank's schedule that change its activations, as `peak_bytes` walks them."""
    steps = []
    for action in actions:
        forward, backward = action.forward_of, action.backward_of
        step = (forward[0] if forward else -1, backward[0] if backward else -1, action.kind == Kind.BI,
                action.chunk if action.kind == Kind.W else -1)
        if step != (-1, -1, False, -1):
            steps.append(step)
    return tuple(steps)


def peak_bytes(steps: tuple[MemoryStep, ...], chunk_bytes: list[Activations],
               exchanges: list[bool] | None = None) -> float:
    """The most activation bytes alive at once on a rank running `steps` (`memory_steps`): each
    forward adds its chunk's micro-batch, a backward frees it (a BI all but its GEMM inputs, which
    its W frees); the backward's recomputed region comes on top. A paired F&B holds both while it
    runs when the backward's chunk has expert all-to-alls (`exchanges`, by chunk; default: all
    have), whose waits run the forward (pipeline/overlap.py); without any, the forward runs after
    the backward."""
    live = peak = 0.0
    for forward, backward, defers_w, w in steps:
        forward_after = forward >= 0 and backward >= 0 and exchanges is not None and not exchanges[backward]
        if forward >= 0 and not forward_after:
            live += chunk_bytes[forward].kept
        if backward >= 0:
            acts = chunk_bytes[backward]
            peak = max(peak, live + max(0.0, acts.transient_deferring if defers_w else acts.transient))
            live -= acts.kept
            if defers_w:
                live += acts.weight_inputs
        if forward_after:
            live += chunk_bytes[forward].kept
        if w >= 0:
            live -= chunk_bytes[w].weight_inputs
        peak = max(peak, live)
    return peak
