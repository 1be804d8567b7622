"""Activation recomputation: regions whose saved activations are dropped in the forward and
computed again when the backward needs them (Megatron's --recompute-* flags).

A region runs a function, or a generator of sub-steps that pauses while an expert all-to-all
is in flight, under saved-tensor hooks pushed only while its own code runs (never while it is
paused, so another micro-batch's work in the meantime is not taken for the region's). Of what
autograd saves inside it, the region keeps what costs nothing or what it needs to run again -
its inputs (detached) and the weights - and drops everything else, remembering each dropped
tensor's place in the order of saving. The first time the backward unpacks a dropped tensor,
the region runs again from its inputs, with grad enabled and the autocast state of its
forward, collecting what that run saves in the same order. Each recomputed tensor is handed
out once and then let go: it lives from the recomputation until the backward that needed it
has run, or, when that backward deferred its weight gradient (the W split), until that W ran,
which keeps the linear's input.

This is torch.utils.checkpoint's non-reentrant scheme, written out because a region may pause:
torch's checkpoint runs its function in one call. A region that pauses pauses in the
recomputation too, and each pause calls `overlap.launched()`; inside a paired forward/backward
chunk, the other micro-batch's forward then advances while the recomputation's all-to-all is in
flight, as it does for the backward's own all-to-alls. The whole region is recomputed (no early
stop), since its collectives must be joined by the other ranks in the same order.

The recomputation repeats the forward bit for bit: dropout masks are pure functions of (seed,
sample, position), so there is no RNG state to restore; `recompute_context` silences side
effects of the forward that must happen once, such as the routers' statistics; the routing
itself is the same, since the expert biases move only after the step.

Whoever wants to see what the chunk holds for its backward (the memory report) sets
`Recompute.observer`: it is told of every tensor saved outside regions, every input a region
keeps, and every tensor a region recomputes.
"""
from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import torch
from torch.autograd.graph import saved_tensors_hooks

from megadual.config import RECOMPUTE_MODULES
from megadual.parallel.wgrad import WeightGradStore

if TYPE_CHECKING:
    from megadual.config import TrainConfig

__all__ = ["NO_RECOMPUTE", "RECOMPUTE_MODULES", "ActivationCodec", "Recompute", "RecomputePlan", "SavedTensorObserver",
           "run_steps"]


Steps = Generator[None, None, object]


@dataclass(frozen=True)
class ActivationCodec:
    """How a tensor is kept for the backward: `encode` it into the tensors to keep, `decode` them
    back in a dtype (--recompute-modules moe_act: E4M3 tiles, moe/experts.py)."""
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    decode: Callable[[tuple[torch.Tensor, ...], torch.dtype], torch.Tensor]


class SavedTensorObserver(Protocol):
    def saved(self, tensor: torch.Tensor) -> None:
        """`tensor` is held for the backward from now on (until it is freed)."""


@dataclass(frozen=True)
class RecomputePlan:
    """What to recompute (Megatron's flags). `granularity` "full" recomputes whole layers of each
    model chunk: with `method` "uniform" every group of `num_layers` consecutive layers is one
    region (only its input is kept), with "block" each of the first `num_layers` layers is
    its own region and the others are not recomputed. "selective" recomputes `modules` of every
    layer:

        core_attn       the core attention, softmax(q k^T) v
        layernorm       the input and pre-MLP RMSNorms (the router's GEMM with the latter, so it
                        keeps no norm output) and MLA's latent norms
        mla_up_proj     MLA from the down-projections' outputs (kept) to the attention output: the
                        latent norms, the query/key/value up-projections, RoPE and the core attention
                        they feed (recomputing the up-projections while SDPA kept q, k, v would save nothing)
        mlp             the dense layers' MLP
        moe             the whole MoE layer: routing, dispatch, experts, combine, shared experts
        shared_experts  the MoE layer's shared experts
        moe_act         the MoE layer's SwiGLUs (routed and shared experts): their input kept in E4M3
                        1x128 tiles, the activation and the down-projection's input recomputed from it
    """
    granularity: str | None = None
    method: str | None = None
    num_layers: int | None = None
    modules: frozenset[str] = frozenset({"core_attn"})

    @classmethod
    def from_flags(cls, train: TrainConfig) -> RecomputePlan:
        """The plan the --recompute-* flags ask for."""
        return cls(train.recompute_granularity, train.recompute_method, train.recompute_num_layers,
                   frozenset(train.recompute_modules))

    @property
    def selective_modules(self) -> frozenset[str]:
        return self.modules if self.granularity == "selective" else frozenset()

    def full_layer_groups(self, num_layers: int) -> list[range]:
        """The chunk's layers (by position) that are recomputed as one region each."""
        if self.granularity != "full":
            return []
        n = self.num_layers
        if self.method == "block":
            return [range(i, i + 1) for i in range(min(n, num_layers))]
        return [range(i, min(i + n, num_layers)) for i in range(0, num_layers, n)]


