"""The ``--data-path`` and ``--split`` values, parsed and checked without reading any file.

``--data-path`` is either prefixes (equal weights) or alternating weights and prefixes:
``["prefix1", "prefix2"]`` or ``["0.3", "prefix1", "0.7", "prefix2"]``. ``--split`` gives
the train/valid/test proportions, e.g. "969,30,1". Every error names its flag, so
config validation reports them at start-up.
"""

from __future__ import annotations

import math


def parse_data_path(data_path: list[str]) -> tuple[list[float], list[str]]:
    """(normalised weights, prefixes) from a ``--data-path`` list."""
    if not data_path:
        raise ValueError("--data-path is empty; give dataset prefixes, or use --mock-data")
    if not _is_number(data_path[0]):
        if any(_is_number(entry) for entry in data_path):
            raise ValueError(
                f"--data-path {' '.join(data_path)}: weights must come first and alternate with "
                "prefixes (WEIGHT PREFIX WEIGHT PREFIX ...), or be left out entirely"
            )
        return [1.0 / len(data_path)] * len(data_path), list(data_path)
    weights, prefixes = data_path[0::2], data_path[1::2]
    if len(data_path) % 2 or not all(_is_number(w) for w in weights) or any(_is_number(p) for p in prefixes):
        raise ValueError(
            f"--data-path {' '.join(data_path)}: expected WEIGHT PREFIX pairs (e.g. 0.3 a 0.7 b)"
        )
    values = [float(w) for w in weights]
    if any(w < 0 or not math.isfinite(w) for w in values) or sum(values) <= 0:
        raise ValueError(f"--data-path weights must be non-negative and not all zero, got {weights}")
    return [w / sum(values) for w in values], prefixes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_split(split: str) -> list[float]:
    """Normalised train/valid/test shares from e.g. "969,30,1" (missing shares are 0)."""
    parts = split.replace("/", ",").split(",")
    try:
        shares = [float(part) for part in parts]
    except ValueError:
        raise ValueError(
            f"--split {split!r}: expected up to 3 comma-separated numbers, e.g. 969,30,1"
        ) from None
    if len(shares) > 3 or any(s < 0 or not math.isfinite(s) for s in shares) or sum(shares) <= 0:
        raise ValueError(f"--split {split!r}: expected up to 3 non-negative numbers with a positive sum")
    shares += [0.0] * (3 - len(shares))
    return [s / sum(shares) for s in shares]
