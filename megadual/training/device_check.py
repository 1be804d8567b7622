"""What a training step does on the host, watched on any device (MEGADUAL_DEVICE_CHECK=1).

On a GPU two things go wrong that a CPU run cannot show: a tensor made on the host (a factory
call without `device=`) reaching a collective, which NCCL refuses, and a value brought to the
host (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool/int/float` of a tensor), which stops
the host until the device catches up. `StepWatch`, a TorchFunctionMode active while a step (or
an evaluation) runs, records both wherever megadual's own code does them, naming the line.

With MEGADUAL_DEVICE_CHECK=1 (tests/conftest.py sets it for the whole suite, so every
multi-process run checks itself) a step that creates a tensor without a device, or brings a
value to the host outside ALLOWED_SYNCS, or brings more than STEP_SYNCS values to the host
outside the MoE layers, raises DeviceCheckError listing every such line; and the step reports
how many host transfers it made (StepResult.host_syncs; tests/test_host_syncs.py holds the
budget). Unset, nothing is watched: the mode costs a Python call per torch call.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack, _pop_mode_temporarily

ENV = "MEGADUAL_DEVICE_CHECK"
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../megadual
_HERE = os.path.abspath(__file__)

# Where a step may bring a value to the host, and why: (file under megadual/, function) -> reason.
# "per layer": once per MoE layer per micro-batch forward (both hops of the hierarchical dispatch
# together); "per step": counted against STEP_SYNCS.
ALLOWED_SYNCS = {
    ("moe/dispatcher.py", "counts_to_host"): (
        "per layer", "an all-to-all's row counts size its buffers; the local experts' slot counts come "
                     "in the same transfer"),
    ("moe/experts.py", "forward"): (
        "per layer", "without expert parallelism no exchange carries the slot counts; the experts count "
                     "theirs (the layer's one transfer)"),
    ("training/step.py", "to_host"): (
        "per step", "the gradient norm and whether the losses are finite decide whether the optimizer "
                    "steps (and the consecutive-skipped counter); the logged values stay on the device"),
    ("training/metrics.py", "totals"): (
        "per step", "on a step that logs (--log-interval), the interval's logged values, in one transfer"),
    ("training/loop.py", "_mean_validation_losses"): ("per step", "the validation losses, once per evaluation"),
}
STEP_SYNCS = 1
# Where a step may make a tensor without a device: (file under megadual/, function) -> reason.
ALLOWED_HOST_TENSORS = {
    ("data/sampler.py", "<genexpr>"): "the loader builds batches on the host (an evaluation reads inside "
                                      "its watch); the model moves them to the device",
}

_SYNCS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "cpu",
          torch.Tensor.numpy: "numpy", torch.Tensor.__bool__: "bool", torch.Tensor.__int__: "int",
          torch.Tensor.__float__: "float", torch.Tensor.__index__: "index"}
_FACTORIES = {getattr(torch, name) for name in (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace", "eye",
    "rand", "randn", "randint", "randperm", "empty_strided", "scalar_tensor")}


class DeviceCheckError(RuntimeError):
    pass


@dataclass
class Event:
    kind: str  # "sync: tolist", "no device: torch.zeros"
    file: str  # under megadual/
    line: int
    function: str

    def describe(self) -> str:
        return f"megadual/{self.file}:{self.line} ({self.function}): {self.kind}"


def _megadual_caller() -> tuple[str, int, str] | None:
    """(file under megadual/, line, function) of the frame that made the call, if it is megadual's
    (torch's own calls, such as AdamW reading its CPU step counts, are torch's business)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == _HERE:
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
        return None
    return os.path.relpath(frame.f_code.co_filename, PACKAGE), frame.f_lineno, frame.f_code.co_name


class StepWatch(TorchFunctionMode):
    """Records megadual's host transfers and device-less factory calls while active."""

    def __init__(self):
        super().__init__()
        self.events: list[Event] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _SYNCS.get(func)
        if kind is not None:
            kind = "sync: " + kind
        elif func in _FACTORIES and kwargs.get("device") is None:
            kind = f"no device: torch.{func.__name__}"
        if kind is not None:
            caller = _megadual_caller()
            if caller is not None:
                self.events.append(Event(kind, *caller))
        return func(*args, **kwargs)

    @property
    def syncs(self) -> list[Event]:
        return [e for e in self.events if e.kind.startswith("sync")]

    def problems(self) -> list[str]:
        """Every event the device contract does not allow, and an exceeded step budget."""
        found = []
        per_step = 0
        for event in self.events:
            if event.kind.startswith("no device"):
                if (event.file, event.function) not in ALLOWED_HOST_TENSORS:
                    found.append(event.describe())
                continue
            allowed = ALLOWED_SYNCS.get((event.file, event.function))
            if allowed is None:
                found.append(event.describe())
            elif allowed[0] == "per step":
                per_step += 1
        if per_step > STEP_SYNCS:
            found.append(f"{per_step} host transfers outside the MoE layers in one step (the budget: {STEP_SYNCS})")
        return [f"{line} (x{n})" if n > 1 else line for line, n in Counter(found).items()]


@contextmanager
def _in_backward_functions(watch: StepWatch):
    """The autograd engine runs a backward with no TorchFunctionMode active; megadual's work there
    (custom Functions' backwards, and the paired F&B chunk's forward steps, which run inside the
    expert exchanges' backwards) is watched by entering the mode again around each custom backward.
    (A saved-tensor hook's recomputation is not.)"""
    original = BackwardCFunction.apply

    def apply(node, *args):
        if watch in _get_current_function_mode_stack():
            return original(node, *args)
        with watch:
            return original(node, *args)

    BackwardCFunction.apply = apply
    try:
        yield
    finally:
        BackwardCFunction.apply = original


@contextmanager
def unwatched(watch: StepWatch | None):
    """Inside a watched step, a block that is not the step's own work (the layout checker's gradient
    hook, which gathers every gradient to the host by design)."""
    if watch is None:
        yield
        return
    with _pop_mode_temporarily():
        yield


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


@contextmanager
def watched(what: str):
    """With MEGADUAL_DEVICE_CHECK set, watch the block (a training step, an evaluation), yield the
    StepWatch and raise DeviceCheckError at its end for what the contract does not allow; unset,
    yield None."""
    if not enabled():
        yield None
        return
    with StepWatch() as watch, _in_backward_functions(watch):
        yield watch
    problems = watch.problems()
    if problems:
        raise DeviceCheckError(f"{what}: host tensors or host transfers outside the allowed list "
                               f"(megadual/training/device_check.py):\n  " + "\n  ".join(problems))
