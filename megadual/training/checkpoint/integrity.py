"""Checksums of a checkpoint's files: recorded after the data is written and before the folder is
published, checked before a checkpoint is loaded.

The manifest lists every file of the folder with its size and CRC-32 (zlib's, the fastest
checksum Python ships): one pass over the bytes, split over the ranks (docs/benchmarks.md).
The size finds a truncated file without reading it; the CRC finds every burst of up to 32
flipped bits and any other corruption but for a chance of 2^-32.

A CRC finds accidents, not tampering: anyone can write a file with the CRC they want. With a
key (--checkpoint-key-file, or the file $MEGADUAL_CHECKPOINT_KEY_FILE names) the manifest also
records each file's SHA-256 and is signed with HMAC-SHA256 over its entries; loading with the
key refuses a manifest that is unsigned or whose signature does not match, and a file whose
SHA-256 differs. Without a key, nothing of this is written or checked.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import zlib

from megadual.training.checkpoint.coordination import Coordination, describe, expected
from megadual.training.checkpoint.layout import MANIFEST, CheckpointError, write_atomically

_CHUNK = 16 << 20
_DCP_SHARD = re.compile(r"__(\d+)_")  # DCP names the files rank r writes __r_N.distcp
KEY_ENV = "MEGADUAL_CHECKPOINT_KEY_FILE"


def checkpoint_key(key_file: str | None) -> bytes | None:
    """The signing key in `key_file` (--checkpoint-key-file), else in the file $MEGADUAL_CHECKPOINT_KEY_FILE
    names; None when neither is given (checkpoints unsigned)."""
    path = key_file or os.environ.get(KEY_ENV)
    if not path:
        return None
    source = "--checkpoint-key-file" if key_file else f"${KEY_ENV}"
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise CheckpointError(f"{source} {path}: {e.strerror}") from None
    if not key:
        raise CheckpointError(f"{source} {path} is empty; it should hold the key checkpoints are signed with")
    return key


def file_checksum(path: str, sha256: bool = False) -> dict:
    """{"size": bytes, "crc32": hex} of the file at `path` (and its "sha256" when asked), in one pass."""
    crc, size, buffer = 0, 0, bytearray(_CHUNK)
    digest = hashlib.sha256() if sha256 else None
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            if digest is not None:
                digest.update(view[:n])
            size += n
    found = {"size": size, "crc32": f"{crc:08x}"}
    if digest is not None:
        found["sha256"] = digest.hexdigest()
    return found


def files_written_by(folder: str, rank: int, size: int) -> list[str]:
    """The files of a just-written `folder` that `rank` checksums: its own DCP shards (still in its
    page cache); rank 0 takes every other file."""
    def owner(name: str) -> int:
        match = _DCP_SHARD.match(name)
        return int(match.group(1)) if match and int(match.group(1)) < size else 0
    return sorted(name for name in os.listdir(folder) if name != MANIFEST and owner(name) == rank)


def checksums(folder: str, names: list[str], sha256: bool = False) -> dict[str, dict]:
    return {name: file_checksum(os.path.join(folder, name), sha256) for name in names}


def signature(key: bytes, files: dict[str, dict]) -> str:
    """HMAC-SHA256 under `key` of a manifest's entries (names, sizes, checksums)."""
    return hmac.new(key, json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def write_manifest(folder: str, files: dict[str, dict], key: bytes | None = None) -> None:
    """The manifest of `files` (as `checksums` gives them: with their SHA-256 when `key` is given), signed
    with `key` when given."""
    manifest = {"algorithm": "crc32", "files": dict(sorted(files.items()))}
    if key is not None:
        manifest["signature"] = signature(key, files)
    write_atomically(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))


def read_manifest(folder: str, key: bytes | None = None) -> dict[str, dict]:
    """The manifest's entries; with `key`, only when its signature is `key`'s."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{MANIFEST} is missing: the save did not complete")
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("crc32"), str)
                   for e in files.values()):
            raise ValueError("an entry without its size and crc32")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{MANIFEST} is unreadable ({e})") from e
    if key is not None:
        signed = manifest.get("signature")
        if not isinstance(signed, str) or not hmac.compare_digest(signed, signature(key, files)):
            raise CheckpointError(f"its {MANIFEST} is " + ("unsigned" if signed is None else
                                  "not signed with this key, or was altered") + " (--checkpoint-key-file)")
    return files


def problem_with(folder: str, name: str, expected: dict, key: bytes | None = None) -> str | None:
    """What is wrong with one file of `folder`, in words; None when it matches the manifest (with `key`,
    its SHA-256 too)."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != expected["size"]:
        state = "truncated" if size < expected["size"] else "too long"
        return f"{name} is {state} ({size} bytes, the manifest says {expected['size']})"
    found = file_checksum(path, sha256=key is not None)
    if found["crc32"] != expected["crc32"]:
        return f"{name} is corrupt (CRC-32 {found['crc32']}, the manifest says {expected['crc32']})"
    if key is not None and found["sha256"] != expected.get("sha256"):
        return f"{name} is not the file that was signed (its SHA-256 differs from the manifest's)"
    return None


def verify(folder: str, coord: Coordination, key: bytes | None = None) -> str | None:
    """The first problem with `folder`, the same on every rank (each checks every size-th file);
    None when every file matches its manifest (with `key`: a manifest signed with it)."""
    try:
        manifest = read_manifest(folder, key)
        mine = sorted(manifest)[coord.rank::coord.size]
        problem = next(filter(None, (problem_with(folder, name, manifest[name], key) for name in mine)), None)
    except BaseException as e:
        if not expected(e):
            raise
        problem = describe(e)
    return next(filter(None, coord.gather(problem)), None)
