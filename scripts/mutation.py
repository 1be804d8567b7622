"""One planted bug: a text to replace once in one file, and the tests that must then fail."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    description: str
