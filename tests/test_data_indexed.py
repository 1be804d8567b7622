"""Megatron .bin/.idx layout: exact bytes, reading, dtype choice, and clear errors on bad files."""

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from megadual.data.indexed_dataset import DataFileError, IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from megadual.data.published_files import PublishedFiles
from megadual.data.token_ids import cache_path, check_token_ids

MAGIC = b"MMIDIDX\x00\x00"


def write(prefix, documents, dtype=np.uint16):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for tokens in documents:
        builder.add_document(tokens)
    builder.finalize(f"{prefix}.idx")


def test_builder_writes_megatron_bytes(tmp_path):
    prefix = tmp_path / "tiny"
    write(prefix, [[1, 2, 3], [], [65535, 7]])
    expected_idx = (
        MAGIC
        + struct.pack("<Q", 1)  # version
        + struct.pack("<B", 8)  # uint16
        + struct.pack("<QQ", 3, 4)  # sequences, document indices
        + struct.pack("<3i", 3, 0, 2)  # lengths
        + struct.pack("<3q", 0, 6, 6)  # byte pointers
        + struct.pack("<4q", 0, 1, 2, 3)  # document ends
    )
    assert (tmp_path / "tiny.idx").read_bytes() == expected_idx
    assert (tmp_path / "tiny.bin").read_bytes() == struct.pack("<5H", 1, 2, 3, 65535, 7)

    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == 3 and dataset.dtype == np.uint16
    assert [dataset[i].tolist() for i in range(3)] == [[1, 2, 3], [], [65535, 7]]
    assert dataset.get(0, offset=1, length=2).tolist() == [2, 3]
    assert dataset.sequence_lengths.tolist() == [3, 0, 2]
    assert dataset.document_indices.tolist() == [0, 1, 2, 3]


def test_reads_hand_written_int32_file_with_multi_sequence_documents(tmp_path):
    tokens = [[10, 11], [70000], [5, 6, 7]]
    (tmp_path / "x.bin").write_bytes(np.concatenate([np.array(t, "<i4") for t in tokens]).tobytes())
    (tmp_path / "x.idx").write_bytes(
        MAGIC + struct.pack("<QBQQ", 1, 4, 3, 3) + struct.pack("<3i", 2, 1, 3)
        + struct.pack("<3q", 0, 8, 12) + struct.pack("<3q", 0, 2, 3)
    )
    dataset = IndexedDataset(str(tmp_path / "x"))
    assert dataset.dtype == np.int32
    assert [dataset[i].tolist() for i in range(3)] == tokens
    assert dataset.document_indices.tolist() == [0, 2, 3]


def test_dtype_follows_vocab_size_like_megatron(tmp_path):
    assert optimal_dtype(50257) == np.uint16
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(128256) == np.int32
    write(tmp_path / "big", [[100000]], np.int32)
    assert (tmp_path / "big.idx").read_bytes()[17] == 4  # dtype code of int32
    with pytest.raises(ValueError, match="out of range"):
        write(tmp_path / "small", [[70000]], np.uint16)


@pytest.fixture
def good_prefix(tmp_path):
    prefix = tmp_path / "good"
    write(prefix, [[1, 2, 3, 4], [5, 6]])
    return prefix


@pytest.mark.parametrize("missing", ["bin", "idx"])
def test_missing_file_names_file_and_flag(good_prefix, missing):
    path = good_prefix.with_suffix(f".{missing}")
    path.unlink()
    with pytest.raises(FileNotFoundError) as error:
        IndexedDataset(str(good_prefix))
    assert str(path) in str(error.value) and "--data-path" in str(error.value)


def test_truncated_bin_is_rejected_on_open(good_prefix):
    path = good_prefix.with_suffix(".bin")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataFileError, match="truncated") as error:
        IndexedDataset(str(good_prefix))
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda data: b"XXIDIDX\x00\x00" + data[9:], "bad magic"),
        (lambda data: data[:9] + struct.pack("<Q", 2) + data[17:], "unknown version"),
        (lambda data: data[:17] + bytes([9]) + data[18:], "unknown dtype"),
        (lambda data: data[:-3], "truncated"),
        (lambda data: data[:20], "truncated"),
    ],
)
def test_corrupt_idx_is_rejected_on_open(good_prefix, corrupt, problem):
    path = good_prefix.with_suffix(".idx")
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(DataFileError, match=problem) as error:
        IndexedDataset(str(good_prefix))
    assert str(path) in str(error.value)