class Recompute:
    """The recomputation of one model chunk: which selective modules its layers recompute, and
    the observer of what the chunk keeps for its backward. Layers hold the chunk's instance."""

    def __init__(self, modules: frozenset[str] = frozenset()):
        self.modules = frozenset(modules)
        self.observer: SavedTensorObserver | None = None
        # The chunk's W-split store: whether a forward could defer its weight gradients decides
        # which autograd node its linears build, so a recomputation must see what its forward saw.
        self.wgrad_store: WeightGradStore | None = None
        self._inside = False  # a region of this chunk is running (its forward or its recomputation)

    @property
    def in_region(self) -> bool:
        """Whether a region of this chunk is running (its forward or its recomputation)."""
        return self._inside

    def call(self, module: str, fn: Callable, *inputs, recompute_context: Callable = nullcontext,
             codecs: Sequence[ActivationCodec | None] = ()):
        """fn(*inputs), recomputed in the backward when `module` is selected. `codecs[i]`: how the
        region keeps input i (encoded, and decoded for the recomputation; None: as it is)."""
        if module not in self.modules:
            return fn(*inputs)
        return run_steps(self.region_steps(_without_pauses(fn), inputs, recompute_context, codecs=codecs))

    def steps(self, module: str, steps_fn: Callable[..., Steps], *inputs, recompute_context: Callable = nullcontext,
              overlap=None) -> Steps:
        """The generator steps_fn(*inputs), recomputed in the backward when `module` is selected."""
        if module not in self.modules:
            return steps_fn(*inputs)
        return self.region_steps(steps_fn, inputs, recompute_context, overlap)

    def region_steps(self, steps_fn: Callable[..., Steps], inputs: Sequence, recompute_context: Callable = nullcontext,
                     overlap=None, codecs: Sequence[ActivationCodec | None] = ()) -> Steps:
        """steps_fn(*inputs) as one recomputed region, whatever the modules; `overlap`: the
        comm.BackwardOverlap its recomputation's pauses call. Inside another region of this chunk
        (moe_act within moe) it runs plainly: the outer region drops what it saves."""
        if not torch.is_grad_enabled() or self._inside:
            return steps_fn(*inputs)
        store = self.wgrad_store
        if store is not None:
            recompute_context = _also(recompute_context, partial(_deferrable_as, store, store.forward_deferrable))
        return _Region(steps_fn, inputs, self.observer, _also(recompute_context, self._in_region), overlap,
                       codecs).run(self._in_region)

    @contextmanager
    def _in_region(self):
        before, self._inside = self._inside, True
        try:
            yield
        finally:
            self._inside = before

    def observed(self, steps: Steps) -> Steps:
        """`steps` (a chunk's forward) with every tensor it saves outside regions shown to the observer."""
        if self.observer is None:
            return (yield from steps)
        observer = self.observer

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            observer.saved(tensor)
            return tensor

        return (yield from _under(lambda: saved_tensors_hooks(pack, _identity), steps))


NO_RECOMPUTE = Recompute()  # what a layer holds until its chunk gives it the chunk's


def run_steps(steps: Steps):
    """Run a sub-step generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _without_pauses(fn: Callable) -> Callable[..., Steps]:
    def steps(*inputs):
        return fn(*inputs)
        yield  # unreachable: makes this a generator function

    return steps


def _under(context: Callable[[], AbstractContextManager], steps: Steps) -> Steps:
    """`steps` with `context` entered around each resumption only, not while paused."""
    while True:
        with context():
            try:
                next(steps)
            except StopIteration as done:
                return done.value
        yield


def _also(first: Callable[[], AbstractContextManager], second: Callable[[], AbstractContextManager]):
    def both() -> ExitStack:
        stack = ExitStack()
        stack.enter_context(first())
        stack.enter_context(second())
        return stack

    return both


@contextmanager
def _deferrable_as(store: WeightGradStore, deferrable: bool):
    """The store's forward_deferrable as a region's forward had it, and as it was afterwards: the
    recomputation may run while another micro-batch's forward is half done (a paired F&B)."""
    before, store.forward_deferrable = store.forward_deferrable, deferrable
    try:
        yield
    finally:
        store.forward_deferrable = before


