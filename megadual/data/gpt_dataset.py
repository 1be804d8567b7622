"""Megatron-style GPT dataset: fixed-length samples cut from a shuffled stream of documents.

Three indices, all built from ``numpy.random.RandomState(seed)`` in this order, as
Megatron-LM builds them:

- document index: the dataset's documents repeated for as many epochs as ``num_samples``
  needs, shuffled. When the last epoch is used for under 80% of its samples it is
  shuffled on its own, so every document is seen once before any is seen twice.
- sample index: row k is (position in the document index, token offset) where sample k
  starts; sample k runs to row k+1 inclusive, i.e. seq_length + 1 tokens, and samples
  overlap by one token (the last label of one sample is the first token of the next).
- shuffle index: a permutation of the samples (again with the final epoch kept apart).

Item i is sample ``shuffle_index[i]`` as {"tokens", "labels"}, labels shifted by one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

# Megatron's rule: a final epoch used for less than this share of its samples is
# shuffled separately from the full epochs before it.
_SEPARATE_FINAL_EPOCH_BELOW = 0.80


class TokenSource(Protocol):
    """What the GPT dataset reads from: an IndexedDataset, or synthetic documents."""

    sequence_lengths: np.ndarray

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray: ...


class GPTDataset(Dataset):
    """``num_samples`` (or a few more) samples of ``seq_length`` tokens over ``document_ids``."""

    def __init__(
        self,
        source: TokenSource,
        document_ids: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
    ) -> None:
        if seq_length < 1:
            raise ValueError(f"sequence length must be positive, got {seq_length} (--seq-length)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.source = source
        self.seq_length = seq_length
        document_ids = np.asarray(document_ids, dtype=np.int64)
        lengths = np.asarray(source.sequence_lengths)[document_ids].astype(np.int64)
        tokens_per_epoch = int(lengths.sum())
        if tokens_per_epoch < 2:
            raise ValueError(
                f"the {len(document_ids)} documents given hold {tokens_per_epoch} tokens; need at least 2"
            )
        num_epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
        full_epoch_samples = _full_epoch_samples(tokens_per_epoch, seq_length, num_samples, num_epochs)

        rng = np.random.RandomState(seed)
        self.document_index = _document_index(document_ids, num_epochs, full_epoch_samples is not None, rng)
        self.sample_index = _sample_index(
            np.asarray(source.sequence_lengths)[self.document_index].astype(np.int64), seq_length
        )
        total = len(self.sample_index) - 1
        self.shuffle_index = _shuffle_index(
            total if full_epoch_samples is None else full_epoch_samples, total, rng
        )

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 tokens of item i, as int64."""
        sample = self.shuffle_index[i]
        (first, first_offset), (last, last_offset) = self.sample_index[sample], self.sample_index[sample + 1]
        pieces = []
        for position in range(first, last + 1):
            start = int(first_offset) if position == first else 0
            length = int(last_offset) + 1 - start if position == last else None
            pieces.append(self.source.get(int(self.document_index[position]), start, length))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(self.sample_tokens(i))
        return {"tokens": tokens[:-1].clone(), "labels": tokens[1:].clone()}


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    # samples overlap by one token, so E epochs give (E * tokens - 1) // seq_length samples;
    # the smallest E with at least num_samples of them:
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def _full_epoch_samples(
    tokens_per_epoch: int, seq_length: int, num_samples: int, num_epochs: int
) -> int | None:
    """Samples in the epochs before the last when the last is shuffled apart, else None."""
    if num_epochs == 1:
        return None
    before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    per_epoch = (tokens_per_epoch - 1) // seq_length
    from_final = num_samples - before_final
    return before_final if from_final < int(_SEPARATE_FINAL_EPOCH_BELOW * per_epoch) else None


def _document_index(
    document_ids: np.ndarray, num_epochs: int, separate_final_epoch: bool, rng: np.random.RandomState
) -> np.ndarray:
    if not separate_final_epoch:
        index = np.tile(document_ids, num_epochs)
        rng.shuffle(index)
        return index
    return np.concatenate(
        [
            _document_index(document_ids, num_epochs - 1, False, rng),
            _document_index(document_ids, 1, False, rng),
        ]
    )


def _sample_index(stream_lengths: np.ndarray, seq_length: int) -> np.ndarray:
    """[(position in document index, offset)] of every sample boundary in the token stream."""
    stream_tokens = int(stream_lengths.sum())
    num_samples = (stream_tokens - 1) // seq_length
    boundaries = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    document_ends = np.cumsum(stream_lengths)
    # the document holding token position p is the first whose end lies beyond p;
    # empty documents are skipped that way
    positions = np.searchsorted(document_ends, boundaries, side="right")
    offsets = boundaries - (document_ends[positions] - stream_lengths[positions])
    return np.stack([positions, offsets], axis=1)


def _shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """The first ``num_first`` samples shuffled among themselves, then the rest among themselves."""
    first = np.arange(num_first, dtype=np.int64)
    rng.shuffle(first)
    rest = np.arange(num_first, total, dtype=np.int64)
    rng.shuffle(rest)
    return np.concatenate([first, rest])


class MockDocuments:
    """Synthetic documents for ``--mock-data``: each is a run of consecutive ids from a
    seeded start (so a model can learn it), ending with the end-of-document id."""

    def __init__(self, num_documents: int, vocab_size: int, seed: int, max_length: int) -> None:
        if vocab_size < 2:
            raise ValueError(f"mock data needs a vocabulary of at least 2, got {vocab_size} (--vocab-size)")
        rng = np.random.RandomState(seed)
        self.vocab_size = vocab_size
        self.sequence_lengths = rng.randint(2, max(3, max_length + 1), size=num_documents).astype(np.int32)
        self._starts = rng.randint(0, vocab_size - 1, size=num_documents)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        doc_length = int(self.sequence_lengths[idx])
        eod = self.vocab_size - 1
        document = (self._starts[idx] + np.arange(doc_length - 1)) % eod
        document = np.append(document, eod)
        end = doc_length if length is None else offset + length
        return document[offset:end]


class MockGPTDataset(GPTDataset):
    """A GPTDataset over ``MockDocuments``; same items, deterministic from the seed."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int) -> None:
        num_documents = 1000
        source = MockDocuments(num_documents, vocab_size, seed, max_length=2 * seq_length)
        super().__init__(source, np.arange(num_documents), num_samples, seq_length, seed)
