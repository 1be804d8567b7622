"""Train/valid/test datasets from Megatron-style ``--data-path`` and ``--split`` values.

``--data-path`` is either prefixes (equal weights) or alternating weights and prefixes:
``["prefix1", "prefix2"]`` or ``["0.3", "prefix1", "0.7", "prefix2"]``. ``--split``
("969,30,1") cuts each prefix's documents into contiguous train/valid/test ranges.
With several prefixes each split is a ``BlendedDataset`` of the prefixes' datasets, each
built with 0.5% more samples than its share so that rounding never runs one dry.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
from torch.utils.data import Dataset

from megadual.data.blended import BlendedDataset
from megadual.data.gpt_dataset import GPTDataset, MockGPTDataset
from megadual.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")
_BLEND_MARGIN = 1.005  # Megatron's per-component oversampling


def parse_data_path(data_path: list[str]) -> tuple[list[float], list[str]]:
    """(normalised weights, prefixes) from a ``--data-path`` list."""
    if not data_path:
        raise ValueError("--data-path is empty; give dataset prefixes, or use --mock-data")
    if not _is_number(data_path[0]):
        if any(_is_number(entry) for entry in data_path):
            raise ValueError(
                f"--data-path {' '.join(data_path)}: weights must come first and alternate with "
                "prefixes (WEIGHT PREFIX WEIGHT PREFIX ...), or be left out entirely"
            )
        return [1.0 / len(data_path)] * len(data_path), list(data_path)
    weights, prefixes = data_path[0::2], data_path[1::2]
    if len(data_path) % 2 or not all(_is_number(w) for w in weights) or any(_is_number(p) for p in prefixes):
        raise ValueError(
            f"--data-path {' '.join(data_path)}: expected WEIGHT PREFIX pairs (e.g. 0.3 a 0.7 b)"
        )
    values = [float(w) for w in weights]
    if any(w < 0 or not math.isfinite(w) for w in values) or sum(values) <= 0:
        raise ValueError(f"--data-path weights must be non-negative and not all zero, got {weights}")
    return [w / sum(values) for w in values], prefixes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_split(split: str) -> list[float]:
    """Normalised train/valid/test shares from e.g. "969,30,1" (missing shares are 0)."""
    parts = split.replace("/", ",").split(",")
    try:
        shares = [float(part) for part in parts]
    except ValueError:
        raise ValueError(
            f"--split {split!r}: expected up to 3 comma-separated numbers, e.g. 969,30,1"
        ) from None
    if len(shares) > 3 or any(s < 0 or not math.isfinite(s) for s in shares) or sum(shares) <= 0:
        raise ValueError(f"--split {split!r}: expected up to 3 non-negative numbers with a positive sum")
    shares += [0.0] * (3 - len(shares))
    return [s / sum(shares) for s in shares]


def split_ranges(shares: list[float], num_documents: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges per split, rounded as Megatron rounds them."""
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + round(share * num_documents))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    # Megatron's correction can push a bound below 0 in rare tiny cases; keep ranges valid
    bounds = np.maximum.accumulate(np.clip(bounds, 0, num_documents)).tolist()
    return list(pairwise(bounds))


def build_datasets(
    data_path: list[str],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: tuple[int, int, int],
    mock: bool,
    vocab_size: int,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """(train, valid, test); a split is None when its share or its sample count is 0."""
    shares = parse_split(split)
    wanted = [n if share > 0 else 0 for n, share in zip(num_samples, shares)]
    if mock:
        return tuple(
            MockGPTDataset(n, seq_length, vocab_size, seed + i) if n > 0 else None
            for i, n in enumerate(wanted)
        )
    weights, prefixes = parse_data_path(data_path)
    # a zero weight switches a prefix off without editing the rest of the list;
    # opening the others validates their files before anything else happens
    blend = [
        (weight, prefix, IndexedDataset(prefix)) for weight, prefix in zip(weights, prefixes) if weight > 0
    ]
    return tuple(
        _build_split(blend, shares, split_number, n, seq_length, seed) if n > 0 else None
        for split_number, n in enumerate(wanted)
    )


def _build_split(
    blend: list[tuple[float, str, IndexedDataset]],
    shares: list[float],
    split_number: int,
    num_samples: int,
    seq_length: int,
    seed: int,
) -> Dataset:
    if len(blend) == 1:
        _, prefix, source = blend[0]
        return _prefix_split(source, prefix, shares, split_number, num_samples, seq_length, seed)
    parts = [
        _prefix_split(source, prefix, shares, split_number, math.ceil(num_samples * weight * _BLEND_MARGIN),
                      seq_length, seed)
        for weight, prefix, source in blend
    ]
    return BlendedDataset(parts, [weight for weight, _, _ in blend], num_samples)


def _prefix_split(
    source: IndexedDataset,
    prefix: str,
    shares: list[float],
    split_number: int,
    num_samples: int,
    seq_length: int,
    seed: int,
) -> GPTDataset:
    start, end = split_ranges(shares, len(source))[split_number]
    if start == end:
        raise ValueError(
            f"--split gives the {SPLIT_NAMES[split_number]} split no documents of {prefix} "
            f"({len(source)} documents); change --split or add data"
        )
    return GPTDataset(source, np.arange(start, end), num_samples, seq_length, seed)
