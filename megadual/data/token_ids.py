"""Token ids against the vocabulary, checked when a dataset is opened.

A ``.bin`` tokenized with another tokenizer holds ids the model's embedding does not have;
training would stop at the first forward with an IndexError, or (with a padded embedding)
train on rows no token should reach. ``check_token_ids`` refuses such a file at start-up,
naming it and the offending id. Finding the largest id reads the whole ``.bin`` once, so the
result is cached beside the data, in ``DIR/cache/IndexedDataset_token_ids/NAME.json``, keyed
by the size, modification time and inode of the ``.bin`` and ``.idx`` (a rewritten dataset is
scanned again). A directory that cannot be written only means no cache.
"""

from __future__ import annotations

import json
import os

from megadual.data.indexed_dataset import DataFileError, IndexedDataset

CACHE_DIR = os.path.join("cache", "IndexedDataset_token_ids")


def cache_path(prefix: str) -> str:
    directory, name = os.path.split(os.path.abspath(prefix))
    return os.path.join(directory, CACHE_DIR, name + ".json")


def _identity(dataset: IndexedDataset) -> dict:
    stats = {path: os.stat(path) for path in (dataset.bin_file, dataset.idx_file)}
    return {path: [s.st_size, s.st_mtime_ns, s.st_ino] for path, s in stats.items()}


def token_id_range(dataset: IndexedDataset) -> tuple[int, int] | None:
    """(smallest, largest) token id in the dataset, None when it holds no tokens; from the cache
    when the files have not changed since it was written."""
    path, identity = cache_path(dataset.prefix), _identity(dataset)
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached["files"] == identity:
            return None if cached["range"] is None else tuple(cached["range"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache, or one from other files: scan
    tokens = dataset.all_tokens()
    found = (int(tokens.min()), int(tokens.max())) if tokens.size else None
    _write_cache(path, {"files": identity, "range": found})
    return found


def _write_cache(path: str, record: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # ranks opening the same data write side by side
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        pass


def check_token_ids(dataset: IndexedDataset, vocab_size: int) -> None:
    """Refuse a dataset holding an id outside [0, vocab_size)."""
    found = token_id_range(dataset)
    if found is None:
        return
    low, high = found
    if high >= vocab_size or low < 0:
        bad = high if high >= vocab_size else low
        raise DataFileError(
            f"indexed dataset file {dataset.bin_file}: token id {bad} is outside the vocabulary of {vocab_size} "
            "(--vocab-size or the tokenizer's): was it tokenized with another tokenizer?"
        )
