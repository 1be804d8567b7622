"""Megatron-LM's indexed dataset: ``PREFIX.bin`` (tokens back to back) + ``PREFIX.idx``.

The ``.idx`` layout, little-endian and unpadded, is the one Megatron-LM writes:

    b"MMIDIDX\\x00\\x00"   magic (9 bytes)
    uint64               version, always 1
    uint8                dtype code of the tokens in .bin (see ``DTYPE_CODES``)
    uint64               sequence count N
    uint64               document-index count D
    int32[N]             sequence lengths, in tokens
    int64[N]             byte offset of each sequence in .bin
    int64[D]             document indices: 0, then the end (in sequences) of each document

Files written here are readable by Megatron-LM and the other way round. Every check a
reader can make cheaply is made when the dataset is opened, so a bad file fails before
training starts with a ``DataFileError`` naming the file.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO, NoReturn

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document-index count
_HEADER = struct.Struct("<9sQBQQ")
HEADER_SIZE = _HEADER.size  # 34

DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}
_CHECK_CHUNK = 1 << 22  # sequences per step of the layout check, to bound its memory
_MISMATCH = "the .idx's dtype does not match the .bin (relabelled?), or the two come from different runs"


class DataFileError(ValueError):
    """A ``.bin``/``.idx`` file exists but is corrupt, truncated or not an indexed dataset."""


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """The token dtype Megatron-LM picks for a vocabulary: uint16 below 65,500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


class IndexedDatasetBuilder:
    """Writes one document (= one sequence) at a time to ``.bin``; ``finalize`` writes ``.idx``."""

    def __init__(self, bin_file: str, dtype: type[np.number] = np.int32) -> None:
        if np.dtype(dtype) not in _CODE_OF_DTYPE or np.dtype(dtype).kind not in "iu":
            raise ValueError(f"unsupported token dtype {dtype}; choose one of {list(_CODE_OF_DTYPE)}")
        self.dtype = np.dtype(dtype)
        self._bin: BinaryIO = open(bin_file, "wb")  # noqa: SIM115 (closed by finalize)
        self._sequence_lengths: list[int] = []

    def add_document(self, tokens) -> None:
        """Append one document's token ids (any int sequence or array)."""
        array = np.asarray(tokens)
        if array.size and self.dtype.kind in "iu":
            limits = np.iinfo(self.dtype)
            if array.min() < limits.min or array.max() > limits.max:
                raise ValueError(
                    f"token id out of range for {self.dtype} ([{array.min()}, {array.max()}]); "
                    "the vocabulary is larger than the dataset dtype allows"
                )
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sequence_lengths.append(int(array.size))

    def finalize(self, idx_file: str) -> None:
        """Close ``.bin`` and write the matching ``.idx``."""
        self._bin.close()
        lengths = np.asarray(self._sequence_lengths, dtype=np.int64)
        pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * self.dtype.itemsize
        count = len(lengths)
        # one sequence per document, so document i ends at sequence i + 1
        document_indices = np.arange(count + 1, dtype=np.int64)
        with open(idx_file, "wb") as out:
            out.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[self.dtype], count, count + 1))
            out.write(lengths.astype("<i4").tobytes())
            out.write(pointers.astype("<i8").tobytes())
            out.write(document_indices.astype("<i8").tobytes())


