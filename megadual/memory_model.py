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
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    bf16_weights: bool = False  # the model holds BF16 weights (the distributed optimizer under --bf16)

    @property
    def tokens(self) -> int:
        return self.seq * self.micro_batch

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
    GEMM inputs to the W). `kinds`: `kept` split by what the bytes are (python -m megadual.plan
    --breakdown), keyed "PART | KIND" once a stage has named the part (a layer, the head)."""
    kept: float = 0.0
    weight_inputs: float = 0.0
    transient: float = -math.inf
    transient_deferring: float = -math.inf
    kinds: Mapping[str, float] = field(default_factory=dict)

    def add(self, saved: float, gemm_inputs: float = 0.0, recomputed: bool = False, kept_inputs: float = 0.0,
            recomputed_extra: float = 0.0, kind: str | Mapping[str, float] = "unsplit") -> None:
        """The next piece in forward order: it saves `saved` bytes, `gemm_inputs` of them GEMM
        inputs; recomputed, only `kept_inputs` stay, and its backward recomputes the rest and
        `recomputed_extra` (copies of tensors still held outside the region). `kind`: what the
        saved bytes are, one name or bytes by name summing to `saved` (the kept inputs of a
        recomputed piece count as "recomputation inputs")."""
        transient = saved - kept_inputs + recomputed_extra if recomputed else -math.inf
        kept = kept_inputs if recomputed else saved
        kinds = {"recomputation inputs": kept} if recomputed else \
            dict(kind) if isinstance(kind, Mapping) else {kind: saved}
        self += Activations(kept, gemm_inputs, transient, transient, kinds)

    def named(self, part: str) -> Activations:
        """These activations with their kinds filed under `part` (kinds already filed stay)."""
        return dataclasses.replace(self, kinds={k if " | " in k else f"{part} | {k}": v
                                                for k, v in self.kinds.items()})

    def __iadd__(self, later: Activations) -> Self:
        """`later` comes after these in the forward, so its backward runs first."""
        self.transient = max(self.transient - later.kept, later.transient)
        self.transient_deferring = max(self.transient_deferring - later.kept + later.weight_inputs,
                                       later.transient_deferring)
        self.kept += later.kept
        self.weight_inputs += later.weight_inputs
        kinds = dict(self.kinds)  # a new dict: layer_activations' cached ones are shared
        for name, value in later.kinds.items():
            if value:
                kinds[name] = kinds.get(name, 0.0) + value
        self.kinds = kinds
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


def mla_latent_bytes(c: ModelConfig, s: Shape) -> float:
    """What MLA saves before its up-projections: the down-projections' outputs and their norms, and
    the latents [query input; c_KV; k_R] the up-projections read."""
    t, rope = s.tokens, c.qk_pos_emb_head_dim
    latent = (c.q_lora_rank or c.hidden_size) + c.kv_lora_rank + rope
    q_norm = 2 * c.q_lora_rank + 1 if c.q_lora_rank else 0
    return t * FP32 * (q_norm + c.kv_lora_rank + rope + c.kv_lora_rank + 1) + t * s.gemm_bytes * latent


def attention_bytes(c: ModelConfig, s: Shape) -> tuple[float, float]:
    """(saved, GEMM inputs) of the attention after its input norm, per micro-batch on one TP rank."""
    t, g = s.tokens, s.gemm_bytes
    heads = c.num_attention_heads // s.tp
    if not c.multi_latent_attention:
        groups, d = c.num_query_groups // s.tp, c.head_dim
        core = t * g * (2 * heads * d + 2 * groups * d) + t * FP32 * heads
        return core + 2 * s.seq * d * FP32, t * g * heads * d
    qk, rope, v = c.qk_head_dim + c.qk_pos_emb_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim
    latent = (c.q_lora_rank or c.hidden_size) + c.kv_lora_rank + rope
    up = t * g * (heads * qk * 2 + heads * (c.qk_head_dim + v) + heads * v) + t * FP32 * heads
    return mla_latent_bytes(c, s) + up + 2 * s.seq * rope * FP32, t * g * (latent + heads * v)


def mlp_bytes(tokens: float, ffn: int, gemm_bytes: int) -> float:
    """gate, up, silu(gate) and the down projection's input."""
    return tokens * gemm_bytes * 4 * ffn


def layer_activations(c: ModelConfig, s: Shape, layer: int, plan: RecomputePlan) -> Activations:
    """One micro-batch of one layer on one rank, selective recomputation applied, pieces in forward order."""
    return dataclasses.replace(_layer_activations(c, s, c.is_moe_layer(layer), plan))


@cache  # the planner's search asks for the same few layers thousands of times
def _layer_activations(c: ModelConfig, s: Shape, moe: bool, plan: RecomputePlan) -> Activations:
    mods, t, h, g = plan.selective_modules, s.tokens, c.hidden_size, s.gemm_bytes
    local_t = t // s.tp if s.sequence_parallel else t
    norm, norm_gemm_in = norm_bytes(s, h)
    norm_kept = local_t * FP32 * h + norm_gemm_in  # its input, and its output the GEMMs hold
    acts = Activations()
    acts.add(norm, norm_gemm_in, "layernorm" in mods, kept_inputs=norm_kept)
    saved, gemm_in = attention_bytes(c, s)
    heads = c.num_attention_heads // s.tp
    # The attention output stays (the output projection saves a view of it): a recomputed core
    # attention frees only the log-sum-exp, and its backward recomputes both.
    lse = t * FP32 * heads
    out = t * g * heads * (c.v_head_dim if c.multi_latent_attention else c.head_dim)
    if c.multi_latent_attention and {"mla_up_proj", "core_attn"} <= mods:
        acts.add(saved, gemm_in, True, kept_inputs=mla_latent_bytes(c, s) + out, recomputed_extra=out)
    else:
        acts.add(saved - lse, gemm_in)
        acts.add(lse, 0.0, "core_attn" in mods, recomputed_extra=out)
    acts.add(norm, norm_gemm_in, "layernorm" in mods, kept_inputs=norm_kept)
    if not moe:
        ffn = c.ffn_hidden_size // s.tp
        acts.add(mlp_bytes(t, ffn, g), t * g * ffn, "mlp" in mods)
    else:
        acts += moe_activations(c, s, mods)
    return acts


