"""GPT sample index: samples are windows of the shuffled document stream, seeded, epoch-aware."""

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


def test_epochs_and_the_separate_final_epoch_follow_megatrons_rule(source):
    """Megatron's GPTDataset: the fewest epochs whose stream (samples overlapping by one token) gives
    num_samples; the final epoch shuffled apart (documents and samples) when fewer than
    int(0.8 x samples per epoch) of num_samples come from it. Every num_samples over three epochs."""
    documents = np.arange(20)
    tokens = int(source.sequence_lengths.sum())
    per_epoch = (tokens - 1) // SEQ
    for num_samples in range(1, 3 * per_epoch + 1):
        epochs = 1
        while (epochs * tokens - 1) // SEQ < num_samples:
            epochs += 1
        before = ((epochs - 1) * tokens - 1) // SEQ
        separate = epochs > 1 and num_samples - before < int(0.8 * per_epoch)
        dataset = GPTDataset(source, documents, num_samples, SEQ, seed=num_samples)
        assert len(dataset.document_index) == 20 * epochs and len(dataset) == (epochs * tokens - 1) // SEQ
        last_epoch_alone = sorted(dataset.document_index[-20:].tolist()) == documents.tolist()
        first_samples_alone = sorted(dataset.shuffle_index[:before].tolist()) == list(range(before))
        assert (last_epoch_alone and first_samples_alone) == separate or epochs == 1, num_samples
