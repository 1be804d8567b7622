"""scripts/preprocess_data.py end to end, run as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from megadual.data.indexed_dataset import IndexedDataset
from megadual.data.tokenizer import build_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "preprocess_data.py"
TEXTS = [f"# file {i}\nclass Shape{i}:\n    sides = {i % 7}\n" + "pass\n" * (i % 4) for i in range(120)]


def preprocess(*args):
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                            check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def test_jsonl_with_trained_tokenizer_is_identical_for_any_worker_count(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}" / "corpus"
        result = preprocess("--input", corpus, "--output-prefix", prefix, "--append-eod",
                            "--workers", workers, "--vocab-size", 300, "--log-interval", 50)
        assert "processed 100 documents" in result.stderr and "MB/s" in result.stderr
        assert f"{prefix}_tokenizer.json" in result.stdout
        outputs[workers] = [Path(f"{prefix}{suffix}").read_bytes()
                            for suffix in ("_text_document.bin", "_text_document.idx", "_tokenizer.json")]
    assert outputs[1] == outputs[2]

    prefix = tmp_path / "w2" / "corpus"
    tokenizer = build_tokenizer("HuggingFaceTokenizer", f"{prefix}_tokenizer.json", None)
    dataset = IndexedDataset(f"{prefix}_text_document")
    assert dataset.dtype == np.uint16 and len(dataset) == len(TEXTS)
    for i in (0, 57, 119):
        tokens = dataset[i].tolist()
        assert tokens[-1] == tokenizer.eod
        assert tokenizer.detokenize(tokens[:-1]) == TEXTS[i]


def test_text_files_with_null_tokenizer_one_document_per_file(tmp_path):
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    files[0].write_text("1 2 3\n70000\n")
    files[1].write_text("4")
    prefix = tmp_path / "out" / "nums"
    preprocess("--input", *files, "--input-format", "text", "--output-prefix", prefix,
               "--tokenizer-type", "NullTokenizer", "--vocab-size", 70001)
    dataset = IndexedDataset(f"{prefix}_text_document")
    assert dataset.dtype == np.int32  # vocabulary too large for uint16
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[1, 2, 3, 70000], [4]]


def test_missing_json_key_is_reported_with_line_and_flag(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "1 2"}\n{"body": "3"}\n')
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(corpus), "--output-prefix", str(tmp_path / "x"),
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"],
        check=False, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert f"{corpus}:2" in result.stderr and "--json-keys" in result.stderr


def test_a_failed_run_leaves_the_previous_dataset_and_names_the_bad_input(tmp_path):
    def run(*inputs):
        return subprocess.run([sys.executable, str(SCRIPT), "--input", *map(str, inputs), "--output-prefix",
                               str(tmp_path / "out"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"],
                              check=False, capture_output=True, text=True)

    good, not_utf8, empty = tmp_path / "good.jsonl", tmp_path / "latin1.jsonl", tmp_path / "empty.jsonl"
    good.write_text('{"text": "1 2"}\n{"text": "3"}\n')
    not_utf8.write_bytes(b'{"text": "1"}\n\n{"text": "caf\xe9"}\n')
    empty.write_text("\n")
    assert run(good).returncode == 0
    written = {path.name: path.read_bytes() for path in tmp_path.glob("out_*")}

    failed = run(good, not_utf8)  # fails after the first file's documents were written
    assert failed.returncode != 0 and f"{not_utf8}:3: not UTF-8" in failed.stderr
    assert run(empty).stderr.strip() == f"preprocess_data.py: error: --input {empty}: no documents (the file is " \
                                        "empty or blank)"
    assert {path.name: path.read_bytes() for path in tmp_path.glob("out_*")} == written  # no .tmp left either
    assert os.listdir(tmp_path / ".out.versions") == ["1"]  # nor the failed runs' unpublished versions
