"""The memory of one rank, counted before launch: what `python -m megadual.plan` predicts and the
memory report (training/memory.py) measures.

Parameters, gradients and optimizer state are counted per parameter tensor of the stages a rank
holds (DualPipe: both copies). Activations are counted per micro-batch and stage, layer type by
layer type, as the tensors our layers save for the backward, in the dtypes a `Precision` gives them
(FP32; --bf16 autocast, whose GEMMs keep BF16 copies of FP32 inputs and weights, and whose SDPA keeps
BF16 casts of the FP8 linears' FP32 outputs; BF16 weights under the distributed optimizer; FP8 linears
keeping E4M3 copies along the tokens). Per layer
(`layer_breakdown`: by tensor kind; tests/test_layer_memory.py holds each kind to the saved-tensor
hooks, byte for byte):

    norm (RMSNorm)       its FP32 input, 1/rms, the normed values; its output as its readers keep it
    MHA                  one copy of the input for q, k, v; q, k, v, the output and log-sum-exp of SDPA's
                         fused kernel; RoPE tables; the output projection's input (a view without FP8)
    MLA                  one copy of the input for both down-projections; the latent norms (recomputed
                         under layernorm); the latents as the up-projections keep them; q, k, values
                         and output padded to the query/key head dim, the log-sum-exp; under
                         mla_up_proj one region keeping only the down-projections' outputs
    dense MLP / shared   gate and up (silu recomputed), the down projection's input; under moe_act
                         (shared) gate and up in E4M3 tiles, the rest recomputed
    router               its input as it came (no FP32 copy; in the pre-MLP norm's region, dropped
                         under layernorm), scores, their sum, the top-k ids (int64) and gates; per
                         sequence the balance loss's
    dispatch / combine   per sent row its source token (int64, twice: nonzero's pair) and the chosen-here
                         mask (none without expert parallelism: no dispatcher); the rows move by index
    routed experts       per (token, expert) pair its row and slot (int64), the gate, the row as the
                         GEMMs keep it (where their InputCache copies it, FP8 or autocast: the received
                         rows once instead, moe/rows.py), gate and up and the down projection's input
                         (the gate scales it: no expert output is kept); under moe_act gate and up in
                         E4M3 tiles, the rest recomputed
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
from dataclasses import dataclass
from functools import cache

from megadual.config import ModelConfig
from megadual.parallel.recompute import RecomputePlan
from megadual.pipeline.actions import Action, Kind
from megadual.plan.tensor_bytes import (
    FP32,
    INT64,
    Activations,
    Precision,
    Shape,
    codec_bytes,
    distinct_ranks_per_token,
    norm_bytes,
    per_expert_keeps,
)


def mla_pieces(c: ModelConfig, s: Shape, mods: frozenset[str]) -> list[tuple[str, float, float, bool, float]]:
    """MLA after its input norm (see attention_pieces)."""
    p, t, lt = s.p, s.tokens, s.local_tokens
    g, a, heads = p.gemm_out, p.stream, c.num_attention_heads // s.tp
    ql, kv, rope, qk, v = c.q_lora_rank, c.kv_lora_rank, c.qk_pos_emb_head_dim, c.qk_head_dim + c.qk_pos_emb_head_dim, \
        c.v_head_dim
    h = c.hidden_size
    x_in = p.keeps(lt, h, a)
    # the latent norms (FP32 input copies, 1/rms, normed values); recomputed, the down-projections' outputs
    norms = (lt * FP32 * (2 * ql + 1) if ql else 0.0) + lt * FP32 * (kv + (rope if g == FP32 else 0) + kv + 1)
    norms_kept = lt * g * (ql + kv + rope)
    latent_bytes = g if ql else max(a, g)  # [query input; c_KV; k_R], the query input x without q-lora
    if p.fp8 or (p.autocast and latent_bytes != 2):  # the up-projections quantize (cast) their two views
        latents = p.keeps(t, ql or h, latent_bytes) + p.keeps(t, kv, latent_bytes)
    else:
        latents = t * latent_bytes * ((ql or h) + kv + rope)
    weights = p.weight_copies(h * (ql + kv + rope))
    up_weights = p.weight_copies((ql or h) * heads * qk + kv * heads * (qk - rope + v))
    tables = 2 * s.seq * rope * FP32
    # q and k as SDPA keeps them, or where core_attn alone is recomputed as its region's inputs: q as the
    # up-projection gives it, k in the latents' dtype (RoPE's part); that SDPA recomputed keeps autocast's
    # casts of them again for the while (`casts`)
    kept_alone = (g, latent_bytes) if "core_attn" in mods and "mla_up_proj" not in mods else (p.attention,) * 2
    q_k = t * heads * qk * sum(kept_alone)
    casts = t * heads * qk * sum(p.attention for b in (g, latent_bytes) if b != p.attention)
    lse = t * FP32 * heads
    core = 2 * t * p.attention * heads * qk + lse  # the padded values and output, the log-sum-exp
    kv_up = t * g * heads * (qk - rope + v)  # what a recomputed core keeps of v: the key/value up-projection
    pieces = [("MLA: down-projections' input", x_in + weights, x_in, False, 0.0)]
    if "mla_up_proj" in mods:
        # one region from the down-projections' outputs (kept; without q-lora x itself, unless the
        # down-projections' copy of x is x) through the latent norms, up-projections and core
        x_itself = 0.0 if ql or not p.keeps(lt, h, a, new=False) else lt * a * h
        pieces.append(("MLA: latents, up-projections and core", norms + latents + up_weights + tables + q_k + core,
                       latents, True, norms_kept + x_itself))
    else:
        pieces += [("MLA: latent norms", norms, 0.0, "layernorm" in mods, norms_kept),
                   ("MLA: latents", latents, latents, False, 0.0),
                   ("MLA: q, k (RoPE tables)", up_weights + tables + q_k, 0.0, False, 0.0)]
        recomputed = "core_attn" in mods
        pieces.append(("MLA: core", core + (casts if recomputed else 0.0), 0.0, recomputed, kv_up if recomputed else 0.0))
    proj = p.keeps(t, heads * v, p.attention) + p.weight_copies(heads * v * h)
    pieces.append(("attention: proj input", proj, proj, False, 0.0))
    return pieces


def attention_pieces(c: ModelConfig, s: Shape, mods: frozenset[str]) -> list[tuple[str, float, float, bool, float]]:
    """The attention after its input norm as (kind, saved, GEMM inputs, recomputed, kept if recomputed)
    in forward order. SDPA's fused kernel keeps q, k, v, its output and the log-sum-exp; MLA's values
    and output are padded to the query/key head dim (model/mla.py)."""
    if c.multi_latent_attention:
        return mla_pieces(c, s, mods)
    p, t = s.p, s.tokens
    g, heads, h = p.gemm_out, c.num_attention_heads // s.tp, c.hidden_size
    groups, d = c.num_query_groups // s.tp, c.head_dim
    x_in = p.keeps(t, h, p.stream)
    weights = p.weight_copies(h * d * (2 * heads + 2 * groups))
    # q, k, v as SDPA keeps them (autocast's casts), or as they came when core_attn keeps them as its
    # inputs: then the recomputed SDPA keeps the casts for the while
    qkv, a = t * (heads * d + 2 * groups * d), p.attention
    casts = qkv * a if a != g and "core_attn" in mods else 0.0
    qkv *= g if "core_attn" in mods else a
    out, lse = t * a * heads * d, t * FP32 * heads
    # SDPA's output is [s, b, heads, d] in memory: the output projection reads a view of it, so a
    # recomputed core attention frees only the log-sum-exp (the FP8 projection keeps its own copy)
    proj = p.keeps(t, heads * d, a, new=False)
    return [("attention: q, k, v", x_in + weights + qkv + 2 * s.seq * d * FP32, x_in, False, 0.0),
            ("attention: core", out + lse + casts, out, "core_attn" in mods, 0.0 if p.fp8 else out),
            ("attention: proj input", proj, proj, False, 0.0)]


def swiglu_down(p: Precision, pairs: float, ffn: int, down_in: float, down_weights: float,
                moe_act: bool) -> Activations:
    """The SwiGLU and the down-projection after gate and up: gate and up (the SwiGLU recomputes
    silu(gate)), the down projection's input and autocast's copy of its weights (`down_weights`
    elements); under moe_act one region keeping gate and up in E4M3 tiles, the rest recomputed."""
    acts = Activations()
    swiglu_in = pairs * p.gemm_out * 2 * ffn
    copies = p.weight_copies(down_weights)
    acts.add(swiglu_in + down_in + copies, down_in, moe_act, kept_inputs=codec_bytes(pairs, ffn) * 2,
             kind={"SwiGLU input": codec_bytes(pairs, ffn) * 2} if moe_act else
             {"SwiGLU input": swiglu_in, "down input": down_in + copies})
    return acts


def mlp_bytes(p: Precision, tokens: float, hidden: int, ffn: int, input_new: bool = True,
              moe_act: bool = False) -> Activations:
    """A SwiGLU MLP: what gate and up keep of its input, then `swiglu_down`."""
    x_in = p.keeps(tokens, hidden, p.stream, new=input_new)
    acts = Activations()
    acts.add(x_in + p.weight_copies(2 * hidden * ffn), x_in, kind="input")
    acts += swiglu_down(p, tokens, ffn, p.keeps(tokens, ffn, p.gemm_out), hidden * ffn, moe_act)
    return acts


def layer_activations(c: ModelConfig, s: Shape, layer: int, plan: RecomputePlan) -> Activations:
    """One micro-batch of one layer on one rank, selective recomputation applied, pieces in forward order."""
    acts = _layer_activations(c, s, c.is_moe_layer(layer), plan)
    return dataclasses.replace(acts, kinds=dict(acts.kinds))


def layer_breakdown(c: ModelConfig, s: Shape, layer: int, plan: RecomputePlan) -> dict[str, float]:
    """Bytes one micro-batch of `layer` keeps for its backward on one rank, by tensor kind."""
    return dict(layer_activations(c, s, layer, plan).kinds)


@cache  # the planner's search asks for the same few layers thousands of times
def _layer_activations(c: ModelConfig, s: Shape, moe: bool, plan: RecomputePlan) -> Activations:
    mods, t, h = plan.selective_modules, s.tokens, c.hidden_size
    norm, norm_kept = norm_bytes(s, h)
    acts = Activations()
    acts.add(norm, 0.0, "layernorm" in mods, kept_inputs=norm_kept, kind="input norm")
    for kind, saved, gemm_in, recomputed, kept in attention_pieces(c, s, mods):
        acts.add(saved, gemm_in, recomputed, kept_inputs=kept, kind=kind)
    if not moe:
        acts.add(norm, 0.0, "layernorm" in mods, kept_inputs=norm_kept, kind="pre-MLP norm")
        mlp = mlp_bytes(s.p, t, h, c.ffn_hidden_size // s.tp)
        acts.add(mlp.kept, mlp.weight_inputs, "mlp" in mods, kept_inputs=t * s.p.stream * h, kind="MLP")
    elif "moe" in mods:
        acts.add(norm, 0.0, "layernorm" in mods, kept_inputs=norm_kept, kind="pre-MLP norm")
        acts += moe_activations(c, s, mods)
    else:  # the router's GEMM runs in the pre-MLP norm's region (model/block.py)
        router_in = s.routed_tokens * s.p.stream * h
        acts.add(norm + router_in, router_in, "layernorm" in mods, kept_inputs=norm_kept,
                 kind={"pre-MLP norm": norm_kept} if "layernorm" in mods else {"pre-MLP norm": norm,
                                                                                 "router": router_in})
        acts += moe_activations(c, s, mods)
    return acts


def rows_kept_once(p: Precision, mods: frozenset[str], received: float, pairs: float) -> bool:
    """Whether the routed experts keep their received rows rather than gate and up's copies per pair
    (moe/rows.py: where an InputCache makes the copies and the rows are smaller)."""
    return (p.fp8 or p.autocast) and "moe" not in mods and received * p.stream < pairs * (1 if p.fp8 else 2)


def moe_activations(c: ModelConfig, s: Shape, mods: frozenset[str]) -> Activations:
    """The MoE layer after the pre-MLP norm, at balanced load (see the module's doc)."""
    p, t, h, k, e = s.p, s.routed_tokens, c.hidden_size, c.moe_router_topk, c.num_experts
    g, a = p.gemm_out, p.stream
    rows = t * distinct_ranks_per_token(c, s.ep)
    pairs, f, local = t * k, c.moe_ffn_hidden_size, c.num_experts // s.ep
    # the router's scores and choices; its GEMM's input (no FP32 copy) is counted with the pre-MLP norm,
    # in whose region it runs, except under moe
    router = t * (FP32 * (e + 2 + k) + INT64 * k) + s.micro_batch * FP32 * e
    dispatch = rows * (2 * INT64 + k) if s.ep > 1 else 0.0  # EP1: no dispatcher
    # per pair: its row and slot (int64), the gate; what gate and up keep of the row. Where their
    # InputCache made it (FP8, autocast) and the received rows are smaller, those are kept instead
    # (moe/rows.py); without expert parallelism they are the norm's output, which the router keeps
    # unless recomputed.
    received = rows if s.ep > 1 else t
    if rows_kept_once(p, mods, received, pairs):
        rows_in = rows * a * h if s.ep > 1 else s.local_tokens * a * h if "layernorm" in mods else 0.0
    else:
        rows_in = per_expert_keeps(p, pairs, h, local, a)
    gathered = pairs * (2 * INT64 + g) + rows_in + p.weight_copies(local * 2 * h * f)
    moe_act = "moe_act" in mods and "moe" not in mods  # inside the moe region moe_act's region runs plainly
    experts = swiglu_down(p, pairs, f, per_expert_keeps(p, pairs, f, local, g), local * h * f, moe_act)
    shared = Activations()
    if c.moe_shared_expert_intermediate_size:
        # its gate and up read the norm's output, which the router keeps unless the norm's region drops
        # it, and without expert parallelism the routed experts' kept rows are
        own_input = "layernorm" in mods and "moe" not in mods and not (s.ep == 1 and rows_kept_once(p, mods, t, pairs))
        mlp = mlp_bytes(p, s.tokens, h, c.moe_shared_expert_intermediate_size // s.tp, own_input,
                        moe_act and "shared_experts" not in mods)
        if "shared_experts" in mods:
            shared.add(mlp.kept, mlp.weight_inputs, True, kept_inputs=s.local_tokens * a * h if own_input else 0.0,
                       kind="shared expert")
        else:
            shared = dataclasses.replace(mlp, kinds={"shared expert": mlp.kept})
    acts = Activations()
    if "moe" in mods:
        acts.add(t * a * h + router + dispatch + gathered + experts.kept + shared.kept,
                 t * a * h + rows_in + experts.weight_inputs + shared.weight_inputs, True,
                 kept_inputs=s.tokens * a * h, kind="MoE (recomputed)")
        dispatched = (acts.kept, acts.weight_inputs)  # the region keeps its input from the start
    else:
        acts.add(router, kind="router")
        acts.add(dispatch, kind="dispatch and combine")
        acts.add(gathered, rows_in, kind="experts: rows, gates")
        acts += dataclasses.replace(experts, kinds={f"experts: {k}": v for k, v in experts.kinds.items()})
        acts += shared
        # the shared expert runs beside the dispatch, before the forward's first pause
        dispatched = (router + dispatch + shared.kept, shared.weight_inputs)
    if s.ep > 1:  # the forward pauses at the dispatch and at the combine (moe/dispatcher.py)
        acts.pauses = (dispatched, (acts.kept, acts.weight_inputs))
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
        part = Activations()
        part.add(whole.kept, whole.weight_inputs, True, kept_inputs=s.local_tokens * s.p.stream * h,
                 kind="recomputed layers' inputs")
        part.pauses = tuple((part.kept, part.weight_inputs) for _ in whole.pauses)  # the region's own
        acts += part.named(f"layers {layers[group.start]}-{layers[group.stop - 1]}")
        position = group.stop
    if head:
        acts.add(*head_bytes(c, s), kind="head and loss | head, loss")
        for depth in range(c.mtp_num_layers):
            acts += mtp_activations(c, s, depth, plan).named(f"MTP {depth + 1}")
    return acts


def head_bytes(c: ModelConfig, s: Shape) -> tuple[float, float]:
    """(saved, GEMM inputs) of the final norm, the head (full precision: autocast's, never FP8) and the loss."""
    saved, _ = norm_bytes(s, c.hidden_size)
    p = s.p
    gemm_in = dataclasses.replace(p, fp8=False).keeps(s.tokens, c.hidden_size, p.stream)
    return saved + gemm_in + s.tokens * (FP32 * c.vocab_size // s.tp + INT64 + 1), gemm_in


def mtp_activations(c: ModelConfig, s: Shape, depth: int, plan: RecomputePlan) -> Activations:
    """One MTP module (model/mtp.py) after the head: the embedded token ids, enorm and hnorm, eh_proj's
    input [2h], its transformer layer (selective recomputation applied), its norm, the shared head."""
    t, h = s.tokens, c.hidden_size
    local_t = s.local_tokens
    norms = 2 * local_t * FP32 * (2 * h + 1)
    eh_in = s.p.keeps(local_t, 2 * h, s.p.stream)
    acts = Activations()
    acts.add(t * INT64 + norms + eh_in, eh_in, kind="MTP inputs")
    acts += layer_activations(c, s, c.num_layers + depth, plan)
    acts.add(*head_bytes(c, s), kind="head and loss")
    return acts


# chunk of the forward, of the backward, BI (defers a W), W's (-1: none); whether the forward's backward
# will be a BI (its linears recast the weights: Precision.recast_weights)
MemoryStep = tuple[int, int, bool, int, bool]


def memory_steps(actions: list[Action]) -> tuple[MemoryStep, ...]:
    """The actions of a rank's schedule that change its activations, as `peak_bytes` walks them."""
    split_later = {action.backward_of for action in actions if action.kind == Kind.BI}
    steps = []
    for action in actions:
        forward, backward = action.forward_of, action.backward_of
        step = (forward[0] if forward else -1, backward[0] if backward else -1, action.kind == Kind.BI,
                action.chunk if action.kind == Kind.W else -1, forward in split_later)
        if step[:4] != (-1, -1, False, -1):
            steps.append(step)
    return tuple(steps)


def peak_bytes(steps: tuple[MemoryStep, ...], chunk_bytes: list[Activations],
               exchanges: list[bool] | None = None, recast_bytes: list[Activations] | None = None) -> float:
    """The most activation bytes alive at once on a rank running `steps` (`memory_steps`): each
    forward adds its chunk's micro-batch (`recast_bytes` where its backward will be a BI, default
    `chunk_bytes`), a backward frees it (a BI all but its GEMM inputs, which its W frees); the
    backward's recomputed region comes on top. In a paired F&B whose backward's chunk has expert
    all-to-alls (`exchanges`, by chunk; default: all have) the forward steps at each of them
    (pipeline/overlap.py): the backward has freed down to the matching pause of its micro-batch
    (`Activations.pauses`, from the end) when the forward's next step adds its bytes up to its next
    pause; forward steps left when the backward ends, or all of them without all-to-alls, run after it."""
    return peak_moment(steps, chunk_bytes, exchanges, recast_bytes).bytes


@dataclass(frozen=True)
class PeakMoment:
    """What is alive when a rank's activations peak: `kept[c]` micro-batches of chunk c whole
    (`recast[c]` of them forwards whose backward will be a BI), `deferred[c]` of them down to the
    GEMM inputs their W still needs, a backward of chunk `rising` (-1: none) above its kept
    bytes by `transient` (its recomputed region), and `paired` bytes of a paired F&B part-way
    (the backward's micro-batch not yet freed, the forward's so far; neither is in `kept`)."""
    bytes: float
    kept: tuple[int, ...]
    deferred: tuple[int, ...]
    rising: int = -1
    transient: float = 0.0
    recast: tuple[int, ...] = ()
    paired: float = 0.0


def peak_moment(steps: tuple[MemoryStep, ...], chunk_bytes: list[Activations],
                exchanges: list[bool] | None = None, recast_bytes: list[Activations] | None = None
                ) -> PeakMoment:
    """`peak_bytes`' walk, telling what is alive at the peak."""
    recast_bytes = chunk_bytes if recast_bytes is None else recast_bytes
    kept, deferred, recast = [0] * len(chunk_bytes), [0] * len(chunk_bytes), [0] * len(chunk_bytes)
    live = 0.0
    best = PeakMoment(0.0, tuple(kept), tuple(deferred), recast=tuple(recast))

    def forward_runs(chunk: int, split_later: bool) -> None:
        nonlocal live
        live += (recast_bytes if split_later else chunk_bytes)[chunk].kept
        kept[chunk] += 1
        recast[chunk] += split_later

    for forward, backward, defers_w, w, split_later in steps:
        forward_alone = forward >= 0 and backward < 0  # a paired forward runs as its backward frees (below)
        if forward_alone:
            forward_runs(forward, split_later)
        if backward >= 0:
            acts = (recast_bytes if defers_w else chunk_bytes)[backward]  # a BI's forward was split_later
            rise = max(0.0, acts.transient_deferring if defers_w else acts.transient)
            if live + rise > best.bytes:
                best = PeakMoment(live + rise, tuple(kept), tuple(deferred), backward, rise, tuple(recast))
            live -= acts.kept
            kept[backward] -= 1
            recast[backward] -= defers_w
            if forward >= 0 and (exchanges is None or exchanges[backward]):
                steps_f = (recast_bytes if split_later else chunk_bytes)[forward]
                for j, (freed_to, inputs_to) in enumerate(reversed(acts.pauses)):
                    held = freed_to + (acts.weight_inputs - inputs_to if defers_w else 0.0)
                    pair = held + (steps_f.pauses[j][0] if j < len(steps_f.pauses) else steps_f.kept)
                    if live + pair > best.bytes:
                        best = PeakMoment(live + pair, tuple(kept), tuple(deferred), recast=tuple(recast),
                                          paired=pair)
            if defers_w:
                live += acts.weight_inputs
                deferred[backward] += 1
            if forward >= 0 and not forward_alone:
                forward_runs(forward, split_later)
        if w >= 0:
            live -= recast_bytes[w].weight_inputs
            deferred[w] -= 1
        if live > best.bytes:
            best = PeakMoment(live, tuple(kept), tuple(deferred), recast=tuple(recast))
    return best
