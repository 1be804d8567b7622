#!/usr/bin/env python
"""Tokenize a corpus into Megatron indexed datasets (``PREFIX_KEY_document.{bin,idx}``).

Input (``--input``, one or more files):
  --input-format json  (default) JSON lines; each ``--json-keys`` field (default: text) of
                       a line is one document, written to ``PREFIX_KEY_document.*``.
  --input-format text  each input FILE is one document (multi-line text, e.g. source
                       files), written to ``PREFIX_text_document.*``. For one document
                       per line, write JSON lines instead.

Tokenizer: ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json``, or
``NullTokenizer --vocab-size N``. With HuggingFaceTokenizer and no ``--tokenizer-model``,
a byte-level BPE of ``--vocab-size`` (default 8192) is trained on the input first and
saved as ``PREFIX_tokenizer.json``.

Publishing: the tokenizer, ``.bin`` and ``.idx`` are written into a fresh version folder
``.PREFIX.versions/N`` and published together by one rename of the symlink ``.PREFIX.current``,
which the public names (symlinks ``PREFIX_...`` -> ``.PREFIX.current/PREFIX_...``) go through; so
at every moment of a run, killed or failed, they read the complete previous set or the complete
new one (megadual/data/published_files.py, docs/data.md).

Each document is one sequence; ``--append-eod`` ends each with the end-of-document id.
``--workers N`` tokenizes in N processes; the output is the same for any N. Progress goes
to stderr, the paths written to stdout.

Example:
  python scripts/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
      --append-eod --workers 4 --vocab-size 8192
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megadual.data.indexed_dataset import (
    IndexedDatasetBuilder,
    bin_path,
    idx_path,
    optimal_dtype,
)
from megadual.data.published_files import PublishedFiles
from megadual.data.tokenizer import build_tokenizer, train_bpe_tokenizer

DEFAULT_TRAINED_VOCAB = 8192

# (source file, line number or 0 for a whole file, raw text)
Record = tuple[str, int, str]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", nargs="+", required=True, help="input file(s)")
    parser.add_argument("--input-format", choices=("json", "text"), default="json")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields to tokenize")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.{bin,idx}")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the eod id")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--tokenizer-type", default="HuggingFaceTokenizer",
                        choices=("HuggingFaceTokenizer", "NullTokenizer"))
    parser.add_argument("--tokenizer-model", default=None,
                        help="tokenizer.json; trained on the input if absent")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="NullTokenizer vocabulary, or the size of a trained BPE "
                        f"(default {DEFAULT_TRAINED_VOCAB})")
    parser.add_argument("--log-interval", type=int, default=1000, help="report progress every N documents")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.log_interval < 1:
        parser.error(f"--log-interval must be at least 1, got {args.log_interval}")
    for path in args.input:
        if not os.path.isfile(path):
            parser.error(f"--input {path}: no such file")
    if args.input_format == "text":
        args.json_keys = ["text"]
    return args


def iter_records(inputs: list[str], input_format: str) -> Iterator[Record]:
    """The documents of every input file in order; a file with none, or with bytes that are not
    UTF-8, is an error naming it (and the line)."""
    for path in inputs:
        with open(path, "rb") as stream:
            if input_format == "text":
                lines = [(1, stream.read())]
            else:
                lines = ((number, line) for number, line in enumerate(stream, start=1))
            found = False
            for line_number, data in lines:
                if data.strip():
                    found = True
                    yield path, line_number, _decode(data, path, line_number)
        if not found:
            raise ValueError(f"--input {path}: no documents (the file is empty or blank)")


def _decode(data: bytes, path: str, first_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        raise ValueError(f"{path}:{line}: not UTF-8 text ({error.reason})") from None


def record_texts(record: Record, input_format: str, keys: list[str]) -> dict[str, str]:
    """The text of each key in one record."""
    path, line_number, raw = record
    if input_format == "text":
        return {"text": raw}
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line_number}: not valid JSON ({error})") from None
    texts = {}
    for key in keys:
        if not isinstance(fields, dict) or not isinstance(fields.get(key), str):
            raise ValueError(f"{path}:{line_number}: no text field {key!r} (--json-keys)")  # noqa: TRY004
        texts[key] = fields[key]
    return texts


class Encoder:
    """Turns a record into token ids per key (one Encoder per worker process)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
        self.input_format = args.input_format
        self.keys = args.json_keys
        self.append_eod = args.append_eod

    def encode(self, record: Record) -> tuple[dict[str, list[int]], int]:
        documents = {}
        for key, text in record_texts(record, self.input_format, self.keys).items():
            ids = self.tokenizer.tokenize(text)
            documents[key] = ids + [self.tokenizer.eod] if self.append_eod else ids
        return documents, len(record[2].encode("utf-8"))


