"""Pretraining sampler: DP ranks split each global batch, and resuming repeats nothing."""

import itertools

import pytest
import torch
from torch.utils.data import Dataset

from megadual.data.sampler import PretrainingSampler, build_loader


class IndexDataset(Dataset):
    """Item i is a sample whose every token is i, so batches reveal their indices."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return {"tokens": torch.full((4,), i), "labels": torch.full((4,), i + 1)}


def rank_batches(consumed, mbs, rank, dp):
    return [batch["tokens"][:, 0].tolist() for batch in build_loader(IndexDataset(), consumed, mbs, rank, dp)]


def test_dp_ranks_partition_each_global_batch():
    mbs, dp = 2, 3
    per_rank = [rank_batches(0, mbs, rank, dp) for rank in range(dp)]
    assert all(len(batches) == 50 // (mbs * dp) for batches in per_rank)
    for step, batches in enumerate(zip(*per_rank)):
        global_batch = list(itertools.chain(*batches))
        assert global_batch == list(range(step * mbs * dp, (step + 1) * mbs * dp))


def test_resume_yields_the_batches_a_fresh_run_yields_next():
    mbs, dp = 2, 2
    for rank in range(dp):
        fresh = rank_batches(0, mbs, rank, dp)
        resumed = rank_batches(12, mbs, rank, dp)
        assert resumed == fresh[12 // (mbs * dp):]


def test_batch_shapes_and_labels():
    batch = next(build_loader(IndexDataset(), 0, 3, 0, 1))
    assert batch["tokens"].shape == (3, 4) and batch["labels"].shape == (3, 4)
    assert torch.equal(batch["labels"], batch["tokens"] + 1)


def test_batches_carry_their_global_sample_ids_and_ranks_that_read_nothing_get_only_those():
    read = build_loader(IndexDataset(), 12, 2, 1, 2)
    ids_only = build_loader(IndexDataset(), 12, 2, 1, 2, read=False)
    for _ in range(3):
        batch, ids = next(read), next(ids_only)
        assert batch["sample_ids"].tolist() == batch["tokens"][:, 0].tolist()
        assert ids.keys() == {"sample_ids"} and torch.equal(ids["sample_ids"], batch["sample_ids"])


@pytest.mark.parametrize("args", [(50, 51, 1, 0, 1), (50, 0, 0, 0, 1), (50, 0, 1, 2, 2), (0, 0, 1, 0, 1)])
def test_bad_arguments_rejected(args):
    with pytest.raises(ValueError):
        PretrainingSampler(*args)
