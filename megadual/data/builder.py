"""Train/valid/test datasets from Megatron-style ``--data-path`` and ``--split`` values.

``--split`` ("969,30,1") cuts each prefix's documents into contiguous train/valid/test ranges
(``--data-path`` forms: megadual/data/data_args.py).
With several prefixes each split is a ``BlendedDataset`` of the prefixes' datasets, each
built with 0.5% more samples than its share so that rounding never runs one dry.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from itertools import pairwise

import numpy as np
from torch.utils.data import Dataset

from megadual.config import ConfigError
from megadual.data.blended import BlendedDataset
from megadual.data.data_args import parse_data_path, parse_split
from megadual.data.gpt_dataset import GPTDataset, MockGPTDataset
from megadual.data.indexed_dataset import IndexedDataset
from megadual.data.token_ids import check_token_ids

SPLIT_NAMES = ("train", "valid", "test")
_BLEND_MARGIN = 1.005  # Megatron's per-component oversampling


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
    warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """(train, valid, test); a split is None when its share or its sample count is 0.

    Every prefix's files are opened and checked first (token ids below `vocab_size`). A
    split that is asked for samples but gets no documents is an error naming --split, except
    the test split, which training never reads: that one is only reported through `warn`.
    """
    shares = parse_split(split)
    wanted = [n if share > 0 else 0 for n, share in zip(num_samples, shares)]
    if mock:
        return tuple(
            MockGPTDataset(n, seq_length, vocab_size, seed + i) if n > 0 else None
            for i, n in enumerate(wanted)
        )
    weights, prefixes = parse_data_path(data_path)
    # a zero weight switches a prefix off without editing the rest of the list
    blend = [(weight, prefix, _open_checked(prefix, vocab_size)) for weight, prefix in zip(weights, prefixes)
             if weight > 0]
    datasets = []
    for split_number, n in enumerate(wanted):
        try:
            datasets.append(_build_split(blend, shares, split_number, n, seq_length, seed) if n > 0 else None)
        except _EmptySplit as empty:
            datasets.append(_no_documents(split_number, split, empty, warn))
    return tuple(datasets)


def _open_checked(prefix: str, vocab_size: int) -> IndexedDataset:
    dataset = IndexedDataset(prefix)
    check_token_ids(dataset, vocab_size)
    return dataset


class _EmptySplit(Exception):
    """A split given no documents of a prefix; build_datasets decides whether that is an error."""

    def __init__(self, prefix: str, documents: int) -> None:
        super().__init__(prefix)
        self.prefix, self.documents = prefix, documents


def _no_documents(split_number: int, split: str, empty: _EmptySplit, warn: Callable[[str], None]) -> None:
    where = (f"--split {split} gives the {SPLIT_NAMES[split_number]} split no documents of {empty.prefix} "
             f"({empty.documents} documents)")
    if split_number == 0:
        raise ConfigError(f"{where}; change --split or add data")
    if split_number == 1:
        raise ConfigError(f"{where}, and evaluation (--eval-interval) reads it; change --split, add data, "
                          "or set --eval-interval 0")
    warn(f"WARNING: {where}; training does not read it, so the run goes on")


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
        raise _EmptySplit(prefix, len(source))
    tokens = int(np.asarray(source.sequence_lengths[start:end], dtype=np.int64).sum())
    if tokens <= seq_length:  # a sample is seq_length + 1 tokens (its labels run one further)
        raise ConfigError(f"the {SPLIT_NAMES[split_number]} split of {prefix} holds {tokens} tokens "
                          f"({end - start} documents), fewer than one sample of --seq-length {seq_length} + 1: "
                          "add data or lower --seq-length")
    return GPTDataset(source, np.arange(start, end), num_samples, seq_length, seed)
