"""--data-path / --split parsing, split ranges, blending, and build_datasets end to end."""

import numpy as np
import pytest

from megadual.data.blended import BlendedDataset, blending_indices
from megadual.data.builder import build_datasets, parse_data_path, parse_split, split_ranges
from megadual.data.indexed_dataset import IndexedDatasetBuilder


def make_prefix(path, first_token, num_docs=40, length=30):
    builder = IndexedDatasetBuilder(f"{path}.bin", np.uint16)
    for doc in range(num_docs):
        builder.add_document(np.full(length, first_token + doc))
    builder.finalize(f"{path}.idx")
    return str(path)


def test_split_ranges_match_megatron_rounding():
    assert split_ranges(parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(parse_split("1,1,1"), 10) == [(0, 4), (4, 7), (7, 10)]
    assert split_ranges(parse_split("100"), 7) == [(0, 7), (7, 7), (7, 7)]
    assert split_ranges(parse_split("98,2,0"), 40) == [(0, 39), (39, 40), (40, 40)]


@pytest.mark.parametrize("bad", ["", "a,b", "1,2,3,4", "-1,2,0", "0,0,0"])
def test_bad_split_names_flag(bad):
    with pytest.raises(ValueError, match="--split"):
        parse_split(bad)


def test_data_path_forms():
    assert parse_data_path(["a", "b"]) == ([0.5, 0.5], ["a", "b"])
    weights, prefixes = parse_data_path(["0.3", "a", "0.9", "b"])
    assert prefixes == ["a", "b"] and np.allclose(weights, [0.25, 0.75])


BAD_DATA_PATHS = [[], ["0.3", "a", "0.7"], ["a", "0.5", "b"], ["0.3", "a", "b", "c"], ["0", "a"]]


@pytest.mark.parametrize("bad", BAD_DATA_PATHS)
def test_bad_data_path_names_flag(bad):
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(bad)


def test_blending_tracks_weights_at_every_prefix():
    weights = [0.2, 0.5, 0.3]
    dataset_index, sample_index = blending_indices(weights, 2000)
    for d, weight in enumerate(weights):
        mine = dataset_index == d
        counts = np.cumsum(mine)
        assert np.all(np.abs(counts - weight * np.arange(1, 2001)) <= 1.0)
        assert sample_index[mine].tolist() == list(range(mine.sum()))  # each dataset read in order


def test_blended_dataset_serves_component_items():
    blended = BlendedDataset([list("abcdefgh"), list("ABCDEFGH")], [0.25, 0.75], 8)
    assert [blended[i] for i in range(8)] == ["A", "a", "B", "C", "b", "D", "E", "F"]  # ties go to the first
    with pytest.raises(ValueError, match="only 2"):
        BlendedDataset([list("abcdefgh"), list("AB")], [0.25, 0.75], 8)


def test_build_datasets_splits_documents(tmp_path):
    prefix = make_prefix(tmp_path / "a", first_token=0)
    train, valid, test = build_datasets([prefix], "30,10,0", 16, 0, (50, 10, 10), False, 1000)
    assert test is None
    assert sorted(set(train.document_index.tolist())) == list(range(30))
    assert sorted(set(valid.document_index.tolist())) == list(range(30, 40))
    assert len(train) >= 50 and len(valid) >= 10
    assert set(train[0]["tokens"].tolist()) <= set(range(30))


def test_build_datasets_blends_prefixes_by_weight(tmp_path):
    a = make_prefix(tmp_path / "a", first_token=0)
    b = make_prefix(tmp_path / "b", first_token=500)
    train, valid, test = build_datasets(["0.25", a, "0.75", b], "1,1,0", 8, 0, (400, 0, 5), False, 1000)
    assert valid is None and test is None and len(train) == 400
    from_b = sum(train[i]["tokens"][0].item() >= 500 for i in range(400))
    assert from_b == 300
    only_b, _, _ = build_datasets(["0", str(tmp_path / "absent"), "2", b], "1,0,0", 8, 0, (50, 0, 0), False, 1000)
    assert all(only_b[i]["tokens"][0].item() >= 500 for i in range(50))


def test_build_datasets_mock_and_missing_prefix(tmp_path):
    train, valid, test = build_datasets([], "9,1,0", 16, 0, (20, 5, 5), True, 64)
    assert len(train) >= 20 and len(valid) >= 5 and test is None
    assert train[0]["tokens"].shape == (16,)
    with pytest.raises(FileNotFoundError, match="--data-path"):
        build_datasets([str(tmp_path / "nope")], "1,0,0", 16, 0, (10, 0, 0), False, 64)


def test_split_without_documents_names_flag(tmp_path):
    prefix = make_prefix(tmp_path / "few", first_token=0, num_docs=3)
    with pytest.raises(ValueError, match="--split"):
        build_datasets([prefix], "98,1,1", 8, 0, (10, 10, 0), False, 64)
