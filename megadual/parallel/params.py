"""What every parameter is to the parallel layout: declared once by its layer, read everywhere.

A layer that owns parameters says, in `self.param_specs`, how each one is initialized
and laid out (`ParamSpec`): split over TP along a dim, a routed expert's (replicated
only over the expert-data-parallel group), or a gradient that is a partial sum over TP
(sequence-parallel norms, the router under TP). `ParamTable.build` walks a model once
and records every parameter under its global name, with whether it is DualPipe's
second copy of a stage. Initialization, gradient reduction, the gradient norm,
checkpoints and the layout checker read the table; nothing else inspects parameters.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPShard:
    """This rank's piece of a tensor split over a TP group along `dim`."""
    dim: int
    rank: int
    size: int
    group: object


@dataclass(frozen=True)
class ParamSpec:
    init_std: float | None  # normal(0, std) from the layout-free generator; None: ones (norms)
    tp: TPShard | None = None  # None: the whole tensor on every TP rank
    expert: bool = False  # a routed expert's: replicated over the expert-DP group, not DP
    grad_partial_over_tp: bool = False  # each TP rank saw part of the sequence: sum the grads over TP
    real_rows: int | None = None  # rows past this are vocabulary padding: zero, never read, not saved


@dataclass(frozen=True)
class ParamRecord:
    name: str  # the global name: layers by global index, experts by global expert index
    param: torch.nn.Parameter
    spec: ParamSpec
    mirror: bool = False  # DualPipe's second copy of a stage (its twin lives on the mirrored rank)
    tied: bool = False  # a tied copy of a parameter another pipeline rank owns (see ParamTable.build)

    @property
    def full_shape(self) -> list[int]:
        shape = list(self.param.shape)
        if self.spec.tp is not None:
            shape[self.spec.tp.dim] *= self.spec.tp.size
        return shape

    def local_piece(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the whole tensor `full`."""
        tp = self.spec.tp
        return full if tp is None else full.chunk(tp.size, tp.dim)[tp.rank]

    @property
    def duplicate(self) -> bool:
        """Another rank holds this parameter too and counts it (norm) and saves it (checkpoints);
        after the pipeline sums the copies' gradients, this copy's gradient equals the other's."""
        return self.mirror or self.tied

    @property
    def replicated_over_tp(self) -> bool:
        """Every TP rank holds the same values (and, after reduction, the same gradient)."""
        return self.spec.tp is None and not self.spec.expert


def _declared_spec(owner: torch.nn.Module, local_name: str, name: str) -> ParamSpec:
    specs = owner.__dict__.get("param_specs", {})
    if local_name not in specs:
        raise TypeError(f"{type(owner).__name__} declares no ParamSpec for its parameter {name}")
    return specs[local_name]


class ParamTable:
    """Every parameter of a rank's model, in `named_parameters` order, by global name."""

    def __init__(self, records: list[ParamRecord]):
        self.records = records
        self._by_param = {id(r.param): r for r in records}

    @classmethod
    def build(cls, module: torch.nn.Module, mirror: bool = False, tied: tuple[str, ...] = ()) -> ParamTable:
        """Read each parameter's spec from the module that owns it; `mirror` marks a second copy.
        `tied` names submodules that are tied copies of modules another pipeline rank owns (the
        last stage's embedding shared with the first under 1F1B): their gradients are summed with
        the owner's, so the copies stay equal."""
        records = []
        for module_name, owner in module.named_modules():
            for local_name, param in owner.named_parameters(recurse=False):
                name = f"{module_name}.{local_name}" if module_name else local_name
                records.append(ParamRecord(name, param, _declared_spec(owner, local_name, name), mirror,
                                           tied=module_name in tied))
        return cls(records)

    @classmethod
    def union(cls, tables: list[ParamTable]) -> ParamTable:
        return cls([r for table in tables for r in table.records])

    def __iter__(self) -> Iterator[ParamRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def of(self, param: torch.Tensor) -> ParamRecord:
        return self._by_param[id(param)]

    def params(self) -> list[torch.nn.Parameter]:
        return [r.param for r in self.records]