def _identity(x):
    return x


class _Dropped:
    """What autograd keeps in place of a dropped tensor: the region and the tensor's place."""
    __slots__ = ("index", "region")

    def __init__(self, region: _Region, index: int):
        self.region, self.index = region, index


def _unpack(packed):
    return packed.region.take(packed.index) if isinstance(packed, _Dropped) else packed


def _storage(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def _is_weight(t: torch.Tensor) -> bool:
    """A parameter or a view of one: kept, since it costs nothing."""
    base = t if t._base is None else t._base
    return base.is_leaf and base.requires_grad


class _Encoded:
    """A region input kept as a codec encodes it."""
    __slots__ = ("codec", "dtype", "parts")

    def __init__(self, codec: ActivationCodec, x: torch.Tensor):
        self.codec, self.dtype, self.parts = codec, x.dtype, codec.encode(x.detach())

    def decoded(self) -> torch.Tensor:
        return self.codec.decode(self.parts, self.dtype)


class _Region:
    def __init__(self, steps_fn: Callable[..., Steps], inputs: Sequence, observer: SavedTensorObserver | None,
                 recompute_context: Callable, overlap, codecs: Sequence[ActivationCodec | None] = ()):
        self.steps_fn, self.given = steps_fn, inputs
        codecs = list(codecs) + [None] * (len(inputs) - len(codecs))
        self.inputs = [_Encoded(codec, x) if codec is not None else x.detach() if torch.is_tensor(x) else x
                       for x, codec in zip(inputs, codecs)]
        self.requires_grad = [torch.is_tensor(x) and x.requires_grad for x in inputs]
        self.input_storages = {_storage(x) for x in self.inputs if torch.is_tensor(x)}
        self.observer, self.recompute_context, self.overlap = observer, recompute_context, overlap
        device = next((x.device for x in self.inputs if torch.is_tensor(x)), torch.device("cpu")).type
        autocast = torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device)
        self.autocast = lambda: torch.autocast(device, dtype=dtype, enabled=autocast)
        self.saved = 0  # tensors saved so far, kept or dropped
        self.dropped: set[int] = set()
        self.recomputed: dict[int, torch.Tensor] | None = None
        for x in self.inputs:
            for kept in (x.parts if isinstance(x, _Encoded) else (x,)):
                if torch.is_tensor(kept):
                    self._observe(kept)

    def _observe(self, tensor: torch.Tensor) -> None:
        if self.observer is not None:
            self.observer.saved(tensor)

    def run(self, inside: Callable[[], AbstractContextManager]) -> Steps:
        """The region's forward; `inside` entered around each of its resumptions."""
        steps = self.steps_fn(*self.given)
        self.given = None
        return (yield from _under(_also(lambda: saved_tensors_hooks(self._pack, _unpack), inside), steps))

    def _pack(self, tensor: torch.Tensor):
        index, self.saved = self.saved, self.saved + 1
        if _is_weight(tensor) or _storage(tensor) in self.input_storages:
            self._observe(tensor)
            return tensor
        self.dropped.add(index)
        return _Dropped(self, index)

    def take(self, index: int) -> torch.Tensor:
        if self.recomputed is None:
            self._recompute()
        try:
            return self.recomputed.pop(index)
        except KeyError:
            raise RuntimeError("a recomputed activation was unpacked twice (a second backward through a "
                               "recomputed region, e.g. retain_graph, is not supported)") from None

    def _recompute(self) -> None:
        self.recomputed, count = {}, [0]

        def record(tensor: torch.Tensor) -> torch.Tensor:
            index, count[0] = count[0], count[0] + 1
            kept = tensor.detach()  # the recomputation's graph never runs its backward: no cycle through it
            if index in self.dropped:
                self.recomputed[index] = kept
                self._observe(kept)
            return kept

        inputs = [x.decoded() if isinstance(x, _Encoded) else x for x in self.inputs]
        inputs = [x.detach().requires_grad_(rg) if torch.is_tensor(x) else x for x, rg in zip(inputs, self.requires_grad)]
        steps = self.steps_fn(*inputs)
        while True:
            with torch.enable_grad(), self.autocast(), self.recompute_context(), saved_tensors_hooks(record, _identity):
                try:
                    next(steps)
                except StopIteration:
                    break
            if self.overlap is not None:  # an all-to-all of the recomputation is in flight
                self.overlap.launched()
        if count[0] != self.saved:
            raise RuntimeError(f"a recomputed region saved {count[0]} tensors where its forward saved "
                               f"{self.saved}: its forward is not a pure function of its inputs")
