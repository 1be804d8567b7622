"""Tokenizers: BPE training and exact round trip, eod ids, and errors naming the flag."""

import pytest

from megadual.data.tokenizer import build_tokenizer, train_bpe_tokenizer

CORPUS = [f"def area_{i}(radius):\n    return 3.14159 * radius ** {i % 3 + 1}\n" for i in range(200)]


def test_trained_bpe_round_trips_any_text(tmp_path):
    path = tmp_path / "tokenizer.json"
    trained = train_bpe_tokenizer(iter(CORPUS), 320, str(path))
    loaded = build_tokenizer("HuggingFaceTokenizer", str(path), None)
    assert path.is_file() and loaded.vocab_size == trained.vocab_size == 320
    assert loaded.detokenize([loaded.eod]) == "<|endoftext|>"
    for text in [CORPUS[5], "naïve 日本語 ✓\ttabs\r\n", ""]:
        ids = loaded.tokenize(text)
        assert loaded.detokenize(ids) == text
        assert all(0 <= i < loaded.vocab_size for i in ids)
    # merges were learned: the training text takes fewer tokens than bytes
    assert len(loaded.tokenize(CORPUS[5])) < len(CORPUS[5].encode()) / 2


def test_null_tokenizer():
    tokenizer = build_tokenizer("NullTokenizer", None, 100)
    assert tokenizer.vocab_size == 100 and tokenizer.eod == 99
    assert tokenizer.tokenize(" 5 17\n3 ") == [5, 17, 3]
    assert tokenizer.detokenize([5, 17, 3]) == "5 17 3"
    with pytest.raises(ValueError, match="--vocab-size"):
        tokenizer.tokenize("100")
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer", None, None)


def test_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", None, None)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing.json"), None)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "bad.json"), None)
    with pytest.raises(ValueError, match="--tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer", None, None)
