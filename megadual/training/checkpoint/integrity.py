"""Checksums of a checkpoint's files: recorded after the data is written and before the folder is
published, checked before a checkpoint is loaded.

The manifest lists every file of the folder with its size and CRC-32 (zlib's, the fastest
checksum Python ships): one pass over the bytes, split over the ranks (docs/benchmarks.md).
The size finds a truncated file without reading it; the CRC finds every burst of up to 32
flipped bits and any other corruption but for a chance of 2^-32.
"""
from __future__ import annotations

import json
import os
import re
import zlib

from megadual.training.checkpoint.coordination import Coordination, describe, expected
from megadual.training.checkpoint.layout import MANIFEST, CheckpointError, write_atomically

_CHUNK = 16 << 20
_DCP_SHARD = re.compile(r"__(\d+)_")  # DCP names the files rank r writes __r_N.distcp


def file_checksum(path: str) -> dict:
    """{"size": bytes, "crc32": hex} of the file at `path`, in one pass."""
    crc, size, buffer = 0, 0, bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return {"size": size, "crc32": f"{crc:08x}"}


def files_written_by(folder: str, rank: int, size: int) -> list[str]:
    """The files of a just-written `folder` that `rank` checksums: its own DCP shards (still in its
    page cache); rank 0 takes every other file."""
    def owner(name: str) -> int:
        match = _DCP_SHARD.match(name)
        return int(match.group(1)) if match and int(match.group(1)) < size else 0
    return sorted(name for name in os.listdir(folder) if name != MANIFEST and owner(name) == rank)


def checksums(folder: str, names: list[str]) -> dict[str, dict]:
    return {name: file_checksum(os.path.join(folder, name)) for name in names}


def write_manifest(folder: str, files: dict[str, dict]) -> None:
    write_atomically(os.path.join(folder, MANIFEST),
                     json.dumps({"algorithm": "crc32", "files": dict(sorted(files.items()))}, indent=1))


def read_manifest(folder: str) -> dict[str, dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{MANIFEST} is missing: the save did not complete")
    try:
        with open(path) as f:
            return json.load(f)["files"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{MANIFEST} is unreadable ({e})") from e


def problem_with(folder: str, name: str, expected: dict) -> str | None:
    """What is wrong with one file of `folder`, in words; None when it matches the manifest."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != expected["size"]:
        state = "truncated" if size < expected["size"] else "too long"
        return f"{name} is {state} ({size} bytes, the manifest says {expected['size']})"
    crc = file_checksum(path)["crc32"]
    if crc != expected["crc32"]:
        return f"{name} is corrupt (CRC-32 {crc}, the manifest says {expected['crc32']})"
    return None


def verify(folder: str, coord: Coordination) -> str | None:
    """The first problem with `folder`, the same on every rank (each checks every size-th file);
    None when every file matches its manifest."""
    try:
        manifest = read_manifest(folder)
        mine = sorted(manifest)[coord.rank::coord.size]
        problem = next(filter(None, (problem_with(folder, name, manifest[name]) for name in mine)), None)
    except BaseException as e:
        if not expected(e):
            raise
        problem = describe(e)
    return next(filter(None, coord.gather(problem)), None)