_encoder: Encoder | None = None


def _init_worker(args: argparse.Namespace) -> None:
    global _encoder
    _encoder = Encoder(args)


def _encode_in_worker(record: Record) -> tuple[dict[str, list[int]], int]:
    return _encoder.encode(record)


def train_tokenizer(args: argparse.Namespace, path: str) -> str:
    """Train a BPE on the input, save it at `path` (in the unpublished version), and return the path."""
    vocab_size = args.vocab_size or DEFAULT_TRAINED_VOCAB
    texts = (text for record in iter_records(args.input, args.input_format)
             for text in record_texts(record, args.input_format, args.json_keys).values())
    started = time.time()
    tokenizer = train_bpe_tokenizer(texts, vocab_size, path)
    print(f"trained a byte-level BPE tokenizer (vocab {tokenizer.vocab_size}) in "
          f"{time.time() - started:.1f}s", file=sys.stderr)
    return path


def encode_records(args: argparse.Namespace, encoder: Encoder) -> Iterator[tuple[dict[str, list[int]], int]]:
    """Encoded records in input order, in this process or in ``--workers`` processes."""
    records = iter_records(args.input, args.input_format)
    if args.workers == 1:
        yield from map(encoder.encode, records)
        return
    # the workers are the parallelism; this also keeps tokenizers quiet about forking
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(args,)) as pool:
        yield from pool.imap(_encode_in_worker, records, chunksize=32)  # imap keeps input order


def write_datasets(args: argparse.Namespace, files: PublishedFiles,
                   outputs: list[str]) -> dict[str, tuple[int, int]]:
    """Tokenize every record into one dataset per key, each file in the unpublished version (its
    public name added to `outputs`); returns {key: (documents, tokens)}."""
    encoder = Encoder(args)
    dtype = optimal_dtype(encoder.tokenizer.vocab_size)
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    outputs += [bin_path(prefix) for prefix in prefixes.values()]
    builders = {key: IndexedDatasetBuilder(files.path(bin_path(prefix)), dtype)
                for key, prefix in prefixes.items()}
    counts = _tokenize_into(builders, args, encoder)
    for key, prefix in prefixes.items():
        outputs.append(idx_path(prefix))
        builders[key].finalize(files.path(idx_path(prefix)))
    return counts


def _tokenize_into(builders: dict[str, IndexedDatasetBuilder], args: argparse.Namespace,
                   encoder: Encoder) -> dict[str, tuple[int, int]]:
    tokens = dict.fromkeys(builders, 0)
    started, total_bytes, documents = time.time(), 0, 0
    for documents_of_record, num_bytes in encode_records(args, encoder):
        for key, ids in documents_of_record.items():
            builders[key].add_document(np.asarray(ids, dtype=np.int64))
            tokens[key] += len(ids)
        documents += 1
        total_bytes += num_bytes
        if documents % args.log_interval == 0:
            elapsed = max(time.time() - started, 1e-9)
            print(f"processed {documents} documents ({documents / elapsed:.0f} docs/s, "
                  f"{total_bytes / elapsed / 1e6:.2f} MB/s)", file=sys.stderr)
    return {key: (documents, tokens[key]) for key in builders}


def _make_folder(prefix: str) -> None:
    folder = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--output-prefix {prefix}: cannot make the folder {folder} ({error.strerror})") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    outputs: list[str] = []  # the public names of the files this run writes
    files = None
    try:
        _make_folder(args.output_prefix)
        files = PublishedFiles(args.output_prefix)
        tokenizer = None
        if args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model is None:
            tokenizer = f"{args.output_prefix}_tokenizer.json"
            outputs.append(tokenizer)
            args.tokenizer_model = train_tokenizer(args, files.path(tokenizer))
        counts = write_datasets(args, files, outputs)
        files.publish(outputs)
    except BaseException as error:
        if files is not None:
            files.abandon()
        if isinstance(error, (ValueError, OSError)):
            sys.exit(f"preprocess_data.py: error: {error}")
        raise
    if tokenizer is not None:
        print(f"tokenizer: {tokenizer}")
    for key, (documents, tokens) in counts.items():
        print(f"dataset: {args.output_prefix}_{key}_document.{{bin,idx}} ({documents} documents, {tokens} tokens)")


if __name__ == "__main__":
    main()