def test_dtype_that_disagrees_with_the_bin_is_refused(good_prefix):
    idx = good_prefix.with_suffix(".idx")
    data = idx.read_bytes()
    idx.write_bytes(data[:17] + bytes([1]) + data[18:])  # uint16 written, uint8 claimed
    with pytest.raises(DataFileError, match="sequence 1 starts at byte 8, but with 1-byte uint8 tokens"):
        IndexedDataset(str(good_prefix))
    idx.write_bytes(data[:17] + bytes([4]) + data[18:])  # int32 claimed: the sequences overrun the .bin
    with pytest.raises(DataFileError, match="sequence 1 starts at byte 8, but with 4-byte int32 tokens"):
        IndexedDataset(str(good_prefix))
    good_prefix.with_suffix(".bin").write_bytes(good_prefix.with_suffix(".bin").read_bytes() + b"\0\0")
    idx.write_bytes(data)  # a .bin longer than its .idx says: not the pair it was written with
    with pytest.raises(DataFileError, match="describes 6 tokens of uint16 .12 bytes. but .* holds 14 bytes"):
        IndexedDataset(str(good_prefix))


def test_token_ids_outside_the_vocabulary_are_refused_and_the_scan_is_cached(tmp_path):
    prefix = tmp_path / "data"
    write(prefix, [[1, 2, 3], [9]])
    check_token_ids(IndexedDataset(str(prefix)), 10)
    assert json.loads(Path(cache_path(str(prefix))).read_text())["range"] == [1, 9]
    write(prefix, [[1, 2, 3], [9, 10]])  # rewritten: the cached range no longer describes it
    with pytest.raises(DataFileError, match=r"data.bin: token id 10 is outside the vocabulary of 10"):
        check_token_ids(IndexedDataset(str(prefix)), 10)


@pytest.mark.parametrize("written, code, name", [(np.int32, 7, "float32"), (np.int64, 6, "float64")])
def test_a_float_token_dtype_is_refused_naming_the_file(tmp_path, written, code, name):
    """The same width relabelled: the layout agrees, so only the dtype's kind can tell (ids read as 0)."""
    prefix = tmp_path / "floats"
    write(prefix, [[1, 2, 3, 4], [5, 6]], written)
    idx = prefix.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:17] + bytes([code]) + idx.read_bytes()[18:])
    with pytest.raises(DataFileError, match=f"dtype code {code} says {name} tokens, but token ids are integers"
                       ) as error:
        IndexedDataset(str(prefix))
    assert str(idx) in str(error.value)
    with pytest.raises(ValueError, match="unsupported token dtype"):
        IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.float32)


def test_a_dataset_reads_the_version_it_was_opened_on_while_a_newer_one_is_published(tmp_path, monkeypatch):
    """preprocess_data.py's public names are symlinks through one pointer: a dataset opened before a
    newer version is published, reopened after it (pickled into a DataLoader worker), reads the
    .idx and .bin it was opened on, never the new .bin under the old positions; a file the newer
    version does not rewrite (a tokenizer given by --tokenizer-model) stays published."""
    prefix = str(tmp_path / "data_text_document")

    def publish(documents, *others):
        files = PublishedFiles(str(tmp_path / "data"))
        write(files.path(prefix), documents)
        for other in others:
            Path(files.path(other)).write_text("first")
        files.publish([f"{prefix}.bin", f"{prefix}.idx", *others])

    publish([[1, 2], [3]], str(tmp_path / "data_tokenizer.json"))
    opened = IndexedDataset(prefix)
    # the old version kept, as it is until the publishing run removes it
    monkeypatch.setattr(PublishedFiles, "_remove_versions_except", lambda self, keep: None)
    publish([[7, 8, 9]])
    current = IndexedDataset(prefix)
    assert len(current) == 1 and current[0].tolist() == [7, 8, 9]
    reopened = pickle.loads(pickle.dumps(opened))
    assert [reopened[i].tolist() for i in range(len(reopened))] == [[1, 2], [3]]
    assert (tmp_path / "data_tokenizer.json").read_text() == "first"  # what a run does not rewrite stays
