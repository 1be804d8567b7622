"""GPT sample index: samples are windows of the shuffled document stream, seeded, epoch-aware."""

import itertools

import numpy as np
import pytest
import torch

from megadual.data.gpt_dataset import GPTDataset, MockGPTDataset
from megadual.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

SEQ = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """20 documents of varied length (one empty); token values encode (document, position)."""
    prefix = str(tmp_path_factory.mktemp("gpt") / "docs")
    rng = np.random.RandomState(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    for doc in range(20):
        length = 0 if doc == 7 else rng.randint(1, 25)
        builder.add_document(doc * 1000 + np.arange(length))
    builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


def stream_of(source, document_order):
    return np.concatenate([source[int(d)] for d in document_order])


def test_every_sample_is_a_window_of_the_shuffled_stream(source):
    documents = np.arange(3, 17)
    dataset = GPTDataset(source, documents, num_samples=20, seq_length=SEQ, seed=5)
    assert sorted(dataset.document_index[: len(documents)].tolist()) == documents.tolist()
    assert sorted(dataset.shuffle_index.tolist()) == list(range(len(dataset)))
    stream = stream_of(source, dataset.document_index)
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["tokens"].dtype == torch.int64 and item["tokens"].shape == (SEQ,)
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])
        start = dataset.shuffle_index[i] * SEQ
        window = np.append(item["tokens"].numpy(), item["labels"][-1].item())
        assert window.tolist() == stream[start : start + SEQ + 1].tolist()


def test_deterministic_from_seed_and_changes_with_it(source):
    documents = np.arange(20)
    first = GPTDataset(source, documents, 30, SEQ, seed=1)
    again = GPTDataset(source, documents, 30, SEQ, seed=1)
    other = GPTDataset(source, documents, 30, SEQ, seed=2)
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(len(first)))
    assert not np.array_equal(first.document_index, other.document_index)
    assert not all(torch.equal(first[i]["tokens"], other[i]["tokens"]) for i in range(10))


def test_repeats_epochs_and_sees_every_document_before_any_twice(source):
    documents = np.arange(20)
    tokens_per_epoch = int(source.sequence_lengths.sum())
    per_epoch = (tokens_per_epoch - 1) // SEQ
    dataset = GPTDataset(source, documents, num_samples=per_epoch + 3, seq_length=SEQ, seed=3)
    assert len(dataset.document_index) == 2 * len(documents)
    for epoch in range(2):
        assert sorted(dataset.document_index[epoch * 20 : (epoch + 1) * 20].tolist()) == documents.tolist()
    # the barely used final epoch is shuffled on its own, after the full epoch
    assert sorted(dataset.shuffle_index[:per_epoch].tolist()) == list(range(per_epoch))
    assert len(dataset) >= per_epoch + 3


def test_mock_dataset_is_seeded_and_in_vocab():
    first, again = MockGPTDataset(50, 16, 100, seed=7), MockGPTDataset(50, 16, 100, seed=7)
    other = MockGPTDataset(50, 16, 100, seed=8)
    assert len(first) >= 50
    item = first[3]
    assert item["tokens"].dtype == torch.int64 and item["tokens"].shape == (16,)
    assert torch.equal(item["tokens"][1:], item["labels"][:-1])
    assert all(torch.equal(first[i]["tokens"], again[i]["tokens"]) for i in range(50))
    assert not all(torch.equal(first[i]["tokens"], other[i]["tokens"]) for i in range(50))
    tokens = torch.cat([first[i]["tokens"] for i in range(50)])
    assert tokens.min() >= 0 and tokens.max() == 99  # 99 is the end-of-document id


def megatron_indices(lengths: list[int], num_samples: int, seq: int, seed: int) -> tuple[list[int], list[int]]:
    """Megatron-LM's document and shuffle indices over documents 0..n-1, written out: the fewest epochs
    whose stream (samples overlapping by one token) gives num_samples; the final epoch's documents and
    samples shuffled apart when fewer than int(0.8 x samples per epoch) of num_samples come from it;
    every shuffle drawn from one RandomState(seed) in this order."""
    tokens, documents = sum(lengths), np.arange(len(lengths))
    epochs = 1
    while (epochs * tokens - 1) // seq < num_samples:
        epochs += 1
    before = ((epochs - 1) * tokens - 1) // seq
    separate = epochs > 1 and num_samples - before < int(0.8 * ((tokens - 1) // seq))
    rng = np.random.RandomState(seed)
    epoch_parts = [np.tile(documents, epochs - 1), documents.copy()] if separate else [np.tile(documents, epochs)]
    for part in epoch_parts:
        rng.shuffle(part)
    total = (epochs * tokens - 1) // seq
    sample_parts = [np.arange(before), np.arange(before, total)] if separate else [np.arange(total)]
    for part in sample_parts:
        rng.shuffle(part)
    return np.concatenate(epoch_parts).tolist(), np.concatenate(sample_parts).tolist()


class Lengths:
    """Documents of these lengths; a document's tokens are its positions in the stream of one epoch."""

    def __init__(self, lengths: list[int]):
        self.sequence_lengths = np.array(lengths, dtype=np.int32)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        end = self.sequence_lengths[idx] if length is None else offset + length
        return np.arange(self.starts[idx], self.starts[idx] + self.sequence_lengths[idx])[offset:end]


def test_epochs_and_shuffles_are_megatrons_at_every_boundary():
    """Tokens per epoch from 2 to 25 over three documents (one empty), sequence lengths 1, 3 and 8, every
    num_samples over three epochs: the epochs' boundaries and the final epoch's 80% rule both sides."""
    for tokens, seq in itertools.product(range(2, 26), (1, 3, 8)):
        lengths = [tokens // 3, 0, tokens - tokens // 3]
        for num_samples in range(1, 3 * ((tokens - 1) // seq) + 2):
            dataset = GPTDataset(Lengths(lengths), np.arange(3), num_samples, seq, seed=num_samples)
            want = megatron_indices(lengths, num_samples, seq, seed=num_samples)
            assert (dataset.document_index.tolist(), dataset.shuffle_index.tolist()) == want, \
                (tokens, seq, num_samples)


@pytest.mark.parametrize("documents, num_samples, seq, message", [
    ([3], 1, 0, "sequence length must be positive, got 0 (--seq-length)"),
    ([3], 0, 4, "num_samples must be positive, got 0"),
    ([1, 0], 1, 4, "the 2 documents given hold 1 tokens; need at least 2"),
])
def test_a_dataset_that_cannot_give_a_sample_is_refused_saying_why(documents, num_samples, seq, message):
    with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
        GPTDataset(Lengths(documents), np.arange(len(documents)), num_samples, seq, seed=0)
