"""A save that failed because the disk is full or a file reached the process's size limit, said in
words: the serializer reports either as its own internal failure ("[enforce fail at
inline_container.cc] unexpected pos ..."), which names neither cause."""
from __future__ import annotations

import os
import resource

_NEARLY_FULL = 1 << 20  # bytes free below which a failed write is put down to a full disk


def in_words(problem: str, staging: str, root: str) -> str:
    """`problem` (a failed save's message), or in its place what stopped it when that was the file size limit
    (RLIMIT_FSIZE, `ulimit -f`) or a full disk under `root`. `staging`: the folder being written."""
    if "No space left on device" in problem:
        return problem
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and ("File too large" in problem or _largest_file(staging) >= limit):
        return (f"file size limit reached: a checkpoint file grew to the limit of {limit} bytes that "
                f"`ulimit -f` (RLIMIT_FSIZE) sets for this process")
    free = _free_bytes(root)
    if free is not None and free < _NEARLY_FULL:
        return f"no space left on the device holding {root} ({free} bytes free)"
    return problem


def _largest_file(folder: str) -> int:
    sizes = [0]
    for parent, _, files in os.walk(folder):
        sizes += [os.path.getsize(os.path.join(parent, name)) for name in files]
    return max(sizes)


def _free_bytes(root: str) -> int | None:
    try:
        stat = os.statvfs(root)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize
