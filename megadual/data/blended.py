"""Blend several datasets by weight, deterministically, as Megatron-LM does.

Sample n of the blend goes to the dataset whose realised count lags its target
``weight * n`` the most (ties to the lowest index), and takes that dataset's next
unused sample. Every prefix of the blend is therefore within one sample per dataset of
the weights, with no randomness involved: component datasets are already shuffled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset


def blending_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each blended sample, index of that sample inside its dataset)."""
    total = float(sum(weights))
    targets = [w / total for w in weights]
    taken = [0] * len(targets)
    dataset_index = np.empty(num_samples, dtype=np.int64)
    sample_index = np.empty(num_samples, dtype=np.int64)
    for n in range(num_samples):
        position = max(n, 1)  # as Megatron: sample 0 is placed as if it were sample 1
        lags = [target * position - count for target, count in zip(targets, taken)]
        chosen = lags.index(max(lags))
        dataset_index[n] = chosen
        sample_index[n] = taken[chosen]
        taken[chosen] += 1
    return dataset_index, sample_index


class BlendedDataset(Dataset):
    """``num_samples`` items drawn from ``datasets`` in proportion to ``weights``."""

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], num_samples: int) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(weights)} for {len(datasets)}")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"blend weights must be non-negative and not all zero, got {list(weights)}")
        self.datasets = list(datasets)
        self.dataset_index, self.dataset_sample_index = blending_indices(weights, num_samples)
        for d, dataset in enumerate(self.datasets):
            needed = int(np.count_nonzero(self.dataset_index == d))
            if needed > len(dataset):
                raise ValueError(
                    f"blend needs {needed} samples of dataset {d}, which has only {len(dataset)}"
                )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int):
        return self.datasets[self.dataset_index[i]][int(self.dataset_sample_index[i])]