class IndexedDataset:
    """Read-only, memory-mapped view of ``PREFIX.bin``/``PREFIX.idx``; item i is sequence i."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.idx_file, self.bin_file = idx_path(prefix), bin_path(prefix)
        resolved = os.path.realpath(self.idx_file).removesuffix(".idx")
        # a symlinked .idx (preprocess_data.py publishes through one): its .bin is the one beside
        # it, so both come from one version even while a newer one is being published
        if os.path.islink(self.idx_file) and os.path.isfile(bin_path(resolved)):
            self.idx_file, self.bin_file = idx_path(resolved), bin_path(resolved)
        self._open()

    def _open(self) -> None:
        for path in (self.idx_file, self.bin_file):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"indexed dataset file {path} not found (from --data-path prefix {self.prefix!r}; "
                    "give the prefix without .bin/.idx)"
                )
        self._read_index()
        self._tokens = self._map_tokens()

    def _read_index(self) -> None:
        size = os.path.getsize(self.idx_file)
        if size < HEADER_SIZE:
            self._fail(self.idx_file, f"truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
        index = np.memmap(self.idx_file, dtype=np.uint8, mode="r")
        magic, version, code, count, doc_count = _HEADER.unpack(bytes(index[:HEADER_SIZE]))
        if magic != MAGIC:
            self._fail(self.idx_file, f"bad magic {magic!r}, expected {MAGIC!r}: not a Megatron .idx file")
        if version != VERSION:
            self._fail(self.idx_file, f"unknown version {version}, only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            self._fail(self.idx_file, f"unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
        expected = HEADER_SIZE + 12 * count + 8 * doc_count
        # Megatron's multimodal datasets append one int8 mode per sequence
        if size not in (expected, expected + count):
            self._fail(
                self.idx_file,
                f"{size} bytes but its header ({count} sequences, {doc_count} document indices) "
                f"needs {expected}: the file is truncated or corrupt",
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        if self.dtype.kind not in "iu":
            self._fail(self.idx_file, f"dtype code {code} says {self.dtype.name} tokens, but token ids are integers "
                                      f"(codes {sorted(c for c, t in DTYPE_CODES.items() if np.dtype(t).kind in 'iu')})")
        lengths_end = HEADER_SIZE + 4 * count
        pointers_end = lengths_end + 8 * count
        self.sequence_lengths = index[HEADER_SIZE:lengths_end].view("<i4")
        self.sequence_pointers = index[lengths_end:pointers_end].view("<i8")
        self.document_indices = index[pointers_end : pointers_end + 8 * doc_count].view("<i8")
        self._check_document_indices(count)

    def _check_document_indices(self, count: int) -> None:
        docs = self.document_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != count or np.any(np.diff(docs) < 0):
            self._fail(
                self.idx_file,
                f"document indices must rise from 0 to the sequence count {count}: the file is corrupt",
            )
        if np.any(self.sequence_lengths < 0) or np.any(self.sequence_pointers < 0):
            self._fail(self.idx_file, "negative sequence length or pointer: the file is corrupt")

    def _map_tokens(self) -> np.ndarray:
        size, end = os.path.getsize(self.bin_file), self._data_end()
        if size < end:
            self._fail(self.bin_file, f"truncated: {size} bytes but {self.idx_file} points to data up to byte {end}")
        if size > end:
            self._fail(self.idx_file, f"describes {end // self.dtype.itemsize} tokens of {self.dtype.name} "
                                      f"({end} bytes) but {self.bin_file} holds {size} bytes: {_MISMATCH}")
        if size == 0:  # np.memmap cannot map an empty file
            return np.empty(0, dtype=np.uint8)
        return np.memmap(self.bin_file, dtype=np.uint8, mode="r")

    def _data_end(self) -> int:
        """Where the last sequence ends in ``.bin``, after checking that the sequences lie back to
        back from byte 0 with this dtype's stride (as every Megatron writer puts them)."""
        itemsize, end = self.dtype.itemsize, 0
        for start in range(0, len(self), _CHECK_CHUNK):
            sizes = self.sequence_lengths[start : start + _CHECK_CHUNK].astype(np.int64) * itemsize
            expected = end + np.cumsum(sizes) - sizes
            wrong = np.flatnonzero(self.sequence_pointers[start : start + _CHECK_CHUNK] != expected)
            if len(wrong):
                i = int(wrong[0])
                self._fail(self.idx_file, f"sequence {start + i} starts at byte {self.sequence_pointers[start + i]}"
                                          f", but with {itemsize}-byte {self.dtype.name} tokens the sequences "
                                          f"before it end at byte {expected[i]}: {_MISMATCH}")
            end = int(expected[-1] + sizes[-1])
        return end

    @staticmethod
    def _fail(path: str, problem: str) -> NoReturn:
        raise DataFileError(f"indexed dataset file {path}: {problem}")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def all_tokens(self) -> np.ndarray:
        """Every token of ``.bin`` in file order (a memory-mapped view, nothing is read yet)."""
        return self._tokens.view(self.dtype)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``idx`` (to its end when length is None)."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences in {self.prefix}")
        sequence_length = int(self.sequence_lengths[idx])
        if length is None:
            length = sequence_length - offset
        if offset < 0 or length < 0 or offset + length > sequence_length:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) outside sequence {idx} of {sequence_length} tokens"
            )
        start = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return self._tokens[start : start + length * self.dtype.itemsize].view(self.dtype)

    def __getstate__(self) -> tuple[str, str, str]:
        # memory maps do not pickle; reopen the same files (e.g. in a DataLoader worker), not a
        # version preprocess_data.py published since
        return self.prefix, self.idx_file, self.bin_file

    def __setstate__(self, state: tuple[str, str, str]) -> None:
        self.prefix, self.idx_file, self.bin_file = state
        self._open()
