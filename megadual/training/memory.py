"""Memory you can see: what a rank holds during its first training step, measured, and its report.

After the first iteration each rank logs one line shaped like Megatron's `report_memory`,
extended with what the run holds by kind:

    [Rank 0] (after 1 iterations) memory (MB) | allocated: ... | max allocated: ... | reserved: ... |
    max reserved: ... | parameters: ... | gradients: ... | optimizer state: ... | peak activations: ...

- parameters: the model's parameter storages on this rank (DualPipe's two copies of a stage both).
- gradients: the gradient storages of the step: each parameter's `.grad` just before the
  optimizer steps, and the gradient buffers an optimizer keeps itself (tensors it holds under
  a name with "grad" in it).
- optimizer state: `dist_optimizer.optimizer_state_bytes` - the storages under the optimizer's
  state tensors: AdamW's moments and step counts, the distributed optimizer's shards of them and
  its FP32 masters beside BF16 weights.
- peak activations: the most bytes of tensors held for the backward at any one time of the
  step, counted exactly by `ActivationTracker`.
- allocated / max allocated / reserved / max reserved: on CUDA torch.cuda's allocator figures
  (max allocated is torch.cuda.max_memory_allocated). The CPU has no allocator statistics: there
  allocated is parameters + gradients + optimizer state and max allocated adds the peak
  activations; reserved equals allocated (no caching allocator).
"""
from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megadual.parallel.recompute import Recompute, run_steps
from megadual.pipeline.stage_model import StageModel
from megadual.training.dist_optimizer import optimizer_state_bytes

MB = 1024.0 * 1024.0
Storage = tuple[str, int]


def storage_of(t: torch.Tensor) -> Storage:
    return str(t.device), t.untyped_storage().data_ptr()


def storage_bytes(tensors: Iterable[torch.Tensor], leave_out: set[Storage] = frozenset()) -> int:
    """Bytes of the distinct storages under `tensors` (each whole, once), those in `leave_out` left out."""
    seen = {}
    for t in tensors:
        key = storage_of(t)
        if key not in leave_out:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


class ActivationTracker:
    """Counts the bytes held for the backward (a recompute.SavedTensorObserver).

    It is told of every tensor autograd saves in a chunk's forward outside recomputed regions,
    every input a region keeps and every tensor a region recomputes (parallel/recompute.py). It
    counts storages, each whole and once, from the first time a tensor on it is seen until the
    storage itself is freed: a tensor saved by several ops, or several views of one storage,
    count once, and a storage stays counted while anything holds it - autograd until its
    backward, a deferred W the linear input it needs (autograd hands a backward a new tensor on
    the saved storage, so liveness is the storage's, not the tensor object's). FP8 caches count
    as stored: one byte per element plus their scales. Saved weights (the parameters' storages)
    are no activations and are left out; autocast's BF16 copies of FP32 weights are counted.
    """

    def __init__(self, parameters: Iterable[torch.Tensor]):
        self.leave_out = {storage_of(p) for p in parameters}
        self.live: dict[Storage, int] = {}  # storage -> bytes
        self.current = self.peak = 0

    def saved(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = str(tensor.device), storage.data_ptr()
        if key in self.leave_out or key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        # Storages keep their Python object while they live: this fires when the memory is freed.
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: Storage) -> None:
        self.current -= self.live.pop(key)


def saved_by(steps_fn: Callable, inputs: tuple, parameters: Iterable[torch.Tensor], recompute: Recompute
             ) -> tuple[int, object]:
    """(bytes held for the backward once steps_fn(*inputs) has run, its result), counted as the memory
    report counts them: every tensor the forward saves outside recomputed regions and every input a
    region keeps, the parameters left out. `recompute` is the Recompute its modules hold."""
    tracker = ActivationTracker(parameters)
    recompute.observer = tracker
    try:
        result = run_steps(recompute.observed(steps_fn(*inputs)))
    finally:
        recompute.observer = None
    return tracker.current, result


@dataclass(frozen=True)
class MemoryReport:
    """One rank's memory after its first iteration, in bytes (cuda: torch.cuda's figures, else None)."""
    rank: int
    iteration: int
    parameters: int
    gradients: int
    optimizer_state: int
    peak_activations: int
    cuda: tuple[int, int, int, int] | None = None  # allocated, max allocated, reserved, max reserved

    def format(self) -> str:
        held = self.parameters + self.gradients + self.optimizer_state
        allocator = self.cuda or (held, held + self.peak_activations, held, held + self.peak_activations)
        fields = dict(zip(("allocated", "max allocated", "reserved", "max reserved"), allocator))
        fields.update({"parameters": self.parameters, "gradients": self.gradients,
                       "optimizer state": self.optimizer_state, "peak activations": self.peak_activations})
        return (f"[Rank {self.rank}] (after {self.iteration} iterations) memory (MB) | "
                + " | ".join(f"{name}: {value / MB:.3f}" for name, value in fields.items()))


def _tensors_held(obj, name: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor `obj` holds in its attributes and containers; the model's
    modules are not entered."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, torch.nn.Module):
        return
    seen.add(id(obj))
    if torch.is_tensor(obj):
        yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors_held(value, f"{name}.{key}" if isinstance(key, str) else name, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for value in obj:
            yield from _tensors_held(value, name, seen)
    elif dataclasses.is_dataclass(obj) or isinstance(obj, torch.optim.Optimizer) or \
            type(obj).__module__.startswith("megadual."):
        for key, value in vars(obj).items():
            yield from _tensors_held(value, f"{name}.{key}", seen)


def gradient_buffer_bytes(optimizer, parameters: list[torch.Tensor]) -> int:
    """Bytes of the gradient buffers the optimizer holds itself (the tensors it holds under a
    "grad" name, e.g. the distributed optimizer's buckets), the parameters' storages left out."""
    grads = [t for path, t in _tensors_held(optimizer) if "grad" in path]
    return storage_bytes(grads, {storage_of(p) for p in parameters})


def _cuda_figures(device: torch.device) -> tuple[int, int, int, int] | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device),
            torch.cuda.memory_reserved(device), torch.cuda.max_memory_reserved(device))


class MemoryMeasurement:
    """Measures a run's first training step and reports it once (`report`, and one logged line per rank)."""

    def __init__(self, model: StageModel, optimizer, device: torch.device):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.report: MemoryReport | None = None

    @contextmanager
    def first_step(self, iteration: int, log: Callable[[str], None]):
        """Around the run's steps: the first is measured, and after it this rank logs its line."""
        if self.report is not None:
            yield
            return
        params = list(self.model.parameters())
        tracker = ActivationTracker(params)
        grads: list[torch.Tensor] = []
        hook = None
        if isinstance(self.optimizer, torch.optim.Optimizer):
            hook = self.optimizer.register_step_pre_hook(
                lambda *_: grads.extend(p.grad for p in params if p.grad is not None))
        for chunk in self.model.chunks:
            chunk.recompute.observer = tracker
        try:
            yield
        finally:
            for chunk in self.model.chunks:
                chunk.recompute.observer = None
            if hook is not None:
                hook.remove()
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.report = MemoryReport(rank, iteration + 1, storage_bytes(params),
                                   storage_bytes(grads) + gradient_buffer_bytes(self.optimizer, params),
                                   optimizer_state_bytes(self.optimizer), tracker.peak, _cuda_figures(self.device))
        log(self.report.format())