def moe_activations(c: ModelConfig, s: Shape, mods: frozenset[str]) -> Activations:
    """The MoE layer after the pre-MLP norm, at balanced load (see the module's doc)."""
    t, h, g, k, e = s.routed_tokens, c.hidden_size, s.gemm_bytes, c.moe_router_topk, c.num_experts
    rows = t * distinct_ranks_per_token(c, s.ep)
    pairs, f = t * k, c.moe_ffn_hidden_size
    router = t * (FP32 * (e + 2 + k) + INT64 * k) + s.micro_batch * FP32 * e
    dispatch = rows * (2 * INT64 + k) + rows * FP32 * h if s.ep > 1 else 0.0  # EP1: no dispatcher
    expert_mlp = pairs * g * 4 * f
    experts = pairs * (2 * INT64 + FP32 * (1 + 2 * h) + g * h) + expert_mlp
    shared_ffn = c.moe_shared_expert_intermediate_size // s.tp
    shared = mlp_bytes(s.tokens, shared_ffn, g)
    gemm_inputs = pairs * g * (h + f) + s.tokens * g * shared_ffn
    acts = Activations()
    if "moe" in mods:
        acts.add(router + dispatch + experts + shared, gemm_inputs, True)
        return acts
    acts.add(router + dispatch + experts - pairs * g * f, gemm_inputs - s.tokens * g * shared_ffn)
    acts.add(pairs * g * f, 0.0, "moe_act" in mods)
    acts.add(shared, s.tokens * g * shared_ffn, "shared_experts" in mods)
    return acts


def stage_activations(c: ModelConfig, s: Shape, layers: range, embedding: bool, head: bool,
                      plan: RecomputePlan) -> Activations:
    """One micro-batch of one stage (chunk) of `layers`, with the embedding and/or the head."""
    t, h = s.tokens, c.hidden_size
    acts = Activations()
    if embedding:
        acts.add(t * INT64, kind="embedding | token ids")
    full = {group.start: group for group in plan.full_layer_groups(len(layers))}
    position = 0
    while position < len(layers):
        group = full.get(position)
        if group is None:
            acts += layer_activations(c, s, layers[position], plan).named(f"layer {layers[position]}")
            position += 1
            continue
        whole = Activations()
        for i in group:
            whole += layer_activations(c, s, layers[i], RecomputePlan())
        local_t = t // s.tp if s.sequence_parallel else t
        part = Activations()
        part.add(whole.kept, whole.weight_inputs, True, kept_inputs=local_t * FP32 * h)
        acts += part.named(f"layers {layers[group.start]}-{layers[group.stop - 1]}")
        position = group.stop
    if head:
        saved, gemm_in = head_bytes(c, s)
        acts.add(saved, gemm_in, kind="head and loss | unsplit")
        for depth in range(c.mtp_num_layers):
            acts += mtp_activations(c, s, depth, plan).named(f"MTP {depth + 1}")
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
    acts.add(t * INT64 + norms + local_t * s.gemm_bytes * 2 * h, local_t * s.gemm_bytes * 2 * h)
    acts += layer_activations(c, s, c.num_layers + depth, plan)
    acts.add(*head_bytes(c, s))
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
    return peak_moment(steps, chunk_bytes, exchanges).bytes


@dataclass(frozen=True)
class PeakMoment:
    """What is alive when a rank's activations peak: `kept[c]` micro-batches of chunk c whole,
    `deferred[c]` of them down to the GEMM inputs their W still needs, and a backward of chunk
    `rising` (-1: none) above its kept bytes by `transient` (its recomputed region)."""
    bytes: float
    kept: tuple[int, ...]
    deferred: tuple[int, ...]
    rising: int = -1
    transient: float = 0.0


def peak_moment(steps: tuple[MemoryStep, ...], chunk_bytes: list[Activations],
                exchanges: list[bool] | None = None) -> PeakMoment:
    """`peak_bytes`' walk, telling what is alive at the peak."""
    kept, deferred = [0] * len(chunk_bytes), [0] * len(chunk_bytes)
    live = 0.0
    best = PeakMoment(0.0, tuple(kept), tuple(deferred))
    for forward, backward, defers_w, w in steps:
        forward_after = forward >= 0 and backward >= 0 and exchanges is not None and not exchanges[backward]
        if forward >= 0 and not forward_after:
            live += chunk_bytes[forward].kept
            kept[forward] += 1
        if backward >= 0:
            acts = chunk_bytes[backward]
            rise = max(0.0, acts.transient_deferring if defers_w else acts.transient)
            if live + rise > best.bytes:
                best = PeakMoment(live + rise, tuple(kept), tuple(deferred), backward, rise)
            live -= acts.kept
            kept[backward] -= 1
            if defers_w:
                live += acts.weight_inputs
                deferred[backward] += 1
        if forward_after:
            live += chunk_bytes[forward].kept
            kept[forward] += 1
        if w >= 0:
            live -= chunk_bytes[w].weight_inputs
            deferred[w] -= 1
        if live > best.bytes:
            best = PeakMoment(live, tuple(kept), tuple(deferred))
    return best
