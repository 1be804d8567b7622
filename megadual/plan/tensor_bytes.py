"""What tensors cost on one rank, the primitives of the planner's count (memory_model.py): a run's
`Precision` (the dtypes activations are kept in), the `Shape` of one micro-batch on a rank, and
`Activations`, the bytes a micro-batch leaves as its pieces add up in forward order."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

from megadual.config import ModelConfig

FP32, INT64 = 4, 8


@dataclass(frozen=True)
class Precision:
    """What a run computes and keeps in: --bf16 autocast, BF16 model weights (the distributed
    optimizer under --bf16, which keeps the FP32 masters itself) and FP8 linears (--fp8-format);
    `recast_weights`: a forward whose backward defers its weight gradients (a BI of the W split),
    whose linears cast the weights again in the backward instead of keeping autocast's copies."""
    autocast: bool = False
    bf16_weights: bool = False
    fp8: bool = False
    recast_weights: bool = False

    @classmethod
    def of_run(cls, bf16: bool, distributed_optimizer: bool, fp8: bool) -> Precision:
        return cls(bf16, bf16 and distributed_optimizer, fp8)

    @property
    def stream(self) -> int:
        """Bytes per element of the hidden states between the layers (norm outputs, expert rows)."""
        return 2 if self.bf16_weights else FP32

    @property
    def gemm_out(self) -> int:
        """Bytes per element of a linear's output: BF16 under autocast, the input's dtype with FP8."""
        return 2 if self.autocast and not self.fp8 else self.stream

    @property
    def attention(self) -> int:
        """Bytes per element of what SDPA keeps of q, k, v and its output: BF16 under autocast, which
        casts the FP32 outputs of FP8 linears under FP32 weights (new copies), else the GEMMs' output."""
        return 2 if self.autocast else self.gemm_out

    def keeps(self, rows: float, cols: float, x_bytes: int, new: bool = True) -> float:
        """What the linears reading one [rows, cols] input (of x_bytes per element) keep of it: an FP8
        copy along the tokens with one scale per 128 of them, autocast's one BF16 cast, or x itself
        (`new`: not held by anyone else already)."""
        if self.fp8:
            return rows * cols + cols * ceil_div(rows, 128) * FP32
        if self.autocast and x_bytes != 2:
            return rows * cols * 2
        return rows * cols * x_bytes if new else 0.0

    def weight_copies(self, elements: float) -> float:
        """Autocast's BF16 copies of FP32 weights, which each GEMM keeps for its backward (parallel/linear.py)."""
        kept = self.autocast and not self.fp8 and not self.bf16_weights and not self.recast_weights
        return elements * 2 if kept else 0.0


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
    precision: Precision | None = None  # None: read from gemm_bytes (4 FP32, 2 autocast, 1 FP8)

    @property
    def p(self) -> Precision:
        if self.precision is not None:
            return self.precision
        return Precision(autocast=self.gemm_bytes == 2, fp8=self.gemm_bytes == 1)

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
    GEMM inputs to the W). `kinds`: `kept` split by what the bytes are (python -m megadual.plan
    --breakdown), keyed "PART | KIND" once a stage has named the part (a layer, the head)."""
    kept: float = 0.0
    weight_inputs: float = 0.0
    transient: float = -math.inf
    transient_deferring: float = -math.inf
    kinds: Mapping[str, float] = field(default_factory=dict)
    # (kept, weight_inputs) so far at each expert all-to-all the forward pauses at, in forward order: a
    # paired F&B's backward frees down to them as the forward steps between them (pipeline/overlap.py)
    pauses: tuple[tuple[float, float], ...] = ()

    def add(self, saved: float, gemm_inputs: float = 0.0, recomputed: bool = False, kept_inputs: float = 0.0,
            recomputed_extra: float = 0.0, kind: str | Mapping[str, float] = "other") -> None:
        """The next piece in forward order: it saves `saved` bytes, `gemm_inputs` of them GEMM
        inputs; recomputed, only `kept_inputs` stay, and its backward recomputes the rest and
        `recomputed_extra` (copies of tensors still held outside the region). `kind`: what the
        kept bytes are, one name or bytes by name summing to what is kept."""
        transient = saved - kept_inputs + recomputed_extra if recomputed else -math.inf
        kept = kept_inputs if recomputed else saved
        kinds = dict(kind) if isinstance(kind, Mapping) else {kind: kept}
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
        self.pauses += tuple((kept + self.kept, inputs + self.weight_inputs) for kept, inputs in later.pauses)
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


def ceil_div(n: float, d: int) -> float:
    return -(-n // d)


def codec_bytes(rows: float, cols: int) -> float:
    """An E4M3 copy of [rows, cols] in 1 x 128 tiles along cols, with its FP32 scales (moe_act's cache)."""
    return rows * cols + rows * ceil_div(cols, 128) * FP32


def per_expert_keeps(p: Precision, pairs: float, cols: int, experts: int, x_bytes: int) -> float:
    """What the experts' linears keep of their [pairs, cols] input, one GEMM per expert (FP8 scales
    per 128 of each expert's rows; balanced load)."""
    if p.fp8:
        return pairs * cols + cols * experts * ceil_div(pairs / max(experts, 1), 128) * FP32
    return p.keeps(pairs, cols, x_bytes)


def norm_bytes(s: Shape, hidden: int) -> tuple[float, float]:
    """(saved, kept when recomputed) of an RMSNorm on this rank's tokens: its FP32 input, 1/rms and the
    normed values; recomputed, its input as it came. Its output is counted with its readers."""
    lt = s.local_tokens
    return lt * FP32 * (2 * hidden + 1), lt * s.p.stream * hidden
