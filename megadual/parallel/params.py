"""What every parameter is to the parallel layout: declared once by its layer, read everywhere.

A layer that owns parameters says, in `self.param_specs`, how each one is initialized
and laid out (`ParamSpec`): split over TP along a dim, a routed expert's (replicated
only over the expert-data-parallel group), or a gradient that is a partial sum over TP
(sequence-parallel norms, the router under TP). `ParamTable.build` walks a model once
and records every parameter under its global name, with whether it is DualPipe's
second copy of a stage; a stacked parameter (a rank's experts of one projection) is recorded
as its rows, each under its expert's name. Initialization, gradient reduction, the gradient norm,
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
    owner: torch.nn.Parameter  # the module's parameter: this one, or the stack this is row `row` of
    spec: ParamSpec
    mirror: bool = False  # DualPipe's second copy of a stage (its twin lives on the mirrored rank)
    tied: bool = False  # a tied copy of a parameter another pipeline rank owns (see ParamTable.build)
    row: int | None = None  # a row of a stacked parameter (a rank's experts of one projection)
    owner_name: str | None = None  # the stacked parameter's own name, for a row

    @property
    def param(self) -> torch.Tensor:
        """The parameter, or its row of the stack (a view, taken now: a stack's storage can move)."""
        return self.owner if self.row is None else self.owner[self.row]

    @property
    def grad(self) -> torch.Tensor | None:
        grad = self.owner.grad
        return grad if grad is None or self.row is None else grad[self.row]

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

    @classmethod
    def build(cls, module: torch.nn.Module, mirror: bool = False, tied: tuple[str, ...] = ()) -> ParamTable:
        """Read each parameter's spec from the module that owns it; `mirror` marks a second copy.
        `tied` names submodules that are tied copies of modules another pipeline rank owns (the
        last stage's embedding shared with the first under 1F1B): their gradients are summed with
        the owner's, so the copies stay equal. A stacked parameter (the module's `param_rows` names
        its rows, under the module) is recorded row by row, the stacks of one module interleaved
        (row 0 of each, then row 1, ...): its rows are what everything else names and counts."""
        records = []
        for module_name, owner in module.named_modules():
            prefix = f"{module_name}." if module_name else ""
            rows = owner.__dict__.get("param_rows", {})
            stacked = []
            for local_name, param in owner.named_parameters(recurse=False):
                name = prefix + local_name
                spec = _declared_spec(owner, local_name, name)
                if local_name in rows:
                    stacked.append((name, param, spec, rows[local_name]))
                else:
                    records.append(ParamRecord(name, param, spec, mirror, tied=module_name in tied))
            for row in range(len(stacked[0][3]) if stacked else 0):
                records += [ParamRecord(prefix + row_names[row], param, spec, mirror, module_name in tied, row, name)
                            for name, param, spec, row_names in stacked]
        return cls(records)

    @classmethod
    def union(cls, tables: list[ParamTable]) -> ParamTable:
        return cls([r for table in tables for r in table.records])

    def __iter__(self) -> Iterator[ParamRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def params(self) -> list[torch.nn.Parameter]:
        """The module parameters, each once (a stack once for all its rows)."""
        return list({id(r.owner): r.owner for r in self.records}.values())
