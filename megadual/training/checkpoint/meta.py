"""megadual_meta.json, a checkpoint's account of the run that wrote it, read and checked against its
schema before anything uses it: a file crafted or damaged by hand is refused in one line naming it
and what is wrong, never a traceback from deep inside the loader or a converter.

    {"train_state": {TrainState's fields: non-negative integers},
     "config": {"model": {ModelConfig's fields, each of its type; older checkpoints may lack some},
                "data": {"vocab_size": int, ...}, the other sections ...},
     "world_size": positive int, "weights_only": bool (optional, written by --from-hf),
     "run_id": str (optional: the run that wrote it, training/checkpoint/ownership.py)}
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing

from megadual.config import ModelConfig
from megadual.training.checkpoint.layout import META, CheckpointError, TrainState

_REQUIRED = {"train_state": dict, "config": dict, "world_size": int}
_OPTIONAL = {"weights_only": bool, "run_id": str}


def read_meta(folder: str) -> dict:
    """The META file of `folder`, checked against its schema; CheckpointError naming it otherwise."""
    path = os.path.join(folder, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON ({e})") from None
    problem = meta_problem(meta)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    return meta


def meta_problem(meta) -> str | None:
    """What in `meta` does not follow the schema, in words; None when it does."""
    if not isinstance(meta, dict):
        return f"should hold a JSON object, holds a {type(meta).__name__}"
    problem = _keys_problem(meta, _REQUIRED, _OPTIONAL, "")
    if problem or meta["world_size"] < 1:
        return problem or f"world_size is {meta['world_size']}"
    problem = _keys_problem(meta["train_state"], {f.name: int for f in dataclasses.fields(TrainState)}, {},
                            "train_state.")
    if problem or any(v < 0 for v in meta["train_state"].values()):
        return problem or "train_state holds a negative count"
    config = meta["config"]
    return (_keys_problem(config.get("data"), {"vocab_size": int}, None, "config.data.")
            or _keys_problem(config.get("model"), {}, typing.get_type_hints(ModelConfig), "config.model."))


def _keys_problem(found: dict, required: dict, optional: dict | None, where: str) -> str | None:
    """A missing key of `required`, a key in neither (unless `optional` is None: any other key
    goes), or a value not of its type."""
    if not isinstance(found, dict):
        return f"{where.rstrip('.')} should be a JSON object"
    missing = sorted(set(required) - set(found))
    if missing:
        return f"{where}{missing[0]} is missing"
    types_ = {**required, **(optional or {})}
    for key, value in found.items():
        if key not in types_:
            if optional is None:
                continue
            return f"unknown key {where}{key}"
        if not _is(value, types_[key]):
            return f"{where}{key} is {value!r}, not of type {getattr(types_[key], '__name__', types_[key])}"
    return None


def _is(value, kind) -> bool:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return any(_is(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
