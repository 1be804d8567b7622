"""A stacked parameter's optimizer state under its rows' names (a rank's experts of one projection,
moe/experts.py): the plain optimizer keeps one state per stack, a checkpoint one per global expert,
as the model's state dict holds the weights; so a checkpoint loads under another EP size."""
from __future__ import annotations

import torch

from megadual.parallel.params import ParamTable


def stacks(table: ParamTable) -> dict[str, list[str]]:
    """Each stacked parameter's name: its rows' names, in row order."""
    rows: dict[str, list[str]] = {}
    for record in table:
        if record.row is not None:
            rows.setdefault(record.owner_name, []).append(record.name)
    return rows


def _entries(state: dict, name: str) -> list[tuple[str, str, str]]:
    """(key, kind, attribute) of the flat optimizer state's entries of parameter `name`."""
    found = []
    for kind in ("state", "param_groups"):
        prefix = f"{kind}.{name}."
        found += [(key, kind, key[len(prefix):]) for key in state
                  if key.startswith(prefix) and "." not in key[len(prefix):]]
    return found


def _per_element(value) -> bool:
    return torch.is_tensor(value) and value.dim() > 0  # Adam's moments; not its step count


def split(state: dict, stacked: dict[str, list[str]]) -> None:
    """In place: each stack's entries replaced by one per row (moments cut, the rest copied)."""
    for name, rows in stacked.items():
        for key, kind, attribute in _entries(state, name):
            value = state.pop(key)
            parts = value.unbind(0) if _per_element(value) else \
                [value.clone() if torch.is_tensor(value) else value for _ in rows]
            state.update({f"{kind}.{row}.{attribute}": part for row, part in zip(rows, parts)})


def join(state: dict, stacked: dict[str, list[str]]) -> None:
    """In place: what `split` made, back to one entry per stack (the rows' moments stacked)."""
    for name, rows in stacked.items():
        for _, kind, attribute in _entries(state, rows[0]):
            parts = [state.pop(f"{kind}.{row}.{attribute}") for row in rows]
            state[f"{kind}.{name}.{attribute}"] = torch.stack(parts) if _per_element(parts[0]) else parts[0]
