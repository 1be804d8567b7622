"""Resumable pretraining sampler and loader (Megatron's ``MegatronPretrainingSampler``).

The dataset is read in order from ``consumed_samples`` on. Each step takes the next
``micro_batch_size * dp_size`` samples (one micro-batch per DP rank) and gives DP rank r
the r-th contiguous slice of them. Because the position is just the global count of
consumed samples, resuming from a checkpoint continues with exactly the batches an
uninterrupted run would have seen. A trailing partial step is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class PretrainingSampler(Sampler[list[int]]):
    """Yields, per step, the sample indices of DP rank ``dp_rank``'s micro-batch."""

    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        if total_samples < 1:
            raise ValueError(f"the dataset has no samples (total_samples={total_samples})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed samples {consumed_samples} outside the dataset's {total_samples} samples; "
                "was the checkpoint written for other data (--data-path, --split)?"
            )
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"DP rank {dp_rank} outside a DP group of {dp_size}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def global_step_samples(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_step_samples

    def __iter__(self) -> Iterator[list[int]]:
        first = self.dp_rank * self.micro_batch_size
        for step_start in range(self.consumed_samples, self.total_samples - self.global_step_samples + 1,
                                self.global_step_samples):
            start = step_start + first
            yield list(range(start, start + self.micro_batch_size))


class _WithSampleIds(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "sample_ids": i}


def build_loader(
    dataset: Dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int, read: bool = True,
    documents: Callable[[torch.Tensor], object] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Iterator of {"tokens": [mbs, seq], "labels": [mbs, seq], "sample_ids": [mbs]} for this DP rank:
    the sample ids are the samples' global indices (which key the dropout masks). With
    `read=False` (a pipeline rank holding no first or last stage) only the sample ids. With
    `documents` (data/documents.py's boundaries_of) also "documents": documents(tokens)."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    if not read:
        return ({"sample_ids": torch.tensor(ids)} for ids in sampler)
    batches = iter(DataLoader(_WithSampleIds(dataset), batch_sampler=sampler, num_workers=0))
    if documents is None:
        return batches
    return ({**batch, "documents": documents(batch["tokens"])} for batch in batches)
